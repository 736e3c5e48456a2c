"""A SuperNode run by the device agent's generic supervisor (edge_node.supervisor) from federated.runner's
ChildSpec: it registers with a real SuperLink on loopback and is stopped cleanly, with every process it started
(the warm ClientApp process's `flower-supernode --isolation process` child; Flower's own SuperExec without warm)."""

from __future__ import annotations

import re
import sqlite3
import time

import psutil
import pytest

from edge_node.ports import free_port
from edge_node.supervisor import Supervisor
from federated.runner import start_superlink, supernode_spec


def registered(db, node_id: int) -> bool:
    """Whether the SuperLink's state (Flower's SQLite database) lists the node online. Node ids are unsigned 64-bit;
    Flower stores them as the signed 64-bit integer with the same bits (SQLite has no unsigned type)."""
    if node_id >= 1 << 63:
        node_id -= 1 << 64
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
        return bool(c.execute("select 1 from node where node_id = ? and status = 'online'", (node_id,)).fetchall())


@pytest.mark.slow
@pytest.mark.parametrize("warm, started", [(True, "flower-supernode"), (False, "flower-superexec")])
def test_a_supervised_supernode_joins_the_superlink_and_stops_cleanly(tmp_path, warm, started):
    address = f"127.0.0.1:{free_port()}"
    link = start_superlink(address, tmp_path)
    sup = Supervisor(tmp_path / "agent-logs")
    try:
        spec = supernode_spec(address, f"127.0.0.1:{free_port()}", {"data": "unused.json"}, tmp_path, "json",
                              warm=warm)
        assert ("--isolation" in spec.argv) == warm
        assert spec.env["FLWR_HOME"] == str(tmp_path / "flwr-home") and "FLWR_HOME" not in spec.argv
        pid = sup.start(spec)
        err = tmp_path / "supernode_json.err"  # the supervisor's log of the child, in the spec's log_dir
        node_id, t0 = None, time.monotonic()
        while node_id is None and time.monotonic() - t0 < 90:
            assert sup.pid(spec.name) == pid, f"the SuperNode ended: {sup.exits.get(spec.name)}"
            found = re.search(r"SuperNode ID: (-?\d+)", err.read_text(errors="replace") if err.exists() else "")
            node_id = int(found[1]) if found else None
            time.sleep(0.5)
        assert node_id is not None, "the SuperNode never registered"
        assert registered(tmp_path / "superlink.db", node_id)
        kids, t0 = [], time.monotonic()
        while not any(started in " ".join(k.cmdline()) for k in kids) and time.monotonic() - t0 < 30:
            time.sleep(0.5)  # the SuperNode starts its SuperExec once registered
            kids = psutil.Process(pid).children(recursive=True)
        assert any(started in " ".join(k.cmdline()) for k in kids), f"no {started} started"
        ended = sup.stop(spec.name, timeout_s=10)
        assert ended is not None and ended.stopped and ended.exit_code in (0, -15), ended
        gone, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        sup.stop_all()
        link.stop()
