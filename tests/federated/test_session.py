"""A real federated session on loopback: a SuperLink and two SuperNodes (Flower processes, no Ray), the demo
model, one non-IID standard-library partition per client. Two rounds lower every client's held-out perplexity;
the SuperLink restarts after round 1 and the session resumes from the checkpoint; only adapters travel; the
final adapter serves on the edge runtime. A third round runs under Flower's SecAgg+ (secaggplus_mod + its
SecAggPlusWorkflow): the server gets only the unmasked sum, which equals FedAvg of the clients' updates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edge_node.adapters import load_adapted
from emulation.corpus import partitions
from federated import checkpoint
from federated.data import write_client_data
from federated.runner import LocalFederation
from federated.strategy import SessionConfig, _orders
from federated.task import ClientSettings, Orders, client_evaluate, client_train

DEMO = Path(__file__).resolve().parents[2] / "models" / "edgefed-demo"


@pytest.mark.slow
def test_two_rounds_lower_every_clients_perplexity_and_resume_after_a_superlink_restart(tmp_path):
    nodes = []
    for name, part in partitions(["json", "email"]).items():
        data = write_client_data(tmp_path / f"{name}.json", part.files("train"), part.files("heldout"))
        nodes.append({"name": name, "data": str(data), "quant": "nf4" if name == "json" else "float32"})
    first = SessionConfig(model=str(DEMO), out=str(tmp_path / "out"), rounds=1, rank=4, steps=6, lr=2e-3,
                          train_blocks=64, eval_blocks=8, deadline_s=300, evaluate=False)
    fed = LocalFederation(tmp_path, nodes)
    with fed:
        s1 = fed.run(first, timeout_s=600)
        fed.restart_superlink()  # the coordinator restarts: round 1 is kept, round 2 continues from it
        s2 = fed.run(dataclasses.replace(first, rounds=2), timeout_s=600)
        third = dataclasses.replace(first, rounds=3, secagg=True)
        s3 = fed.run(third, timeout_s=600)
    assert all(not p.alive() for p in fed.procs)
    for node in nodes:  # one warm ClientApp process served every message of the three sessions (federated.warm)
        log = (tmp_path / f"supernode-{node['name']}.log").read_text(errors="replace")
        assert log.count(": completed in ") >= 6 and "Start `flwr-clientapp` process" not in log
    assert s1["resumed_after"] == 0 and s2["resumed_after"] == 1
    rounds = s2["history"]
    assert [h["round"] for h in rounds] == [1, 2] and all(not h["rejected"] and not h["errors"] for h in rounds)
    before = {c["name"]: c["ppl-before"] for c in rounds[0]["clients"]}
    assert set(before) == {"json", "email"}
    final, _ = checkpoint.load_round(first.out, 2)
    orders = Orders(round=3, model=str(DEMO), rank=4, eval_blocks=8)
    for node in nodes:  # every client's held-out perplexity went down (evaluated here, as its client would)
        after = client_evaluate(ClientSettings.from_config(node), orders, final)["ppl"]
        assert after < before[node["name"]], (node["name"], before[node["name"]], after)
    bits = {c["name"]: c["quant-bits"] for h in rounds for c in h["clients"]}
    assert bits == {"json": 4, "email": 32}  # json trained on a bitsandbytes nf4 base
    assert all(h["bytes_up"] < h["full_model_bytes"] / 20 for h in rounds)  # adapters only
    model = load_adapted(DEMO, s2["adapter"])  # PEFT format, checked against the base it was trained on
    assert model.config.num_layers == 6

    # round 3 under SecAgg+: both clients took part, and the unmasked aggregate is FedAvg of their updates
    # (each retrained here with the same seeded orders; SecAgg+ quantizes values to 16 / 2^22 steps)
    r3 = s3["history"][-1]
    assert s3["resumed_after"] == 2 and r3["secagg"] and not r3["rejected"] and not r3["missing_nodes"]
    assert {c["name"] for c in r3["clients"]} == {"json", "email"}
    g3, _ = checkpoint.load_round(first.out, 3)
    ups = [client_train(ClientSettings.from_config(n), _orders(third, 3, third.steps, third.rank), final)
           for n in nodes]
    total = sum(m["num-examples"] for _, m in ups)
    for name in final:
        want = sum(t[name] * m["num-examples"] for t, m in ups) / total
        assert (g3[name] - want).abs().max().item() < 1e-4, name
    assert max((g3[n] - final[n]).abs().max().item() for n in final) > 1e-3  # the round really moved the adapter
