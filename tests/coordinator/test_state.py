"""One contract suite for coordinator.state, run against every implementation (as Flower's linkstate_test)."""

import pytest

from coordinator.state import (
    AssignmentRecord,
    DeploymentRecord,
    MemoryState,
    RequestRecord,
    SqliteState,
    StateError,
)
from edge_node.control import DeviceFacts, FileRef, HeartbeatFigures

FACTS = DeviceFacts(cores=4, memory_total=8 << 30, memory_available=6 << 30, disk_free=50 << 30,
                    providers=("CPUExecutionProvider",), speed_gflops=12.5)
FILE = FileRef("rank0/layer0000.safetensors", 123, "ab" * 32)


@pytest.fixture(params=["memory", "sqlite"])
def state(request, tmp_path):
    s = MemoryState() if request.param == "memory" else SqliteState(tmp_path / "state")
    yield s
    s.close()


def _deployment(state, dep_id="d-1", nodes=("a", "b")):
    dep = DeploymentRecord(dep_id, "models/demo", "float32", len(nodes), "127.0.0.1:5000", created=1.0)
    asg = [AssignmentRecord(dep_id, r, n, len(nodes), '{"shards": "x"}', "127.0.0.1:6000",
                            "127.0.0.1:5000" if r == 0 else "", (FILE,)) for r, n in enumerate(nodes)]
    state.add_deployment(dep, asg)
    return dep, asg


def test_register_then_refresh_keeps_enrollment_time_and_secret(state):
    a = state.register_node("a", FACTS, "10.0.0.1", now=10.0, secret_digest="sha256:s")
    assert (a.state, a.registered_at, a.last_heartbeat, a.secret_digest, a.facts) == ("alive", 10.0, 10.0,
                                                                                      "sha256:s", FACTS)
    b = state.register_node("a", FACTS, "10.0.0.2", now=20.0)
    assert (b.registered_at, b.last_heartbeat, b.advertise_host, b.secret_digest) == (10.0, 20.0, "10.0.0.2",
                                                                                      "sha256:s")
    assert [n.node_id for n in state.list_nodes()] == ["a"]
    assert state.get_node("zzz") is None


def test_heartbeat_records_figures_and_unknown_node_is_refused(state):
    state.register_node("a", FACTS, "h", now=1.0)
    hb = HeartbeatFigures(cpu_percent=12.0, memory_available=1 << 30, disk_free=2 << 30, agent_rss=3 << 20)
    n = state.heartbeat("a", hb, now=5.0)
    assert (n.heartbeat, n.last_heartbeat) == (hb, 5.0)
    with pytest.raises(StateError, match="unknown node"):
        state.heartbeat("nope", hb, now=5.0)


def test_silent_nodes_are_marked_lost_once_and_revive_on_heartbeat(state):
    state.register_node("a", FACTS, "h", now=1.0)
    state.register_node("b", FACTS, "h", now=9.0)
    assert state.mark_lost(silent_since=5.0) == ["a"]
    assert state.mark_lost(silent_since=5.0) == []  # already lost
    assert state.get_node("a").state == "lost" and state.get_node("b").state == "alive"
    state.heartbeat("a", HeartbeatFigures(1.0, 1, 1), now=10.0)
    assert state.get_node("a").state == "alive"


def test_deployment_with_assignments_round_trips(state):
    dep, asg = _deployment(state)
    assert state.get_deployment("d-1") == dep
    assert state.list_deployments() == [dep]
    assert state.assignments("d-1") == asg
    assert state.assignments(node_id="b") == [asg[1]]
    assert state.assignments(deployment_id="d-1", node_id="a") == [asg[0]]
    assert state.assignments("other") == []
    assert asg[0].to_assignment().files == (FILE,)
    with pytest.raises(StateError, match="exists"):
        _deployment(state)


def test_deployment_state_and_assignment_reports(state):
    _deployment(state)
    assert state.set_deployment_state("d-1", "degraded", "node b lost").detail == "node b lost"
    with pytest.raises(StateError, match="deployment state"):
        state.set_deployment_state("d-1", "sideways")
    with pytest.raises(StateError, match="unknown deployment"):
        state.set_deployment_state("d-9", "running")
    a = state.update_assignment("d-1", 1, "crashed", now=3.0, exit_code=-9, stderr_tail="boom")
    assert (a.status, a.exit_code, a.stderr_tail, a.updated, a.node_id) == ("crashed", -9, "boom", 3.0, "b")
    assert state.assignments("d-1")[1] == a
    with pytest.raises(StateError, match="no rank 7"):
        state.update_assignment("d-1", 7, "running", now=3.0)


def test_request_records(state):
    _deployment(state)
    state.add_request(RequestRecord("r2", "d-1", created=2.0))
    state.add_request(RequestRecord("r1", "d-1", created=1.0, status="running"))
    with pytest.raises(StateError, match="exists"):
        state.add_request(RequestRecord("r1", "d-1", created=1.0))
    done = state.finish_request("r1", "done", now=4.0, prompt_tokens=5, completion_tokens=7)
    assert (done.status, done.finished, done.prompt_tokens, done.completion_tokens) == ("done", 4.0, 5, 7)
    assert [r.request_id for r in state.list_requests("d-1")] == ["r1", "r2"]
    assert state.list_requests("d-2") == []
    assert state.get_request("r1") == done
    with pytest.raises(StateError, match="request status"):
        state.finish_request("r2", "exploded", now=5.0)
    with pytest.raises(StateError, match="unknown request"):
        state.finish_request("r9", "done", now=5.0)


def test_sqlite_state_survives_reopening(tmp_path):
    s = SqliteState(tmp_path)
    s.register_node("a", FACTS, "h", now=1.0, secret_digest="sha256:x")
    dep, asg = _deployment(s)
    s.add_request(RequestRecord("r1", "d-1", created=1.0))
    s.close()
    t = SqliteState(tmp_path)
    assert t.get_node("a").facts == FACTS and t.get_node("a").secret_digest == "sha256:x"
    assert (t.get_deployment("d-1"), t.assignments("d-1")) == (dep, asg)
    assert t.get_request("r1").status == "queued"
    t.close()


def test_rank_zeros_rendezvous_reaches_every_rank_and_the_endpoint(state):
    _deployment(state)
    dep = state.set_rendezvous("d-1", master="10.0.0.7:41000")
    assert [a.master for a in state.assignments("d-1")] == ["10.0.0.7:41000"] * 2
    assert dep.endpoint == "127.0.0.1:5000"  # listen not given: unchanged
    dep = state.set_rendezvous("d-1", listen="10.0.0.7:42000")
    assert dep.endpoint == "10.0.0.7:42000" == state.get_deployment("d-1").endpoint
    assert [(a.master, a.listen) for a in state.assignments("d-1")] == [("10.0.0.7:41000", "10.0.0.7:42000"),
                                                                        ("10.0.0.7:41000", "")]
    with pytest.raises(StateError, match="unknown deployment"):
        state.set_rendezvous("d-9", master="h:1")


def test_a_request_finished_before_it_reached_a_deployment_keeps_its_status(state):
    state.add_request(RequestRecord("r1", "", created=1.0, status="running", model="demo"))
    r = state.finish_request("r1", "failed", now=2.0, error="model: no such model", http_status=404)
    assert (r.deployment_id, r.model, r.http_status, r.error) == ("", "demo", 404, "model: no such model")
    state.add_request(RequestRecord("r2", "", created=3.0, status="running", model="demo"))
    r = state.finish_request("r2", "done", now=4.0, prompt_tokens=3, completion_tokens=2, deployment_id="d-1",
                             http_status=200)
    assert (r.deployment_id, r.http_status, state.list_requests("d-1")) == ("d-1", 200, [r])


def test_an_older_state_file_gains_the_new_request_columns(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "coordinator.sqlite3")
    db.execute("CREATE TABLE requests (request_id TEXT PRIMARY KEY, deployment_id TEXT NOT NULL, created REAL NOT "
               "NULL, status TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, "
               "finished REAL, error TEXT NOT NULL)")
    db.execute("INSERT INTO requests VALUES ('old', 'd-1', 1.0, 'done', 3, 4, 2.0, '')")
    db.commit()
    db.close()
    s = SqliteState(tmp_path)
    assert s.get_request("old") == RequestRecord("old", "d-1", 1.0, "done", 3, 4, 2.0, "", "", 0)
    s.add_request(RequestRecord("new", "", 3.0, "running", model="demo"))
    assert s.finish_request("new", "cancelled", 4.0, http_status=499).model == "demo"
    s.close()
