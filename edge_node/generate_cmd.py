"""`edgefed generate`: single-node generation with timings."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from edge_node.model import SamplingConfig, Tokenizer, generate, load_model
from edge_node.model.config import ModelConfig


def add_parser(sub) -> None:
    from edge_node.cli import add_model_args, add_prefill_args

    p = sub.add_parser("generate", help="generate text on this node")
    add_model_args(p)
    add_prefill_args(p)
    p.set_defaults(run=run)


def generation_config(model_dir: Path) -> dict:
    """generation_config.json's fields, or {} when the model has none."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def sampling_from_args(args: argparse.Namespace, model_dir: Path) -> SamplingConfig:
    """CLI flags over the model's generation_config.json defaults (its repetition_penalty)."""
    sampled = not args.greedy and (args.temperature is not None or args.top_k or args.top_p < 1.0)
    penalty = args.repetition_penalty
    if penalty is None:
        penalty = float(generation_config(model_dir).get("repetition_penalty") or 1.0)
    return SamplingConfig(greedy=not sampled, temperature=args.temperature or 1.0,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, repetition_penalty=penalty)


def prompt_from_args(args: argparse.Namespace, model_dir: Path) -> tuple[list[int], Tokenizer | None]:
    """Prompt ids and the tokenizer (None when ids were given and no tokenizer.json exists)."""
    has_tok = (model_dir / "tokenizer.json").is_file()
    tok = Tokenizer.from_dir(model_dir) if args.prompt is not None or has_tok else None
    if args.prompt is None:
        return args.prompt_ids, tok
    text = args.prompt
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}])
    return tok.encode(text, add_special_tokens=not args.chat), tok


def eos_ids(model_dir: Path, config: ModelConfig) -> tuple[int, ...]:
    """generation_config.json's eos_token_id wins over config.json's."""
    value = generation_config(model_dir).get("eos_token_id")
    if value is not None:
        return tuple(value) if isinstance(value, list) else (int(value),)
    return config.eos_token_ids


class TextStream:
    """Prints generated text as it arrives (decoding the whole tail so multi-byte tokens come out whole)."""

    def __init__(self, tok: Tokenizer | None):
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
    from edge_node.cli import emit
    from edge_node.memory import own_peak_rss_mb as peak_rss_mb

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    prompt, tok = prompt_from_args(args, model_dir)
    model = load_model(model_dir, getattr(torch, args.dtype), pack=True)
    stream = None
    if not args.json:
        stream = TextStream(tok)
        if args.prompt is not None:
            sys.stdout.write(args.prompt)
    prefill: dict = {}
    step = _prefill_step(model, model_dir, args, prompt, prefill)
    result = generate(model, prompt, args.max_new_tokens, sampling_from_args(args, model_dir),
                      eos_ids(model_dir, model.config), on_token=stream, step=step)
    text = tok.decode(result.token_ids) if tok else ""
    if args.json:
        emit({"token_ids": result.token_ids, "text": text, "ttft_ms": round(result.ttft_ms, 3),
              "tpot_ms": round(result.tpot_ms, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
              "stop_reason": result.stop_reason, **prefill}, True)
        return 0
    if tok is None:
        print(",".join(map(str, result.token_ids)))
    print(f"\n\n[{len(result.token_ids)} tokens, stop: {result.stop_reason}] "
          f"time to first token {result.ttft_ms:.1f} ms, "
          f"{result.tpot_ms:.2f} ms/token ({1e3 / result.tpot_ms if result.tpot_ms else 0:.1f} tok/s), "
          f"peak RSS {peak_rss_mb():.0f} MB", file=sys.stderr)
    if prefill:
        print(f"[prefill on ONNX Runtime, {prefill['prefill_provider']}: {prefill['prefill_ms']:.1f} ms]",
              file=sys.stderr)
    return 0


def _prefill_step(model, model_dir: Path, args: argparse.Namespace, prompt: list[int], report: dict):
    """With --prefill ort, a decode step whose first call prefills on ONNX Runtime; fills `report`."""
    if getattr(args, "prefill", "torch") != "ort":
        return None
    from npu_backends.build import prefill_step_from_args

    def on_prefill(result) -> None:
        report.update(prefill="ort", prefill_provider=result.provider, prefill_ms=round(result.seconds * 1e3, 3))

    return prefill_step_from_args(model, model_dir, args, len(prompt), on_prefill)
