"""Float ORT chunked prefill equals the torch engine's full-prompt prefill (logits and KV within 1e-4)."""

import numpy as np
import pytest
import torch

from edge_node.model import PromptError, SamplingConfig, generate, load_model
from edge_node.model.decode import decode_loop
from edge_node.model.sampling import Sampler
from npu_backends.export import export_chunk_graphs
from npu_backends.prefill import ChunkedPrefill, ort_prefill_step, to_kv_cache
from tests.checkpoints import make_checkpoint
from tests.npu_backends.conftest import prompt_of

TOL = 1e-4


def torch_prefill(model, prompt):
    cache = model.new_cache()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache, 0, last_only=True)[0, -1]
    return logits.numpy(), cache


def assert_parity(model, result, prompt):
    ref_logits, cache = torch_prefill(model, prompt)
    n = len(prompt)
    assert np.abs(result.logits - ref_logits).max() < TOL
    for i in model.layer_ids:
        assert np.abs(result.kv.k[i][:, :, :n] - cache.layers[i].k[:, :, :n].numpy()).max() < TOL
        assert np.abs(result.kv.v[i][:, :, :n] - cache.layers[i].v[:, :, :n].numpy()).max() < TOL


# 64: chunks divide the prompt; 77: the last chunk is padded; 5: shorter than one chunk; 1: a single token;
# 128: the whole context, so the last chunk reads every one of the C = 96 past slots
@pytest.mark.parametrize("length", [64, 77, 5, 1, 128])
@pytest.mark.parametrize("groups", [1, 2, "plain"])
def test_chunked_prefill_equals_torch_prefill(llama, graphs, length, groups):
    prompt = prompt_of(length, seed=length)
    result = ChunkedPrefill(llama, graphs[groups]).run(prompt)
    assert result.chunks == -(-length // 32) and result.kv.length == length
    assert result.provider == "CPUExecutionProvider"
    assert_parity(llama, result, prompt)


@pytest.mark.parametrize("length", [32, 5])
def test_a_one_chunk_context_has_no_past_inputs_and_still_matches_torch(llama, tmp_path, length):
    import onnx

    specs = export_chunk_graphs(llama, tmp_path, 32, 32)  # T = N: C = 0 past slots
    names = {i.name for i in onnx.load(specs[0].path, load_external_data=False).graph.input}
    assert specs[0].past == 0 and not any(n.startswith("past_") for n in names)
    prompt = prompt_of(length, seed=20 + length)
    prefill = ChunkedPrefill(llama, specs)
    assert_parity(llama, prefill.run(prompt), prompt)
    ref = generate(llama, prompt, 8, SamplingConfig(greedy=True))
    got = decode_loop(ort_prefill_step(llama, prefill), prompt, 8, Sampler(SamplingConfig(greedy=True)), (),
                      llama.config.max_position_embeddings)
    assert got.token_ids == ref.token_ids
    with pytest.raises(PromptError, match="context of 32"):
        prefill.run(prompt_of(33))


# qwen2 with max_window_layers 2: full-attention layers and windowed ones in one graph. A window of 20 under
# chunks of 32: a chunk's first rows see the end of the past, its last rows only their own chunk. Fused graphs
# give the window to GroupQueryAttention (local_window_size), plain ones a mask per window.
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("arch,overrides", [
    ("qwen2", {}), ("mistral", {"sliding_window": 20}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 20, "max_window_layers": 2})])
def test_parity_with_biases_and_sliding_window(tmp_path, arch, overrides, fused):
    make_checkpoint(tmp_path / "ck", arch=arch, **overrides)
    model = load_model(tmp_path / "ck")
    specs = export_chunk_graphs(model, tmp_path / "g", 32, 96, fused=fused)
    assert specs[0].fused == fused and len(specs[0].mask_windows) == (0 if fused else len(specs[0].windows))
    for seed, length in ((3, 90), (4, 96), (5, 33)):
        prompt = prompt_of(length, seed=seed)
        assert_parity(model, ChunkedPrefill(model, specs).run(prompt), prompt)


class _PlainRun:
    """A session wrapper without io_binding (as calibration's and evaluation's are): the host takes the plain
    run path and copies the chunk's rows out of the fused layers' whole-cache presents."""

    def __init__(self, sess):
        self.sess = sess

    def run(self, outputs, feeds):
        return self.sess.run(outputs, feeds)

    def get_inputs(self):
        return self.sess.get_inputs()

    def get_providers(self):
        return self.sess.get_providers()


@pytest.mark.parametrize("length", [77, 128])
def test_fused_layers_written_in_place_equal_the_plain_run_path(llama, graphs, length):
    prompt = prompt_of(length, seed=30 + length)
    in_place = ChunkedPrefill(llama, graphs[2])
    plain = ChunkedPrefill(llama, graphs[2], sessions=[_PlainRun(s) for s in in_place.sessions])
    a, b = in_place.run(prompt), plain.run(prompt)
    assert np.array_equal(a.logits, b.logits)
    for i in llama.layer_ids:
        assert np.array_equal(a.kv.k[i][:, :, :length], b.kv.k[i][:, :, :length])
        assert np.array_equal(a.kv.v[i][:, :, :length], b.kv.v[i][:, :, :length])
    assert_parity(llama, b, prompt)
    # the op wrote the last chunk's padding rows into the bound cache too (past the prompt: nothing reads them);
    # the plain path copies only the real rows
    padded = slice(length, -(-length // 32) * 32)
    assert (length % 32 == 0) or (np.abs(a.kv.k[0][:, :, padded]).max() > 0 and not b.kv.k[0][:, :, padded].any())


def test_greedy_decode_after_ort_prefill_equals_pure_torch(llama, graphs):
    prompt = prompt_of(45, seed=7)
    ref = generate(llama, prompt, 12, SamplingConfig(greedy=True))
    step = ort_prefill_step(llama, ChunkedPrefill(llama, graphs[1]))
    got = decode_loop(step, prompt, 12, Sampler(SamplingConfig(greedy=True)), (), llama.config.max_position_embeddings)
    assert got.token_ids == ref.token_ids


def test_kv_handoff_to_a_tensor_parallel_rank_keeps_its_head_slice(llama, graphs):
    prompt = prompt_of(40, seed=1)
    result = ChunkedPrefill(llama, graphs[1]).run(prompt)
    cache = to_kv_cache(result.kv, llama, kv_heads=(1, 2))
    _, full = torch_prefill(llama, prompt)
    for i in llama.layer_ids:
        assert cache.layers[i].k.shape[1] == 1 and cache.layers[i].length == 40
        assert torch.allclose(cache.layers[i].k[:, :, :40], full.layers[i].k[:, 1:2, :40], atol=TOL)


def test_prompt_longer_than_the_exported_context_fails_clearly(llama, graphs):
    with pytest.raises(PromptError, match="context of 128"):
        ChunkedPrefill(llama, graphs[1]).run(prompt_of(129))


def test_all_logits_graph_gives_every_position_of_the_prompt(llama, tmp_path):
    from npu_backends.evaluate import agreement

    specs = export_chunk_graphs(llama, tmp_path, 32, 96, all_logits=True)
    prompt = prompt_of(70, seed=11)
    rows = np.concatenate(ChunkedPrefill(llama, specs).run(prompt).rows)  # (70, vocab)
    with torch.inference_mode():
        ref = llama(torch.tensor([prompt]), llama.new_cache(), 0)[0].numpy()
    assert rows.shape == (70, 256) and np.abs(rows - ref).max() < TOL
    same = agreement(ChunkedPrefill(llama, specs), ChunkedPrefill(llama, specs), [prompt])
    assert same.top1 == 1.0 and same.positions == 70 and same.max_abs_err == 0.0


def test_a_oneDNN_packed_model_exports_the_same_graph(llama_dir, tmp_path):
    packed = load_model(llama_dir, pack=True)
    specs = export_chunk_graphs(packed, tmp_path, 32, 64)
    prompt = prompt_of(50, seed=4)
    assert_parity(packed, ChunkedPrefill(packed, specs).run(prompt), prompt)
