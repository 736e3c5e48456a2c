"""Chunk graphs of the tiny Llama checkpoint, exported once per test session."""

import logging

import numpy as np
import pytest

from edge_node.model import load_model
from npu_backends.export import export_chunk_graphs

CHUNK, CONTEXT = 32, 128


@pytest.fixture(scope="session", autouse=True)
def _quiet_quantizer():
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs advice at WARNING on root


@pytest.fixture(scope="session")
def llama(llama_dir):
    return load_model(llama_dir)


@pytest.fixture(scope="session")
def graphs(llama, tmp_path_factory):
    """One whole-model graph, the same model as two layer-group subgraphs (both with ONNX Runtime's
    GroupQueryAttention), and one whole-model graph with plain masked attention."""
    root = tmp_path_factory.mktemp("graphs")
    return {1: export_chunk_graphs(llama, root / "g1", CHUNK, CONTEXT, groups=1),
            2: export_chunk_graphs(llama, root / "g2", CHUNK, CONTEXT, groups=2),
            "plain": export_chunk_graphs(llama, root / "gp", CHUNK, CONTEXT, fused=False)}


def prompt_of(n: int, seed: int = 0, vocab: int = 256) -> list[int]:
    return np.random.RandomState(seed).randint(0, vocab, n).tolist()
