"""Flower's processes on this machine (or beside a coordinator and each device agent): SuperLink, SuperNodes, and
`flwr run` of edgefed's app. No Ray: each SuperNode serves its ClientApp's messages in one long-lived process
beside it (federated.warm), or, with warm=False, Flower's default of a ClientApp subprocess per message.

The seam for the device agent (and the coordinator): `start_superlink` / `start_supernode` take addresses and
directories and return a `Proc` the caller supervises (`alive`, `stop`); `supernode_spec` gives the same SuperNode
as an edge_node.supervisor.ChildSpec, for the agent's Supervisor to run; `submit_run` starts a session on a
SuperLink and waits for it. Each process leads its own process group, so stopping it also ends the ServerApp /
ClientApp children it spawned. `LocalFederation` puts them together on loopback for tests and `edgefed fl`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tomli_w

from edge_node.model.errors import EdgefedError
from edge_node.ports import free_port
from edge_node.supervisor import ChildSpec

from .strategy import SUMMARY, SessionConfig

APP_NAME = "edgefed-lora"


class FederationError(EdgefedError):
    """A Flower process did not start, or a session did not finish."""


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name  # the console scripts of the running environment
    return str(here) if here.is_file() else name


@dataclass
class Proc:
    """A started Flower process (its own process group) and where it logs."""

    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM to its group, SIGKILL after `grace_s` (and to every descendant: Flower detaches its SuperExec
        into a session of its own); returns its exit status."""
        kids = _descendants(self.popen.pid)
        if self.alive():
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.popen.pid, signal.SIGKILL)  # children (a ServerApp, a ClientApp) may outlive it
        for k in kids:
            try:
                k.kill()
            except psutil.Error:
                pass
        try:
            return self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the group this process leads (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def _start(name: str, argv: list[str], log: Path, env: dict[str, str]) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        popen = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 start_new_session=True)
    return Proc(name, popen, log)


def flower_env_extra(flwr_home: Path) -> dict[str, str]:
    """What a Flower process needs on top of the caller's environment (a supervisor's ChildSpec.env)."""
    bin_dir = str(Path(sys.executable).parent)  # Flower starts flower-superexec, flwr-clientapp ... by name
    extra = {"FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1",
             "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    if "OMP_WAIT_POLICY" not in os.environ:
        extra["OMP_WAIT_POLICY"] = "PASSIVE"  # several torch processes share the cores
    return extra


def flower_env(flwr_home: Path) -> dict[str, str]:
    return {**os.environ, **flower_env_extra(flwr_home)}


def wait_listening(address: str, proc: Proc, timeout_s: float) -> None:
    host, port = address.rsplit(":", 1)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if not proc.alive():
            raise FederationError(f"{proc.name} exited ({proc.popen.returncode}) before listening on {address}:\n"
                                  f"{proc.tail()}")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise FederationError(f"{proc.name} is not listening on {address} after {timeout_s:.0f} s")


def start_superlink(address: str, work_dir: str | Path, timeout_s: float = 60.0) -> Proc:
    """A SuperLink (insecure, loopback or a private network) serving Fleet, Control and ServerApp on `address`."""
    spec = superlink_spec(address, work_dir)
    proc = _start("SuperLink", list(spec.argv), Path(work_dir) / "superlink.log", {**os.environ, **spec.env})
    wait_listening(address, proc, timeout_s)
    return proc


def superlink_spec(address: str, work_dir: str | Path) -> ChildSpec:
    """The SuperLink as a ChildSpec (the coordinator supervises it: it dies with the coordinator). Its state is
    in a file under `work_dir`, so a restarted SuperLink still knows the SuperNodes that registered with it."""
    work = Path(work_dir)
    host, port = address.rsplit(":", 1)
    argv = (_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation", "--host", host,
            "--port", port, "--database", str(work / "superlink.db"))
    return ChildSpec("superlink", argv, env=flower_env_extra(work / "flwr-home"), cwd=str(work), log_dir=str(work))


def start_supernode(superlink: str, address: str, node_config: dict, work_dir: str | Path, name: str,
                    max_wait_s: float = 120.0, warm: bool = True) -> Proc:
    """A SuperNode connecting to `superlink`, its ClientApp API on `address`, its device in `node_config`
    (name, data, model, quant, memory-mb, slowdown, threads: federated.task.ClientSettings). It gives up when the
    SuperLink stays unreachable for `max_wait_s`. `warm`: one ClientApp process serves every message
    (federated.warm); otherwise Flower's default, a fresh ClientApp process per message."""
    spec = supernode_spec(superlink, address, node_config, work_dir, name, max_wait_s, warm)
    return _start(f"SuperNode {name}", list(spec.argv), Path(work_dir) / f"supernode-{name}.log",
                  {**os.environ, **spec.env})


def supernode_spec(superlink: str, address: str, node_config: dict, work_dir: str | Path, name: str,
                   max_wait_s: float = 120.0, warm: bool = True) -> ChildSpec:
    """The same SuperNode as a ChildSpec for the device agent's generic supervisor (edge_node.supervisor): argv,
    the environment it adds (FLWR_HOME under `work_dir`, Flower's console scripts on PATH), cwd and log directory
    `work_dir`. With `warm` (the default) the child is `edgefed fl supernode`, which runs `flower-supernode
    --isolation process` as its own child and serves the ClientApp's messages in itself, keeping the base model
    loaded between rounds (federated.warm); without, the child is `flower-supernode`, whose SuperExec spawns a
    ClientApp process per message. Either way Supervisor.stop's SIGTERM to the child's group ends every process
    it started (they stay in its group)."""
    work = Path(work_dir)
    host, port = address.rsplit(":", 1)
    argv = (_bin("flower-supernode"), "--insecure", "--superlink", superlink, "--host", host, "--port", port,
            "--max-wait-time", str(max_wait_s), "--node-config", str(write_node_config(work, name, node_config)))
    if warm:
        argv = (sys.executable, "-m", "edgefed", "fl", "supernode", "--runtime-api", address, "--", *argv,
                "--isolation", "process")
    return ChildSpec(f"supernode/{name}", argv, env=flower_env_extra(work / "flwr-home"), cwd=str(work),
                     log_dir=str(work))


def write_node_config(work: Path, name: str, values: dict) -> Path:
    """A SuperNode's node config as a TOML file (Flower's --node-config takes one: no quoting of paths)."""
    path = work / f"node-{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps({"name": name, **values}))
    return path


def write_app(app_dir: str | Path, session: SessionConfig) -> Path:
    """The Flower app directory `flwr run` bundles: a pyproject.toml naming edgefed's ServerApp and ClientApp
    (installed code) with the session as its run config."""
    d = Path(app_dir)
    d.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": APP_NAME, "version": "1.0.0", "description": "edgefed federated LoRA",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
                 "flwr": {"app": {"publisher": "edgefed",
                                  "components": {"serverapp": "federated.server_app:app",
                                                 "clientapp": "federated.client_app:app"},
                                  "config": session.to_run_config()}}},
    }
    (d / "pyproject.toml").write_text(tomli_w.dumps(project))
    return d


def write_connection(flwr_home: Path, superlink: str) -> None:
    """The `flwr` CLI's SuperLink connection ("local") in this session's own FLWR_HOME."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    conf = {"superlink": {"default": "local", "local": {"address": superlink, "insecure": True}}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(conf))


def submit_run(superlink: str, session: SessionConfig, work_dir: str | Path, timeout_s: float) -> dict:
    """Start the session on `superlink` with `flwr run` and wait for it; returns its summary."""
    import json

    work = Path(work_dir)
    app = write_app(work / "app", session)
    home = work / "flwr-home"
    write_connection(home, superlink)
    summary = Path(session.out) / SUMMARY
    summary.unlink(missing_ok=True)
    log = work / "run.log"
    with open(log, "ab") as f:
        try:
            subprocess.run([_bin("flwr"), "run", str(app), "local", "--stream"], stdout=f, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, env=flower_env(home), timeout=timeout_s, check=False,
                           start_new_session=True)
        except subprocess.TimeoutExpired:
            raise FederationError(f"the session did not finish within {timeout_s:.0f} s (log: {log})") from None
    if not summary.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise FederationError(f"the session ended without a summary ({summary}); its log ends:\n{tail}")
    return json.loads(summary.read_text())


@dataclass
class LocalFederation:
    """A SuperLink and N SuperNodes on loopback; `with LocalFederation(...) as fed: fed.run(session)`."""

    work_dir: Path
    nodes: list[dict]  # node config per SuperNode (must include "name")
    superlink: str = ""
    warm: bool = True  # one ClientApp process per SuperNode serving every message (False: one per message)
    procs: list[Proc] = field(default_factory=list)

    def __enter__(self) -> LocalFederation:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.work_dir = Path(self.work_dir)
        self.superlink = self.superlink or f"127.0.0.1:{free_port()}"
        try:
            self.procs.append(start_superlink(self.superlink, self.work_dir))
            for cfg in self.nodes:
                cfg = dict(cfg)
                self.procs.append(start_supernode(self.superlink, f"127.0.0.1:{free_port()}", cfg, self.work_dir,
                                                  cfg.pop("name"), warm=self.warm))
        except BaseException:
            self.stop()
            raise

    def restart_superlink(self) -> None:
        """Stop the SuperLink (and the ServerApp it runs) and start a fresh one on the same address: a
        coordinator restart. SuperNodes reconnect by themselves."""
        self.procs[0].stop()
        self.procs[0] = start_superlink(self.superlink, self.work_dir)

    def node(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == f"SuperNode {name}")

    def run(self, session: SessionConfig, timeout_s: float = 900.0) -> dict:
        return submit_run(self.superlink, session, self.work_dir, timeout_s)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
