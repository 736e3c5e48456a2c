"""Cleanup always: the registry undoes in reverse, once, past errors; a run that fails in the middle, or gets
SIGINT / SIGTERM, leaves no namespace, link, cgroup or process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from emulation.cleanup import Cleanup, Interrupted, leftovers, run_prefix, sweep
from tests.emulation.netutil import mine, snapshot, why_no_cgroups, why_no_netns

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = """
name = "two"
[[nodes]]
name = "a"
memory_mb = 128
bandwidth_mbit = 50
[[nodes]]
name = "b"
memory_mb = 128
"""
NOTHING = {"netns": [], "links": [], "cgroups": []}


def test_registry_runs_newest_first_once_and_past_errors():
    done: list[str] = []
    c = Cleanup("eftest00")
    c.add("one", lambda: done.append("one"))
    c.add("boom", lambda: 1 / 0)
    c.add("two", lambda: done.append("two"))
    errors = c.run()
    assert done == ["two", "one"] and len(errors) == 1 and errors[0].startswith("boom: ")
    assert c.run() == errors and done == ["two", "one"]  # a second run does nothing more


def test_sigterm_inside_the_block_becomes_interrupted_and_cleans_up():
    done: list[str] = []
    with pytest.raises(Interrupted, match="SIGTERM"):
        with Cleanup("eftest00") as c:
            c.add("x", lambda: done.append("x"))
            os.kill(os.getpid(), signal.SIGTERM)
    assert done == ["x"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_sweep_refuses_a_prefix_that_could_match_others():
    with pytest.raises(Exception, match="too short"):
        sweep("ef")


@pytest.fixture
def isolated(tmp_path):
    why = why_no_netns() or why_no_cgroups()
    if why:
        pytest.skip(why)
    (tmp_path / "s.toml").write_text(SCENARIO)
    return tmp_path


def _hold(tmp: Path, *extra: str) -> tuple[subprocess.Popen, dict]:
    p = subprocess.Popen([sys.executable, "-m", "tests.emulation.hold_fleet", str(tmp / "s.toml"), str(tmp / "logs"),
                          *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line, p.communicate(timeout=30)[1]
    return p, json.loads(line)


def _assert_gone(info: dict, before: dict) -> None:
    assert leftovers(info["prefix"]) == NOTHING
    assert mine(snapshot(), info["prefix"]) == NOTHING
    assert not (set(snapshot()["links"]) - set(before["links"]))
    for pid in info["pids"]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_forced_failure_in_the_middle_leaves_nothing_behind(isolated):
    before = snapshot()
    p, info = _hold(isolated, "--fail")
    assert info["mode"] == "isolated" and len(info["pids"]) == 2
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "forced failure in the middle" in err
    _assert_gone(info, before)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_testbed_process_cleans_up(isolated, sig):
    before = snapshot()
    p, info = _hold(isolated)
    try:
        assert mine(snapshot(), info["prefix"])["netns"]  # it did build something
        assert all(psutil.pid_exists(pid) for pid in info["pids"])
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
            sweep(info["prefix"])
    assert p.returncode == 128 + sig, err
    _assert_gone(info, before)


def test_sweep_removes_what_a_killed_run_left(isolated):
    p, info = _hold(isolated)
    p.kill()  # SIGKILL: no cleanup ran
    p.wait()
    prefix = info["prefix"]
    assert leftovers(prefix) != NOTHING
    assert sweep(prefix) == NOTHING
    for pid in info["pids"]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert run_prefix() != run_prefix()
