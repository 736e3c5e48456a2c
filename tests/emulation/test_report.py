"""The report: JSON, one PNG per plot, an HTML page that a headless browser shows with every plot, and a
console table; the summary's figures come from the per-request records."""

from __future__ import annotations

import json
import shutil
import subprocess

import matplotlib.image
import pytest

from emulation.report import PLOTS, console_table, summary, write_report


def sample_report() -> dict:
    reqs = [{"start_s": i, "end_s": i + 2.0, "ttft_ms": 100.0 + 10 * i, "total_ms": 900.0 + 10 * i,
             "ms_per_token": 50.0 + i, "tokens_per_s": 1000 / (50 + i), "tokens": 16,
             "index": i, "exits": {"edge": 10 + i % 2, "cloud": 6 - i % 2 - (i == 4), "fallback": int(i == 4),
                                   "cloud_status": "lost" if i == 4 else "used"},
             "error": None} for i in range(9)]
    reqs.append({"start_s": 9.0, "error": "HTTP 503: no deployment"})
    return {
        "run": {"scenario": "unit", "mode": "isolated", "latency_mode": "injected", "wall_s": 12.0, "notes": ["n1"],
                "early_exit": {"heads": "h.json", "threshold": 0.5, "mode": "collaborative", "applied": True}},
        "requests": reqs,
        "nodes": {"a": {"caps": {"memory_mb": 256}, "peak_memory_mb": 180.5,
                        "memory_mb": [[0.5 * i, 100 + 10 * i] for i in range(8)], "tx_bytes": 4096, "rx_bytes": 8192,
                        "ended": None},
                  "b": {"caps": {"memory_mb": 128}, "peak_memory_mb": 128.0, "memory_mb": [[0, 50], [1, 128]],
                        "tx_bytes": 0, "rx_bytes": 0,
                        "ended": "killed by the kernel OOM killer (memory cap 128 MB, swap off)"}},
        "per_token": [{"compute_ms": 5.0, "comm_ms": 20.0 + i, "io_wait_ms": 0.5} for i in range(16)],
        "rounds": [{"round": 1, "perplexity": 40.0, "bytes": 1000, "wall_s": 3.0},
                   {"round": 2, "perplexity": 31.5, "bytes": 1000, "wall_s": 3.1}],
        "faults": [{"at_s": 5, "kind": "kill_node", "node": "b", "applied_s": 5.01, "result": "killed pid 1"}],
        "cloud": {"address": "10.0.0.2:7072", "split": 4, "peak_memory_mb": 300.0, "ended": None,
                  "metrics": {"memory_used_bytes": 3 * 2**20, "memory_bound_bytes": 256 * 2**20, "requests": 70.0}},
    }


def test_summary_counts_and_percentiles():
    s = summary(sample_report())
    assert (s["requests"], s["ok"], s["errors"]) == (10, 9, 1)
    assert s["ttft_ms_p50"] == 140.0 and s["ttft_ms_p95"] == 180.0
    assert s["tokens"] == 144 and s["tokens_per_s"] == 14.4  # over the 10 s the requests ran, not the run
    # tokens: edge 10/11 alternating (4 requests of 11), cloud 6/5 (one of them lost the cloud: 1 fell back)
    assert (s["tokens_edge"], s["tokens_cloud"], s["tokens_cloud_unreachable"]) == (94, 49, 1)
    assert s["requests_cloud_unreachable"] == 1
    assert s["oom_kills"] == ["b"]
    assert (s["after_fault"], s["after_fault_ok"]) == (4, 3)  # started at 6, 7, 8 (ok) and 9 (failed) s


def test_console_table_names_nodes_faults_and_an_oom_kill():
    text = console_table(sample_report())
    assert "testbed unit: isolated nodes, latency injected" in text
    assert "requests 9/10 ok, 1 errors" in text
    assert any(line.startswith("b ") and "OOM killer" in line for line in text.splitlines())
    assert "fault at 5 s: kill_node b" in text and "note: n1" in text
    assert "after the first fault: 3/4 requests ok" in text
    assert ("early exit (collaborative, threshold 0.5): tokens at the edge 94 (65%), at the cloud 49 (34%), at the "
            "edge with the cloud unreachable 1 (1%) (1 request(s))") in text
    assert "cloud tier at 10.0.0.2:7072 (layers [4, L)), peak 300 MB, 3.0 of 256 MB bound, 70 requests" in text


def test_console_table_names_the_rank_a_fault_hit_and_the_re_plan():
    report = sample_report()
    report["faults"][0]["rank"] = 1
    report["run"]["deployments"] = [{"deployment_id": "d1", "state": "stopped", "detail": "replaced by d2",
                                     "nodes": ["a", "b"]},
                                    {"deployment_id": "d2", "state": "running", "detail": "", "nodes": ["a", "c"]}]
    text = console_table(report)
    assert "fault at 5 s: kill_node b (rank 1)" in text
    assert "deployment d1 on a, b: stopped (replaced by d2)" in text and "deployment d2 on a, c: running" in text


def test_files_are_written_and_readable(tmp_path):
    paths = write_report(sample_report(), tmp_path)
    report = json.loads(paths["json"].read_text())
    assert report["summary"]["ok"] == 9 and report["nodes"]["b"]["peak_memory_mb"] == 128.0
    for name in PLOTS:
        img = matplotlib.image.imread(paths[name])
        assert img.shape[0] >= 300 and img.shape[1] >= 600
        assert img.std() > 0.05  # something is drawn, not a blank canvas
    page = paths["html"].read_text()
    assert all(f'src="{name}.png"' in page for name in PLOTS)
    assert "<h2>early exit</h2>" in page and "<td>4</td><td></td><td>10</td><td>5</td><td>1</td><td>lost</td>" in page


def test_empty_run_still_writes_every_plot(tmp_path):
    paths = write_report({"run": {"scenario": "empty"}}, tmp_path)
    assert all(paths[name].is_file() for name in PLOTS)
    assert "requests 0/0 ok" in console_table({"run": {"scenario": "empty"}})


@pytest.mark.slow
def test_headless_chromium_shows_every_plot(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("needs Debian's chromium (apt install chromium)")
    paths = write_report(sample_report(), tmp_path / "out")
    url = paths["html"].resolve().as_uri()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert f"{len(PLOTS)} of {len(PLOTS)} plots shown" in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "screenshot.png"  # taken in the test, never committed
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2400", url], capture_output=True,
                   timeout=120, check=True)
    img = matplotlib.image.imread(shot)
    assert img.shape[:2] == (2400, 1280)
    assert img[..., :3].std() > 0.05  # the plots are on it, not an empty page
