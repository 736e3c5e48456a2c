"""`edgefed quantize`: write a weight-only int8 or int4 copy of a checkpoint that `generate` and `shard` load."""

from __future__ import annotations

import argparse
import sys
import time

from edgefed.args import emit


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="offline weight-only int8 / int4 quantization of a checkpoint")
    p.add_argument("--model", required=True, help="Hugging Face model directory (float weights)")
    p.add_argument("--weights", required=True, metavar="int8|int4",
                   help="int8: one scale per output row, or per group of input columns with --group-size; "
                        "int4: group-wise along the input")
    p.add_argument("--group-size", type=int, metavar="32|64|128|256",
                   help="input columns per scale (int4 default 32; int8 default -1: one scale per row)")
    p.add_argument("--lm-head", metavar="float|int8|int4",
                   help="the head's weights (default: float for int8, int8 for int4); int4 decodes fastest")
    p.add_argument("--scale-dtype", metavar="float32|float16|bfloat16",
                   help="group-wise int8's scales and zeros (default float32: each group symmetric or asymmetric, "
                        "whichever fits; float16 the same on float16 values, half their bytes, Q8_0's scale type; "
                        "int4 keeps bfloat16)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace the checkpoint in a non-empty --out directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edge_node.memory import own_peak_rss_mb
    from quant.quantize import quantize_checkpoint

    t0 = time.perf_counter()
    result = quantize_checkpoint(args.model, args.out, args.weights, args.group_size, args.force, args.lm_head,
                                 args.scale_dtype)
    result |= {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(own_peak_rss_mb(), 1)}
    if args.json:
        emit(result, True)
    else:
        print(f"wrote {args.weights} checkpoint to {args.out}: {result['bytes_out'] / 2**20:.1f} MiB "
              f"(from {result['bytes_in'] / 2**20:.1f} MiB) in {result['seconds']} s, "
              f"peak RSS {result['peak_rss_mb']} MiB", file=sys.stderr)
    return 0
