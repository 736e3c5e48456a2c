"""`edgefed generate`: single-node generation with timings."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from edgefed.args import (
    add_generation_args,
    add_prefill_args,
    calibration_texts,
    emit,
    prefill_from_args,
    prompt_from_args,
    run_config,
)


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text on this node")
    add_generation_args(p)
    add_prefill_args(p)
    add_early_exit_args(p)
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter directory (adapter_config.json + "
                   "adapter_model.safetensors) merged into the model as it loads")
    p.set_defaults(run=run)


class TextStream:
    """Prints generated text as it arrives (decoding the whole tail so multi-byte tokens come out whole)."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        if self.tok is None:
            return
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text


def run(args: argparse.Namespace) -> int:
    from edge_node.runtime import generate_local
    from npu_backends.options import round_up

    model_dir = Path(args.model)
    prompt, tok = prompt_from_args(args, model_dir)
    if args.exits is not None or args.exit_mode == "collaborative":
        return run_early_exit(args, model_dir, prompt, tok)
    cfg = run_config(args, prompt, prefill_from_args(args, round_up(len(prompt), args.chunk)), model=str(model_dir))
    if args.adapter:
        cfg = dataclasses.replace(cfg, adapter=args.adapter)
    stream = None
    if not args.json:
        stream = TextStream(tok)
        if args.prompt is not None:
            sys.stdout.write(args.prompt)
    calibration = calibration_texts() if cfg.prefill is not None and cfg.prefill.int8 else ()
    result = generate_local(cfg, on_token=stream, calibration=calibration)
    result["text"] = tok.decode(result["token_ids"]) if tok else ""
    if args.json:
        emit(_with_token_text(result, tok), True)
        return 0
    if tok is None:
        print(",".join(map(str, result["token_ids"])))
    tpot = result["tpot_ms"]
    print(f"\n\n[{len(result['token_ids'])} tokens, stop: {result['stop_reason']}] "
          f"time to first token {result['ttft_ms']:.1f} ms, "
          f"{tpot:.2f} ms/token ({1e3 / tpot if tpot else 0:.1f} tok/s), "
          f"peak RSS {result['peak_rss_mb']:.0f} MB", file=sys.stderr)
    if "prefill_provider" in result:
        print(f"[prefill on ONNX Runtime, {result['prefill_provider']}: {result['prefill_ms']:.1f} ms]",
              file=sys.stderr)
    return 0


def _with_token_text(result: dict, tok) -> dict:
    """Adds each logprobs entry's token text (as the OpenAI API reports it) where a tokenizer exists."""
    if tok is None or "logprobs" not in result:
        return result
    for entry in result["logprobs"]:
        entry["token"] = tok.decode([entry["token_id"]], skip_special_tokens=False)
        for alt in entry["top_logprobs"]:
            alt["token"] = tok.decode([alt["token_id"]], skip_special_tokens=False)
    return result


def add_early_exit_args(p: argparse.ArgumentParser) -> None:
    from edgefed.args import non_negative_float, positive_float, positive_int

    g = p.add_argument_group("early exit (off unless --exits is given)")
    g.add_argument("--exits", metavar="FILE|auto", help="exit heads (exits.json; auto: the ones beside the model)")
    g.add_argument("--threshold", type=non_negative_float, default=0.9,
                   help="in [0, 1]: a token leaves at an exit when its confidence is strictly above it")
    g.add_argument("--exit-criterion", choices=["max_prob", "margin"], default="max_prob")
    g.add_argument("--exit-mode", choices=["standalone", "collaborative"], default="standalone")
    g.add_argument("--split", type=positive_int, help="k: the edge runs [0, k) (default: the last exit layer)")
    g.add_argument("--cloud", metavar="HOST:PORT", help="the cloud tier (`edgefed cloud-serve`), collaborative mode")
    g.add_argument("--codec", choices=["float16", "int8", "float32"], default="float16",
                   help="hidden states sent to the cloud")
    g.add_argument("--cloud-timeout", type=positive_float, default=10.0, help="seconds: every cloud call's deadline")


def run_early_exit(args: argparse.Namespace, model_dir: Path, prompt: list[int], tok) -> int:
    """`generate --exits ...`: the edge's early-exit generation, standalone or with a cloud tier."""
    from edge_node.cloud_link import EarlyExitOptions
    from edge_node.cloud_link import run_early_exit as run_on_edge
    from edge_node.model.config import ModelConfig
    from edge_node.model.formats import TORCH_NAMES
    from edge_node.model.generation_config import eos_ids
    from edgefed.args import sampling_from_args

    if args.prefill != "torch" or getattr(args, "adapter", None):
        raise ValueError("--exits combines with neither --prefill ort nor --adapter yet")
    opts = EarlyExitOptions(args.exits, args.threshold, args.exit_criterion, args.exit_mode, args.cloud,
                            args.split, args.codec, args.cloud_timeout)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run_on_edge(str(model_dir), prompt, args.max_new_tokens, sampling_from_args(args, model_dir),
                         eos_ids(model_dir, ModelConfig.from_dir(model_dir)), opts,
                         TORCH_NAMES[args.dtype or "float32"], on_token=None if args.json else TextStream(tok))
    result["text"] = tok.decode(result["token_ids"]) if tok else ""
    if args.json:
        emit(result, True)
        return 0
    if tok is None:
        print(",".join(map(str, result["token_ids"])))
    print(f"\n\n[{len(result['token_ids'])} tokens, stop: {result['stop_reason']}, {result['exit_mode']}: "
          f"{result['usage']}, cloud: {result['cloud']}] {result['tpot_ms']:.2f} ms/token", file=sys.stderr)
    if result["cloud_error"]:
        print(f"[the cloud tier was {result['cloud']}: {result['cloud_error']}; the edge answered alone]",
              file=sys.stderr)
    return 0
