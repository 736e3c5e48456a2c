"""`edgefed serve`: one rank of a long-lived serving group (edge_node.serving).

    edgefed serve --run-config FILE --rank R --master HOST:PORT [--listen HOST:PORT]
                  [--tls-dir DIR | --insecure] [--ready-file PATH] [--iface NAME]

Every rank of the group runs it with the same run configuration (shards, or a model directory for one rank).
Rank 0 serves the Inference gRPC service on --listen (port 0: a free one) and, once the model is loaded and
every rank has joined, writes {"address", "host", "port", "rank", "world", "tls", "pid", "config_sha256"} to
--ready-file (ranks > 0 write theirs with "address": null). The run configuration's prompt_ids,
max_new_tokens, sampling and logprobs are not used here: each request carries its own. A run configuration with
`exits` (exit heads, cloud tier, split) also serves early-exit requests (each picks its mode and threshold).

SIGTERM or SIGINT: the running request is cancelled at its next token, the group stopped, exit 0. A peer rank
that dies fails the running request with UNAVAILABLE and the process exits 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from edgefed.args import non_negative_int


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model (or one rank of a tensor-parallel group) over gRPC")
    p.add_argument("--run-config", required=True, help="the run configuration as JSON, in a file or - for stdin")
    p.add_argument("--rank", type=non_negative_int, default=0)
    p.add_argument("--master", help="HOST:PORT of rank 0's rendezvous (needed for more than one rank)")
    p.add_argument("--listen", default="127.0.0.1:0", help="rank 0: HOST:PORT to serve on (default 127.0.0.1:0, "
                   "a free port)")
    sec = p.add_mutually_exclusive_group(required=True)
    sec.add_argument("--tls-dir", help="mutual TLS: the node's ca.pem, node.pem, node.key (`edgefed certs node`); "
                     "only the coordinator's certificate is served")
    sec.add_argument("--insecure", action="store_true", help="plain text, no authentication (testing only)")
    p.add_argument("--ready-file", help="written (JSON) once the model is loaded and the group is joined")
    p.add_argument("--iface", help="network interface the ranks talk over (default: the one that routes to "
                   "--master)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edge_node.run_config import RunConfig
    from edge_node.serving import ServeOptions, Serving

    text = sys.stdin.read() if args.run_config == "-" else Path(args.run_config).read_text()
    cfg = RunConfig.from_json(text)
    credentials = peers = None
    if args.tls_dir:
        from edge_node.tls import COORDINATOR_NAME, server_credentials

        credentials, peers = server_credentials(args.tls_dir), (COORDINATOR_NAME,)
    elif args.rank == 0:
        print(f"edgefed serve: warning: --insecure: serving {args.listen} in plain text; anyone who can reach it "
              f"can run the model", file=sys.stderr, flush=True)
    serving = Serving(cfg, args.rank, args.master,
                      ServeOptions(args.listen, credentials, peers, args.ready_file, args.iface))

    def stop(_signum, _frame) -> None:
        serving.shutdown()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    code = _serve(serving)
    if serving.error is not None:
        print(f"edgefed serve: error: {serving.error}", file=sys.stderr, flush=True)
    # A group with a dead peer (or left mid-wait) cannot be torn down cleanly: gloo's destructors would abort
    # or block, so leave at once with the status.
    sys.stdout.flush()
    os._exit(code)


def _serve(serving) -> int:
    from edge_node.model.errors import EdgefedError

    try:
        return serving.run()
    except (EdgefedError, ValueError, OSError) as e:  # the group did not form, a peer vanished while joining,
        serving.error = e                              # bad shards, a port that cannot be bound ...
        return 2
