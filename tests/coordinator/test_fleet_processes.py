"""The control plane as real processes on loopback: `edgefed coordinator` and `edgefed node` daemons."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.coordinator.fleet import Fleet, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.close()


def test_nodes_register_heartbeat_and_a_silent_node_is_lost_then_back(fleet):
    fleet.start_coordinator(http=False)
    token = fleet.token()
    fleet.start_node("a", token)
    b = fleet.start_node("b", token)
    wait_until(lambda: all(fleet.view.get_node(n) and fleet.view.get_node(n).heartbeat for n in "ab"), 60,
               "both nodes to register and heartbeat")
    a = fleet.view.get_node("a")
    assert a.facts.cores >= 1 and a.facts.memory_total > 0 and a.facts.speed_gflops > 0
    assert "CPUExecutionProvider" in a.facts.providers and a.heartbeat.agent_rss > 0
    b.send_signal(signal.SIGSTOP)  # silent, but not gone
    t0 = time.monotonic()
    wait_until(lambda: fleet.node_state("b") == "lost", 10, "node b to be marked lost")
    assert time.monotonic() - t0 < fleet.lost_after + 3
    assert fleet.node_state("a") == "alive"
    b.send_signal(signal.SIGCONT)
    wait_until(lambda: fleet.node_state("b") == "alive", 10, "node b to be alive again")
    assert fleet.procs.stop("a") == 0 and fleet.procs.stop("b") == 0  # SIGTERM: a clean exit


def test_a_node_with_a_wrong_token_is_refused(fleet):
    fleet.start_coordinator(http=False)
    fleet.token()
    p = fleet.start_node("intruder", "efe.000000000000.not-a-real-token")
    assert p.wait(60) == 3
    assert "refused this node" in fleet.procs.err("intruder") and "enrollment token" in fleet.procs.err("intruder")
    assert fleet.view.get_node("intruder") is None


def test_coordinator_restart_loses_no_record_and_nodes_reconnect_by_themselves(fleet, llama_dir):
    from coordinator.state import RequestRecord

    fleet.start_coordinator()
    token = fleet.token(uses=2)  # spent by the two enrollments: reconnecting must not need it
    fleet.start_node("a", token)
    fleet.start_node("b", token)
    wait_until(lambda: all(fleet.node_state(n) == "alive" for n in "ab"), 60, "both nodes to register")
    key = fleet.admin_key()
    out = subprocess.run([sys.executable, "-m", "edgefed", "deploy", "--coordinator", fleet.http, "--model",
                          str(llama_dir), "--nodes", "2", "--admin-key", key, "--wait", "60", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    dep = json.loads(out.stdout)
    assert dep["state"] == "running" and sorted(a["node_id"] for a in dep["assignments"]) == ["a", "b"]
    fleet.view.add_request(RequestRecord("req-1", dep["deployment_id"], time.time(), "done", 3, 5, time.time()))
    refused = _post_completion(fleet.http, key, {"model": "no-such-model", "prompt": "hi"})
    assert refused == 404  # a client error through the coordinator's API is recorded too
    # the endpoint rank 0's node reported (a port it chose on its own host), and the master it gave rank 1
    rank0, rank1 = fleet.view.assignments(dep["deployment_id"])
    assert fleet.view.get_deployment(dep["deployment_id"]).endpoint == rank0.listen
    assert rank0.listen.startswith("127.0.0.1:") and rank1.master == rank0.master != ""
    before = {n.node_id: n for n in fleet.view.list_nodes()}

    fleet.procs.stop("coordinator", signal.SIGKILL)
    time.sleep(1.0)  # the nodes notice, back off, retry
    fleet.start_coordinator()
    t0 = time.time()
    wait_until(lambda: all(fleet.view.get_node(n).last_heartbeat > t0 for n in "ab"), 30,
               "both nodes to heartbeat the restarted coordinator")
    # the same enrollments (registered_at kept; free memory and disk are refreshed by the re-registration)
    assert {n.node_id: (n.facts.cores, n.facts.memory_total, n.registered_at) for n in fleet.view.list_nodes()} == \
        {k: (v.facts.cores, v.facts.memory_total, v.registered_at) for k, v in before.items()}
    assert fleet.view.get_deployment(dep["deployment_id"]).state == "running"
    assert fleet.view.get_request("req-1").completion_tokens == 5
    [api] = [r for r in fleet.view.list_requests() if r.request_id != "req-1"]
    assert (api.status, api.http_status, api.model) == ("failed", 404, "no-such-model")
    for name in "ab":  # the daemons kept their ranks running through the restart
        assert fleet.procs.procs[name].poll() is None
    # SIGTERM to a daemon: its rank is stopped and the coordinator told so before it exits
    assert fleet.procs.stop("a") == 0
    assert [x.status for x in fleet.view.assignments(dep["deployment_id"]) if x.node_id == "a"] == ["stopped"]


def test_a_crashing_rank_comes_back_as_a_report_and_the_daemon_stays_up(fleet, llama_dir):
    fleet.start_coordinator("--no-replan")  # keep the failed deployment as it is (re-planning: test_fleet_e2e)
    token = fleet.token()
    fleet.start_node("a", token, rank_mode="crash-rank1")
    fleet.start_node("b", token, rank_mode="crash-rank1")
    wait_until(lambda: all(fleet.node_state(n) == "alive" for n in "ab"), 60, "both nodes to register")
    key = fleet.admin_key()
    out = subprocess.run([sys.executable, "-m", "edgefed", "deploy", "--coordinator", fleet.http, "--model",
                          str(llama_dir), "--nodes", "a,b", "--admin-key", key, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    dep_id = json.loads(out.stdout)["deployment_id"]
    rank1 = wait_until(lambda: next((a for a in fleet.view.assignments(dep_id) if a.rank == 1 and a.status ==
                                     "crashed"), None), 60, "rank 1's crash report")
    assert rank1.exit_code == 3 and "boom: rank 1 cannot go on" in rank1.stderr_tail
    dep = wait_until(lambda: fleet.view.get_deployment(dep_id).state == "failed" and fleet.view.get_deployment(
        dep_id), 10, "the deployment to fail")
    assert f"rank 1 on node {rank1.node_id} crashed (exit status 3)" in dep.detail
    # the files each node fetched are the coordinator's, byte for byte, and only its own rank's shards
    manifest = json.loads((fleet.state_dir / "deployments" / dep_id / "manifest.json").read_text())
    for a in fleet.view.assignments(dep_id):
        shards = fleet.tmp / f"data-{a.node_id}" / "deployments" / dep_id / "shards"
        for f in a.files:
            assert (shards / f.path).read_bytes() == (fleet.state_dir / "deployments" / dep_id / f.path).read_bytes()
        held = {p.relative_to(shards).as_posix() for p in shards.rglob("*") if p.is_file()}
        assert held == {f.path for f in a.files}
        assert {f["rank"] for f in manifest["files"] if f["path"] in held} == {a.rank}
    t0 = time.time()
    wait_until(lambda: fleet.view.get_node(rank1.node_id).last_heartbeat > t0 + 0.5, 10,
               "the crashed rank's node to keep heartbeating")
    assert fleet.procs.procs[rank1.node_id].poll() is None
    # stopping the deployment stops rank 0 on node a (SIGTERM to its child)
    import urllib.request

    req = urllib.request.Request(f"http://{fleet.http}/admin/deployments/{dep_id}", method="DELETE",
                                 headers={"Authorization": f"Bearer {key}"})
    assert json.loads(urllib.request.urlopen(req, timeout=10).read())["state"] == "stopped"
    wait_until(lambda: fleet.view.assignments(dep_id)[0].status == "stopped", 20, "rank 0 to be stopped")
    assert fleet.procs.stop("a") == 0 and fleet.procs.stop("b") == 0


def _post_completion(http: str, key: str, body: dict) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://{http}/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code
