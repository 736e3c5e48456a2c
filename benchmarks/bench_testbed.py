"""The testbed's latency sweep: tensor-parallel decode on the embedded demo model (2 ranks, every rank a local
process with its link injected) at 0, 5, 10, 20 ms per link, star and gloo allreduce, against the analytic model
(emulation.latency: ms/token(0) + (2 + 2 x layers x hops) x latency).

    .venv/bin/python benchmarks/bench_testbed.py [--model models/edgefed-demo] [--tokens 12] [--repeats 3]

Runs are interleaved over the repeats and medians kept; the table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    from edge_node.model import ModelConfig
    from edge_node.shard import write_shards
    from emulation.latency import sweep, table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "edgefed-demo"))
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--delays", default="0,5,10,20")
    args = ap.parse_args()
    layers = ModelConfig.from_dir(args.model).num_layers
    with tempfile.TemporaryDirectory(prefix="edgefed-bench-testbed-") as tmp:
        shards = Path(tmp) / "s"
        write_shards(args.model, shards, 2)
        rows = sweep(shards, layers, 2, [float(d) for d in args.delays.split(",")], ["star", "gloo"],
                     [1, 2, 3, 4, 5, 6, 7, 8], args.tokens, args.repeats)
    print(f"{machine()}; {Path(args.model).name}, {layers} layers, 2 ranks, {args.tokens} new tokens, "
          f"median of {args.repeats}")
    print(table(rows, layers, 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
