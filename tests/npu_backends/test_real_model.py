"""The int8 recipe that holds on a real pretrained model (issue 16): block-wise int8 chunk graphs of
SmolLM2-135M-Instruct keep top-1 agreement with float over every position of held-out text.

The full measurement (4 prompts x 512 tokens, every variant, speed) is benchmarks/bench_prefill.py; this is a
smaller sample of the same evaluation, so its floor sits a little under the benchmark's 99%. The demo model
(always present) checks that the recipe keeps issue 5's 99.44% there.
"""

from pathlib import Path

import pytest

from edge_node.model import Tokenizer, load_model
from edgefed.args import calibration_texts
from emulation.corpus import corpus_files
from npu_backends.build import calibration_prompts
from npu_backends.evaluate import evaluate
from npu_backends.export import export_chunk_graphs
from npu_backends.quantize import build_int8, record_calibration

SMOLLM2 = Path.home() / ".cache" / "edgefed" / "models" / "SmolLM2-135M-Instruct"
DEMO = Path(__file__).resolve().parents[2] / "models" / "edgefed-demo"
PROMPTS, LENGTH, CHUNK = 2, 256, 128

pytestmark = pytest.mark.slow
needs_smollm2 = pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(),
                                   reason=f"the real model is not at {SMOLLM2} (make real-model)")


def heldout_prompts(model_dir: Path, prompts: int, length: int) -> list[list[int]]:
    tok, ids = Tokenizer.from_dir(model_dir), []
    for path in corpus_files("heldout"):
        ids += tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
        if len(ids) >= prompts * length:
            break
    return [ids[i * length:(i + 1) * length] for i in range(prompts)]


def test_block_int8_keeps_the_demo_models_agreement(tmp_path):
    # issue 5's recipe (shadow) kept 99.44% on the demo model; the block recipe must not do worse there
    model = load_model(DEMO, pack=True)
    specs = export_chunk_graphs(model, tmp_path, CHUNK, 512)
    calib = calibration_prompts(DEMO, calibration_texts(), 2048, 512, model.config.vocab_size)
    int8 = build_int8(specs, record_calibration(model, specs, calib, 2), tmp_path, "block")
    ev = evaluate(model, specs, int8, heldout_prompts(DEMO, 4, 512), threads=2)
    print(f"demo block int8: top-1 {ev.agreement.top1:.4f} over {ev.agreement.positions} positions")
    assert ev.agreement.top1 >= 0.9944


@needs_smollm2
def test_block_int8_keeps_top1_agreement_on_smollm2(tmp_path):
    model = load_model(SMOLLM2, pack=True)
    specs = export_chunk_graphs(model, tmp_path, CHUNK, LENGTH)
    calib = calibration_prompts(SMOLLM2, calibration_texts(), 1024, LENGTH, model.config.vocab_size)
    int8 = build_int8(specs, record_calibration(model, specs, calib, 2), tmp_path, "block")
    ev = evaluate(model, specs, int8, heldout_prompts(SMOLLM2, PROMPTS, LENGTH), threads=2)
    print(f"SmolLM2 block int8: top-1 {ev.agreement.top1:.4f} over {ev.agreement.positions} positions, "
          f"last-layer relative error {ev.relative_error[-1]:.4f}")
    assert ev.agreement.positions == PROMPTS * LENGTH
    assert ev.agreement.top1 >= 0.985
    assert ev.relative_error[-1] < 0.03  # the residual stream stays within a few percent of float's


def test_token_int8_keeps_the_demo_models_agreement(tmp_path):
    # the per-token recipe (rotated inputs, GPTQ weights) must keep issue 5's 99.44% on the demo model too
    model = load_model(DEMO, pack=True)
    specs = export_chunk_graphs(model, tmp_path, CHUNK, 512)
    calib = calibration_prompts(DEMO, calibration_texts(), 2048, 512, model.config.vocab_size)
    int8 = build_int8(specs, record_calibration(model, specs, calib, 2), tmp_path, "token")
    ev = evaluate(model, specs, int8, heldout_prompts(DEMO, 4, 512), threads=2)
    print(f"demo token int8: top-1 {ev.agreement.top1:.4f} over {ev.agreement.positions} positions")
    assert ev.agreement.top1 >= 0.9944


@needs_smollm2
def test_token2_and_fine_int8_keep_top1_agreement_on_smollm2(tmp_path):
    """Both fused per-token recipes from one export and one calibration pass (the two builds share them)."""
    model = load_model(SMOLLM2, pack=True)
    specs = export_chunk_graphs(model, tmp_path, CHUNK, LENGTH)
    calib = calibration_prompts(SMOLLM2, calibration_texts(), 1024, LENGTH, model.config.vocab_size)
    feeds = record_calibration(model, specs, calib, 2)
    held = heldout_prompts(SMOLLM2, PROMPTS, LENGTH)
    # measured over 4 x 512 (benchmarks/README.md): token2 98.4%, relative error ~0.0205; fine 99.2%, ~0.012.
    # On this 2 x 256 sample one flip is 0.2 points (fine 98.6%, token2 98.8% here): the relative error is the
    # steadier measure of the two
    for mode, top1, rel in (("token2", 0.975, 0.025), ("fine", 0.98, 0.016)):
        ev = evaluate(model, specs, build_int8(specs, feeds, tmp_path, mode), held, threads=2)
        print(f"SmolLM2 {mode} int8: top-1 {ev.agreement.top1:.4f} over {ev.agreement.positions} positions, "
              f"last-layer relative error {ev.relative_error[-1]:.4f}")
        assert ev.agreement.positions == PROMPTS * LENGTH
        assert ev.agreement.top1 >= top1, mode
        assert ev.relative_error[-1] < rel, mode


@pytest.mark.parametrize("mode", ["token2", "fine"])
def test_fused_int8_recipes_keep_the_demo_models_agreement(tmp_path, mode):
    model = load_model(DEMO, pack=True)
    specs = export_chunk_graphs(model, tmp_path, CHUNK, 512)
    calib = calibration_prompts(DEMO, calibration_texts(), 2048, 512, model.config.vocab_size)
    int8 = build_int8(specs, record_calibration(model, specs, calib, 2), tmp_path, mode)
    ev = evaluate(model, specs, int8, heldout_prompts(DEMO, 4, 512), threads=2)
    print(f"demo {mode} int8: top-1 {ev.agreement.top1:.4f} over {ev.agreement.positions} positions")
    assert ev.agreement.top1 >= 0.9944
