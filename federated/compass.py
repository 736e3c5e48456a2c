"""FedCompass-style compute-aware scheduling, as pure functions: local steps per client from its measured
seconds per step, so a group of clients returns together; a deadline for the group; the weight of an update
that arrives late (in aggregation.staleness_weight)."""

from __future__ import annotations

from collections.abc import Mapping

SCHEDULES = ("sync", "compass")


def assign_steps(s_per_step: Mapping[str, float], base_steps: int, clients: list[str], min_steps: int = 1,
                 max_steps: int | None = None, probe_steps: int = 0) -> dict[str, int]:
    """Steps per client so all return when the fastest measured client would finish `base_steps`: a client k
    times slower gets base_steps / k. Clients not yet measured get `probe_steps` (0: `base_steps`): the first
    round measures, and a short one bounds what an unknown straggler costs the group before it is measured."""
    unmeasured = probe_steps or base_steps
    known = {c: s for c, s in s_per_step.items() if s > 0}
    if not known:
        return {c: unmeasured for c in clients}
    budget = base_steps * min(known.values())  # seconds of the group
    cap = max_steps or base_steps
    return {c: unmeasured if c not in known else max(min_steps, min(cap, round(budget / known[c]))) for c in clients}


def expected_seconds(s_per_step: Mapping[str, float], steps: Mapping[str, int],
                     overhead_s: Mapping[str, float] | None = None) -> float:
    """When the last measured client of a group should be back: its steps x s/step plus its measured per-round
    overhead (process start, loading, evaluating, messaging)."""
    over = overhead_s or {}
    times = [s_per_step[c] * n + over.get(c, 0.0) for c, n in steps.items() if s_per_step.get(c, 0) > 0]
    return max(times, default=0.0)


def deadline(s_per_step: Mapping[str, float], steps: Mapping[str, int], fixed_s: float, slack: float,
             cap_s: float, overhead_s: Mapping[str, float] | None = None) -> float:
    """The group's deadline: its expected time (`expected_seconds`) times `slack`, plus a fixed margin `fixed_s`,
    never above `cap_s` (`cap_s` while any client of the group is unmeasured)."""
    if any(s_per_step.get(c, 0) <= 0 for c in steps):
        return cap_s
    return min(cap_s, expected_seconds(s_per_step, steps, overhead_s) * slack + fixed_s)
