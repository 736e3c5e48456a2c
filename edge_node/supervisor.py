"""A generic child-process supervisor for the device agent: start an argv with its environment, capture how it
ended (exit status or signal, and the tail of its stderr), stop it cleanly (SIGTERM, then SIGKILL after a
timeout).

Restart policy is "none": a child that ends stays ended and its ending comes back as a ChildExit record the
agent reports; deciding what to run next is the coordinator's job. The supervisor knows nothing of ranks or
models, so the same class runs a tensor-parallel rank today and a Flower SuperNode or an early-exit edge
process later. Each child runs in its own process group (a child's own children are stopped with it) and
dies with the agent (PR_SET_PDEATHSIG on Linux), so an agent killed with SIGKILL leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

STOP_TIMEOUT_S = 5.0
TAIL_BYTES = 4096


@dataclass(frozen=True)
class ChildSpec:
    name: str  # unique per supervisor, e.g. "d-1234/rank0"
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)  # added to the agent's environment
    cwd: str | None = None
    log_dir: str | None = None  # stdout/stderr files go here (default: a temporary directory per child)


@dataclass(frozen=True)
class ChildExit:
    name: str
    pid: int
    exit_code: int  # negative: killed by that signal (subprocess's convention)
    stderr_tail: str
    stopped: bool  # True when the supervisor stopped it (not a crash)
    runtime_s: float

    @property
    def how(self) -> str:
        if self.exit_code < 0:
            return f"killed by {signal.Signals(-self.exit_code).name}"
        return f"exit status {self.exit_code}"


def tail(path: Path, limit: int = TAIL_BYTES) -> str:
    """The last `limit` bytes of a file, decoded leniently (a child may stop mid-character)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# Run by a fresh interpreter between the fork and the real program: PR_SET_PDEATHSIG (SIGTERM when the parent
# dies), exit if the parent is already gone, then exec argv (same pid: the death signal survives the exec).
_GUARD = ("import ctypes, os, signal, sys\n"
          "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
          "if os.getppid() != int(sys.argv[1]):\n    os._exit(70)\n"
          "os.execvp(sys.argv[2], sys.argv[2:])\n")


def dies_with_parent(argv) -> list[str]:
    """argv, run so that it gets SIGTERM when this process dies, even by SIGKILL (Linux), so no child outlives
    its supervisor. A small launcher sets it and execs argv: no Python runs in the forked child itself, which
    subprocess's preexec_fn would do, and that is unsafe in a process with threads (the agent's gRPC threads):
    such a child can deadlock or abort before its exec (seen: a rank aborting in gRPC's epoll poller)."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _GUARD, str(os.getpid()), *argv]


class _Child:
    def __init__(self, spec: ChildSpec, log_dir: Path):
        self.spec = spec
        log_dir.mkdir(parents=True, exist_ok=True)
        safe = spec.name.replace("/", "_")
        self.stdout_path, self.stderr_path = log_dir / f"{safe}.out", log_dir / f"{safe}.err"
        self.stopping = False
        self.t0 = time.monotonic()
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(dies_with_parent(spec.argv), env={**os.environ, **spec.env}, cwd=spec.cwd,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)

    def record(self, code: int) -> ChildExit:
        return ChildExit(self.spec.name, self.proc.pid, code, tail(self.stderr_path), self.stopping,
                         time.monotonic() - self.t0)

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # its own group: start_new_session made pid the group id
        except ProcessLookupError:
            pass


class Supervisor:
    """Children by name; `on_exit` is called (from a watcher thread) with each child's ChildExit."""

    def __init__(self, log_dir: str | Path, on_exit: Callable[[ChildExit], None] | None = None,
                 stop_timeout_s: float = STOP_TIMEOUT_S):
        self.log_dir = Path(log_dir)
        self.on_exit = on_exit
        self.stop_timeout_s = stop_timeout_s
        self._lock = threading.Lock()
        self._children: dict[str, _Child] = {}
        self.exits: dict[str, ChildExit] = {}

    def start(self, spec: ChildSpec) -> int:
        """Start a child; returns its pid. A name already running is refused (stop it first)."""
        with self._lock:
            if spec.name in self._children:
                raise ValueError(f"child {spec.name!r} is already running")
            child = _Child(spec, Path(spec.log_dir) if spec.log_dir else self.log_dir)
            self._children[spec.name] = child
            self.exits.pop(spec.name, None)
        threading.Thread(target=self._watch, args=(child,), name=f"watch-{spec.name}", daemon=True).start()
        return child.proc.pid

    def _watch(self, child: _Child) -> None:
        code = child.proc.wait()
        child.signal_group(signal.SIGKILL)  # whatever the child left in its group goes with it
        record = child.record(code)
        if self.on_exit is not None:  # before the record is filed: stop() returns after on_exit has run
            self.on_exit(record)
        with self._lock:
            self._children.pop(child.spec.name, None)
            self.exits[child.spec.name] = record

    def running(self) -> list[str]:
        with self._lock:
            return sorted(self._children)

    def pid(self, name: str) -> int | None:
        with self._lock:
            child = self._children.get(name)
            return child.proc.pid if child else None

    def stop(self, name: str, timeout_s: float | None = None) -> ChildExit | None:
        """SIGTERM the child's group, SIGKILL after the timeout; returns how it ended (None: not running)."""
        with self._lock:
            child = self._children.get(name)
        if child is None:
            return self.exits.get(name)
        child.stopping = True
        child.signal_group(signal.SIGTERM)
        try:
            child.proc.wait(timeout=self.stop_timeout_s if timeout_s is None else timeout_s)
        except subprocess.TimeoutExpired:
            child.signal_group(signal.SIGKILL)
            child.proc.wait(timeout=10.0)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:  # the watcher thread files the record
            with self._lock:
                if name in self.exits and name not in self._children:
                    return self.exits[name]
            time.sleep(0.01)
        return child.record(child.proc.returncode)

    def stop_all(self, timeout_s: float | None = None) -> list[ChildExit]:
        """Stop every child (in parallel, so N children take one timeout, not N)."""
        names = self.running()
        results: dict[str, ChildExit | None] = {}
        threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, self.stop(n, timeout_s)))
                   for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [r for n in names if (r := results.get(n)) is not None]


def python_argv(module: str, *args: str) -> tuple[str, ...]:
    """argv running `python -m module args...` with this interpreter."""
    return (sys.executable, "-m", module, *args)
