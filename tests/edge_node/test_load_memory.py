"""Loading costs about the weights' bytes once: peak RSS of `edgefed generate`, less the process's RSS after
its imports, stays within 1.25x the weights' bytes in the compute dtype (tensors are read, not mapped; a tied
head is laid out in place; freed memory goes back to the OS)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.checkpoints import make_checkpoint

BOUND = 1.25

PROBE = """
import json, sys, psutil
import torch, edge_node.model.load, edge_node.runtime, edgefed.cli  # everything a generate run imports
from edge_node.memory import own_peak_rss_mb
base = psutil.Process().memory_info().rss / 2**20
code = edgefed.cli.main(["generate", "--model", sys.argv[1], "--prompt-ids", "5,6,7", "--max-new-tokens", "2",
                         "--json", "--threads", "1"])
print(json.dumps({"code": code, "base": base, "peak": own_peak_rss_mb()}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False])
def test_generate_peaks_near_the_weights_bytes_over_its_imports(tmp_path, tie):
    hf = make_checkpoint(tmp_path / "m", tie=tie, vocab_size=32000, hidden_size=512, intermediate_size=1536,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)
    weights_mb = sum(p.numel() * 4 for p in hf.parameters()) / 2**20  # float32; a tied table counted once
    assert weights_mb > 150  # large enough that allocator slack cannot hide a second copy
    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "m")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["code"] == 0
    ratio = (got["peak"] - got["base"]) / weights_mb
    assert ratio <= BOUND, f"peak {got['peak']:.0f} MB - base {got['base']:.0f} MB = {ratio:.2f}x the weights"
