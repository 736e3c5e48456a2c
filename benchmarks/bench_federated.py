"""Federated LoRA on the demo model: synchronous FedAvg against FedCompass with a straggler, and against
centralized LoRA on the pooled data.

Clients train for real, in this process, one after another (the machine has 2 shared cores: running them at
once would time the contention, not the schedule); the wall time of a round is what the clients would take side
by side: the slowest client's training time x its emulated slowdown, plus its per-round overhead (loading the
base, reading its data, evaluating; measured) and `--overhead-s` (process start and messaging in a Flower
deployment, ~20 s per round on this machine's loopback runs). Held-out perplexity is measured on every client's
partition after every round (not counted in wall time).

    .venv/bin/python benchmarks/bench_federated.py --rounds 3 --steps 8 --straggler email=4 --out /tmp/edgefed-bench/fl

`--live`: the same comparison as a real deployment on loopback, wall time read off the clock: a SuperLink and one
SuperNode per client (federated.runner.LocalFederation; each SuperNode's ClientApp one warm process that keeps the
base model loaded between rounds, federated.warm, or with `--cold` Flower's default of a fresh ClientApp process
per message; the clients training side by side on the machine's cores), the straggler's SuperNode given
`slowdown` in its node config (its client sleeps (factor - 1) x each step's measured time after the step: an
emulated slow device, not a CPU quota).
Synchronous FedAvg runs `--rounds` rounds; FedCompass then runs until its mean held-out perplexity reaches sync's
final one (at most 3x as many rounds). With `--side-by-side` both run at once on two federations (4 SuperNodes),
`--rounds` each (FedCompass `--compass-rounds`), so the shared machine's load swings hit both alike; the time to
sync's final perplexity is read off each curve. `--probe-steps N`: FedCompass gives clients not yet measured N
steps (its first round). The held-out perplexity is measured after every round (ServerApp `eval-rounds`) and its
time kept out of the wall time, which is the server's clock from sending a round's orders to aggregating it,
summed over rounds.

    .venv/bin/python benchmarks/bench_federated.py --live --rounds 3 --steps 8 --seq-len 64 --batch-size 2 \
        --straggler email=4 --out /tmp/edgefed-bench/fl-live

`--fixed-cost`: what a live round costs beside training, warm ClientApp processes against Flower's default of
one per message, two federations side by side (sync FedAvg, no straggler).

    .venv/bin/python benchmarks/bench_federated.py --fixed-cost --rounds 4 --steps 4 --out /tmp/edgefed-bench/fl-fixed
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from flwr.supercore.differential_privacy import compute_clip_model_update  # noqa: E402

from edge_node.model.config import ModelConfig  # noqa: E402
from emulation.corpus import partitions  # noqa: E402
from federated import compass, models  # noqa: E402
from federated.aggregation import Update, aggregate  # noqa: E402
from federated.data import write_client_data  # noqa: E402
from federated.strategy import add_noise  # noqa: E402
from federated.task import ClientSettings, Orders, client_evaluate, client_train, params  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "models" / "edgefed-demo"


def evaluate(clients: dict, orders: Orders, state) -> dict[str, float]:
    return {name: client_evaluate(s, orders, state)["ppl"] for name, s in clients.items()}


def run_strategy(schedule: str, clients: dict, slow: dict, args, target: float | None,
                 measured: list[tuple[float, float]]) -> list[dict]:
    """Rounds until `args.rounds` (sync) or until the mean perplexity reaches `target` (at most 4x as many)."""
    cfg = ModelConfig.from_dir(DEMO)
    state = models.init_state(cfg, args.rank, seed=0)
    orders = Orders(round=0, model=str(DEMO), rank=args.rank, lr=args.lr, seq_len=args.seq_len,
                    train_blocks=args.train_blocks, eval_blocks=args.eval_blocks)
    ppl = evaluate(clients, orders, state)
    curve = [{"round": 0, "t": 0.0, "ppl": ppl, "mean_ppl": statistics.mean(ppl.values())}]
    speeds: dict[str, float] = {}  # measured s/step x slowdown: what the server would measure
    t = 0.0
    for rnd in range(1, (args.rounds if target is None else 4 * args.rounds) + 1):
        steps = (compass.assign_steps(speeds, args.steps, list(clients), probe_steps=args.probe_steps)
                 if schedule == "compass"
                 else {c: args.steps for c in clients})
        updates, times, up, norms = [], {}, 0, []
        for name, s in clients.items():
            o = Orders(**{**orders.__dict__, "round": rnd, "steps": steps[name]})
            tensors, met = client_train(s, o, state)
            norms.append(update_norm(tensors, state))
            if args.dp_clip > 0:  # Flower's client-side fixed clipping, as its fixedclipping_mod applies it
                tensors = clip(tensors, state, args.dp_clip)
            speeds[name] = met["s-per-step"] * slow[name]
            times[name] = met["train-s"] * slow[name] + (met["client-s"] - met["train-s"]) + args.overhead_s
            measured.append((met["s-per-step"], met["client-s"] - met["train-s"]))
            updates.append(Update(name, tensors, met["num-examples"], args.rank))
            up += met["bytes-up"]
        state, _ = aggregate("fedavg", state, updates)
        if args.dp_noise > 0:  # the server's Gaussian noise (federated.strategy.add_noise)
            state = add_noise(state, args.dp_noise, args.dp_clip, len(updates), rnd)
        t += max(times.values())
        ppl = evaluate(clients, orders, state)
        curve.append({"round": rnd, "t": round(t, 2), "ppl": ppl, "mean_ppl": statistics.mean(ppl.values()),
                      "steps": steps, "slowdown": slow, "client_s": {k: round(v, 2) for k, v in times.items()},
                      "bytes_up": up, "bytes_down": models.nbytes(state) * len(clients),
                      "update_l2": [round(n, 4) for n in norms]})
        print(f"{schedule} round {rnd}: t={t:.1f} s steps={steps} mean ppl {curve[-1]['mean_ppl']:.3f}",
              file=sys.stderr, flush=True)
        if target is not None and curve[-1]["mean_ppl"] <= target:
            break
    return curve


def update_norm(new: dict, old: dict) -> float:
    return float(torch.cat([(new[n] - old[n]).flatten() for n in new]).norm())


def clip(new: dict, old: dict, norm: float) -> dict:
    names = list(new)
    arrays = [new[n].numpy().copy() for n in names]
    compute_clip_model_update(arrays, [old[n].numpy() for n in names], norm)
    return {n: torch.from_numpy(a) for n, a in zip(names, arrays, strict=True)}


def centralized(clients: dict, work: Path, args, total_steps: int) -> dict[str, float]:
    """One LoRA trained on every client's training files pooled, the same number of steps in all."""
    train = [f for s in clients.values() for f in json.loads(Path(s.data).read_text())["train"]]
    pooled = ClientSettings(name="pooled", data=str(write_client_data(work / "pooled.json", train, train[:1])))
    cfg = ModelConfig.from_dir(DEMO)
    o = Orders(round=1, model=str(DEMO), rank=args.rank, lr=args.lr, seq_len=args.seq_len, steps=total_steps,
               train_blocks=args.train_blocks * len(clients), eval_blocks=args.eval_blocks)
    tensors, _ = client_train(pooled, o, models.init_state(cfg, args.rank, seed=0))
    return evaluate(clients, o, tensors)


def time_to(curve: list[dict], target: float, key: str = "t") -> float | None:
    return next((c[key] for c in curve if c["mean_ppl"] <= target), None)


def calibrate(curves: list[list[dict]], measured: list[tuple[float, float]], extra_s: float) -> float:
    """Add "t_cal" to every round: the same round timed with the median s/step and per-round overhead of the whole
    benchmark, so the machine's load swings (2 shared cores) do not favour either schedule."""
    s_step = statistics.median(m[0] for m in measured)
    over = statistics.median(m[1] for m in measured) + extra_s
    for curve in curves:
        t = 0.0
        for c in curve:
            if c["round"]:
                t += max(n * s_step * c["slowdown"][k] + over for k, n in c["steps"].items())
            c["t_cal"] = round(t, 2)
    return s_step


def live_curve(summary: dict) -> list[dict]:
    """(round, clock wall time, per-client and mean held-out perplexity) from a session summary."""
    hist = summary["history"]
    ppl0 = {c["name"]: c["ppl-before"] for c in hist[0]["clients"]}
    curve = [{"round": 0, "t": 0.0, "ppl": ppl0, "mean_ppl": statistics.mean(ppl0.values())}]
    for h in hist:
        curve.append({"round": h["round"], "t": h["wall_s"], "round_s": h["seconds"], "ppl": h["ppl_after"],
                      "mean_ppl": h["mean_ppl"], "steps": {c["name"]: c["steps"] for c in h["clients"]},
                      "s_per_step": {c["name"]: round(c["s-per-step"], 3) for c in h["clients"]},
                      "late": [c["name"] for c in h["clients"] if c["sent_in_round"] != h["round"]],
                      "missing": h["missing_nodes"], "eval_s": h["eval_s"]})
    return curve


def run_fixed_cost(args, clients: dict, work: Path) -> None:
    """A round's fixed cost (its seconds less the slowest client's training seconds), warm ClientApp processes
    against a fresh ClientApp process per message: two federations at once (sync FedAvg, no straggler), so the
    machine's load hits both alike."""
    from concurrent.futures import ThreadPoolExecutor

    from federated.runner import LocalFederation
    from federated.strategy import SessionConfig

    nodes = [{"name": n, "data": s.data, "quant": "float32", "threads": 1} for n, s in clients.items()]
    base = SessionConfig(model=str(DEMO), out="", rounds=args.rounds, min_clients=len(nodes), rank=args.rank,
                         steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                         train_blocks=args.train_blocks, eval_blocks=args.eval_blocks, deadline_s=args.deadline,
                         evaluate=False)

    def one(mode: str) -> list[dict]:
        with LocalFederation(work / f"flower-{mode}", nodes, warm=mode == "warm") as fed:
            summary = fed.run(replace(base, out=str(work / mode)), timeout_s=args.timeout)
        return [{"round": h["round"], "round_s": h["seconds"],
                 "train_s": round(max(c["train-s"] for c in h["clients"]), 2),
                 "fixed_s": round(h["seconds"] - max(c["train-s"] for c in h["clients"]), 2)}
                for h in summary["history"]]

    with ThreadPoolExecutor(2) as pool:
        warm, cold = pool.map(one, ["warm", "cold"])
    result = {"mode": "fixed-cost", "warm": warm, "cold": cold,
              "median_fixed_s_after_round_1": {k: statistics.median(r["fixed_s"] for r in v[1:]) if len(v) > 1
                                               else None for k, v in (("warm", warm), ("cold", cold))},
              "args": vars(args)}
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("warm", "cold", "median_fixed_s_after_round_1")}, indent=1))


def run_live(args, clients: dict, slow: dict, work: Path) -> None:
    from federated.runner import LocalFederation
    from federated.strategy import SessionConfig

    nodes = [{"name": n, "data": s.data, "quant": "float32", "slowdown": slow[n], "threads": 1}
             for n, s in clients.items()]
    base = SessionConfig(model=str(DEMO), out="", rounds=args.rounds, min_clients=len(nodes), rank=args.rank,
                         steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                         train_blocks=args.train_blocks, eval_blocks=args.eval_blocks, deadline_s=args.deadline,
                         evaluate=False, eval_rounds=True)
    t0 = time.perf_counter()
    if args.side_by_side:  # two federations at once: the machine's load swings hit both schedules alike
        from concurrent.futures import ThreadPoolExecutor

        def one(schedule: str) -> tuple[dict, float]:
            with LocalFederation(work / f"flower-{schedule}", nodes, warm=not args.cold) as fed:
                c = time.perf_counter()
                kw = {"probe_steps": args.probe_steps, "rounds": args.compass_rounds or args.rounds} \
                    if schedule == "compass" else {}
                out = fed.run(replace(base, out=str(work / schedule), schedule=schedule, **kw), timeout_s=args.timeout)
                return out, time.perf_counter() - c

        with ThreadPoolExecutor(2) as pool:
            (sync, ds), (fc, dc) = pool.map(one, ["sync", "compass"])
        target = sync["history"][-1]["mean_ppl"]
        c0, c1, c2 = 0.0, ds, ds + dc
    else:
        with LocalFederation(work / "flower", nodes, warm=not args.cold) as fed:
            c0 = time.perf_counter()
            sync = fed.run(replace(base, out=str(work / "sync"), schedule="sync"), timeout_s=args.timeout)
            c1 = time.perf_counter()
            target = sync["history"][-1]["mean_ppl"]
            fc = fed.run(replace(base, out=str(work / "compass"), schedule="compass", rounds=3 * args.rounds,
                                 target_ppl=target, probe_steps=args.probe_steps), timeout_s=args.timeout)
            c2 = time.perf_counter()
    curves = {"sync FedAvg": live_curve(sync), "FedCompass": live_curve(fc)}
    ts, tc = (time_to(c, target) for c in curves.values())
    best = min(c["mean_ppl"] for c in curves["sync FedAvg"][1:])  # sync's best round (its last may overfit)
    bs, bc = (time_to(c, best) for c in curves.values())
    result = {"mode": "live", "target_mean_ppl": target, "curves": curves,
              "time_to_target_s": {"sync": ts, "compass": tc}, "speedup": round(ts / tc, 2) if tc else None,
              "sync_best_mean_ppl": best, "time_to_sync_best_s": {"sync": bs, "compass": bc},
              "speedup_to_sync_best": round(bs / bc, 2) if bc else None,
              "session_clock_s": {"sync": round(c1 - c0, 1), "compass": round(c2 - c1, 1)},
              "bench_seconds": round(time.perf_counter() - t0, 1), "args": vars(args)}
    (work / "result.json").write_text(json.dumps(result, indent=1))
    for c in curves.values():
        for r in c:
            r["t_cal"] = r["t"]
    plot(curves, work / "ppl_vs_time.png", "wall time (s, server clock, live SuperNodes on loopback)")
    print(json.dumps({k: result[k] for k in ("target_mean_ppl", "time_to_target_s", "speedup", "sync_best_mean_ppl",
                                             "time_to_sync_best_s", "speedup_to_sync_best", "session_clock_s",
                                             "bench_seconds")}, indent=1))


def plot(curves: dict[str, list[dict]], path: Path,
         xlabel: str = "wall time (s, clients side by side; median s/step)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([c["t_cal"] for c in curve], [c["mean_ppl"] for c in curve], marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean held-out perplexity")
    ax.set_title("federated LoRA, demo model, one 4x straggler")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--train-blocks", type=int, default=64)
    p.add_argument("--eval-blocks", type=int, default=8)
    p.add_argument("--partitions", default="json,email")
    p.add_argument("--straggler", default="email=4", help="NAME=FACTOR")
    p.add_argument("--overhead-s", type=float, default=0.0, help="added to every client's round time")
    p.add_argument("--dp-clip", type=float, default=0.0, help="clip every client update to this L2 norm")
    p.add_argument("--dp-noise", type=float, default=0.0, help="noise multiplier (std = noise x clip / clients)")
    p.add_argument("--only-sync", action="store_true", help="the synchronous run alone (privacy cost runs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--live", action="store_true", help="a real SuperLink and SuperNodes, wall time by the clock")
    p.add_argument("--deadline", type=float, default=600.0, help="--live: a round's hard limit (s)")
    p.add_argument("--side-by-side", action="store_true",
                   help="--live: run both schedules at once, --rounds each (time to target read off the curves)")
    p.add_argument("--timeout", type=float, default=1800.0, help="--live: a session's limit (s)")
    p.add_argument("--probe-steps", type=int, default=0,
                   help="FedCompass: steps of a client not yet measured, i.e. its first round (0: --steps)")
    p.add_argument("--compass-rounds", type=int, default=0,
                   help="--live --side-by-side: FedCompass's rounds (0: --rounds); its rounds are shorter")
    p.add_argument("--fixed-cost", action="store_true",
                   help="live per-round fixed cost, warm ClientApp processes against one per message, side by side "
                        "(sync, no straggler)")
    p.add_argument("--cold", action="store_true",
                   help="--live: a fresh ClientApp process per message (Flower's default) instead of a warm one")
    p.add_argument("--out", default="/tmp/edgefed-bench/fl")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    who, factor = args.straggler.split("=")
    clients, slow = {}, {}
    for name, part in partitions(args.partitions.split(",")).items():
        data = write_client_data(work / f"{name}.json", part.files("train"), part.files("heldout"))
        clients[name] = ClientSettings(name=name, data=str(data), quant="float32")
        slow[name] = float(factor) if name == who else 1.0
    if args.fixed_cost:
        run_fixed_cost(args, clients, work)
        return
    if args.live:
        run_live(args, clients, slow, work)
        return
    t0 = time.perf_counter()
    measured: list[tuple[float, float]] = []
    sync = run_strategy("sync", clients, slow, args, None, measured)
    target = sync[-1]["mean_ppl"]
    if args.only_sync:
        (work / "result.json").write_text(json.dumps({"sync": sync, "args": vars(args)}, indent=1))
        print(json.dumps({"mean_ppl": [round(c["mean_ppl"], 3) for c in sync],
                          "update_l2": [c.get("update_l2") for c in sync[1:]]}))
        return
    fc = run_strategy("compass", clients, slow, args, target, measured)
    s_step = calibrate([sync, fc], measured, args.overhead_s)
    central = centralized(clients, work, args, args.rounds * args.steps * len(clients))
    ts, tc = time_to(sync, target), time_to(fc, target)
    cs, cc = time_to(sync, target, "t_cal"), time_to(fc, target, "t_cal")
    result = {"target_mean_ppl": target, "sync": sync, "compass": fc, "centralized_ppl": central,
              "time_to_target_s": {"sync": ts, "compass": tc}, "speedup": round(ts / tc, 2) if tc else None,
              "calibrated_time_to_target_s": {"sync": cs, "compass": cc, "s_per_step": round(s_step, 3)},
              "calibrated_speedup": round(cs / cc, 2) if cc else None,
              "full_model_bytes": params(str(DEMO)) * 4,
              "bench_seconds": round(time.perf_counter() - t0, 1), "args": vars(args)}
    (work / "result.json").write_text(json.dumps(result, indent=1))
    plot({"sync FedAvg": sync, "FedCompass": fc}, work / "ppl_vs_time.png")
    print(json.dumps({k: result[k] for k in ("target_mean_ppl", "time_to_target_s", "speedup",
                                             "calibrated_time_to_target_s", "calibrated_speedup", "centralized_ppl",
                                             "bench_seconds")}, indent=1))


if __name__ == "__main__":
    main()
