"""Per-node cgroups: a process over its memory cap is killed by the kernel and reported as an OOM kill; one
under its cap is not; a CPU quota bounds the CPU time a busy process gets; removal kills what is left."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from emulation.cgroups import create_cgroup
from emulation.cleanup import Cleanup, leftovers, run_prefix
from tests.emulation.netutil import why_no_cgroups

CAP_MB = 64
# touch every page of `mb` MiB, then report success
GROW = "import sys; b = bytearray(int(sys.argv[1]) << 20); b[::4096] = b'x' * len(b[::4096]); print('ok')"
SPIN = ("import time; t = time.monotonic() + float(__import__('sys').argv[1])\n"
        "while time.monotonic() < t: pass\nprint(time.process_time())")


@pytest.fixture
def prefix():
    why = why_no_cgroups()
    if why:
        pytest.skip(why)
    p = run_prefix()
    yield p
    assert leftovers(p)["cgroups"] == []


def _run_in(cg, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", *argv], preexec_fn=cg.preexec(), capture_output=True, text=True,
                          timeout=timeout)


def test_over_the_memory_cap_is_an_oom_kill_reported_as_such(prefix):
    with Cleanup(prefix) as cleanup:
        cg = create_cgroup(f"{prefix}-node", CAP_MB, 1.0)
        cleanup.add("cgroup", cg.remove)
        assert cg.oom_kills() == 0
        r = _run_in(cg, GROW, str(4 * CAP_MB))
        assert r.returncode == -9 and "ok" not in r.stdout  # the kernel stopped it, it did not finish
        assert cg.oom_kills() == 1
        assert cg.explain_exit(r.returncode) == f"killed by the kernel OOM killer (memory cap {CAP_MB} MB, swap off)"
        assert cg.peak_bytes() <= CAP_MB << 20


def test_under_the_cap_runs_and_a_plain_sigkill_is_not_called_oom(prefix):
    with Cleanup(prefix) as cleanup:
        cg = create_cgroup(f"{prefix}-node", CAP_MB, 1.0)
        cleanup.add("cgroup", cg.remove)
        r = _run_in(cg, GROW, str(CAP_MB // 4))
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
        assert cg.oom_kills() == 0 and cg.explain_exit(0) == "exit status 0"
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=cg.preexec())
        assert cg.pids() == [p.pid]
        p.kill()
        assert cg.explain_exit(p.wait(timeout=10)) == "killed by SIGKILL"


def test_cpu_quota_bounds_cpu_time(prefix):
    with Cleanup(prefix) as cleanup:
        cg = create_cgroup(f"{prefix}-node", 256, 0.2)
        cleanup.add("cgroup", cg.remove)
        wall = 1.5
        r = _run_in(cg, SPIN, str(wall))
        cpu = float(r.stdout)
        # 0.2 CPU for 1.5 s is 0.3 s of CPU; allow start-up before the child joins and one period of slack
        assert cpu <= 0.2 * wall + 0.15, f"{cpu:.2f} s of CPU in {wall} s under a 0.2 CPU quota"


def test_removal_kills_what_is_left_in_the_cgroup(prefix):
    cg = create_cgroup(f"{prefix}-node", CAP_MB, 1.0)
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=cg.preexec())
    time.sleep(0.1)
    cg.remove()
    assert p.wait(timeout=10) == -9
    assert not any(d.exists() for d in cg.dirs)
    cg.remove()  # idempotent
