"""Block-Hadamard rotation of the down projection's input: exact in float, float itself, and it tames the tails."""

import dataclasses

import numpy as np
import onnx
import pytest

from npu_backends.outliers import activation_stats
from npu_backends.prefill import ChunkedPrefill
from npu_backends.quantize import record_calibration
from npu_backends.rotate import ROTATE_SUFFIX, block_size, hadamard, rotate_down
from tests.npu_backends.conftest import prompt_of


def test_hadamard_blocks_are_orthogonal_and_fit_the_width():
    for b in (1, 2, 16, 64):
        h = hadamard(b)
        assert np.allclose(h @ h.T, np.eye(b), atol=1e-6) and np.allclose(h, h.T)
    assert block_size(704, 64) == 64 and block_size(4864, 128) == 128 and block_size(96, 64) == 32
    assert block_size(4864, 64) == 64 and block_size(11, 64) == 1
    with pytest.raises(ValueError, match="power of two"):
        hadamard(12)


@pytest.fixture(scope="module")
def rotated(llama, graphs, tmp_path_factory):
    spec = graphs[1][0]  # intermediate 160 = 10 blocks of 16
    dst = tmp_path_factory.mktemp("rotate") / "rotated.onnx"
    names = rotate_down(spec.path, dst, block=16)
    return spec, dataclasses.replace(spec, path=str(dst)), names


@pytest.mark.parametrize("length", [77, 5])
def test_rotation_is_exact_in_float(llama, rotated, length):
    spec, rot_spec, _ = rotated
    prompt = prompt_of(length, seed=60 + length)
    a, b = ChunkedPrefill(llama, [spec]).run(prompt), ChunkedPrefill(llama, [rot_spec]).run(prompt)
    assert np.abs(a.logits - b.logits).max() < 1e-4
    for i in range(4):
        assert np.abs(a.kv.k[i][:, :, :length] - b.kv.k[i][:, :, :length]).max() < 1e-4


def test_each_down_projection_gets_one_rotation_and_its_input_tails_shrink(llama, rotated):
    spec, rot_spec, names = rotated
    g = onnx.load(rot_spec.path, load_external_data=False).graph
    assert len(names) == 4 and all(n.endswith(ROTATE_SUFFIX) for n in names)
    by_name = {n.name: n for n in g.node}
    downs = [n[: -len(ROTATE_SUFFIX)] for n in names]
    assert all(by_name[d].input[0] == by_name[d + "/RotateJoin"].output[0] for d in downs)
    feeds = record_calibration(llama, [spec], [prompt_of(96, seed=400)])[0]
    before, after = activation_stats(spec.path, feeds), activation_stats(rot_spec.path, feeds)

    def spread(st):  # largest channel range over the typical one: what a per-tensor scale must span
        mag = np.maximum(np.abs(st.lo), np.abs(st.hi))
        return mag.max() / np.median(mag)

    assert all(spread(after[d]) < spread(before[d]) for d in downs)
