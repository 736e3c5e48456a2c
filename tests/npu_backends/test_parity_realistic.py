"""Float ONNX Runtime chunked prefill, then torch decode, against transformers on a realistic-scale checkpoint:
64-token prompts over two 32-token chunks, 32 greedy steps, logits within 1e-4 of their spread at the last
prompt position and every decode step (tests/parity.py)."""

from __future__ import annotations

import pytest
import torch

from edge_node.model import SamplingConfig, generate, load_model
from edge_node.model.decode import decode_loop
from edge_node.model.sampling import Sampler
from npu_backends.build import prefill_step
from npu_backends.options import PrefillOptions
from tests.parity import NEW, check_run, prompts, realistic_checkpoint, scale_cached_keys_beyond_12


def ort_run(model_dir, graph_dir, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    model = load_model(model_dir, pack=True)
    inner = prefill_step(model, model_dir, PrefillOptions(chunk=32, context=64, graph_dir=str(graph_dir)))
    rows: list[torch.Tensor] = []

    def step(ids: list[int], pos0: int) -> torch.Tensor:
        rows.append(inner(ids, pos0).float())
        return rows[-1]

    got = decode_loop(step, prompt, NEW, Sampler(SamplingConfig()), (), model.config.max_position_embeddings)
    return got.token_ids, rows


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ort_prefill_then_torch_decode_matches_transformers(arch, tmp_path):
    hf = realistic_checkpoint(tmp_path / "m", arch=arch, eos_token_id=None)
    for i, prompt in enumerate(prompts(hf.config.vocab_size)):
        tokens, rows = ort_run(tmp_path / "m", tmp_path / "g", prompt)
        check_run(hf, prompt, tokens, None, rows, f"{arch} ORT prefill, prompt {i}")
        assert tokens == generate(load_model(tmp_path / "m"), prompt, NEW).token_ids


def test_a_kv_cache_error_of_a_tenth_of_a_percent_fails_ort_parity(tmp_path, monkeypatch):
    hf = realistic_checkpoint(tmp_path / "m", eos_token_id=None)
    prompt = prompts(hf.config.vocab_size)[1]
    scale_cached_keys_beyond_12(monkeypatch)
    tokens, rows = ort_run(tmp_path / "m", tmp_path / "g", prompt)
    with pytest.raises(AssertionError, match="x spread|greedy tokens differ"):
        check_run(hf, prompt, tokens, None, rows, "corrupted ORT prefill")
