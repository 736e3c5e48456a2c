"""`edgefed shard`: split a checkpoint into per-(rank, layer) tensor-parallel shard files + manifest."""

from __future__ import annotations

import argparse
import sys
import time

from edgefed.args import emit, positive_int


def _ratios(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios must be comma-separated numbers, got {text!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser("shard", help="shard a checkpoint for tensor-parallel ranks (streaming, layer by layer)")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--nodes", type=positive_int, required=True, help="number of ranks (at most num_key_value_heads)")
    p.add_argument("--ratios", type=_ratios, help="per-rank shares, e.g. 2,1 (default: even)")
    p.add_argument("--weights", choices=["float32", "bfloat16", "int8"], default="float32",
                   help="shard dtype; int8 = weight-only, one scale per output channel")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace the shards in a non-empty --out directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edge_node.memory import own_peak_rss_mb
    from edge_node.shard import write_shards

    t0 = time.perf_counter()
    m = write_shards(args.model, args.out, args.nodes, args.ratios, args.weights, args.force)
    result = {"out": args.out, "nodes": m["nodes"], "weights": m["weights"], "plan": m["plan"],
              "files": len(m["files"]), "bytes": sum(f["bytes"] for f in m["files"]),
              "seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(own_peak_rss_mb(), 1)}
    if args.json:
        emit(result, True)
    else:
        print(f"wrote {result['files']} files ({result['bytes'] / 2**20:.1f} MiB) to {args.out} "
              f"in {result['seconds']} s, peak RSS {result['peak_rss_mb']} MiB", file=sys.stderr)
    return 0
