"""A tuned adapter chosen per request through the OpenAI API's `model` field: two in-process deployments of the
demo model, the base and `demo+<adapter>` (LocalBackend with the PEFT adapter merged at load), each answering
with its own model's greedy tokens."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from coordinator.api import Deployment, create_app
from coordinator.backend import LocalBackend
from edge_node.adapters import AdapterError, adapted_name, split_adapted_name
from tests.coordinator.conftest import auth
from tests.edge_node.test_adapters import peft_adapter

PROMPT = "def fibonacci(n):"
NEW = 16


@pytest.fixture(scope="module")
def adapter(demo_chat_dir, tmp_path_factory):
    """A random PEFT LoRA (B non-zero) on the demo model, as peft saves it, in a directory named like a round."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(demo_chat_dir, dtype=torch.float32)
    out = tmp_path_factory.mktemp("fl") / "round-0002"
    peft_adapter(hf, out, r=4, seed=5)
    return out


@pytest.fixture(scope="module")
def adapted_backend(demo_chat_dir, adapter):
    backend = LocalBackend(demo_chat_dir, adapter=adapter)
    yield backend
    backend.close()


def greedy(backend: LocalBackend, prompt_ids: list[int]) -> list[int]:
    from edge_node.model import SamplingConfig, generate

    sampling = SamplingConfig(greedy=True, repetition_penalty=backend.repetition_penalty)
    return generate(backend.model, prompt_ids, NEW, sampling, backend.eos_ids).token_ids


@pytest.mark.slow
def test_the_model_field_chooses_the_adapted_or_the_base_model(demo_chat_dir, local_backend, adapted_backend,
                                                               adapter, keys, reference):
    tuned = adapted_name("demo", adapter)
    assert tuned == "demo+round-0002" and split_adapted_name(tuned) == ("demo", "round-0002")
    deployments = {"demo": Deployment.for_model("demo", demo_chat_dir, local_backend),
                   tuned: Deployment.for_model(tuned, demo_chat_dir, adapted_backend)}
    ids = deployments["demo"].tokenizer.encode(PROMPT)
    want = {"demo": reference(ids, NEW), tuned: greedy(adapted_backend, ids)}
    assert want["demo"] != want[tuned]  # the adapter really changes the greedy output
    with TestClient(create_app(deployments, *keys)) as client:
        listed = {m["id"] for m in client.get("/v1/models", headers=auth()).json()["data"]}
        assert listed == {"demo", tuned}
        for name in ("demo", tuned, "demo"):  # interleaved: each request is served by its own deployment
            r = client.post("/v1/completions", headers=auth(), json={
                "model": name, "prompt": PROMPT, "max_tokens": NEW, "temperature": 0, "return_token_ids": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == want[name], name
        r = client.post("/v1/completions", headers=auth(), json={"model": "demo+round-0003", "prompt": PROMPT,
                                                                  "max_tokens": 2})
        assert r.status_code == 404 and "demo+round-0003" in r.text


@pytest.mark.slow
def test_adapted_greedy_tokens_are_peft_and_transformers(demo_chat_dir, adapter, adapted_backend):
    """The served adapted model is the PEFT model: its greedy tokens are the argmax of peft's float32 logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_chat_dir, dtype=torch.float32),
                                    adapter).eval()
    prompt = [5, 17, 42, 7, 99, 3]
    with torch.no_grad():
        x = torch.tensor([prompt])
        want = ref(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
        got = adapted_backend.model(x, adapted_backend.model.new_cache())[0]
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["+round-1", "demo+", "demo+a/b", "demo+" + "x" * 65])
def test_a_malformed_adapted_name_is_a_named_error(name):
    with pytest.raises(AdapterError, match="deployment name"):
        split_adapted_name(name)


def test_a_missing_adapter_is_a_named_error(demo_chat_dir, tmp_path):
    with pytest.raises(AdapterError, match="adapter directory not found"):
        LocalBackend(demo_chat_dir, adapter=tmp_path / "nope")
