"""Deployment state from reports (pure), re-planning a broken deployment, and requests against broken ones."""

import asyncio
import time

import pytest

from coordinator.backend import BackendError, GenerationRequest
from coordinator.deploy import DeployRequest, deploy
from coordinator.fleet import RemoteBackend
from coordinator.recovery import Recovery, RecoveryPolicy, replacement
from coordinator.server import Changes, deployment_state
from coordinator.state import AssignmentRecord, DeploymentRecord, MemoryState
from edge_node.control import DeviceFacts

GiB = 1 << 30


def _a(rank, node, status="running", code=0, updated=0.0):
    return AssignmentRecord("d-1", rank, node, 2, "{}", "h:1", status=status, exit_code=code, updated=updated)


def test_deployment_state_names_the_first_rank_to_end_and_lost_nodes():
    assert deployment_state([_a(0, "a"), _a(1, "b")], set()) == ("running", "")
    assert deployment_state([_a(0, "a"), _a(1, "b", "starting")], set()) == ("pending", "")
    assert deployment_state([_a(0, "a"), _a(1, "b")], {"b"}) == ("degraded", "node(s) b lost (no heartbeat)")
    state, detail = deployment_state([_a(0, "a", "crashed", 2, updated=5.0), _a(1, "b", "crashed", -9, updated=4.0)],
                                     set())
    assert state == "failed" and detail == "rank 1 on node b crashed (killed by signal 9)"


@pytest.fixture
def fleet_state(tmp_path):
    s = MemoryState()
    for name in ("a", "b", "c"):
        s.register_node(name, DeviceFacts(2, 8 * GiB, 6 * GiB, 50 * GiB, ("CPUExecutionProvider",), 10.0), "127.0.0.1",
                        now=time.time())
    return s


def _break(state, dep_id):
    rank = state.assignments(dep_id)[1]
    state.update_assignment(dep_id, 1, "crashed", time.time(), -9, "", "killed by SIGKILL")
    state.set_deployment_state(dep_id, "failed", f"rank 1 on node {rank.node_id} crashed")


def test_a_failed_deployment_is_replaced_on_the_nodes_alive_until_the_policy_gives_up(fleet_state, tmp_path,
                                                                                      llama_dir):
    state = fleet_state
    first = deploy(state, tmp_path / "state", DeployRequest(str(llama_dir), 2))
    changes = Changes()
    recovery = Recovery(state, tmp_path / "state", changes, RecoveryPolicy(max_recoveries=1))
    assert recovery.step() == []  # nothing broken
    _break(state, first.deployment_id)
    state.mark_lost(time.time() + 1)  # every node silent ...
    for name in ("a", "c"):  # ... but a and c came back
        state.register_node(name, state.get_node(name).facts, "127.0.0.1", time.time())
    version = changes.version
    [(old, new)] = recovery.step()
    assert old == first.deployment_id and changes.version != version
    assert state.get_deployment(old).state == "stopped" and f"replaced by {new}" in state.get_deployment(old).detail
    assert {a.node_id for a in state.assignments(new)} == {"a", "c"}  # b is lost
    assert not (tmp_path / "state" / "deployments" / old).exists()  # the replaced shards are gone, records stay
    assert (tmp_path / "state" / "deployments" / new / "manifest.json").is_file()
    _break(state, new)
    assert recovery.step() == []  # one re-plan per window: given up, with the cause kept
    dep = state.get_deployment(new)
    assert dep.state == "failed" and "crashed; not re-planned: 1 re-plans of llama" in dep.detail


def test_no_replacement_when_no_node_is_alive_or_the_model_does_not_fit(fleet_state, tmp_path, llama_dir):
    state = fleet_state
    first = deploy(state, tmp_path / "state", DeployRequest(str(llama_dir), 2))
    _break(state, first.deployment_id)
    state.mark_lost(time.time() + 1)
    recovery = Recovery(state, tmp_path / "state", Changes())
    assert recovery.step() == []
    assert state.get_deployment(first.deployment_id).detail.endswith("not re-planned: no node is alive")
    state.register_node("tiny", DeviceFacts(1, 64 << 20, 1 << 20, 1 << 20, (), 1.0), "127.0.0.1", time.time())
    second = DeploymentRecord("d-x", str(llama_dir), "float32", 1, "h:1", "degraded", time.time(), "node(s) a lost")
    run_config = state.assignments(first.deployment_id)[0].run_config_json
    state.add_deployment(second, [AssignmentRecord("d-x", 0, "a", 1, run_config, "h:2")])
    assert recovery.step() == []
    assert "not re-planned: not enough memory" in state.get_deployment("d-x").detail


def _backend(dep: DeploymentRecord, **kw) -> RemoteBackend:
    def no_client(_):
        raise AssertionError("no call may reach a broken group")

    return RemoteBackend("m", lambda: dep, no_client, **kw)


async def _drain(backend):
    return [e async for e in backend.generate(GenerationRequest((1, 2), 4, request_id="r"))]


@pytest.mark.parametrize("dep, kw, bound, words", [
    (DeploymentRecord("d-1", "m", "float32", 2, "h:1", "failed", 0, "rank 1 on node b crashed; not re-planned: x"),
     {}, 1.0, "is failed: rank 1 on node b crashed"),
    (DeploymentRecord("d-1", "m", "float32", 2, "h:1", "degraded", 0, "node(s) b lost (no heartbeat)"),
     {"replan": False}, 1.0, "is degraded: node(s) b lost"),
    (DeploymentRecord("d-1", "m", "float32", 2, "h:1", "pending", 0, ""),
     {"retry_timeout_s": 0.3, "poll_s": 0.05}, 2.0, "is pending (waited 0.3 s for it to run)"),
])
def test_a_request_to_a_broken_deployment_gets_a_clear_error_within_a_bound(dep, kw, bound, words):
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=r"deployment d-1 .*") as e:
        asyncio.run(_drain(_backend(dep, **kw)))
    assert words in str(e.value) and time.monotonic() - t0 < bound


def test_a_re_plan_leaves_out_nodes_alive_by_state_but_silent_of_late(fleet_state, tmp_path, llama_dir):
    """A node that died is declared lost only after lost_after_s; its peers' crash comes first. The re-plan
    made in between must not land on it: nodes not heard from within fresh_s are excluded."""
    state = fleet_state
    first = deploy(state, tmp_path / "state", DeployRequest(str(llama_dir), 2))
    _break(state, first.deployment_id)
    now = time.time()
    for name in ("a", "b"):  # a and b heartbeat; c went silent 30 s ago but is not yet marked lost ...
        state.heartbeat(name, None, now)
    # ... and c is the node placement would pick first: the most free memory, the fastest
    state.register_node("c", DeviceFacts(2, 16 * GiB, 14 * GiB, 50 * GiB, ("CPUExecutionProvider",), 40.0),
                        "127.0.0.1", now=now - 30)
    recovery = Recovery(state, tmp_path / "state", Changes(), RecoveryPolicy(fresh_s=5.0), clock=lambda: now)
    [(old, new)] = recovery.step()
    assert {a.node_id for a in state.assignments(new)} == {"a", "b"}
    # with every node silent the deployment waits (not given up) until they are heard from or lost
    _break(state, new)
    later = now + 60
    recovery.clock = lambda: later
    assert recovery.step() == [] and new not in recovery.given_up


def _fleet_at(t: float, names=("a", "b", "c")) -> MemoryState:
    s = MemoryState()
    for name in names:
        s.register_node(name, DeviceFacts(2, 8 * GiB, 6 * GiB, 50 * GiB, ("CPUExecutionProvider",), 10.0), "127.0.0.1",
                        now=t)
    return s


def _running(state, dep_id, t):
    for a in state.assignments(dep_id):
        state.update_assignment(dep_id, a.rank, "running", t)


def test_suspects_are_the_nodes_of_ranks_killed_by_a_signal_or_vanished():
    from coordinator.recovery import suspects

    assert suspects([_a(0, "a"), _a(1, "b")]) == (set(), None)  # nothing ended (a lost node: no suspects)
    # the testbed's kill: b's agent and rank died together, so only a's rank reported (its peer was gone)
    assert suspects([_a(0, "a", "crashed", 2, updated=7.0), _a(1, "b", "running", updated=1.0)]) == ({"b"}, 7.0)
    # b's rank killed by a signal (reported by its agent), a's rank followed with an exit status
    assert suspects([_a(0, "a", "crashed", 2, updated=7.5), _a(1, "b", "crashed", -9, updated=7.0)]) == ({"b"}, 7.0)
    # a rank that exited on its own and one stopped by its agent point at nobody
    assert suspects([_a(0, "a", "exited", 1, updated=3.0), _a(1, "b", "stopped", -15, updated=4.0)]) == (set(), 3.0)


def test_a_node_killed_just_after_its_heartbeat_is_left_out_of_the_re_plan(tmp_path, llama_dir):
    """The default testbed scenario's kill: node X holding rank 1 dies 0.1 s after a heartbeat; rank 0's peer
    crashes at once and the re-plan runs while X is still fresh by its heartbeat. It must not land on X."""
    t = 1000.0
    state = _fleet_at(t)
    first = deploy(state, tmp_path / "state", DeployRequest(str(llama_dir), 2))
    _running(state, first.deployment_id, t + 1)
    by_rank = {a.rank: a.node_id for a in state.assignments(first.deployment_id)}
    for name in ("a", "b", "c"):
        state.heartbeat(name, None, t + 9.9)
    state.update_assignment(first.deployment_id, 0, "crashed", t + 10.2, 2, "", "peer gone")  # X died at t + 10
    state.set_deployment_state(first.deployment_id, "failed", f"rank 0 on node {by_rank[0]} crashed")
    recovery = Recovery(state, tmp_path / "state", Changes(), RecoveryPolicy(fresh_s=2.0), clock=lambda: t + 10.5)
    [(old, new)] = recovery.step()  # one re-plan, at once, on the two nodes left (the old rule kept X: fresh)
    assert {a.node_id for a in state.assignments(new)} == {"a", "b", "c"} - {by_rank[1]}
    assert state.get_deployment(old).state == "stopped"


def test_a_suspect_heard_from_since_is_used_and_a_shrinking_re_plan_waits_for_it(tmp_path, llama_dir):
    t = 1000.0
    state = _fleet_at(t, ("a", "b"))
    first = deploy(state, tmp_path / "state", DeployRequest(str(llama_dir), 2))
    _running(state, first.deployment_id, t + 1)
    dep = state.get_deployment(first.deployment_id)
    by_rank = {a.rank: a.node_id for a in state.assignments(first.deployment_id)}
    peer, gone = by_rank[0], by_rank[1]
    state.heartbeat(peer, None, t + 9.9)
    state.heartbeat(gone, None, t + 9.9)
    state.update_assignment(dep.deployment_id, 0, "crashed", t + 10.2, 2)
    # without the suspect the group would shrink to 1: wait (up to fresh_s) for it to be heard from ...
    assert replacement(state, dep, now=t + 10.5, fresh_s=2.0) is None
    # ... it is (its agent is alive; its rank was slow to say how it ended): both nodes, 2 ranks
    state.heartbeat(gone, None, t + 10.9)
    req = replacement(state, dep, now=t + 11.0, fresh_s=2.0)
    assert req.nodes == 2 and req.exclude == ()
    # ... it is not: past fresh_s the re-plan goes on with the node left
    state.heartbeat(peer, None, t + 12.0)
    state.heartbeat(gone, None, t + 9.9)  # (as if the one above never came)
    req = replacement(state, dep, now=t + 12.3, fresh_s=2.0)
    assert req.nodes == 1 and req.exclude == (gone,)


def test_a_rank_killed_by_a_signal_on_a_node_whose_agent_lives_on_is_used_once_heard_from(tmp_path, llama_dir):
    t = 1000.0
    state = _fleet_at(t)
    first = deploy(state, tmp_path / "state", DeployRequest(str(llama_dir), 2))
    _running(state, first.deployment_id, t + 1)
    dep = state.get_deployment(first.deployment_id)
    by_rank = {a.rank: a.node_id for a in state.assignments(first.deployment_id)}
    for name in ("a", "b", "c"):
        state.heartbeat(name, None, t + 9.9)
    state.update_assignment(dep.deployment_id, 1, "crashed", t + 10.0, -9, "", "killed by SIGKILL")  # e.g. OOM
    state.update_assignment(dep.deployment_id, 0, "crashed", t + 10.1, 2)
    req = replacement(state, dep, now=t + 10.3, fresh_s=2.0)
    assert req.nodes == 2 and req.exclude == (by_rank[1],)  # two other nodes: no need to wait for it
    state.heartbeat(by_rank[1], None, t + 10.5)
    assert replacement(state, dep, now=t + 10.6, fresh_s=2.0).exclude == ()


def test_a_re_plan_keeps_the_deployments_early_exit(tmp_path, llama_dir):
    """The heads (from the old deployment's copy), mode, threshold and cloud tier go with the new group."""
    from edge_node.early_exit import ExitHeads, load_exit_heads, save_exit_heads
    from edge_node.model import load_model
    from edge_node.run_config import EarlyExitOptions, RunConfig

    model = load_model(llama_dir)
    heads_json = save_exit_heads(ExitHeads.untrained(model.config, [1], model.norm.weight), tmp_path / "e.json")
    t = time.time()
    state = _fleet_at(t)
    opts = EarlyExitOptions(str(heads_json), threshold=0.4, mode="collaborative", cloud="10.0.0.2:7072")
    first = deploy(state, tmp_path / "state", DeployRequest(str(llama_dir), 2, exits=opts))
    heads_json.unlink()  # the re-plan must not need the original file: the deployment shipped its own copy
    _running(state, first.deployment_id, t)
    state.update_assignment(first.deployment_id, 0, "crashed", t + 1, 2)
    state.set_deployment_state(first.deployment_id, "failed", "rank 0 crashed")
    for name in ("a", "b", "c"):
        state.heartbeat(name, None, t + 1.5)
    [(old, new)] = Recovery(state, tmp_path / "state", Changes(), clock=lambda: t + 2).step()
    runs = [RunConfig.from_json(a.run_config_json) for a in state.assignments(new)]
    assert {(r.exits.mode, r.exits.threshold, r.exits.cloud, r.exits.layers) for r in runs} == \
        {("collaborative", 0.4, "10.0.0.2:7072", (1,))}
    shipped = tmp_path / "state" / "deployments" / new / "exits.json"  # with its weights, sha256-checked
    assert load_exit_heads(shipped, model.config).layers == (1,)
