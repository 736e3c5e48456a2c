"""Federated rounds on the fleet itself: the coordinator runs the SuperLink (`edgefed coordinator --superlink`),
each node agent runs a SuperNode as a supervised child (`edgefed node --superlink --fl-data`), and `edgefed fl
start --superlink` runs a session on them. A SuperNode that dies is restarted by its agent; SIGTERM to an agent
ends its SuperNode with everything the SuperNode started."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from edge_node.ports import free_port
from emulation.corpus import partitions
from federated.data import write_client_data
from tests.coordinator.fleet import Fleet, wait_until

DEMO = Path(__file__).resolve().parents[2] / "models" / "edgefed-demo"


def _supernode_pid(agent_pid: int) -> int | None:
    """The agent's live SuperNode child (a killed one may linger as a zombie until the agent reaps it)."""
    for child in psutil.Process(agent_pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "supernode" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:  # ended (or a zombie) between the listing and the look
            continue
    return None


@pytest.mark.slow
def test_agents_supervise_supernodes_and_a_session_runs_on_the_coordinators_superlink(tmp_path):
    fleet = Fleet(tmp_path)
    link = f"127.0.0.1:{free_port()}"
    try:
        fleet.start_coordinator("--superlink", link)
        wait_until(lambda: f"superlink {link}" in fleet.procs.out("coordinator"), 60, "the SuperLink")
        token = fleet.token()
        agents = {}
        for name, part in partitions(["json", "email"]).items():
            data = write_client_data(tmp_path / f"{name}.json", part.files("train"), part.files("heldout"))
            agents[name] = fleet.start_node(name, token, "--superlink", link, "--fl-data", str(data),
                                            "--fl-quant", "float32")
        wait_until(lambda: all(_supernode_pid(p.pid) for p in agents.values()), 60, "both SuperNodes to start")

        # a SuperNode killed from outside comes back (its agent restarts it)
        first = _supernode_pid(agents["email"].pid)
        psutil.Process(first).kill()
        wait_until(lambda: _supernode_pid(agents["email"].pid) not in (None, first), 60, "the SuperNode's restart")
        assert "restarting supernode/email" in fleet.procs.err("email")

        out = subprocess.run([sys.executable, "-m", "edgefed", "fl", "start", "--superlink", link, "--model",
                              str(DEMO), "--rounds", "1", "--clients", "2", "--rank", "4", "--steps", "2",
                              "--train-blocks", "16", "--eval-blocks", "4", "--deadline", "300", "--work",
                              str(tmp_path / "fl"), "--timeout", "400", "--json"],
                             capture_output=True, text=True, timeout=450)
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads(out.stdout)
        [round1] = summary["history"]
        assert {c["name"] for c in round1["clients"]} == {"json", "email"} and not round1["rejected"]
        assert Path(summary["adapter"], "adapter_config.json").is_file()

        # SIGTERM to an agent: its SuperNode and whatever that started end with it
        node = _supernode_pid(agents["json"].pid)
        family = [psutil.Process(node), *psutil.Process(node).children(recursive=True)]
        assert fleet.procs.stop("json", signal.SIGTERM) == 0
        _, alive = psutil.wait_procs(family, timeout=15)
        assert not alive, [p.cmdline() for p in alive]
        assert re.search(r"stopped supernode/json", fleet.procs.err("json"))
    finally:
        fleet.close()
