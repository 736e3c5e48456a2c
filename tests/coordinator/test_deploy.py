"""coordinator.deploy: each node is sent only its own rank's shard files, and no address is chosen on the
coordinator's machine (rank 0's node picks them)."""

import shutil
import time
from pathlib import Path

from coordinator.deploy import DeployRequest, deploy
from coordinator.server import DEPLOYMENTS_DIR
from coordinator.state import MemoryState
from edge_node.control import DeviceFacts
from edge_node.shard import Manifest

DEMO = Path(__file__).resolve().parents[2] / "models" / "edgefed-demo"
GiB = 1 << 30


def test_each_rank_is_sent_its_own_shards_and_loads_from_them_alone(tmp_path):
    state = MemoryState()
    for name in ("a", "b"):
        state.register_node(name, DeviceFacts(2, 8 * GiB, 6 * GiB, 50 * GiB, (), 10.0), "10.0.0.9", time.time())
    dep = deploy(state, tmp_path / "state", DeployRequest(str(DEMO), 2))
    src = tmp_path / "state" / DEPLOYMENTS_DIR / dep.deployment_id
    whole = Manifest.load(src)
    every = {f.relative_to(src).as_posix() for f in src.rglob("*") if f.is_file()}
    assert dep.endpoint == ""
    sent: dict[int, set[str]] = {}
    for a in state.assignments(dep.deployment_id):
        assert (a.master, a.listen) == ("", "")  # rank 0's node chooses both on its host
        sent[a.rank] = {f.path for f in a.files}
        mine = {f.path.relative_to(src).as_posix() for f in whole.files if f.rank == a.rank}
        assert mine <= sent[a.rank] and not any(f.rank != a.rank and f.path.relative_to(src).as_posix() in
                                                sent[a.rank] for f in whole.files)
        assert {"manifest.json", "config.json", "tokenizer.json"} <= sent[a.rank]
        node_dir = tmp_path / f"node-{a.rank}"
        for rel in sent[a.rank]:  # what the node's agent fetches
            (node_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, node_dir / rel)
        m = Manifest.load(node_dir, rank=a.rank)
        layers = [f for f in m.files if f.rank == a.rank and f.kind == "layer" and f.path.is_file()]
        assert len(layers) == whole.config.num_layers
    assert any(p.startswith("rank0/embed") for p in sent[0]) and not any(p.startswith("rank0/") for p in sent[1])
    assert sent[0] | sent[1] == every
    size = {r: sum(f.size for f in a.files) for r, a in enumerate(state.assignments(dep.deployment_id))}
    assert size[0] + size[1] < 1.2 * sum((src / p).stat().st_size for p in every)  # not the whole set twice
