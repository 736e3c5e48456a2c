"""Bad input yields a named error that says what and where."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from edge_node.model import (
    CheckpointError,
    MissingTensorError,
    ModelConfigError,
    PromptError,
    TensorShapeError,
    UnexpectedTensorError,
    UnsupportedArchitectureError,
    generate,
    load_model,
)


@pytest.fixture
def model_dir(llama_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    return d


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def edit_tensors(d, fn):
    path = d / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_config_key_is_named(model_dir):
    edit_config(model_dir, hidden_size=None)
    with pytest.raises(ModelConfigError, match="'hidden_size'"):
        load_model(model_dir)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ModelConfigError, match="config.json: file not found"):
        load_model(tmp_path)


def test_unsupported_architecture_lists_supported(model_dir):
    edit_config(model_dir, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        load_model(model_dir)


def test_missing_tensor_is_named(model_dir):
    edit_tensors(model_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(model_dir)


def test_unexpected_tensor_is_named(model_dir):
    edit_tensors(model_dir, lambda t: t.__setitem__("model.layers.9.extra.weight", t["model.norm.weight"].clone()))
    with pytest.raises(UnexpectedTensorError, match=r"model\.layers\.9\.extra\.weight"):
        load_model(model_dir)


def test_misshaped_tensor_names_tensor_and_shapes(model_dir):
    edit_tensors(model_dir, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"][:10].clone()))
    with pytest.raises(TensorShapeError, match=r"'model\.norm\.weight' has shape \[10\].*\[64\]"):
        load_model(model_dir)


def test_truncated_safetensors_names_the_file(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        load_model(model_dir)


def test_corrupt_safetensors_header_names_the_file(model_dir):
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        load_model(model_dir)


def test_prompt_longer_than_context_is_refused(llama_dir):
    model = load_model(llama_dir)
    with pytest.raises(PromptError, match="max_position_embeddings=256"):
        generate(model, [5] * 257, 4)


def test_empty_prompt_is_refused(llama_dir):
    with pytest.raises(PromptError, match="empty"):
        generate(load_model(llama_dir), [], 4)


def test_generation_stops_at_the_context_limit(llama_dir):
    # positions 250..255 take 6 fed-back tokens; the 7th is produced but never needs a position
    result = generate(load_model(llama_dir), [5] * 250, 20)
    assert len(result.token_ids) == 7 and result.stop_reason == "context"
