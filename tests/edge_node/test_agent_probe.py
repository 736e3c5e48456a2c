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
