"""edge_node.probe: device facts, and the matmul speed probe measured once per device and cached."""

import json

from edge_node import probe


def test_speed_probe_is_cached_per_device_and_remeasured_when_the_device_differs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(probe, "measure_gflops", lambda: calls.append(1) or 12.3456)
    assert probe.speed_gflops(tmp_path) == 12.346 and len(calls) == 1
    assert probe.speed_gflops(tmp_path) == 12.346 and len(calls) == 1  # cached
    cache = tmp_path / probe.SPEED_CACHE
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "device": "another CPU"}))
    assert probe.speed_gflops(tmp_path) == 12.346 and len(calls) == 2  # a different device: measured again
    cache.write_text("{not json")
    assert probe.speed_gflops(tmp_path) == 12.346 and len(calls) == 3  # a broken cache is replaced


def test_device_facts_and_heartbeat_figures_are_this_machines(tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "measure_gflops", lambda: 5.0)
    f = probe.device_facts(tmp_path)
    assert f.cores >= 1 and 0 < f.memory_available <= f.memory_total and f.disk_free > 0
    assert "CPUExecutionProvider" in f.providers and f.speed_gflops == 5.0
    h = probe.heartbeat_figures(tmp_path)
    assert 0 <= h.cpu_percent and h.memory_available > 0 and h.agent_rss > 10 << 20


def test_the_real_probe_measures_a_positive_speed():
    assert probe.measure_gflops(repeats=2) > 0


def _tree(tmp_path, files: dict[str, str]):
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)


def test_cgroup_v2_memory_is_the_tightest_cap_over_the_ancestors(tmp_path):
    cg = tmp_path / "cg"
    _tree(tmp_path, {
        "proc_cgroup": "0::/outer/node\n",
        "mountinfo": f"31 23 0:28 / {cg} rw,relatime - cgroup2 cgroup2 rw\n",
        "cg/memory.current": "100\n",  # the root has no memory.max: skipped
        "cg/outer/memory.max": str(600 << 20), "cg/outer/memory.current": str(500 << 20),
        "cg/outer/memory.stat": f"anon 1\ninactive_file {50 << 20}\n",
        "cg/outer/node/memory.max": str(300 << 20), "cg/outer/node/memory.current": str(100 << 20)})
    # the node's cap (300 MiB) with the outer group's headroom (600 - 500 + 50 reclaimable = 150 MiB)
    assert probe.cgroup_memory(tmp_path / "proc_cgroup", tmp_path / "mountinfo") == (300 << 20, 150 << 20)
    (cg / "outer" / "memory.max").write_text("max\n")
    assert probe.cgroup_memory(tmp_path / "proc_cgroup", tmp_path / "mountinfo") == (300 << 20, 200 << 20)
    (cg / "outer" / "node" / "memory.max").write_text("max\n")
    assert probe.cgroup_memory(tmp_path / "proc_cgroup", tmp_path / "mountinfo") is None  # nothing caps it


def test_cgroup_v1_memory_and_unlimited_v1(tmp_path):
    mem = tmp_path / "memory"
    _tree(tmp_path, {
        "proc_cgroup": "5:cpu:/\n4:memory:/job/node\n0::/\n",
        "mountinfo": f"32 31 0:29 / {tmp_path / 'cpu'} rw - cgroup cgroup rw,cpu\n"
                     f"35 31 0:31 / {mem} rw,relatime - cgroup cgroup rw,memory\n",
        "memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": str(8 << 30),
        "memory/job/memory.limit_in_bytes": "9223372036854771712",
        "memory/job/memory.usage_in_bytes": str(1 << 30),
        "memory/job/node/memory.limit_in_bytes": str(256 << 20),
        "memory/job/node/memory.usage_in_bytes": str(64 << 20),
        "memory/job/node/memory.stat": f"cache 9\ntotal_inactive_file {16 << 20}\n"})
    assert probe.cgroup_memory(tmp_path / "proc_cgroup", tmp_path / "mountinfo") == (256 << 20, 208 << 20)
    (mem / "job" / "node" / "memory.limit_in_bytes").write_text("9223372036854771712")
    assert probe.cgroup_memory(tmp_path / "proc_cgroup", tmp_path / "mountinfo") is None  # v1's "unlimited"
    assert probe.cgroup_memory(tmp_path / "absent", tmp_path / "mountinfo") is None


def test_device_facts_in_a_real_cgroup_report_its_cap(tmp_path):
    """A process in a 300 MiB cgroup (made here, removed after) is told 300 MiB, not the host's memory."""
    import os
    import subprocess
    import sys

    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root to make a cgroup")
    from emulation.cgroups import cgroup_version, create_cgroup

    if cgroup_version() is None:
        pytest.skip("no cgroup memory controller mounted under /sys/fs/cgroup")
    cg = create_cgroup(f"probe-test-{os.getpid()}", 300, 1.0)
    try:
        code = ("import json, sys; from edge_node import probe; probe.measure_gflops = lambda: 1.0; "
                "f = probe.device_facts(sys.argv[1]); h = probe.heartbeat_figures(sys.argv[1]); "
                "print(json.dumps([f.memory_total, f.memory_available, h.memory_available]))")
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                           preexec_fn=cg.preexec())
        assert r.returncode == 0, r.stderr
        total, available, beat = json.loads(r.stdout)
        assert total == 300 << 20
        assert 100 << 20 < available < 300 << 20 and 100 << 20 < beat < 300 << 20  # the cap less what it uses
    finally:
        cg.remove()
    assert not any(d.exists() for d in cg.dirs)
