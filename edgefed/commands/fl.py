"""`edgefed fl start`: a federated LoRA session on loopback: a SuperLink, one SuperNode per client (each with one
non-IID standard-library partition of the demo corpus), and edgefed's Flower app, for R rounds."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edgefed.args import emit, non_negative_float, positive_float, positive_int

RULES = ("fedavg", "ffa", "hetlora")
SCHEDULES = ("sync", "compass")
QUANTS = ("auto", "nf4", "int8", "float32")


def _slowdowns(text: str) -> dict[str, float]:
    """'json=4,email=1' -> {"json": 4.0, "email": 1.0}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--slowdown wants NAME=FACTOR pairs, got {part!r}") from None
        if not out[name] >= 1:
            raise argparse.ArgumentTypeError(f"--slowdown factor must be >= 1, got {part!r}")
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("fl", help="federated LoRA fine-tuning rounds on Flower")
    fl = p.add_subparsers(dest="fl_command", required=True)
    s = fl.add_parser("start", help="run a session on loopback: SuperLink + one SuperNode per client")
    s.add_argument("--model", required=True, help="base model directory (Hugging Face format)")
    s.add_argument("--rounds", type=positive_int, default=2)
    s.add_argument("--clients", type=positive_int, default=2, help="one SuperNode per standard-library partition "
                   "(with --superlink: how many of the connected SuperNodes a round needs)")
    s.add_argument("--superlink", metavar="HOST:PORT", help="run on this SuperLink (`edgefed coordinator "
                   "--superlink`) with the SuperNodes that node agents started, instead of local ones")
    s.add_argument("--partitions", help="comma-separated package names (default: the first N default partitions)")
    s.add_argument("--out", help="checkpoint directory (default: WORK/out); a session there resumes after its "
                                 "last finished round")
    s.add_argument("--work", help="logs, app and Flower home (default: a new directory under /tmp)")
    s.add_argument("--rule", choices=RULES, default="fedavg", help="aggregation: FedAvg over A and B, FFA-LoRA "
                                                                   "(A frozen), HetLoRA (ranks by device speed)")
    s.add_argument("--schedule", choices=SCHEDULES, default="sync",
                   help="sync: every client the same steps; compass: steps from measured speed (FedCompass)")
    s.add_argument("--probe-steps", type=positive_int, default=0,
                   help="with --schedule compass: steps of a client not yet measured (default: --steps); a short "
                        "first round measures every client's speed without waiting --steps on a straggler")
    s.add_argument("--rank", type=positive_int, default=8)
    s.add_argument("--steps", type=positive_int, default=10, help="local steps per round (the fastest client's)")
    s.add_argument("--lr", type=positive_float, default=2e-3)
    s.add_argument("--batch-size", type=positive_int, default=4)
    s.add_argument("--seq-len", type=positive_int, default=128)
    s.add_argument("--train-blocks", type=positive_int, default=256, help="training blocks per client (at most)")
    s.add_argument("--eval-blocks", type=positive_int, default=8, help="held-out blocks per client")
    s.add_argument("--deadline", type=positive_float, default=600.0, help="seconds a round may take at most")
    s.add_argument("--quant", choices=QUANTS, default="auto", help="every client's base: auto picks by memory")
    s.add_argument("--memory-mb", type=non_negative_float, default=4096.0, help="each client's memory (auto quant)")
    s.add_argument("--slowdown", type=_slowdowns, default={}, help="emulated stragglers, e.g. json=4")
    s.add_argument("--dp-clip", type=non_negative_float, default=0.0,
                   help="central DP: clients clip their update to this L2 norm (Flower's fixedclipping_mod)")
    s.add_argument("--dp-noise", type=non_negative_float, default=0.0,
                   help="central DP noise multiplier: the server adds N(0, (noise x clip / clients)^2)")
    s.add_argument("--secagg", action="store_true",
                   help="Flower's SecAgg+: the server sees only the sum of masked updates (fedavg, sync, no DP)")
    s.add_argument("--eval-rounds", action="store_true", help="held-out perplexity after every round too")
    s.add_argument("--target-ppl", type=non_negative_float, default=0.0,
                   help="with --eval-rounds: stop after the first round whose mean perplexity is at or below it")
    s.add_argument("--timeout", type=positive_float, default=3600.0, help="seconds the whole session may take")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=run)
    n = fl.add_parser("supernode", help="a Flower SuperNode whose ClientApp stays loaded between rounds "
                                        "(what federated.runner starts beside each device agent)")
    n.add_argument("--runtime-api", required=True, help="HOST:PORT of the SuperNode's Runtime API (its --host/--port)")
    n.add_argument("supernode_argv", nargs=argparse.REMAINDER,
                   help="-- flower-supernode ... --isolation process: the SuperNode to run as a child")
    n.set_defaults(run=run_supernode)
    m = fl.add_parser("merge", help="merge a PEFT LoRA adapter into a model directory or into tensor-parallel shards")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="float Hugging Face model directory: writes a merged checkpoint")
    src.add_argument("--shards", help="float or bfloat16 shards from `edgefed shard`: writes adapted shards")
    m.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + "
                                                    "adapter_model.safetensors), e.g. OUT/round-0002")
    m.add_argument("--base", help="with --shards: the model directory they were cut from, to check the adapter's "
                                  "recorded base")
    m.add_argument("--out", required=True)
    m.add_argument("--force", action="store_true", help="with --model: replace a merged checkpoint in --out")
    m.set_defaults(run=run_merge)


def run_supernode(args: argparse.Namespace) -> int:
    from federated.warm import run_supernode as run

    argv = args.supernode_argv[1:] if args.supernode_argv[:1] == ["--"] else args.supernode_argv
    if not argv or "process" not in argv:
        raise ValueError("give the SuperNode after --: -- flower-supernode ... --isolation process")
    return run(argv, args.runtime_api)


def run_merge(args: argparse.Namespace) -> int:
    from edge_node.adapters import adapt_shards, merge_checkpoint

    if args.model:
        merge_checkpoint(args.model, args.adapter, args.out, args.force)
    else:
        adapt_shards(args.shards, args.adapter, args.out, args.base)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _partitions(args: argparse.Namespace) -> dict:
    from emulation.corpus import DEFAULT_PARTITIONS, partitions

    names = args.partitions.split(",") if args.partitions else list(DEFAULT_PARTITIONS[: args.clients])
    if len(names) != args.clients:
        raise ValueError(f"--partitions names {len(names)} package(s) for --clients {args.clients}")
    return partitions(names)


def run(args: argparse.Namespace) -> int:
    import tempfile

    from federated.data import write_client_data
    from federated.runner import LocalFederation, submit_run
    from federated.strategy import SessionConfig

    work = Path(args.work or tempfile.mkdtemp(prefix="edgefed-fl-"))
    out = Path(args.out or work / "out")
    nodes = []
    if args.superlink and (args.partitions or args.slowdown):
        raise ValueError("--partitions and --slowdown describe local clients; with --superlink the clients are the "
                         "SuperNodes of the node agents, each with its own --fl-data")
    for name, part in ({} if args.superlink else _partitions(args)).items():
        data = write_client_data(work / "data" / f"{name}.json", part.files("train"), part.files("heldout"))
        nodes.append({"name": name, "data": str(data), "quant": args.quant, "memory-mb": args.memory_mb,
                      "slowdown": args.slowdown.get(name, 1.0)})
    unknown = sorted(set(args.slowdown) - {n["name"] for n in nodes})
    if unknown:
        raise ValueError(f"--slowdown names unknown client(s) {', '.join(unknown)}")
    session = SessionConfig(model=str(Path(args.model).resolve()), out=str(out.resolve()), rounds=args.rounds,
                            min_clients=args.clients, rule=args.rule, schedule=args.schedule, rank=args.rank,
                            steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                            train_blocks=args.train_blocks, eval_blocks=args.eval_blocks, deadline_s=args.deadline,
                            probe_steps=args.probe_steps, dp_clip=args.dp_clip, dp_noise=args.dp_noise,
                            secagg=args.secagg, eval_rounds=args.eval_rounds, target_ppl=args.target_ppl)
    t0 = time.perf_counter()
    if args.superlink:  # the coordinator's SuperLink, with the SuperNodes the node agents run
        summary = submit_run(args.superlink, session, work, args.timeout)
    else:
        with LocalFederation(work, nodes) as fed:
            summary = fed.run(session, args.timeout)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        emit(summary, True)
    else:
        _print(summary)
    return 0


def _print(summary: dict) -> None:
    for h in summary["history"]:
        ppl = ", ".join(f"{c['name']} {c['ppl-before']:.2f}" for c in h["clients"])
        print(f"round {h['round']}: {h['seconds']:.1f} s, held-out perplexity before: {ppl}; up "
              f"{h['bytes_up'] / 2**10:.0f} KiB, down {h['bytes_down'] / 2**10:.0f} KiB "
              f"(full model {h['full_model_bytes'] / 2**20:.1f} MiB); rejected {len(h['rejected'])}, "
              f"missing {len(h['missing_nodes'])}", file=sys.stderr)
    after = ", ".join(f"{k} {v:.2f}" for k, v in summary.get("ppl_after", {}).items())
    print(f"after round {summary['rounds']}: {after}\nadapter: {summary['adapter']} ({summary['wall_s']} s)",
          file=sys.stderr)
