"""`edgefed train-exits`: distil early-exit heads at some layers of a frozen model (KL to its last layer)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edgefed.args import emit, positive_float, positive_int


def _layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated layer indices, got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("--layers needs at least one layer")
    return layers


def add_parser(sub) -> None:
    p = sub.add_parser("train-exits", help="train early-exit heads on a frozen model by distillation")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--layers", required=True, type=_layers, help="exit layers, e.g. 15,20 (the split k among them)")
    p.add_argument("--data", nargs="*", default=None,
                   help="text files or directories of *.py / *.txt (default: the stdlib corpus' train split)")
    p.add_argument("--tokens", type=positive_int, default=4096, help="training tokens (hidden states cached once)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per text chunk")
    p.add_argument("--steps", type=int, default=200, help="Adam steps after the closed-form start (0: none)")
    p.add_argument("--batch", type=positive_int, default=256)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--no-adapter", action="store_true", help="train only the norm (no identity-initialised adapter)")
    p.add_argument("--out", help="exit-head JSON to write (default: MODEL/exits.json, safetensors beside it)")
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def _texts(paths: list[str] | None):
    from emulation.corpus import corpus_files

    if paths is None:
        files = corpus_files("train")
        files = files[:: max(1, len(files) // 400)]  # a spread across packages, not the first few
    else:
        files = []
        for p in map(Path, paths):
            if p.is_dir():
                files += sorted(x for x in p.rglob("*") if x.suffix in (".py", ".txt", ".md") and x.is_file())
            elif p.is_file():
                files.append(p)
            else:
                raise ValueError(f"--data {p}: no such file or directory")
    for f in files:
        try:
            yield f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"--data {f}: not UTF-8 text") from None


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from edge_node.early_exit import ExitHeads, save_exit_heads
    from edge_node.exit_train import ExitTrainConfig, agreement, collect_hidden, token_chunks, train_exit_heads
    from edge_node.model import Tokenizer, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    model_dir = Path(args.model)
    if not (model_dir / "tokenizer.json").is_file():
        raise ValueError(f"{model_dir}: no tokenizer.json to tokenize the training text with")
    t0 = time.perf_counter()
    model = load_model(model_dir)
    cfg = ExitTrainConfig(args.layers, steps=args.steps, batch=args.batch, lr=args.lr, adapter=not args.no_adapter)
    tok = Tokenizer.from_dir(model_dir)
    chunks = token_chunks(_texts(args.data), lambda t: tok.encode(t, add_special_tokens=False), args.seq_len,
                          args.tokens, per_text=1 if args.data is None else None)
    cache = collect_hidden(model, tqdm(chunks, desc="hidden states", unit="chunk", file=sys.stderr), cfg.layers)
    before = agreement(model, ExitHeads.untrained(model.config, cfg.layers, model.norm.weight, adapter=False), cache)
    bar = tqdm(total=cfg.steps, desc="distilling", unit="step", file=sys.stderr)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(kl=f"{loss:.3f}")

    heads = train_exit_heads(model, cache, cfg, on_step)
    bar.close()
    after = agreement(model, heads, cache)
    heads.meta["trained"]["train_top1_untrained"] = before
    heads.meta["trained"]["train_top1"] = after
    out = save_exit_heads(heads, Path(args.out) if args.out else model_dir / "exits.json")
    result = {"exits": str(out), "layers": list(cfg.layers), "tokens": cache.rows, "steps": cfg.steps,
              "train_top1_untrained": before, "train_top1": after,
              "final_kl": heads.meta["trained"]["final_kl"], "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        emit(result, True)
    else:
        for layer in cfg.layers:
            print(f"exit {layer}: top-1 agreement with the last layer on the training text "
                  f"{before[layer]:.1%} untrained -> {after[layer]:.1%}", file=sys.stderr)
        print(f"wrote {out} ({cache.rows} tokens, {cfg.steps} steps, {result['seconds']} s)", file=sys.stderr)
    return 0
