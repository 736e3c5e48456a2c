"""Re-planning after a failure: a deployment whose rank crashed (failed) or whose node was lost (degraded) is
replaced by a new deployment of the same model, placed on the nodes alive now; the old one is stopped, so
the agents end whatever is left of its ranks. The HTTP API follows a model's newest deployment
(coordinator.fleet), so a request the old group failed is retried on the new one.

A model that keeps failing is not re-planned forever: at most `max_recoveries` within `window_s`; past that,
or when the remaining nodes cannot hold the model, the deployment stays failed with the cause in its detail,
and requests get that cause as their error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coordinator.deploy import DeployRequest, deploy, remove_files
from coordinator.server import Changes
from coordinator.state import DeploymentRecord, State
from edge_node.model.errors import EdgefedError
from edge_node.run_config import RunConfig

log = logging.getLogger("edgefed.coordinator")
BROKEN = ("failed", "degraded")


@dataclass(frozen=True)
class RecoveryPolicy:
    max_recoveries: int = 3  # per model within window_s
    window_s: float = 600.0
    # A node still "alive" whose last heartbeat is older than this is left out of the new plan: when a node dies,
    # its rank's peers crash at once while the node is only declared lost after lost_after_s, and a plan made in
    # between would land on the dead node (seen in the testbed: two re-plans instead of one).
    fresh_s: float = 5.0


def replacement(state: State, old: DeploymentRecord, now: float | None = None,
                fresh_s: float = RecoveryPolicy.fresh_s) -> DeployRequest | None:
    """The deploy request that re-plans `old` on the nodes alive now, and heard from within `fresh_s` (None: no
    such node)."""
    now = time.time() if now is None else now
    nodes = state.list_nodes()
    alive = [n for n in nodes if n.state == "alive" and now - n.last_heartbeat <= fresh_s]
    if not alive:
        return None
    silent = tuple(sorted(n.node_id for n in nodes if n.state == "alive" and n not in alive))
    ranks = state.assignments(old.deployment_id)
    run = RunConfig.from_json(ranks[0].run_config_json) if ranks else None
    return DeployRequest(old.model, min(old.world, len(alive)), old.weights, run.dtype if run else None,
                         run.threads if run else None, exclude=silent)


class Recovery:
    """Call step() periodically (coordinator.server.Periodic): it replaces every broken deployment it may."""

    def __init__(self, state: State, state_dir: str | Path, changes: Changes, policy: RecoveryPolicy = RecoveryPolicy(),
                 clock: Callable[[], float] = time.time):
        self.state, self.state_dir, self.changes, self.policy, self.clock = state, state_dir, changes, policy, clock
        self.history: dict[str, list[float]] = {}  # model name -> times it was re-planned
        self.given_up: set[str] = set()

    def step(self) -> list[tuple[str, str]]:
        """Re-plan what is broken; returns (old deployment, new deployment) pairs."""
        done = []
        for dep in self.state.list_deployments():
            if dep.state in BROKEN and dep.deployment_id not in self.given_up:
                new = self._recover(dep)
                if new is not None:
                    done.append((dep.deployment_id, new))
        return done

    def _give_up(self, dep: DeploymentRecord, why: str) -> None:
        self.given_up.add(dep.deployment_id)
        log.error("deployment %s not re-planned: %s", dep.deployment_id, why)
        self.state.set_deployment_state(dep.deployment_id, "failed", f"{dep.detail}; not re-planned: {why}")

    def _recover(self, dep: DeploymentRecord) -> str | None:
        name, now = Path(dep.model).name, self.clock()
        recent = [t for t in self.history.get(name, []) if now - t < self.policy.window_s]
        if len(recent) >= self.policy.max_recoveries:
            self._give_up(dep, f"{len(recent)} re-plans of {name} within {self.policy.window_s:.0f} s already")
            return None
        req = replacement(self.state, dep, now, self.policy.fresh_s)
        if req is None:
            if not any(n.state == "alive" for n in self.state.list_nodes()):
                self._give_up(dep, "no node is alive")
            return None  # nodes alive but silent of late: the next step sees them lost or heard from again
        try:
            new = deploy(self.state, self.state_dir, req)
        except (EdgefedError, ValueError, OSError) as e:  # PlacementError names the shortfall
            self._give_up(dep, str(e))
            return None
        self.history[name] = [*recent, now]
        self.state.set_deployment_state(dep.deployment_id, "stopped", f"{dep.detail}; replaced by {new.deployment_id}")
        self.changes.bump()  # one change: the old ranks stop and the new ones start
        remove_files(self.state_dir, dep.deployment_id)
        log.warning("deployment %s (%s) re-planned as %s on %d node(s)", dep.deployment_id, dep.detail,
                    new.deployment_id, new.world)
        return new.deployment_id
