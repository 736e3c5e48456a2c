"""The server's round loop over a fake Flower Grid (in-process, instant clients): deadlines, dropped and failing
clients, poisoned updates, checkpoints in PEFT format that the edge runtime and peft both load, and resume
after a restart."""

from __future__ import annotations

import json
import time

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from edge_node.adapters import load_adapted
from federated import checkpoint, wire
from federated.aggregation import lora_rank, truncate
from federated.strategy import SessionConfig, run_session


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower's Message needs the identity a ServerApp process has; give the test process one."""
    from flwr.supercore.task_identity import TaskIdentity

    for k, v in {"run_id": 1, "node_id": 0, "task_id": 1}.items():
        setattr(TaskIdentity, k, v)


class FakeGrid:
    """Nodes answer through `behave(node, message) -> reply | None` (None: never answers)."""

    def __init__(self, behaviours: dict[int, str], delay_s: dict[str, float] | None = None):
        self.behaviours, self.queue, self.sent, self.delay_s = behaviours, {}, [], delay_s or {}

    def get_node_ids(self):
        return list(self.behaviours)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = mid = f"{m.object_id}-{len(self.sent)}"
            self.sent.append(m)
            reply = behave(self.behaviours[m.metadata.dst_node_id], m)
            if reply is not None:  # shows up delay_s[kind] after it was sent
                kind = self.behaviours[m.metadata.dst_node_id]
                self.queue[mid] = (reply, time.monotonic() + self.delay_s.get(kind, 0.0))
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        now = time.monotonic()
        return [self.queue.pop(i)[0] for i in list(ids) if i in self.queue and self.queue[i][1] <= now]

    def send_and_receive(self, messages, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def behave(kind: str, m: Message) -> Message | None:
    if kind == "silent":
        return None
    if kind == "error":
        return Message(Error(code=0, reason="client crashed"), reply_to=m)
    if m.metadata.message_type.startswith("evaluate"):
        return Message(RecordDict({"metrics": MetricRecord({"ppl": 1.0}), "info": ConfigRecord({"name": kind})}),
                       reply_to=m)
    state = sent(m)
    config = m.content["config"]
    if config["rule"] == "hetlora":  # the client trains at the rank it was given
        state = truncate(state, int(config["rank"]))
    out = {n: t + (100.0 if kind == "poison" else 0.25) for n, t in state.items()}
    if kind == "poison":
        next(iter(out.values()))[0, 0] = float("nan")
    if kind == "garbled":  # a layout that does not fit its array
        out = {"x.lora_A.weight": torch.zeros(3, 3)}
    metrics = {"num-examples": 4, "train-loss": 1.0, "ppl-before": 2.0, "steps": 2,
               "s-per-step": 0.4 if kind == "slow" else 0.1,
               "train-s": 0.2, "client-s": 0.3, "rank": int(m.content["config"]["rank"]), "bytes-up": 8}
    arrays, layout = wire.pack(out)
    if kind == "garbled":
        arrays, _ = wire.pack(state)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                               "info": ConfigRecord({"name": kind, **layout})}), reply_to=m)


def sent(m: Message) -> dict[str, torch.Tensor]:
    """The adapter a message carries (one flat array and its layout in the message's config or info record)."""
    return wire.unpack(m.content["arrays"], m.content["config" if "config" in m.content.config_records else "info"])


def session(llama_dir, out, **kw) -> SessionConfig:
    return SessionConfig(model=str(llama_dir), out=str(out), rank=4, min_clients=1, wait_nodes_s=1, **kw)


def test_dropped_failing_and_poisoned_clients_never_stall_or_spoil_a_round(llama_dir, tmp_path):
    grid = FakeGrid({1: "good", 2: "silent", 3: "poison", 4: "error", 5: "garbled"})
    t0 = time.monotonic()
    summary = run_session(grid, session(llama_dir, tmp_path, rounds=1, deadline_s=1.0))
    assert time.monotonic() - t0 < 30
    rec = summary["history"][0]
    assert 1.0 <= rec["seconds"] < 3.0  # the silent node costs the deadline, no more
    assert rec["missing_nodes"] == [2] and rec["errors"][0]["error"] == "client crashed"
    assert rec["errors"][1]["node"] == 5 and "malformed adapter from garbled" in rec["errors"][1]["error"]
    assert [r["client"] for r in rec["rejected"]] == ["poison"] and "NaN" in rec["rejected"][0]["reason"]
    assert [c["name"] for c in rec["clients"]] == ["good", "poison"]
    init = sent(grid.sent[0])
    state, _ = checkpoint.load_round(tmp_path, 1)
    for n, t in state.items():  # the good client's update alone: initial + 0.25
        torch.testing.assert_close(t, init[n] + 0.25)


@pytest.mark.slow  # imports peft and transformers
def test_checkpoints_resume_and_load_in_the_edge_runtime_and_peft(llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_session(FakeGrid({1: "good"}), session(llama_dir, tmp_path, rounds=1))
    first, _ = checkpoint.load_round(tmp_path, 1)
    grid = FakeGrid({1: "good"})  # a restarted server, a fresh grid
    summary = run_session(grid, session(llama_dir, tmp_path, rounds=3))
    assert summary["resumed_after"] == 1 and [h["round"] for h in summary["history"]] == [1, 2, 3]
    again = sent(grid.sent[0])  # round 2 started from round 1's adapter
    assert all(torch.equal(again[n], first[n]) for n in first)
    assert checkpoint.finished_rounds(tmp_path) == [1, 2, 3] and (tmp_path / "latest").resolve().name == "round-0003"
    assert json.loads((tmp_path / "summary.json").read_text())["ppl_after"] == {"good": 1.0}

    adapter = checkpoint.round_dir(tmp_path, 3)
    edge = load_adapted(llama_dir, adapter)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), adapter).eval()
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        got = edge(ids, edge.new_cache())[0]
    assert (got - want).abs().max().item() < 1e-4


def test_dp_clips_on_the_client_and_noises_the_aggregate(llama_dir, tmp_path):
    from federated.client_app import dp_clipping

    grid = FakeGrid({1: "good", 2: "good"})
    run_session(grid, session(llama_dir, tmp_path, rounds=1, dp_clip=0.5, dp_noise=2.0, evaluate=False))
    msg = grid.sent[0]
    assert msg.content["config"]["clipping_norm"] == 0.5
    init = sent(msg)
    state, _ = checkpoint.load_round(tmp_path, 1)
    noise = torch.cat([(state[n] - init[n] - 0.25).flatten() for n in init])
    assert abs(noise.std().item() - 2.0 * 0.5 / 2) < 0.02  # Flower's stdv: noise x clip / clients

    # the client side: Flower's fixedclipping_mod through our switch clips the update to the norm
    reply = dp_clipping(msg, None, lambda m, ctx: behave("good", m))
    clipped = sent(reply)
    norm = torch.cat([(clipped[n] - init[n]).flatten() for n in init]).norm().item()
    assert abs(norm - 0.5) < 1e-4
    del msg.content["config"]["clipping_norm"]  # switched off: the update passes untouched
    plain = sent(dp_clipping(msg, None, lambda m, ctx: behave("good", m)))
    assert all(torch.allclose(plain[n], init[n] + 0.25) for n in init)


def test_hetlora_and_compass_plan_from_measured_speed(llama_dir, tmp_path):
    grid = FakeGrid({1: "good", 2: "slow"})
    summary = run_session(grid, session(llama_dir, tmp_path, rounds=2, rule="hetlora", schedule="compass", steps=8,
                                        evaluate=False))
    first, second = grid.sent[:2], grid.sent[2:4]
    assert [int(m.content["config"]["rank"]) for m in first] == [4, 4]  # nothing measured yet
    assert [int(m.content["config"]["steps"]) for m in first] == [8, 8]
    # measured: node 2 is 4x slower -> a quarter of the rank and of the steps, so both return together
    assert [int(m.content["config"]["rank"]) for m in second] == [4, 2]
    assert [int(m.content["config"]["steps"]) for m in second] == [8, 2]
    assert not summary["history"][1]["rejected"]
    state, _ = checkpoint.load_round(tmp_path, 2)
    assert lora_rank(state) == 4


def test_compass_probes_unmeasured_clients_with_a_short_first_round(llama_dir, tmp_path):
    grid = FakeGrid({1: "good", 2: "slow"})
    run_session(grid, session(llama_dir, tmp_path, rounds=2, schedule="compass", steps=8, probe_steps=2,
                              evaluate=False))
    assert [int(m.content["config"]["steps"]) for m in grid.sent] == [2, 2, 8, 2]  # probe, then measured


def test_compass_folds_a_late_update_into_the_next_round_with_a_staleness_weight(llama_dir, tmp_path):
    # round 1 ends at its deadline (1.5 s) without the late node; round 2 (1.5 s to 3 s) gets the late
    # reply at 2 s and the good node's at 2.5 s
    grid = FakeGrid({1: "good", 2: "late"}, delay_s={"good": 1.0, "late": 2.0})
    summary = run_session(grid, session(llama_dir, tmp_path, rounds=2, schedule="compass", deadline_s=1.5,
                                        evaluate=False))
    r1, r2 = summary["history"]
    assert [c["name"] for c in r1["clients"]] == ["good"]  # the late node missed round 1's deadline ...
    assert [m.metadata.dst_node_id for m in grid.sent] == [1, 2, 1]  # ... and, busy, got no round-2 work
    late = next(c for c in r2["clients"] if c["name"] == "late")
    assert late["sent_in_round"] == 1  # its round-1 update was folded into round 2, one round stale
    init = sent(grid.sent[0])
    g1 = {n: t + 0.25 for n, t in init.items()}
    w = 2 ** -0.5 / (1 + 2 ** -0.5)  # (1 + staleness)^-0.5 against a fresh update's 1
    state, _ = checkpoint.load_round(tmp_path, 2)
    for n, t in state.items():
        torch.testing.assert_close(t, (1 - w) * (g1[n] + 0.25) + w * (init[n] + 0.25))


def test_per_round_evaluation_stops_the_session_at_the_target_perplexity(llama_dir, tmp_path):
    grid = FakeGrid({1: "good", 2: "slow"})  # every node evaluates to perplexity 1.0
    summary = run_session(grid, session(llama_dir, tmp_path / "a", rounds=3, eval_rounds=True, target_ppl=1.5,
                                        evaluate=False))
    assert summary["rounds_done"] == 1 and len(summary["history"]) == 1
    rec = summary["history"][0]
    assert rec["ppl_after"] == {"good": 1.0, "slow": 1.0} and rec["mean_ppl"] == 1.0
    assert rec["wall_s"] == rec["seconds"] and summary["adapter"].endswith("round-0001")
    summary = run_session(FakeGrid({1: "good"}), session(llama_dir, tmp_path / "b", rounds=3, eval_rounds=True,
                                                         target_ppl=0.5, evaluate=False))
    assert summary["rounds_done"] == 3  # never reached: every round runs
    walls = [h["wall_s"] for h in summary["history"]]
    assert walls == sorted(walls) and walls[-1] >= sum(h["seconds"] for h in summary["history"]) - 1e-3


@pytest.mark.parametrize("kw, message", [
    ({"target_ppl": 2.0}, "target-ppl needs eval-rounds"),
    ({"secagg": True, "schedule": "compass"}, "secagg needs rule fedavg and schedule sync"),
    ({"secagg": True, "rule": "hetlora"}, "secagg needs rule fedavg and schedule sync"),
    ({"secagg": True, "dp_clip": 1.0}, "secagg needs rule fedavg and schedule sync"),
])
def test_session_options_that_cannot_combine_are_named_errors(llama_dir, tmp_path, kw, message):
    from edge_node.model.errors import UsageError

    with pytest.raises(UsageError, match=message):
        session(llama_dir, tmp_path, **kw)
