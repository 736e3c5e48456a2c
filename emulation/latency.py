"""The latency sweep: ms/token of tensor-parallel decode under a per-link latency, measured and predicted.

Model (per decoded token): rank 0 broadcasts a step message and the input hidden states (one hop each),
then every layer runs 2 allreduces, each costing `allreduce_hops(mode, world)` hops. With one-way latency d
per hop and the compute measured at d = 0:

    ms/token(d) = ms/token(0) + (2 + 2 * layers * hops) * d

The ranks run as real processes (`edgefed tp-generate`), each with its link injected (EDGEFED_LINK_DELAY_MS);
see edge_node.collectives.LinkEmulation for where the delay is taken.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edge_node.collectives import allreduce_hops
from edge_node.model.errors import EdgefedError

BROADCASTS_PER_TOKEN = 2  # the step message and the input hidden states


def hops_per_token(layers: int, world: int, mode: str) -> int:
    return BROADCASTS_PER_TOKEN + 2 * layers * allreduce_hops(mode, world)


def predicted_ms(compute_ms: float, layers: int, world: int, mode: str, delay_ms: float) -> float:
    return compute_ms + hops_per_token(layers, world, mode) * delay_ms


@dataclass(frozen=True)
class SweepRow:
    mode: str
    delay_ms: float
    measured_ms: float  # median ms/token over the repeats
    predicted_ms: float
    comm_ms: float  # median of the per-token comm time rank 0 reported

    @property
    def error(self) -> float:
        return self.measured_ms / self.predicted_ms - 1.0


def run_tp(shards: Path, mode: str, delay_ms: float, prompt_ids: list[int], tokens: int,
           timeout_s: float = 300.0, threads: int = 1) -> dict:
    """One `edgefed tp-generate` run (every rank local, on loopback) with each rank's link delayed."""
    env = {**os.environ, "EDGEFED_LINK_DELAY_MS": f"{delay_ms:g}", "EDGEFED_LINK_JITTER_MS": "0"}
    for name in ("EDGEFED_LINK_MBIT", "EDGEFED_LINK_LOSS_PCT"):
        env.pop(name, None)
    argv = [sys.executable, "-m", "edgefed", "tp-generate", "--shards", str(shards), "--allreduce", mode,
            "--prompt-ids", ",".join(map(str, prompt_ids)), "--max-new-tokens", str(tokens), "--greedy",
            "--threads", str(threads), "--json", "--timeout", "60"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise EdgefedError(f"tp-generate ({mode}, {delay_ms:g} ms) did not finish within {timeout_s:g} s") from None
    if r.returncode != 0:
        raise EdgefedError(f"tp-generate ({mode}, {delay_ms:g} ms) failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout)


def sweep(shards: Path, layers: int, world: int, delays: list[float], modes: list[str], prompt_ids: list[int],
          tokens: int, repeats: int = 1) -> list[SweepRow]:
    """Every (mode, delay), interleaved over the repeats (so a busy spell of a shared machine hits them all),
    medians kept; predictions use each mode's own measured ms/token at delay 0."""
    runs: dict[tuple[str, float], list[dict]] = {}
    for _ in range(repeats):
        for d in delays:
            for mode in modes:
                out = run_tp(shards, mode, d, prompt_ids, tokens)
                if len(out["token_ids"]) < tokens:
                    raise EdgefedError(f"tp-generate stopped after {len(out['token_ids'])} of {tokens} tokens "
                                       f"({out['stop_reason']}): ms/token would cover too few steps")
                runs.setdefault((mode, d), []).append(out)
    rows = []
    for mode in modes:
        base = statistics.median(o["tpot_ms"] for o in runs[(mode, min(delays))])
        base -= hops_per_token(layers, world, mode) * min(delays)
        for d in delays:
            outs = runs[(mode, d)]
            rows.append(SweepRow(mode, d, statistics.median(o["tpot_ms"] for o in outs),
                                 predicted_ms(base, layers, world, mode, d),
                                 statistics.median(o["per_token_mean"].get("comm_ms", 0.0) for o in outs)))
    return rows


def table(rows: list[SweepRow], layers: int, world: int) -> str:
    """Markdown table of a sweep."""
    lines = ["| allreduce | hops/token | latency (ms/link) | measured ms/token | predicted ms/token | error |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.mode} | {hops_per_token(layers, world, r.mode)} | {r.delay_ms:g} | "
                     f"{r.measured_ms:.1f} | {r.predicted_ms:.1f} | {r.error:+.1%} |")
    return "\n".join(lines)
