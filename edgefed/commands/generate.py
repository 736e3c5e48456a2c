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
