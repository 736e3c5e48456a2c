"""Everything a testbed run creates is undone: namespaces, veths, bridges, qdiscs, cgroups and processes.

`Cleanup` is a registry of undo actions, run in reverse order on success, on an exception and on SIGINT or
SIGTERM (which become `Interrupted`, so `with` blocks unwind). Each action runs once; running the registry
again does nothing. Every name the testbed creates starts with the run's prefix (`run_prefix()`), so
`leftovers(prefix)` can check that nothing remains and `sweep(prefix)` can remove what a killed run left,
without ever touching anything outside the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from edge_node.model.errors import EdgefedError

CMD_TIMEOUT_S = 30.0  # every ip / tc call
STOP_S = 5.0  # a process gets this long after SIGTERM before SIGKILL


class Interrupted(EdgefedError):
    """SIGINT or SIGTERM reached the testbed; cleanup runs as the stack unwinds."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; cleaning up")
        self.signum = signum


def run_prefix() -> str:
    """A short per-run prefix ("ef" + 6 hex digits): interface names must fit in 15 characters."""
    return "ef" + secrets.token_hex(3)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command (ip, tc) with a timeout; a failure names the command and its error."""
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise EdgefedError(f"`{' '.join(argv)}` did not finish within {CMD_TIMEOUT_S:g} s") from None
    if check and r.returncode != 0:
        raise EdgefedError(f"`{' '.join(argv)}` failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


class Cleanup:
    """Undo actions, run last-in first-out, once each."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._actions: list[tuple[str, Callable[[], None]]] = []
        self.errors: list[str] = []
        self._previous: dict[int, object] = {}

    def add(self, what: str, undo: Callable[[], None]) -> None:
        self._actions.append((what, undo))

    def process(self, proc: subprocess.Popen, what: str) -> subprocess.Popen:
        """Register a process we started: SIGTERM, then SIGKILL after STOP_S; then whatever it started itself
        (its descendants, found by parentage while it lived) gets SIGKILL."""
        self.add(f"process {what} (pid {proc.pid})", lambda: stop_tree(proc))
        return proc

    def run(self) -> list[str]:
        """Run every pending action (newest first); errors are collected, never stop the others."""
        while self._actions:
            what, undo = self._actions.pop()
            try:
                undo()
            except Exception as e:  # noqa: BLE001 - cleanup must go on past any one failure
                self.errors.append(f"{what}: {e}")
        return self.errors

    def __enter__(self) -> Cleanup:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, _raise_interrupted)
        return self

    def __exit__(self, *exc) -> None:
        # A second Ctrl-C while cleaning up must not cut the cleanup short.
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            self.run()
        finally:
            for sig, h in self._previous.items():
                signal.signal(sig, h)
            self._previous.clear()


def _raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signum)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=STOP_S)


def stop_tree(proc: subprocess.Popen) -> None:
    """stop_process, then SIGKILL to the descendants it leaves (a node agent's rank child, say)."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    except psutil.Error:
        kids = []
    stop_process(proc)
    for k in kids:
        with contextlib.suppress(psutil.Error):
            k.kill()


def stop_group(proc: subprocess.Popen) -> None:
    """End a process started with start_new_session=True and whatever stayed in its process group."""
    for sig, wait in ((signal.SIGTERM, STOP_S), (signal.SIGKILL, STOP_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(0.2)  # members of the group that outlive their leader get the next signal too
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_S)


# --- what a run left behind, found by its prefix -------------------------------------------------------------

def netns_names() -> list[str]:
    r = sh("ip", "netns", "list", check=False)
    return [ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()]


def host_links() -> list[str]:
    r = sh("ip", "-j", "link", "show", check=False)
    try:
        return [link["ifname"] for link in json.loads(r.stdout or "[]")]
    except (json.JSONDecodeError, KeyError):
        return []


def cgroup_dirs(prefix: str) -> list[Path]:
    """Cgroup directories named with the prefix, in any hierarchy (v1 controllers and v2)."""
    from emulation.cgroups import cgroup_parents

    return sorted(p for parent in cgroup_parents() if parent.is_dir() for p in parent.glob(f"{prefix}*"))


def leftovers(prefix: str) -> dict[str, list[str]]:
    """What still exists with the prefix: namespaces, host links and cgroups (empty lists: nothing)."""
    return {
        "netns": [n for n in netns_names() if n.startswith(prefix)],
        "links": [n for n in host_links() if n.startswith(prefix)],
        "cgroups": [str(p) for p in cgroup_dirs(prefix)],
    }


def sweep(prefix: str) -> dict[str, list[str]]:
    """Remove what a run with this prefix left (after a SIGKILL of the testbed, say); returns what remains.

    Processes inside the run's cgroups are killed (only a run's own processes are in them); deleting a
    namespace removes its veths, bridge and qdiscs with it."""
    if not prefix or len(prefix) < 4:
        raise EdgefedError(f"refusing to sweep with the prefix {prefix!r}: too short to be a run's own")
    from emulation.cgroups import remove_cgroup_dir

    for d in cgroup_dirs(prefix):
        remove_cgroup_dir(d)
    for ns in netns_names():
        if ns.startswith(prefix):
            kill_netns_processes(ns)
            sh("ip", "netns", "del", ns, check=False)
    for link in host_links():
        if link.startswith(prefix):
            sh("ip", "link", "del", link, check=False)
    return leftovers(prefix)


def kill_netns_processes(ns: str) -> None:
    """SIGKILL what still runs inside one of the run's namespaces (a namespace with live processes
    lingers after `ip netns del`)."""
    r = sh("ip", "netns", "pids", ns, check=False)
    for pid in (int(p) for p in r.stdout.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if r.stdout.strip():
        time.sleep(0.1)
