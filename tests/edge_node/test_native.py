"""The native decode step (edge_node/model/native): float32 parity with transformers, quantized kernels against
a plain dequantize-and-matmul reference, the KV cache shared with torch, and the fallback to torch when the
native code is off or cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from edge_node.model import generate, load_model, native
from edge_node.model.native import build
from quant.int4 import Int4Linear, dequantize_groups, quantize_groups
from quant.int8 import Int8GroupLinear, Int8Linear, dequantize_groups8, dequantize_rows, quantize_groups8, quantize_rows
from tests.parity import NEW, check_run, prompts, realistic_checkpoint

pytestmark = pytest.mark.skipif(not native.enabled(), reason=f"native code unavailable: no compiler or "
                                f"EDGEFED_NATIVE=0 ({build.compiler()=})")

CASES = {
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tie=True),
    "qwen2-tied-bias": dict(arch="qwen2", tie=True),
    "mistral-sliding-window": dict(arch="mistral", sliding_window=24),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, realistic_checkpoint(path, eos_token_id=None, **CASES[request.param])


def native_run(model, prompt: list[int]) -> tuple[list[int], torch.Tensor, list[torch.Tensor]]:
    """Prefill by the model's torch forward, then NEW greedy steps on the native decoder (same KV cache)."""
    dec = native.NativeDecoder.of(model)
    assert dec is not None, native.NativeDecoder.why_not
    cache = model.new_cache()
    with torch.inference_mode():
        prefill = model(torch.tensor([prompt]), cache, 0)[0]  # (S, vocab)
        rows, tokens = [prefill[-1]], []
        for i in range(NEW):
            tokens.append(int(rows[-1].argmax()))
            rows.append(dec.step(tokens[-1], len(prompt) + i, cache))
    return tokens, prefill, rows[:-1]


@pytest.mark.parametrize("pack", [False, True], ids=["plain", "packed"])
def test_float32_native_decode_matches_transformers_at_every_step(case, pack):
    name, path, hf = case
    model = load_model(path, pack=pack)  # packed: a tied head is read column-major
    for i, prompt in enumerate(prompts(hf.config.vocab_size)):
        tokens, prefill, rows = native_run(model, prompt)
        check_run(hf, prompt, tokens, prefill, rows, f"{name} native, prompt {i}")
        assert generate(model, prompt, NEW).token_ids == tokens  # generate's default step is the native one


def _linears(out: int, cols: int, bias: torch.Tensor) -> dict:
    """Each quantized linear type with its dequantized float weight."""
    w = torch.randn(out, cols)
    q, s = quantize_rows(w)
    q8, s8, z8 = quantize_groups8(w, 32)
    c4, s4, z4 = quantize_groups(w, 32)
    return {"int8 rows": (Int8Linear(q, s, bias), dequantize_rows(q, s)),
            "int8 g32": (Int8GroupLinear(q8, s8, z8, bias), dequantize_groups8(q8, s8, z8)),
            "int4 g32": (Int4Linear(c4, s4, z4, bias), dequantize_groups(c4, s4, z4))}


@pytest.mark.parametrize("shape", [(96, 64), (7, 160), (48, 96), (1536, 576)])
def test_quantized_native_matmul_equals_dequantize_and_matmul(shape):
    """Every layout against W x in float64; a packed weight's products against W x^ (every token rounded to two
    int8 levels per block of 32, as `quantize_input` rounds it)."""
    torch.manual_seed(0)
    out, cols = shape
    x, bias = torch.randn(20, cols), torch.randn(out)
    for name, (lin, w) in _linears(out, cols, bias).items():
        nw = lin.native_weight()
        assert nw is not None, name
        assert (nw.kind in (native.Q8P, native.Q4P)) == native.packs(out, cols, 32), name
        assert torch.allclose(lin.weight, w, atol=1e-6), f"{name}: native layout round trip"
        ref = x.double() @ w.double().T + bias.double()
        for t in (1, 2, 9, 20):  # the one-token GEMV, the small-prompt kernel (4-token tiles), the blocked GEMM
            #                      (packed: the GEMV, then the int8 GEMM's 4-token tiles and its 1-token tail)
            r = ref[:t]
            if nw.kind in (native.Q8P, native.Q4P):  # every token rounded as a decode step rounds its one
                r = native.quantize_input(x[:t]) @ w.double().T + bias.double()
                assert (r - ref[:t]).abs().max() > 1e-7 * ref.abs().max(), "the input rounding is visible"
            err = (lin(x[:t]).double() - r).abs().max().item()
            assert err <= 2e-6 * ref.abs().max().item(), f"{name}, {t} token(s): error {err:.3g}"


@pytest.mark.skipif(not native.packs(16, 64, 32), reason="no AVX512-VNNI here (or EDGEFED_NATIVE_PACK=0)")
def test_packed_layouts_round_trip_and_the_kernel_rounds_its_input_as_quantize_input_does():
    torch.manual_seed(1)
    q8 = torch.randint(-128, 128, (32, 96), dtype=torch.int8)
    q4 = torch.randint(0, 16, (32, 96), dtype=torch.int32)
    s = torch.rand(32, 3)
    assert torch.equal(native.unpack_codes(native.pack_q8(q8, s, None, 32)), q8.int())
    assert torch.equal(native.unpack_codes(native.pack_q4(q4, s, s, 32)), q4)
    x = torch.zeros(32)
    x[0], x[1], x[2], x[3] = 127.0, 2.5, 3.5, 0.3  # level 1 (scale 1): 2, 4 (half to even), 0; level 2 keeps
    got = native.quantize_input(x)  # the remainders 0.5, -0.5, 0.3 on the scale 0.5 / 127
    assert (got - x.double()).abs().max() <= 0.5 / 127 / 2 + 1e-7
    one = Int8Linear(torch.eye(32, dtype=torch.int8), torch.ones(32))  # y = x^: the kernel's own rounding
    assert one.native_weight().kind == native.Q8P
    assert torch.equal(one(x[None])[0], got.float())
    x = torch.randn(4, 96) * torch.logspace(-3, 3, 96)  # values of many magnitudes, ties unlikely
    one = Int8Linear(torch.eye(96, dtype=torch.int8), torch.ones(96))
    got, want = torch.stack([one(r[None])[0] for r in x]).double(), native.quantize_input(x)
    assert ((got - want).abs() <= 1e-6 * want.abs()).all()  # q d + q2 d2 summed in float32: an ulp or so
    amax = x.double().reshape(4, 3, 32).abs().amax(-1, keepdim=True)  # each block's largest
    err = (want - x.double()).reshape(4, 3, 32).abs()
    assert (err <= amax / 127 / 254 * 1.01).all()  # two levels: half a step of the second (one level: of 1/127)


def test_native_int4_layout_round_trips():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.int32)
    assert torch.equal(native.q4_codes(native.q4_layout(codes)), codes)


@pytest.mark.parametrize("layout", ["plain", "packed"])
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_native_step_equals_the_torch_forward_of_the_same_model(tmp_path, weights, layout, monkeypatch):
    """The step's plumbing (which product gets which input) against the model's torch layers. Plain layouts
    (float32 inputs) agree to float rounding. Packed ones round each product's input to int8, a discontinuous
    function: ~1e-7 differences between the two paths' norms flip a rare half-way rounding, and those flips
    accumulate over the steps, so there the bound is a fraction of the logits' spread (a product fed the wrong
    input is off by about the spread itself)."""
    from quant.checkpoint import load_any
    from quant.quantize import quantize_checkpoint

    if layout == "plain":
        monkeypatch.setenv("EDGEFED_NATIVE_PACK", "0")
    elif not native.packs(16, 64, 32):
        pytest.skip("no AVX512-VNNI here: nothing is packed")
    tol = 1e-4 if layout == "plain" else 0.1
    realistic_checkpoint(tmp_path / "f", tie=True)
    quantize_checkpoint(tmp_path / "f", tmp_path / "q", weights, 32, lm_head="int8")
    model = load_any(tmp_path / "q", pack=True)
    assert (model.blocks["0"].mlp.w13.native_weight().kind in (native.Q8P, native.Q4P)) == (layout == "packed")
    prompt = prompts(model.config.vocab_size, 1)[0][:40]
    tokens, _, rows = native_run(model, prompt)
    # the reference: the same model's torch layers (the linears' kernels were checked above), token by token
    cache = model.new_cache()
    with torch.inference_mode():
        model(torch.tensor([prompt]), cache, 0)
        for i, (t, row) in enumerate(zip(tokens, rows[1:], strict=False)):
            ref = model(torch.tensor([[t]]), cache, len(prompt) + i)[0, -1]
            assert (row - ref).abs().max() <= tol * ref.std(), f"{weights} {layout} step {i}"


def test_native_and_torch_share_the_kv_cache(tmp_path):
    """A step natively, the next by torch, the next natively: every logit row equals the all-torch run."""
    realistic_checkpoint(tmp_path, tie=True)
    model = load_model(tmp_path)
    dec = native.NativeDecoder.of(model)
    prompt = prompts(model.config.vocab_size, 1)[0][:20]
    runs = []
    for mixed in (False, True):
        cache, rows = model.new_cache(), []
        with torch.inference_mode():
            model(torch.tensor([prompt]), cache, 0)
            for i, t in enumerate([3, 5, 7, 11]):
                pos = len(prompt) + i
                use_native = mixed and i % 2 == 0
                rows.append(dec.step(t, pos, cache) if use_native else model(torch.tensor([[t]]), cache, pos)[0, -1])
        runs.append(torch.stack(rows))
    assert (runs[0] - runs[1]).abs().max() <= 1e-4 * runs[0].std()


def test_generations_on_several_threads_at_once_equal_their_runs_alone(tmp_path):
    """Native calls drop the GIL and share one worker pool: threads generating at once (a server answering two
    requests) must queue for it, never mix their jobs or hang."""
    import threading

    realistic_checkpoint(tmp_path, tie=True)
    model = load_model(tmp_path)
    ps = prompts(model.config.vocab_size)[:3]
    alone = [generate(model, p, 24).token_ids for p in ps]
    got: list[tuple[int, list[int]]] = []
    threads = [threading.Thread(target=lambda i=i: got.append((i, generate(model, ps[i], 24).token_ids)), daemon=True)
               for i in range(len(ps)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a native generation hung"
    assert sorted(got) == sorted((i, alone[i]) for i in range(len(ps)) for _ in range(2))


def test_a_step_at_the_wrong_position_is_refused(tmp_path):
    from edge_node.model.kv_cache import KVPositionError

    realistic_checkpoint(tmp_path)
    model = load_model(tmp_path)
    dec, cache = native.NativeDecoder.of(model), model.new_cache()
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache, 0)
        with pytest.raises(KVPositionError, match="layer 0: write at position 5, but the layer holds 3"):
            dec.step(4, 5, cache)


def test_a_model_the_step_cannot_run_is_reported_not_run(tmp_path):
    realistic_checkpoint(tmp_path)
    part = load_model(tmp_path, start=0, end=2)
    assert native.NativeDecoder.of(part) is None
    assert "part" in native.NativeDecoder.why_not
    bf16 = load_model(tmp_path, dtype=torch.bfloat16)
    assert native.NativeDecoder.of(bf16) is None and "bfloat16" in native.NativeDecoder.why_not


@pytest.fixture
def native_off(monkeypatch):
    """The process as if EDGEFED_NATIVE=0: models loaded meanwhile use torch only."""
    monkeypatch.setenv("EDGEFED_NATIVE", "0")
    build.library.cache_clear()
    yield
    monkeypatch.undo()
    build.library.cache_clear()


def test_edgefed_native_0_falls_back_to_torch_with_the_same_greedy_tokens(tmp_path, native_off, caplog):
    from quant.checkpoint import load_any
    from quant.quantize import quantize_checkpoint

    hf = realistic_checkpoint(tmp_path / "f", eos_token_id=None)
    prompt = prompts(hf.config.vocab_size, 1)[0]
    with caplog.at_level(logging.WARNING, logger="edgefed.native"):
        assert not native.enabled()
    assert "EDGEFED_NATIVE=0" in caplog.text
    model = load_model(tmp_path / "f", pack=True)
    assert native.NativeDecoder.of(model) is None
    tokens, prefill, rows = [], [], []

    def step(ids, pos0):
        out = model(torch.tensor([ids]), cache, pos0)[0]
        prefill.append(out) if pos0 == 0 else None
        rows.append(out[-1])
        return out[-1]

    cache = model.new_cache()
    tokens = generate(model, prompt, NEW, step=step).token_ids
    check_run(hf, prompt, tokens, prefill[0], rows, "EDGEFED_NATIVE=0")
    quantize_checkpoint(tmp_path / "f", tmp_path / "q", "int4", 32)
    q = load_any(tmp_path / "q", pack=True)
    assert q.blocks["0"].mlp.w13.native_weight() is None  # torch's int4 kernel layout


def test_a_compiler_that_fails_gives_one_clear_line_and_torch(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EDGEFED_NATIVE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.c"
    bad.write_text("int f(void) { return undefined_thing; }\n")
    with pytest.raises(build.NativeBuildError, match=r"could not compile bad\.c .*undefined_thing"):
        build.build(source=bad)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(build.NativeBuildError, match="no C compiler found"):
        build.build()
    build.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="edgefed.native"):
            assert build.library() is None
        assert [r.message for r in caplog.records] == ["native decode unavailable, using the torch path: no C "
                                                       "compiler found (set CC, or install gcc or clang)"]
    finally:
        monkeypatch.undo()
        build.library.cache_clear()
    assert native.enabled()


def test_the_build_is_cached_by_source_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFED_NATIVE_CACHE", str(tmp_path))
    first = build.build()
    mtime = first.stat().st_mtime_ns
    assert build.build() == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    assert first.parent == tmp_path and first.name.startswith("edgefed_decode-")
