"""edge_node.agent against a real Node service on loopback (in-process): resumable, sha256-checked fetches; the
assignment -> child -> report path; capped backoff."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.state import AssignmentRecord, DeploymentRecord
from edge_node.agent import Agent, AgentConfig, Backoff, FetchError
from edge_node.control import AssignmentSet, HeartbeatFigures
from edge_node.run_config import RunConfig
from tests.coordinator import test_node_service as node_service
from tests.coordinator.fleet import FAKE_RANK, wait_until
from tests.coordinator.test_node_service import FACTS, _deployment, _register

service = node_service.service  # the fixture: a Node service on loopback


def _agent(tmp_path, stub, md) -> Agent:
    a = Agent(AgentConfig("unused:1", tmp_path / "agent", "n1", "127.0.0.1", backoff_initial_s=0.01),
              facts=lambda: FACTS, figures=lambda: HeartbeatFigures(0, 0, 0))
    a.identity = {"name": "n1", "node_id": md[0][1], "secret": md[1][1]}
    a._stub = stub
    return a


def test_fetch_resumes_from_a_partial_file_and_checks_sha256(service, tmp_path):
    servicer, stub, _ = service
    md = _register(stub)
    data, ref = _deployment(servicer, tmp_path)
    agent = _agent(tmp_path, stub, md)
    dest = tmp_path / "got" / "w.bin"
    dest.parent.mkdir()
    (dest.parent / "w.bin.part").write_bytes(data[:2345])  # an earlier fetch broke here
    agent.fetch("d-1", ref, dest)
    assert dest.read_bytes() == data and servicer.offsets == [2345]
    agent.fetch("d-1", ref, dest)  # present and verified: nothing fetched again
    assert servicer.offsets == [2345]


def test_a_file_whose_sha256_differs_is_refused_and_not_kept(service, tmp_path):
    servicer, stub, _ = service
    md = _register(stub)
    _, ref = _deployment(servicer, tmp_path, sha="0" * 64)
    agent = _agent(tmp_path, stub, md)
    dest = tmp_path / "got" / "w.bin"
    with pytest.raises(FetchError, match="does not match"):
        agent.fetch("d-1", ref, dest)
    assert not dest.exists() and not dest.with_name("w.bin.part").exists()


def test_a_corrupt_partial_file_is_refused_then_fetched_whole(service, tmp_path):
    servicer, stub, _ = service
    md = _register(stub)
    data, ref = _deployment(servicer, tmp_path)
    agent = _agent(tmp_path, stub, md)
    dest = tmp_path / "got" / "w.bin"
    dest.parent.mkdir()
    (dest.parent / "w.bin.part").write_bytes(b"\0" * 1000)  # wrong bytes: the digest catches them
    with pytest.raises(FetchError):
        agent.fetch("d-1", ref, dest)
    agent.fetch("d-1", ref, dest)
    assert dest.read_bytes() == data and servicer.offsets == [1000, 0]


def test_backoff_doubles_up_to_its_cap_and_resets():
    b = Backoff(0.2, 1.0)
    delays = [b.next() for _ in range(6)]
    assert all(0.8 * w <= d <= w for d, w in zip(delays, [0.2, 0.4, 0.8, 1.0, 1.0, 1.0], strict=True))
    b.reset()
    assert b.next() <= 0.2


def test_an_assignment_is_fetched_started_and_its_crash_reported(service, tmp_path):
    servicer, stub, _ = service
    md = _register(stub)
    d = Path(servicer.dir) / "deployments" / "d-1"
    (d / "rank0").mkdir(parents=True)
    (d / "rank0" / "w.bin").write_bytes(b"weights" * 100)
    (d / "manifest.json").write_text('{"files": [{"path": "rank0/w.bin", "rank": 0}]}')
    ref, manifest = _file_ref(d, "rank0/w.bin"), _file_ref(d, "manifest.json")
    run = RunConfig(shards="placeholder").to_json()
    rec = AssignmentRecord("d-1", 0, "n1", 1, run, "127.0.0.1:2", "127.0.0.1:3", (ref, manifest))
    servicer.state.add_deployment(DeploymentRecord("d-1", "m", "float32", 1, "127.0.0.1:3"), [rec])
    agent = _agent(tmp_path, stub, md)
    agent.config = AgentConfig("unused:1", tmp_path / "agent", "n1", "127.0.0.1",
                               rank_command=(sys.executable, str(FAKE_RANK), "--mode", "crash-rank0"))
    sent = []
    agent.report = sent.append
    agent.apply(AssignmentSet(1, (rec.to_assignment(),)))
    wait_until(lambda: any(r.status in ("crashed", "failed") for r in sent), 30, "the crash report")
    crash = [r for r in sent if r.status == "crashed"][0]
    assert [r.status for r in sent] == ["fetching", "starting", "crashed"]
    assert crash.exit_code == 3 and "boom: rank 0 cannot go on" in crash.stderr_tail
    assert (tmp_path / "agent" / "deployments" / "d-1" / "shards" / ref.path).is_file()
    agent.apply(AssignmentSet(2, (rec.to_assignment(),)))  # restart policy none: the same assignment again
    assert len(sent) == 3 and agent.supervisor.running() == []
    agent.apply(AssignmentSet(3, ()))  # no longer assigned: its files go
    assert not (tmp_path / "agent" / "deployments" / "d-1").exists()


def test_rank_zeros_node_picks_its_ports_and_the_other_ranks_wait_for_its_master(service, tmp_path):
    import json

    servicer, stub, _ = service
    md = _register(stub)
    d = Path(servicer.dir) / "deployments" / "d-1"
    for r in (0, 1):
        (d / f"rank{r}").mkdir(parents=True)
        (d / f"rank{r}" / "w.bin").write_bytes(b"w" * (100 + r))
    (d / "manifest.json").write_text(json.dumps({"files": [{"path": f"rank{r}/w.bin", "rank": r} for r in (0, 1)]}))
    man = _file_ref(d, "manifest.json")
    run = RunConfig(shards="placeholder").to_json()
    recs = [AssignmentRecord("d-1", r, "n1", 2, run, "", "", (_file_ref(d, f"rank{r}/w.bin"), man)) for r in (0, 1)]
    servicer.state.add_deployment(DeploymentRecord("d-1", "m", "float32", 2, ""), recs)
    agent = _agent(tmp_path, stub, md)
    agent.config = AgentConfig("unused:1", tmp_path / "agent", "n1", "127.0.0.1",
                               rank_command=(sys.executable, str(FAKE_RANK)))
    sent = []
    agent.report = sent.append
    try:
        agent.apply(AssignmentSet(1, tuple(r.to_assignment() for r in recs)))
        wait_until(lambda: any(r.status in ("running", "failed", "crashed") for r in sent), 30, "rank 0 running")
        assert not [r for r in sent if r.status in ("failed", "crashed")], sent
        by = {(r.rank, r.status): r for r in sent}
        master, listen = by[(0, "starting")].master, by[(0, "running")].listen
        assert master.startswith("127.0.0.1:") and int(master.rpartition(":")[2]) > 0  # on its advertised host
        assert listen.startswith("127.0.0.1:") and listen != "127.0.0.1:0" and listen != master
        assert [(r.rank, r.status) for r in sent if r.rank == 1] == [(1, "fetching")]  # fetched, not started
        assert agent.handled[("d-1", 1)] == "waiting" and agent.supervisor.running() == ["d-1/rank0"]
        shards = tmp_path / "agent" / "deployments" / "d-1" / "shards"
        assert (shards / "rank1" / "w.bin").is_file()
        agent.apply(AssignmentSet(2, tuple(replace(r, master=master).to_assignment() for r in recs)))
        wait_until(lambda: (1, "running") in {(r.rank, r.status) for r in sent}, 30, "rank 1 running")
        assert by[(0, "running")].master == "" and [r for r in sent if r.rank == 1][-1].listen == ""
        assert sorted(agent.supervisor.running()) == ["d-1/rank0", "d-1/rank1"]
    finally:
        agent.supervisor.stop_all()


def _file_ref(d: Path, rel: str):
    import hashlib

    from edge_node.control import FileRef

    data = (d / rel).read_bytes()
    return FileRef(rel, len(data), hashlib.sha256(data).hexdigest())


def test_the_agent_rewrites_only_the_shard_path_and_never_imports_torch():
    import json
    import subprocess

    from edge_node.agent import local_run_config

    run = RunConfig(shards="/coordinator/side", max_new_tokens=7, memory_mb=300.0)
    local = local_run_config(run.to_json(), "shards")
    assert local == RunConfig.from_json(local).to_json()  # what RunConfig itself writes: digests agree
    assert json.loads(local)["shards"] == "shards" and RunConfig.from_json(local).memory_mb == 300.0
    code = "import sys, edge_node.agent, edge_node.probe, edge_node.supervisor; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip() == "False"


def test_the_agent_verifies_with_the_one_torch_free_sha256(tmp_path):
    import hashlib
    import subprocess

    import edge_node.agent as agent
    from edge_node.model import checksum, formats
    from edge_node.shard import ShardChecksumError

    assert agent.sha256_file is checksum.sha256_file is formats.sha256_file  # no copy of its own
    assert formats.ChecksumError is checksum.ChecksumError is ShardChecksumError
    f = tmp_path / "blob"
    f.write_bytes(b"x" * ((1 << 24) + 5))  # crosses a read chunk
    assert checksum.sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    code = "import sys, edge_node.model.checksum; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip() == "False"
