"""Re-planning after a failure: a deployment whose rank crashed (failed) or whose node was lost (degraded) is
replaced by a new deployment of the same model, placed on the nodes alive now; the old one is stopped, so
the agents end whatever is left of its ranks. The HTTP API follows a model's newest deployment
(coordinator.fleet), so a request the old group failed is retried on the new one.

The new plan leaves out the nodes that may be gone though still "alive" by state: a node is declared lost only
after lost_after_s, but its rank's peers crash at once, so a plan made in between could land on it. Left out are
the nodes not heard from within `fresh_s`, and the *suspects* of the broken deployment not heard from since it
broke: a node whose rank was killed by a signal, or whose rank vanished (no report of an end while a peer
crashed: the node died with it). A suspect heard from since (its agent is alive) is usable again; when leaving
the suspects out would shrink the group, the re-plan waits up to `fresh_s` for them first.

A re-plan keeps the deployment's early exit (its heads, copied from the old deployment's files, its mode, threshold
and cloud tier).

A model that keeps failing is not re-planned forever: at most `max_recoveries` within `window_s`; past that,
or when the remaining nodes cannot hold the model, the deployment stays failed with the cause in its detail,
and requests get that cause as their error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from coordinator.deploy import DeployRequest, deploy, remove_files
from coordinator.server import DEPLOYMENTS_DIR, Changes
from coordinator.state import AssignmentRecord, DeploymentRecord, State
from edge_node.early_exit import EXITS_JSON
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
    # between would land on the dead node (seen in the testbed: two re-plans instead of one). A node killed just
    # after a heartbeat is still fresh: the suspects rule (see suspects()) leaves it out; this is also how long a
    # re-plan that would shrink the group waits for a suspect to be heard from.
    fresh_s: float = 5.0


ENDED = ("crashed", "failed", "exited", "stopped")  # a rank's statuses after it ended (coordinator.server.CRASHED)


def suspects(ranks: list[AssignmentRecord]) -> tuple[set[str], float | None]:
    """The nodes of a broken deployment that may have died with it, and when it broke (the first end reported;
    None: no rank reported an end, e.g. a node lost). A rank killed by a signal, or one that never reported an
    end while a peer did, marks its node (pure)."""
    ended = [a for a in ranks if a.status in ENDED]
    if not ended:
        return set(), None
    signalled = {a.node_id for a in ended if a.status != "stopped" and a.exit_code < 0}
    vanished = {a.node_id for a in ranks if a.status not in ENDED}
    return signalled | vanished, min(a.updated for a in ended)


def replacement(state: State, old: DeploymentRecord, now: float | None = None,
                fresh_s: float = RecoveryPolicy.fresh_s) -> DeployRequest | None:
    """The deploy request that re-plans `old` on the nodes alive now, heard from within `fresh_s`, and (for the
    broken deployment's suspects) heard from since it broke. None: no such node yet, or suspects that may still
    be heard from would make the group smaller than `old`'s."""
    now = time.time() if now is None else now
    nodes = state.list_nodes()
    ranks = state.assignments(old.deployment_id)
    suspect, broke = suspects(ranks)

    def usable(n) -> bool:
        if n.state != "alive" or now - n.last_heartbeat > fresh_s:
            return False
        return n.node_id not in suspect or broke is None or n.last_heartbeat > broke

    alive = [n for n in nodes if usable(n)]
    if not alive:
        return None
    pending = [n for n in nodes if n.state == "alive" and n not in alive and n.node_id in suspect
               and broke is not None and now - broke < fresh_s]  # might yet heartbeat: a rank death, not a node's
    if pending and len(alive) < old.world:
        return None
    left_out = tuple(sorted(n.node_id for n in nodes if n.state == "alive" and n not in alive))
    run = RunConfig.from_json(ranks[0].run_config_json) if ranks else None
    if left_out:
        log.info("re-planning %s without %s (silent of late, or suspected gone with it)", old.deployment_id,
                 ", ".join(left_out))
    return DeployRequest(old.model, min(old.world, len(alive)), old.weights, run.dtype if run else None,
                         run.threads if run else None, exclude=left_out, exits=run.exits if run else None)


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
        if req.exits is not None:  # the heads as the old deployment shipped them (removed only once replaced)
            heads = Path(self.state_dir) / DEPLOYMENTS_DIR / dep.deployment_id / EXITS_JSON
            req = replace(req, exits=replace(req.exits, exits=str(heads), layers=()))
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
