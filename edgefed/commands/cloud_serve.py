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
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus /metrics here: sessions, memory used against its bound, queued tokens, "
                        "counters (port 0: any free port, printed)")
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
    if args.metrics:
        http = serve_metrics(args.metrics, server.manager.metrics)
        print(f"cloud metrics on http://{args.metrics.rpartition(':')[0] or '127.0.0.1'}:{http.server_port}/metrics",
              flush=True)
    print(f"cloud tier listening on {args.host}:{server.port} (layers [{args.split}, "
          f"{server.manager.model.config.num_layers}))", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()
    print("cloud tier stopped", file=sys.stderr)
    return 0


def serve_metrics(where: str, read):
    """Prometheus /metrics for the cloud tier on HOST:PORT, in a daemon thread; returns the HTTP server."""
    from prometheus_client import start_http_server

    from coordinator.metrics import cloud_registry

    host, sep, port = where.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"edgefed cloud-serve: --metrics must be HOST:PORT, got {where!r}")
    http, _ = start_http_server(int(port), addr=host or "127.0.0.1", registry=cloud_registry(read))
    return http
