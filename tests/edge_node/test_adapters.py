"""A PEFT LoRA adapter on the edge runtime equals peft + transformers (float32 logits within 1e-4, same greedy
tokens), single node and tensor-parallel; a bad adapter is a named error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from edge_node.adapters import BASE, AdapterError, adapt_shards, load_adapted
from edge_node.model import generate, load_model
from edge_node.model.formats import weights_digest
from edge_node.shard import write_shards
from tests.checkpoints import make_checkpoint

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11]
NEW = 12
# k_proj and gate_proj left out: their rows in the fused wqkv / w13 must stay untouched
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def peft_adapter(hf_model, out, r: int = 4, seed: int = 3):
    """A random LoRA (B non-zero) saved in PEFT format; returns the peft model (float32, eval)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(hf_model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                init_lora_weights=False, lora_dropout=0.0))
    with torch.no_grad():  # larger than peft's random init, so a wrong merge moves logits far beyond 1e-4
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(3.0)
    model.save_pretrained(out)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        x = torch.tensor([ids])
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    hf = make_checkpoint(d / "m")
    base = logits(hf, PROMPT)
    ref = peft_adapter(hf, d / "a")
    return d, ref, base


def test_single_node_adapter_equals_peft_and_transformers(adapted):
    d, ref, base = adapted
    model = load_adapted(d / "m", d / "a", pack=True)
    ids = generate(model, PROMPT, NEW).token_ids
    want = logits(ref, PROMPT + ids)
    with torch.no_grad():
        got = model(torch.tensor([PROMPT + ids]), model.new_cache())[0]
    assert (got - want).abs().max().item() < 1e-4
    assert torch.equal(want[len(PROMPT) - 1:-1].argmax(-1), torch.tensor(ids))  # greedy tokens are peft's
    assert (want[: len(PROMPT)] - base).abs().max().item() > 1e-2  # the adapter really changes the logits


@pytest.mark.slow
def test_tensor_parallel_adapter_equals_peft_and_transformers(adapted):
    from tests.edge_node.test_tp import run_group

    d, ref, _ = adapted
    write_shards(d / "m", d / "s", 2, [2, 1])
    manifest = adapt_shards(d / "s", d / "a", d / "sa", base_dir=d / "m")
    assert manifest["adapter"]["sha256"] and manifest["weights_digest"] != json.loads((d / "s/manifest.json")
                                                                                      .read_text())["weights_digest"]
    ids, got, _ = run_group(d / "sa", 2, [None])[None]
    want = logits(ref, PROMPT + ids)[len(PROMPT) - 1: len(PROMPT) - 1 + NEW]
    assert (got - want).abs().max().item() < 1e-4
    assert ids == want.argmax(-1).tolist()


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_adapters_are_named_errors(adapted, tmp_path):
    d, _, _ = adapted
    missing = _copy(d / "a", tmp_path / "missing")
    (missing / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors: not found"):
        load_adapted(d / "m", missing)
    with pytest.raises(AdapterError, match="adapter directory not found"):
        load_adapted(d / "m", tmp_path / "nowhere")

    unknown = _copy(d / "a", tmp_path / "unknown")
    cfg = json.loads((unknown / "adapter_config.json").read_text())
    (unknown / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "lm_head"]}))
    with pytest.raises(AdapterError, match="unknown target module.*lm_head"):
        load_adapted(d / "m", unknown)

    rank = _copy(d / "a", tmp_path / "rank")
    (rank / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(AdapterError, match=r"shape \[4, \d+\], expected \[8, \d+\].*wrong rank"):
        load_adapted(d / "m", rank)

    nan = _copy(d / "a", tmp_path / "nan")
    t = load_file(nan / "adapter_model.safetensors")
    next(v for k, v in t.items() if "lora_B" in k)[0, 0] = float("nan")
    save_file(t, nan / "adapter_model.safetensors")
    with pytest.raises(AdapterError.__mro__[1], match="NaN or Inf"):
        load_adapted(d / "m", nan)


def test_an_adapter_for_another_base_model_is_refused(adapted, tmp_path):
    d, _, _ = adapted
    other = tmp_path / "other"
    make_checkpoint(other, hidden_size=96, seed=1)
    with pytest.raises(AdapterError, match="another base model"):
        load_adapted(other, d / "a")
    same_shape = tmp_path / "same"
    make_checkpoint(same_shape, seed=7)  # same shapes, other weights: only the recorded digest can tell
    tagged = _copy(d / "a", tmp_path / "tagged")
    (tagged / BASE).write_text(json.dumps({"base_weights_digest": weights_digest(d / "m")}))
    load_adapted(d / "m", tagged)
    with pytest.raises(AdapterError, match="base model mismatch"):
        load_adapted(same_shape, tagged)
    assert load_model(same_shape) is not None


def test_a_merged_checkpoint_loads_like_the_adapter_applied_at_load(adapted, tmp_path):
    from edgefed.cli import main

    d, ref, _ = adapted
    assert main(["fl", "merge", "--model", str(d / "m"), "--adapter", str(d / "a"), "--out", str(tmp_path / "mm")]) == 0
    merged = load_model(tmp_path / "mm")
    ids = PROMPT + [1, 2, 3]
    with torch.no_grad():
        got = merged(torch.tensor([ids]), merged.new_cache())[0]
    assert (got - logits(ref, ids)).abs().max().item() < 1e-4
    assert main(["fl", "merge", "--model", str(d / "m"), "--adapter", str(d / "a"), "--out", str(tmp_path / "mm")]) == 2


def test_generate_with_an_adapter_runs_the_adapted_model(adapted):
    """`generate --adapter` (RunConfig.adapter through generate_local) gives peft's greedy tokens, not the base's."""
    from edge_node.run_config import RunConfig
    from edge_node.runtime import generate_local

    d, ref, base = adapted
    run = RunConfig(model=str(d / "m"), prompt_ids=tuple(PROMPT), max_new_tokens=NEW, adapter=str(d / "a"))
    ids = generate_local(run)["token_ids"]
    want = logits(ref, PROMPT + ids)
    assert torch.equal(want[len(PROMPT) - 1:-1].argmax(-1), torch.tensor(ids))
    plain = generate_local(RunConfig(model=str(d / "m"), prompt_ids=tuple(PROMPT), max_new_tokens=NEW))["token_ids"]
    assert generate(load_model(d / "m"), PROMPT, NEW).token_ids == plain
    assert ids != plain  # so the first check could not pass with the adapter ignored
