"""`edgefed cloud-serve`: the cloud tier of early exit (layers [k, L) + head) over gRPC."""

from __future__ import annotations

import argparse
import signal
import sys

from edgefed.args import positive_float, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("cloud-serve", help="serve layers [k, L) of a model as the cloud tier of early exit")
    p.add_argument("--model", required=True, help="Hugging Face model directory (the edge's checkpoint)")
    p.add_argument("--split", required=True, type=positive_int, help="k: the edge runs [0, k), this tier [k, L)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--max-mb", type=positive_float, default=1024.0, help="bound on KV + queued states, all sessions")
    p.add_argument("--session-ttl", type=positive_float, default=300.0, help="seconds before an idle session expires")
    p.add_argument("--threads", type=positive_int)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from coordinator.cloud import CloudLimits
    from coordinator.cloud_server import CloudServer, cloud_manager

    if args.threads:
        torch.set_num_threads(args.threads)
    limits = CloudLimits(max_bytes=int(args.max_mb * 2**20), session_ttl_s=args.session_ttl)
    server = CloudServer(cloud_manager(args.model, args.split, limits), args.host, args.port).start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    print(f"cloud tier listening on {args.host}:{server.port} (layers [{args.split}, "
          f"{server.manager.model.config.num_layers}))", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()
    print("cloud tier stopped", file=sys.stderr)
    return 0
