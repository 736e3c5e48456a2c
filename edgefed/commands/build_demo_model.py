"""`edgefed build-demo-model`: train the embedded demo model (emulation.demo_model) from scratch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MINUTES = 14.0  # emulation.demo_model.DEFAULT_MINUTES (not imported here: it loads torch)
PRESETS = ("default", "tiny")  # emulation.demo_model.PRESETS


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "build-demo-model",
        help="train the embedded demo model on the Python standard library",
        description=(
            "Train edgefed's embedded default model from scratch on CPU: a byte-level BPE tokenizer "
            "and a small LlamaForCausalLM on the train split of the Python standard library, "
            "scored on the held-out module files, written as a Hugging Face model directory."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("models/edgefed-demo"), help="output directory")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help=f"time budget for the whole build, 0 for none (default {DEFAULT_MINUTES:g})")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many optimiser steps")
    parser.add_argument("--seed", type=int, default=0, help="seed for init and data order (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all usable)")
    parser.add_argument("--preset", choices=PRESETS, default="default", help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        import transformers  # noqa: F401  (the model class; an optional dependency of edgefed)
    except ModuleNotFoundError:
        print("edgefed build-demo-model: error: needs transformers: pip install 'edgefed[test]'", file=sys.stderr)
        return 2
    from emulation.demo_model import PRESETS, build_demo_model

    result = build_demo_model(args.out, PRESETS[args.preset], minutes=args.minutes, steps=args.steps,
                              seed=args.seed, threads=args.threads, progress=not args.quiet)
    print(
        f"wrote {result.out_dir}: {result.num_parameters:,} parameters, {result.steps} steps, "
        f"{result.tokens_seen:,} tokens, held-out loss {result.heldout_loss:.4f} "
        f"(perplexity {result.heldout_perplexity:.2f}) in {result.total_seconds / 60:.1f} min"
    )
    return 0
