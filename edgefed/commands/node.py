"""`edgefed node`: the device agent daemon (edge_node.agent) — register, heartbeat, fetch shards, run ranks."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from edgefed.args import positive_float, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("node", help="run the device agent: join a coordinator's fleet and run assigned ranks")
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's node service")
    p.add_argument("--data-dir", required=True, help="where the agent keeps its identity, shards and logs")
    p.add_argument("--token", default=os.environ.get("EDGEFED_ENROLL_TOKEN", ""),
                   help="enrollment token (needed the first time; default $EDGEFED_ENROLL_TOKEN)")
    sec = p.add_mutually_exclusive_group(required=True)
    sec.add_argument("--tls-dir", help="ca.pem, node.pem, node.key (from `edgefed certs node NAME`)")
    sec.add_argument("--insecure", action="store_true", help="plain text: only on a trusted test network")
    p.add_argument("--name", help="this node's name (default: the certificate's name, else the host name)")
    p.add_argument("--advertise", metavar="HOST", help="the address other ranks (and the coordinator) reach this "
                   "node at; as rank 0 it picks its rendezvous and serving ports free on this host and reports them "
                   "(default: this machine's address on the route to the coordinator)")
    p.add_argument("--heartbeat", type=positive_float, help="seconds between heartbeats (default: the coordinator's)")
    p.add_argument("--backoff-max", type=positive_float, default=10.0, help="cap of the reconnect backoff, seconds")
    p.add_argument("--rpc-timeout", type=positive_float, default=10.0, help="deadline of every unary call, seconds")
    fl = p.add_argument_group("federated learning (a Flower SuperNode supervised beside the ranks)")
    fl.add_argument("--superlink", metavar="HOST:PORT", help="the SuperLink beside the coordinator "
                    "(`edgefed coordinator --superlink`); the agent runs a SuperNode for it and restarts it if it ends")
    fl.add_argument("--fl-data", help="this device's training data: JSON {\"train\": [files], \"heldout\": [files]}")
    fl.add_argument("--fl-model", default="", help="the base model directory here (default: the one the server names)")
    fl.add_argument("--fl-quant", default="auto", help="the base's quantization for training (auto: by memory)")
    fl.add_argument("--fl-memory-mb", type=positive_float, help="memory for training (default: the device's)")
    fl.add_argument("--fl-threads", type=positive_int, default=1)
    p.add_argument("--rank-command", help=argparse.SUPPRESS)  # tests: what runs a rank instead of `edgefed serve`
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(run=run)


def _name(args: argparse.Namespace) -> str:
    from edge_node.control import check_name

    if args.name:
        return check_name(args.name, "--name")
    if args.tls_dir:
        from edge_node.tls import load_bundle

        return load_bundle(args.tls_dir).name
    import socket

    return check_name(socket.gethostname().lower(), "--name (from the host name; give --name)")


def run(args: argparse.Namespace) -> int:
    import shlex

    from edge_node.agent import Agent, AgentConfig, AgentError, route_ip
    from edge_node.probe import device_facts, heartbeat_figures

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    name = _name(args)
    if args.tls_dir:
        from edge_node.tls import load_bundle

        cert_name = load_bundle(args.tls_dir).name  # a bad --tls-dir is one clear error now, not a failed handshake
        if cert_name != name:
            raise ValueError(f"--name {name!r} differs from the certificate's name {cert_name!r} in {args.tls_dir}")
    data_dir = Path(args.data_dir)
    extra = {"rank_command": tuple(shlex.split(args.rank_command))} if args.rank_command else {}
    config = AgentConfig(coordinator=args.coordinator, data_dir=data_dir, name=name,
                         advertise_host=args.advertise or route_ip(args.coordinator), token=args.token,
                         tls_dir=args.tls_dir, rpc_timeout_s=args.rpc_timeout, backoff_max_s=args.backoff_max,
                         heartbeat_interval_s=args.heartbeat, **extra)
    if args.superlink:
        config = replace(config, services=(_supernode(args, name, data_dir),))
    agent = Agent(config, facts=lambda: device_facts(data_dir), figures=lambda: heartbeat_figures(data_dir))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    try:
        return agent.run()
    except AgentError as e:
        print(f"edgefed node: error: {e}", file=sys.stderr)
        return 3


def _supernode(args: argparse.Namespace, name: str, data_dir: Path):
    """The SuperNode's ChildSpec (federated.runner builds it; edge_node's agent only supervises it)."""
    from edge_node.ports import free_port
    from edge_node.probe import device_facts
    from federated.runner import supernode_spec
    from federated.task import QUANTS

    if args.fl_quant not in QUANTS:
        raise ValueError(f"--fl-quant must be one of {', '.join(QUANTS)}, got {args.fl_quant!r}")
    if not args.fl_data:
        raise ValueError("--superlink needs --fl-data (this device's training data)")
    data = Path(args.fl_data).resolve()
    if not data.is_file():
        raise ValueError(f"--fl-data {data}: no such file")
    memory_mb = args.fl_memory_mb or device_facts(data_dir).memory_available / 2**20
    config = {"data": str(data), "model": args.fl_model and str(Path(args.fl_model).resolve()), "quant": args.fl_quant,
              "memory-mb": round(memory_mb, 1), "threads": args.fl_threads}
    return supernode_spec(args.superlink, f"127.0.0.1:{free_port()}", config, data_dir / "flower", name,
                          max_wait_s=3600.0)
