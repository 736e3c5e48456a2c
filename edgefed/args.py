"""Flags shared by several commands, and their conversion into the frozen configurations packages take."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from edge_node.model.generation_config import repetition_penalty
from npu_backends.options import PrefillOptions

if TYPE_CHECKING:  # torch-backed: imported where used, so that `edgefed --help` stays fast
    from edge_node.model import SamplingConfig, Tokenizer
    from edge_node.run_config import RunConfig

DTYPES = ("float32", "bfloat16", "float16")  # edge_node.run_config.DTYPES

CHUNKS = (32, 64, 128, 256)
PROVIDERS = ("cpu", "qnn", "openvino", "vitisai", "coreml")  # npu_backends.providers.PROFILES, without importing ORT


def _number(kind: type, test, want: str):
    """An argparse type: `kind` parsed, then `test` applied; the message names what was expected."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not test(value) or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def add_generation_args(p: argparse.ArgumentParser, model_required: bool = True, prompt_required: bool = True) -> None:
    """Flags shared by every command that generates text."""
    if model_required:
        p.add_argument("--model", required=True, help="Hugging Face model directory")
    src = p.add_mutually_exclusive_group(required=prompt_required)
    src.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer.json)")
    src.add_argument("--prompt-ids", type=parse_ids, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default unless --temperature etc.)")
    p.add_argument("--temperature", type=non_negative_float, help="sampling temperature; 0 means greedy")
    p.add_argument("--top-k", type=non_negative_int, default=0)
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--repetition-penalty", type=positive_float,
                   help="penalise tokens already in the sequence (default: generation_config.json's, else 1.0 = off)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="compute dtype (default: float32 for a model, the stored dtype for shards)")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--logprobs", type=non_negative_int, default=0, metavar="K",
                   help="with --json: the top-K log-probabilities at every generated position")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def add_prefill_args(p: argparse.ArgumentParser) -> None:
    """Flags for a runtime command to prefill on ONNX Runtime."""
    p.add_argument("--prefill", choices=["torch", "ort"], default="torch", help="who prefills the prompt")
    p.add_argument("--chunk", type=int, choices=CHUNKS, default=128, help="with --prefill ort")
    p.add_argument("--provider", choices=PROVIDERS, default="cpu", help="with --prefill ort")
    p.add_argument("--strict", action="store_true", help="with --prefill ort: no CPU fall-back")
    p.add_argument("--int8", action="store_true", help="with --prefill ort: W8A8 linear layers")
    p.add_argument("--shadow", action="store_true", help="with --int8: shadow outlier execution")
    p.add_argument("--block", action="store_true", help="with --int8: block-wise int8 weights and dynamic int8 "
                   "activations (ONNX Runtime MatMulNBits, CPU EP)")
    p.add_argument("--token", action="store_true", help="with --int8: per-token dynamic int8 activations with "
                   "Hadamard-rotated inputs and GPTQ-rounded weights (the fastest int8 recipe on a real model)")
    p.add_argument("--token2", action="store_true", help="with --int8: --token plus two-pass activations for o "
                   "and two-level weights for down (~98.4%% top-1 on SmolLM2-135M, ~0.85x --token's speed)")
    p.add_argument("--fine", action="store_true", help="with --int8: every linear's input quantized twice, the "
                   "second pass on an 11x finer grid in the same GEMM (>= 99%% top-1 on SmolLM2-135M, ~0.8x "
                   "--token2's speed)")
    p.add_argument("--graph-dir", help="with --prefill ort: keep and reuse exported graphs")
    p.add_argument("--plain-attention", action="store_true", help="with --prefill ort: attention as standard "
                   "ONNX ops over every past slot, not ONNX Runtime's GroupQueryAttention (for a provider that "
                   "must run every node)")


def sampling_from_args(args: argparse.Namespace, model_dir: str | Path) -> SamplingConfig:
    """CLI flags over the model's generation_config.json defaults (its repetition_penalty)."""
    from edge_node.model import SamplingConfig

    # temperature 0 is greedy, as every other tool reads it (not "sample at the default temperature")
    sampled = not args.greedy and args.temperature != 0 and (args.temperature is not None or args.top_k
                                                              or args.top_p < 1.0)
    penalty = args.repetition_penalty
    if penalty is None:
        penalty = repetition_penalty(model_dir)
    return SamplingConfig(greedy=not sampled, temperature=args.temperature or 1.0,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, repetition_penalty=penalty)


def prompt_from_args(args: argparse.Namespace, model_dir: str | Path) -> tuple[list[int], Tokenizer | None]:
    """Prompt ids and the tokenizer (None when ids were given and no tokenizer.json exists)."""
    from edge_node.model import Tokenizer

    model_dir = Path(model_dir)
    if args.prompt is None and args.prompt_ids is None:
        raise ValueError("give a prompt: --prompt TEXT or --prompt-ids 1,2,3")
    has_tok = (model_dir / "tokenizer.json").is_file()
    tok = Tokenizer.from_dir(model_dir) if args.prompt is not None or has_tok else None
    if args.prompt is None:
        return args.prompt_ids, tok
    text = args.prompt
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}])
    return tok.encode(text, add_special_tokens=not args.chat), tok


def prefill_from_args(args: argparse.Namespace, context: int) -> PrefillOptions | None:
    """ONNX Runtime prefill options for graphs holding `context` tokens, or None for torch prefill."""
    if getattr(args, "prefill", "torch") != "ort":
        return None
    block, token, token2, fine = (getattr(args, f, False) for f in ("block", "token", "token2", "fine"))
    recipes = [flag for flag, on in (("--shadow", args.shadow), ("--block", block), ("--token", token),
                                     ("--token2", token2), ("--fine", fine)) if on]
    if recipes and not args.int8:
        raise ValueError(f"{recipes[0]} needs --int8")
    if len(recipes) > 1:
        raise ValueError(f"{' and '.join(recipes)} are int8 recipes: choose one")
    return PrefillOptions(args.chunk, context, provider=args.provider, strict=args.strict, int8=args.int8,
                          shadow=args.shadow, threads=args.threads, graph_dir=args.graph_dir, block=block,
                          token=token, token2=token2, fine=fine,
                          fused_attention=not getattr(args, "plain_attention", False))


def run_config(args: argparse.Namespace, prompt: list[int], prefill: PrefillOptions | None, *,
               model: str | None = None, shards: str | None = None) -> RunConfig:
    """The one RunConfig of a generation command (every option the user set, in one frozen record)."""
    from edge_node.run_config import RunConfig

    return RunConfig(model=model, shards=shards, prompt_ids=tuple(prompt), max_new_tokens=args.max_new_tokens,
                     sampling=sampling_from_args(args, model or shards), dtype=args.dtype, threads=args.threads,
                     logprobs=args.logprobs, prefill=prefill, window=getattr(args, "window", None),
                     memory_mb=getattr(args, "memory_mb", None), allreduce=getattr(args, "allreduce", "star"),
                     timeout_s=getattr(args, "timeout", 60.0), drop_page_cache=getattr(args, "drop_page_cache", False))


def calibration_texts() -> Iterator[str]:
    """A spread of the stdlib corpus' train split (one file in 50, across packages), read lazily:
    the text int8 prefill graphs are calibrated on."""
    from emulation.corpus import corpus_files

    for path in corpus_files("train")[::50]:
        yield path.read_text(encoding="utf-8")


def emit(result: dict, as_json: bool, text_key: str = "text") -> None:
    if as_json:
        print(json.dumps(result))
        return
    print(result.get(text_key, ""))
