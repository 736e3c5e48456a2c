"""`edgefed coordinator`: the control plane — node registry and liveness (gRPC), deployments, the HTTP API."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from edgefed.args import positive_float


def add_parser(sub) -> None:
    p = sub.add_parser("coordinator", help="run the coordinator: node service, state, HTTP API")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="the node service (gRPC)")
    p.add_argument("--http", metavar="HOST:PORT", help="the HTTP API (OpenAI-compatible, admin, /metrics)")
    p.add_argument("--state", required=True, help="state directory (SQLite, secrets, deployments' shards)")
    sec = p.add_mutually_exclusive_group(required=True)
    sec.add_argument("--tls-dir", help="ca.pem, coordinator.pem, coordinator.key (from `edgefed certs init`)")
    sec.add_argument("--insecure", action="store_true", help="plain text: only on a trusted test network")
    p.add_argument("--heartbeat", type=positive_float, default=3.0, help="seconds between node heartbeats")
    p.add_argument("--lost-after", type=positive_float, default=10.0,
                   help="a node silent for this many seconds is marked lost")
    p.add_argument("--no-replan", action="store_true",
                   help="leave a deployment that lost a rank failed instead of re-planning it on the nodes left")
    p.add_argument("--superlink", metavar="HOST:PORT",
                   help="also run a Flower SuperLink here for federated rounds (nodes join it with `edgefed node "
                        "--superlink`, sessions start with `edgefed fl start --superlink`); it stops with the "
                        "coordinator")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.recovery import Recovery, RecoveryPolicy
    from coordinator.security import SecretStore
    from coordinator.server import NodeServicer, Periodic, ServerConfig, start_server
    from coordinator.state import SqliteState

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("edgefed.coordinator")
    if args.lost_after <= args.heartbeat:
        raise ValueError(f"--lost-after ({args.lost_after}) must exceed --heartbeat ({args.heartbeat})")
    creds = None
    if args.tls_dir:
        from coordinator.security import server_credentials

        creds = server_credentials(args.tls_dir)
    else:
        log.warning("--insecure: the node service is plain text and nodes are known by a bearer secret; "
                    "use --tls-dir outside a trusted test network")
    state = SqliteState(args.state)
    secrets = SecretStore(args.state)
    config = ServerConfig(heartbeat_interval_s=args.heartbeat, lost_after_s=args.lost_after)
    servicer = NodeServicer(state, args.state, config, tls=creds is not None,
                            enroll=lambda token: secrets.consume(token, "enroll") is not None,
                            revoked=lambda cert: cert is not None and secrets.certificate_revoked(cert))
    server, port = start_server(servicer, args.listen, creds)
    loops = [Periodic(servicer.check_liveness, min(1.0, args.heartbeat / 2), "liveness")]
    if not args.no_replan:
        recovery = Recovery(state, args.state, servicer.changes, RecoveryPolicy(fresh_s=2 * args.heartbeat))
        loops.append(Periodic(recovery.step, 1.0, "re-planning"))
    log.info("node service on port %d, state in %s", port, args.state)
    print(f"listening {args.listen.rpartition(':')[0]}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    http = _start_http(args, servicer, state, secrets, stop) if args.http else None
    flower = _start_superlink(args.superlink, args.state) if args.superlink else None
    stop.wait()
    log.info("stopping")
    if flower is not None:
        flower.stop_all()
    if http is not None:
        http.should_exit = True
    for loop in loops:
        loop.stop()
    server.stop(grace=2.0).wait(5.0)
    state.close()
    return 0


def _start_superlink(address: str, state_dir: str):
    """A Flower SuperLink as a supervised child (it dies with the coordinator); returns once it listens."""
    import socket
    import time
    from pathlib import Path

    from edge_node.supervisor import Supervisor
    from federated.runner import superlink_spec

    spec = superlink_spec(address, Path(state_dir) / "flower")
    flower = Supervisor(Path(state_dir) / "flower")
    flower.start(spec)
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if flower.pid(spec.name) is None:
            raise OSError(f"the SuperLink exited before listening on {address}: {flower.exits[spec.name].how}\n"
                          f"{flower.exits[spec.name].stderr_tail[-2000:]}")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                print(f"superlink {address}", flush=True)
                return flower
        except OSError:
            time.sleep(0.2)
    flower.stop_all()
    raise OSError(f"the SuperLink is not listening on {address} after 60 s")


def _start_http(args, servicer, state, secrets, stop):
    """The HTTP API (coordinator.api over the fleet's deployments, plus the admin routes) in a uvicorn thread."""
    import time

    import uvicorn

    from coordinator.admin import admin_router, deploy_handler
    from coordinator.api import create_app
    from coordinator.fleet import FleetDeployments, RequestRecorder
    from coordinator.metrics import NodeSample
    from edge_node.inference_client import InferenceClient

    def make_client(rec):
        if not args.tls_dir:
            return InferenceClient(rec.endpoint, insecure=True)
        from coordinator.security import node_channel_credentials

        head = next(a.node_id for a in state.assignments(rec.deployment_id) if a.rank == 0)
        return InferenceClient(rec.endpoint, node_channel_credentials(args.tls_dir), server_name=head)

    def nodes():
        now = time.time()
        for n in state.list_nodes():
            hb = n.heartbeat
            yield NodeSample(n.node_id, n.state, n.facts.memory_total,
                             hb.memory_available if hb else n.facts.memory_available, hb.cpu_percent if hb else 0.0,
                             now - n.last_heartbeat)

    def api_key(key: str) -> bool:
        return secrets.check(key, ("api", "admin")) is not None

    def admin_key(key: str) -> bool:
        return secrets.check(key, ("admin",)) is not None

    app = create_app(FleetDeployments(state, make_client, replan=not args.no_replan), api_key, admin_key,
                     deploy=deploy_handler(state, args.state, servicer.changes), nodes=nodes)
    app.include_router(admin_router(state, args.state, servicer.changes, admin_key))
    host, _, port = args.http.rpartition(":")
    recorded = RequestRecorder(app, state)  # every completion request leaves a record, answered or refused
    server = uvicorn.Server(uvicorn.Config(recorded, host=host, port=int(port), log_level="warning"))
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.05)
    if not server.started:
        raise OSError(f"the HTTP API did not start on {args.http}")
    print(f"http {args.http}", flush=True)
    return server
