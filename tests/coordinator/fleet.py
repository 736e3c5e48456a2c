"""Real coordinator and node daemons as processes on loopback, for tests; every process is removed at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from coordinator.state import SqliteState
from edge_node.ports import free_port

FAKE_RANK = Path(__file__).with_name("fake_rank.py")


def wait_until(pred, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _seed_speed_probe(data_dir: Path) -> None:
    """Measure the speed probe once per fleet and give each daemon the result, as if measured before
    (the daemons then start without importing torch)."""
    from edge_node.probe import SPEED_CACHE, speed_gflops

    session = data_dir.parent / ".probe"
    speed_gflops(session)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / SPEED_CACHE).write_bytes((session / SPEED_CACHE).read_bytes())


class Procs:
    """Started processes by name; stop() ends them all (SIGTERM, then SIGKILL), only these pids."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        out, err = open(self.tmp / f"{name}.out", "wb"), open(self.tmp / f"{name}.err", "wb")
        p = subprocess.Popen([sys.executable, "-m", "edgefed", *argv], stdout=out, stderr=err, env=env,
                             stdin=subprocess.DEVNULL)
        out.close()
        err.close()
        self.procs[name] = p
        return p

    def err(self, name: str) -> str:
        return (self.tmp / f"{name}.err").read_text(errors="replace")

    def out(self, name: str) -> str:
        return (self.tmp / f"{name}.out").read_text(errors="replace")

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        return p.returncode

    def stop_all(self) -> None:
        for name in list(self.procs):
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGCONT)
                self.stop(name)


class Fleet:
    """A coordinator (plain text, or mutual TLS with tls=True; short heartbeats) and node daemons on loopback."""

    def __init__(self, tmp: Path, heartbeat: float = 0.2, lost_after: float = 1.2, tls: bool = False):
        self.tmp, self.heartbeat, self.lost_after = tmp, heartbeat, lost_after
        self.tls_dir = tmp / "tls" if tls else None
        if self.tls_dir is not None:  # a CA and the coordinator's certificate; node certificates in start_node
            from coordinator.security import init_ca

            init_ca(self.tls_dir)
        self.state_dir = tmp / "state"
        self.port, self.http_port = free_port(), free_port()
        self.procs = Procs(tmp)
        self._view: SqliteState | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start_coordinator(self, *extra: str, http: bool = True) -> subprocess.Popen:
        argv = ["coordinator", "--listen", self.address, "--state", str(self.state_dir), *self._security(),
                "--heartbeat", str(self.heartbeat), "--lost-after", str(self.lost_after), *extra]
        if http:
            argv += ["--http", self.http]
        p = self.procs.start("coordinator", argv)
        wait_until(lambda: ("http" if http else "listening") in self.procs.out("coordinator") or p.poll() is not None,
                   60, "the coordinator to listen")
        assert p.poll() is None, self.procs.err("coordinator")
        return p

    def token(self, uses: int | None = None) -> str:
        from coordinator.security import SecretStore

        return SecretStore(self.state_dir).create("enroll", uses=uses)[1]

    def admin_key(self) -> str:
        from coordinator.security import SecretStore

        return SecretStore(self.state_dir).create("admin")[1]

    def start_node(self, name: str, token: str, *extra: str, rank_mode: str | None = "ok") -> subprocess.Popen:
        """A node daemon; its ranks are tests/coordinator/fake_rank.py in `rank_mode`, or with rank_mode=None
        the real `edgefed serve`."""
        if self.tls_dir is not None:
            from coordinator.security import issue_node_cert

            issue_node_cert(self.tls_dir, name)
        argv = ["node", "--coordinator", self.address, "--data-dir", str(self.tmp / f"data-{name}"),
                "--token", token, *self._security(name), "--name", name, "--advertise", "127.0.0.1",
                "--heartbeat", str(self.heartbeat), "--backoff-max", "0.5", "--rpc-timeout", "3", *extra]
        if rank_mode is not None:
            argv += ["--rank-command", f"{sys.executable} {FAKE_RANK} --mode {rank_mode}"]
        _seed_speed_probe(self.tmp / f"data-{name}")
        return self.procs.start(name, argv)

    def _security(self, node: str | None = None) -> list[str]:
        if self.tls_dir is None:
            return ["--insecure"]
        return ["--tls-dir", str(self.tls_dir / "nodes" / node if node else self.tls_dir)]

    @property
    def view(self) -> SqliteState:
        """The coordinator's SQLite state, read from this process (WAL: concurrent readers are fine)."""
        if self._view is None:
            self._view = SqliteState(self.state_dir)
        return self._view

    def node_state(self, name: str) -> str | None:
        n = self.view.get_node(name)
        return n.state if n else None

    def close(self) -> None:
        self.procs.stop_all()
        if self._view is not None:
            self._view.close()
