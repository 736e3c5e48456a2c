"""A client's round in-process on the demo model: only adapter tensors come back, FFA-LoRA sends only B (A stays
frozen), HetLoRA trains at the rank it is given, and every reply passes the server's validation. A round on the
peft model kept from an earlier round (a warm ClientApp process) equals one on a freshly loaded base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edge_node.model.config import ModelConfig
from emulation.corpus import partitions
from federated import models, task
from federated.aggregation import Update, check_update, is_b
from federated.data import write_client_data
from federated.task import ClientSettings, Orders, client_train

pytestmark = pytest.mark.slow  # imports transformers, peft and bitsandbytes (~10-25 s on a busy machine)
DEMO = Path(__file__).resolve().parents[2] / "models" / "edgefed-demo"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    part = partitions(["json"])["json"]
    data = write_client_data(tmp_path_factory.mktemp("c") / "json.json", part.files("train"), part.files("heldout"))
    return ClientSettings(name="json", data=str(data), quant="float32")


def orders(rule: str, rank: int) -> Orders:
    return Orders(round=1, model=str(DEMO), rule=rule, rank=rank, steps=2, seq_len=32, train_blocks=8, eval_blocks=2)


@pytest.mark.parametrize("rule, rank", [("fedavg", 4), ("ffa", 4), ("hetlora", 2)])
def test_a_round_sends_back_only_what_the_rule_wants(client, rule, rank):
    glob = models.init_state(ModelConfig.from_dir(DEMO), 4, seed=1)
    sent, met = client_train(client, orders(rule, rank), glob)
    assert check_update(Update("json", sent, met["num-examples"], met["rank"]), glob, rule) is None
    assert met["bytes-up"] == models.nbytes(sent) and met["steps"] == 2 and met["ppl-before"] > 1
    if rule == "ffa":
        assert sent and all(is_b(n) for n in sent)
    b = next(n for n in sent if is_b(n))
    assert sent[b].shape[1] == rank and sent[b].abs().sum() > 0  # B left zero and moved
    if rule == "fedavg":
        a = b.replace("lora_B", "lora_A")
        assert not torch.equal(sent[a], glob[a])  # A trains too (FFA-LoRA keeps it)


def test_a_round_on_the_kept_model_equals_one_on_a_fresh_load(client):
    cfg = ModelConfig.from_dir(DEMO)
    task.clear_cache()
    client_train(client, orders("fedavg", 4), models.init_state(cfg, 4, seed=1))  # loads the base and keeps it
    kept_model = next(iter(task._MODEL.values()))
    second = models.init_state(cfg, 4, seed=2)
    kept, met_kept = client_train(client, orders("fedavg", 4), second)
    assert next(iter(task._MODEL.values())) is kept_model  # the same peft model served the second round
    task.clear_cache()
    fresh, met_fresh = client_train(client, orders("fedavg", 4), second)
    fresh_model = next(iter(task._MODEL.values()))
    assert fresh_model is not kept_model
    assert met_kept["ppl-before"] == met_fresh["ppl-before"] and met_kept["train-loss"] == met_fresh["train-loss"]
    assert list(kept) == list(fresh) and all(torch.equal(kept[n], fresh[n]) for n in fresh)
    client_train(client, orders("ffa", 4), second)  # another rule: another model (A frozen), not the kept one
    assert next(iter(task._MODEL.values())) is not fresh_model and len(task._MODEL) == 1
