"""A scenario's federated session, run with `edgefed fl start` (its own SuperLink and one SuperNode per client,
on loopback beside the fleet), and its summary turned into the report's rounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from emulation.cleanup import Cleanup, stop_group
from emulation.corpus import DEFAULT_PARTITIONS
from emulation.scenario import Scenario

# scenario strategy -> (`--rule`, `--schedule`)
STRATEGY_FLAGS = {"fedavg": ("fedavg", "sync"), "ffa-lora": ("ffa", "sync"), "hetlora": ("hetlora", "sync"),
                  "fedcompass": ("fedavg", "compass")}


def fl_argv(sc: Scenario, work: Path, timeout_s: float) -> list[str]:
    """The `edgefed fl start` command for the scenario (pure): client i trains on partition i; a node's smaller
    CPU quota becomes its slowdown against the fastest client; the smallest client memory picks the base's
    quantization."""
    fed = sc.federated
    names = list(fed.clients) or [n.name for n in sc.nodes]
    nodes = [sc.node(n) for n in names]
    parts = DEFAULT_PARTITIONS[: len(nodes)]
    fastest = max(n.cpu_quota for n in nodes)
    slow = ",".join(f"{p}={fastest / n.cpu_quota:.3g}" for p, n in zip(parts, nodes, strict=True))
    rule, schedule = STRATEGY_FLAGS[fed.strategy]
    return [sys.executable, "-m", "edgefed", "fl", "start", "--model", str(Path(sc.model.path).resolve()),
            "--rounds", str(fed.rounds), "--clients", str(len(nodes)), "--partitions", ",".join(parts),
            "--rule", rule, "--schedule", schedule, "--steps", str(fed.steps),
            "--memory-mb", str(min(n.memory_mb for n in nodes)), "--slowdown", slow, "--work", str(work),
            "--timeout", f"{timeout_s:g}", "--json"]


def rounds_of(summary: dict) -> list[dict]:
    """Per round: the clients' mean held-out perplexity after it, bytes moved, wall time (round 0: the base)."""
    history = summary.get("history", [])
    out = []
    for i, h in enumerate(history):
        before = [c["ppl-before"] for c in h.get("clients", []) if "ppl-before" in c]
        if i == 0 and before:
            out.append({"round": 0, "perplexity": round(sum(before) / len(before), 3), "bytes": 0, "wall_s": 0.0})
        nxt = history[i + 1] if i + 1 < len(history) else None
        after = ([c["ppl-before"] for c in nxt.get("clients", []) if "ppl-before" in c] if nxt
                 else list(summary.get("ppl_after", {}).values()))
        out.append({"round": h["round"], "perplexity": round(sum(after) / len(after), 3) if after else None,
                    "bytes": int(h.get("bytes_up", 0)) + int(h.get("bytes_down", 0)),
                    "wall_s": h.get("seconds"), "clients": len(h.get("clients", [])),
                    "missing": h.get("missing_nodes", [])})
    return out


def run_federated(sc: Scenario, work: Path, cleanup: Cleanup, timeout_s: float = 1200.0) -> tuple[list[dict], str]:
    """Run the session; (rounds, a note for the report). A failed session is a note, never the end of the run.
    It runs in a process group of its own, which the cleanup ends whole (its SuperLink and SuperNodes too)."""
    argv = fl_argv(sc, work, timeout_s)
    log = work.with_suffix(".log")
    work.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    cleanup.add(f"federated session (process group {proc.pid})", lambda: stop_group(proc))
    try:
        stdout, _ = proc.communicate(timeout=timeout_s + 60)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        return [], f"federated session did not finish within {timeout_s:g} s (log: {log})"
    r = subprocess.CompletedProcess(argv, proc.returncode, stdout)
    if r.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        return [], f"federated session failed (exit {r.returncode}): {tail[0][:300]} (log: {log})"
    rounds = rounds_of(json.loads(r.stdout))
    return rounds, (f"federated session: {sc.federated.rounds} round(s) of {sc.federated.strategy} with "
                    f"`edgefed fl start` on loopback beside the fleet (its SuperNodes are not inside the node "
                    f"namespaces or caps); client speed from cpu_quota as --slowdown")
