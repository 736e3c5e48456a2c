"""The `edgefed` command. Each package contributes its subcommands through add_parser(subparsers)."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. Edge devices and the testbed run several
# processes per core set; spinning workers then steal the core from the one thread with work
# and every parallel region costs a scheduler tick (measured: 56 -> 3.7 ms/token on a busy
# 2-core machine). Must be set before torch loads libgomp; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

from edge_node.model import EdgefedError  # noqa: E402


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    """Flags shared by every command that generates text."""
    if model_required:
        p.add_argument("--model", required=True, help="Hugging Face model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer.json)")
    src.add_argument("--prompt-ids", type=parse_ids, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default unless --temperature etc.)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--repetition-penalty", type=float,
                   help="penalise tokens already in the sequence (default: generation_config.json's, else 1.0 = off)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def add_prefill_args(p: argparse.ArgumentParser) -> None:
    """--prefill torch|ort and its flags, where ONNX Runtime is installed (else torch prefill only)."""
    try:
        from npu_backends.build import add_prefill_args as add
    except ModuleNotFoundError as e:
        if e.name not in ("onnxruntime", "onnx"):
            raise
        return
    add(p)


def _register(sub) -> None:
    from edge_node import generate_cmd

    generate_cmd.add_parser(sub)
    for module in ("emulation.demo_model", "edge_node.shard_cmd", "edge_node.tp_cmd", "npu_backends.cli"):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ModuleNotFoundError as e:
            if e.name != module:  # a real missing dependency, not a package that is not built yet
                raise
            continue
        mod.add_parser(sub)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgefed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except EdgefedError as e:
        print(f"edgefed {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"edgefed {args.command}: error: {e}", file=sys.stderr)
        return 2


def emit(result: dict, as_json: bool, text_key: str = "text") -> None:
    if as_json:
        print(json.dumps(result))
        return
    print(result.get(text_key, ""))


if __name__ == "__main__":
    sys.exit(main())
