"""edge_node.supervisor: real child processes, their endings recorded, stopped cleanly."""

import os
import signal
import sys
import threading
import time

import pytest

from edge_node.supervisor import ChildSpec, Supervisor


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_crash_comes_back_with_exit_status_and_stderr_tail(tmp_path):
    got = []
    done = threading.Event()
    sup = Supervisor(tmp_path, on_exit=lambda e: (got.append(e), done.set()))
    code = "import sys, os; print('x' * 9000, file=sys.stderr); print('the cause', os.environ['EXTRA'], " \
           "file=sys.stderr); sys.exit(3)"
    sup.start(ChildSpec("job/rank1", _py(code), env={"EXTRA": "42"}))
    assert done.wait(10)
    e = got[0]
    assert (e.name, e.exit_code, e.stopped, e.how) == ("job/rank1", 3, False, "exit status 3")
    assert e.stderr_tail.rstrip().endswith("the cause 42") and len(e.stderr_tail) <= 4096
    assert sup.running() == [] and sup.exits["job/rank1"] == e


def test_stop_terminates_then_kills_a_child_that_ignores_sigterm(tmp_path):
    sup = Supervisor(tmp_path, stop_timeout_s=0.5)
    code = "import signal, time, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); " \
           "time.sleep(60)"
    pid = sup.start(ChildSpec("stubborn", _py(code)))
    _wait_for_file(tmp_path / "stubborn.out", "up")
    t0 = time.monotonic()
    e = sup.stop("stubborn")
    assert time.monotonic() - t0 < 5
    assert e.exit_code == -signal.SIGKILL and e.stopped
    assert not _alive(pid)


def test_stop_all_stops_grandchildren_too(tmp_path):
    sup = Supervisor(tmp_path)
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(60)']); print(p.pid, flush=True); time.sleep(60)")
    sup.start(ChildSpec("a", _py(code)))
    sup.start(ChildSpec("b", _py("import time; time.sleep(60)")))
    grandchild = int(_wait_for_file(tmp_path / "a.out", "\n").strip())
    with pytest.raises(ValueError, match="already running"):
        sup.start(ChildSpec("b", _py("pass")))
    exits = sup.stop_all()
    assert sorted(e.name for e in exits) == ["a", "b"]
    assert all(e.exit_code == -signal.SIGTERM and e.stopped for e in exits)
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def _wait_for_file(path, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in (text := path.read_text()):
            return text
        time.sleep(0.02)
    raise AssertionError(f"{path} never contained {needle!r}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_a_supervisor_killed_outright_even_one_with_threads_running(tmp_path):
    """The supervisor's own process is SIGKILLed while busy threads run in it (the agent's gRPC threads): its
    child gets SIGTERM from the kernel, and the pid the supervisor recorded is the program's own (the launcher
    that sets the death signal execs it)."""
    import subprocess

    code = ("import os, sys, threading, time\n"
            "from pathlib import Path\n"
            "from edge_node.supervisor import ChildSpec, Supervisor\n"
            "for _ in range(4):\n"
            "    threading.Thread(target=lambda: [sum(range(1000)) for _ in iter(int, 1)], daemon=True).start()\n"
            "sup = Supervisor(Path(sys.argv[1]))\n"
            "pid = sup.start(ChildSpec('c', (sys.executable, '-c', 'import os, time; print(os.getpid(), "
            "flush=True); time.sleep(60)')))\n"
            "print(pid, flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    recorded = None
    try:
        recorded = int(parent.stdout.readline())
        assert int(_wait_for_file(tmp_path / "c.out", "\n").strip()) == recorded  # the program's own pid
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(recorded) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(recorded), "the child outlived its supervisor"
    finally:
        parent.kill()
        parent.wait(10)
        if recorded is not None and _alive(recorded):
            os.kill(recorded, signal.SIGKILL)
