"""The committed gRPC modules in edge_node/rpc are exactly what `make proto` generates from proto/*.proto."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "proto").glob("*.proto"))


@pytest.mark.parametrize("proto", PROTOS, ids=[p.stem for p in PROTOS])
def test_generated_code_is_reproducible(proto, tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iedge_node/rpc=proto", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(proto.relative_to(ROOT))],
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
        name = f"edge_node/rpc/{proto.stem}{suffix}"
        assert (ROOT / name).read_bytes() == (tmp_path / name).read_bytes(), f"{name} differs: run `make proto`"
