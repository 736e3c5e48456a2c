"""The server's side of a session, over Flower's Grid (Message API): rounds, deadlines, aggregation, checkpoints.

Each round sends the global adapter to every connected node with its orders (steps from FedCompass when the
schedule is "compass", rank from measured speed under HetLoRA), waits until every reply is in or the round's
deadline passes (a dropped or slow client never stalls the round past it), validates and aggregates the
replies, and checkpoints the new global adapter. FedCompass: replies that miss the deadline are kept pending
and folded into a later round with a weight that falls with their staleness. A restarted server resumes from
the last finished round in `out-dir`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_stdv

from edge_node.model.config import ModelConfig
from edge_node.model.errors import UsageError
from edge_node.model.formats import weights_digest

from . import checkpoint, compass, models, wire
from .aggregation import RULES, Update, aggregate
from .plan import choose_rank
from .task import Orders, params

log = logging.getLogger(__name__)
SUMMARY = "summary.json"


@dataclass(frozen=True)
class SessionConfig:
    model: str
    out: str
    rounds: int = 2
    min_clients: int = 2
    rule: str = "fedavg"
    schedule: str = "sync"
    rank: int = 8
    steps: int = 10
    lr: float = 1e-3
    batch_size: int = 4
    seq_len: int = 128
    train_blocks: int = 256
    eval_blocks: int = 8
    seed: int = 0
    deadline_s: float = 600.0  # a round's hard limit
    fixed_s: float = 5.0  # compass: margin added to the deadline
    slack: float = 1.5  # compass: deadline = (measured overhead + steps x s/step) x slack + fixed_s
    staleness_decay: float = 0.5  # weight of an update k rounds late: (1 + k) ^ -decay
    probe_steps: int = 0  # compass: steps of a client not yet measured (0: `steps`); a short first round measures
    wait_nodes_s: float = 60.0
    evaluate: bool = True  # ask every client for held-out perplexity of the final adapter
    eval_rounds: bool = False  # also after every round (its time kept out of the round's seconds)
    target_ppl: float = 0.0  # > 0 (with eval_rounds): stop after the first round whose mean perplexity is <= it
    dp_clip: float = 0.0  # > 0: central DP, clients clip their update to this L2 norm (Flower's fixedclipping_mod)
    dp_noise: float = 0.0  # noise multiplier: the server adds N(0, (noise x clip / clients)^2) to the aggregate
    secagg: bool = False  # Flower's SecAgg+ (federated.secagg): the server sees only the sum of masked updates

    def __post_init__(self):
        if self.rule not in RULES:
            raise UsageError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.schedule not in compass.SCHEDULES:
            raise UsageError(f"schedule must be one of {', '.join(compass.SCHEDULES)}, got {self.schedule!r}")
        if (self.dp_clip > 0 or self.dp_noise > 0) and (self.rule != "fedavg" or self.dp_clip <= 0):
            raise UsageError("differential privacy needs rule fedavg (clients send every tensor) and dp-clip > 0")
        if self.secagg and (self.rule != "fedavg" or self.schedule != "sync" or self.dp_clip > 0):
            raise UsageError("secagg needs rule fedavg and schedule sync, without dp (Flower's SecAgg+ workflow "
                             "aggregates one synchronous FedAvg round; see federated/secagg.py)")
        if self.target_ppl > 0 and not self.eval_rounds:
            raise UsageError("target-ppl needs eval-rounds (the perplexity is measured after every round)")
        if self.rounds < 1 or self.min_clients < 1 or self.rank < 1 or self.steps < 1:
            raise UsageError("rounds, min-clients, rank and steps must be at least 1")
        if self.probe_steps < 0 or (self.probe_steps and self.schedule != "compass"):
            raise UsageError("probe-steps (>= 0) is for schedule compass: sync gives every client `steps`")

    @classmethod
    def from_run_config(cls, raw: dict) -> SessionConfig:
        conv = {"int": int, "float": float, "bool": bool, "str": str}
        kw = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in raw:
                kw[f.name] = conv[f.type](raw[key])
        for req in ("model", "out"):
            if req not in kw:
                raise UsageError(f"run config lacks {req!r}")
        return cls(**kw)

    def to_run_config(self) -> dict:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


@dataclass
class Pending:
    node: int
    round: int
    name: str = ""


@dataclass
class SessionState:
    state: dict[str, torch.Tensor]
    speeds: dict[int, float] = field(default_factory=dict)  # node -> measured s/step
    overheads: dict[int, float] = field(default_factory=dict)  # node -> measured round trip less training
    names: dict[int, str] = field(default_factory=dict)
    pending: dict[str, Pending] = field(default_factory=dict)  # message id -> who, sent in which round
    history: list[dict] = field(default_factory=list)


def wait_for_nodes(grid: Grid, n: int, timeout_s: float) -> list[int]:
    t0 = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"only {len(nodes)} of {n} SuperNodes connected within {timeout_s:.0f} s")
        time.sleep(0.5)


def _orders(cfg: SessionConfig, rnd: int, steps: int, rank: int) -> Orders:
    return Orders(round=rnd, model=cfg.model, rule=cfg.rule, rank=rank, steps=steps, lr=cfg.lr,
                  batch_size=cfg.batch_size, seq_len=cfg.seq_len, train_blocks=cfg.train_blocks,
                  eval_blocks=cfg.eval_blocks, seed=cfg.seed)


def _plan(cfg: SessionConfig, s: SessionState, nodes: list[int]) -> dict[int, tuple[int, int]]:
    """(steps, rank) per idle node."""
    speeds = {str(n): v for n, v in s.speeds.items()}
    if cfg.schedule == "compass":
        steps = {int(c): k for c, k in compass.assign_steps(speeds, cfg.steps, [str(n) for n in nodes],
                                                            probe_steps=cfg.probe_steps).items()}
    else:
        steps = {n: cfg.steps for n in nodes}
    fastest = min(s.speeds.values(), default=0)
    ranks = {n: choose_rank(s.speeds[n], fastest, cfg.rank) if cfg.rule == "hetlora" and n in s.speeds and fastest
             else cfg.rank for n in nodes}
    return {n: (steps[n], ranks[n]) for n in nodes}


def _deadline(cfg: SessionConfig, s: SessionState, plan: dict[int, tuple[int, int]]) -> float:
    if cfg.schedule != "compass":
        return cfg.deadline_s
    speeds = {str(n): v for n, v in s.speeds.items()}
    over = {str(n): v for n, v in s.overheads.items()}
    return compass.deadline(speeds, {str(n): k for n, (k, _) in plan.items()}, cfg.fixed_s, cfg.slack, cfg.deadline_s,
                            over)


def run_round(grid: Grid, cfg: SessionConfig, s: SessionState, rnd: int) -> dict:
    """Send, wait until all replies or the deadline, aggregate; returns the round's record."""
    t0 = time.monotonic()
    busy = {p.node for p in s.pending.values()}
    nodes = [n for n in sorted(grid.get_node_ids()) if n not in busy]
    plan = _plan(cfg, s, nodes)
    arrays, layout = wire.pack(s.state)
    dp = {KEY_CLIPPING_NORM: cfg.dp_clip} if cfg.dp_clip > 0 else {}
    msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({**_orders(cfg, rnd, *plan[n]).to_config(),
                                                                          **layout, **dp})}),
                    dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
    sent = dict(zip(grid.push_messages(msgs), nodes, strict=True))
    s.pending.update({mid: Pending(n, rnd) for mid, n in sent.items()})
    limit = _deadline(cfg, s, plan)
    replies: list[tuple[Message, Pending, float]] = []
    while s.pending and time.monotonic() - t0 < limit:
        for m in grid.pull_messages(list(s.pending)):
            replies.append((m, s.pending.pop(m.metadata.reply_to_message_id), time.monotonic() - t0))
        if not any(p.round == rnd for p in s.pending.values()):
            break  # every client of this round is back (late ones of earlier rounds may still come)
        time.sleep(0.1)
    updates, clients, errors = [], [], []
    for m, sent_in, back_s in replies:
        node = m.metadata.src_node_id
        if m.has_error():
            errors.append({"node": node, "error": m.error.reason[-500:]})
            log.warning("round %d: node %s failed: %s", rnd, node, m.error.reason[-500:])
            continue
        met = dict(m.content["metrics"])
        name = str(m.content["info"]["name"])
        s.names[node], s.speeds[node] = name, float(met["s-per-step"])
        if sent_in.round == rnd:  # what a round costs this node beside training
            s.overheads[node] = max(0.0, back_s - float(met["train-s"]))
        try:
            tensors = wire.unpack(m.content["arrays"], m.content["info"])
        except ValueError as e:  # rejected and logged like an update that does not fit
            errors.append({"node": node, "error": f"malformed adapter from {name}: {e}"})
            log.warning("round %d: node %s sent a malformed adapter: %s", rnd, node, e)
            continue
        updates.append(Update(name, tensors, float(met["num-examples"]), int(met["rank"]), rnd - sent_in.round))
        clients.append({"name": name, "node": node, "sent_in_round": sent_in.round, **met})
    if cfg.schedule == "sync":
        s.pending.clear()  # synchronous FedAvg forgets what missed the deadline
    new, sorted_ = aggregate(cfg.rule, s.state, updates, cfg.staleness_decay if cfg.schedule == "compass" else None)
    if cfg.dp_noise > 0 and sorted_.accepted:
        new = add_noise(new, cfg.dp_noise, cfg.dp_clip, len(sorted_.accepted), cfg.seed * 7919 + rnd)
    s.state = new
    missing = sorted(n for n in nodes if n not in {c["node"] for c in clients} and n not in {e["node"] for e in errors})
    return {"round": rnd, "seconds": round(time.monotonic() - t0, 3), "deadline_s": round(limit, 3),
            "clients": clients, "errors": errors, "missing_nodes": missing,
            "rejected": [{"client": r.client, "reason": r.reason} for r in sorted_.rejected],
            "bytes_down": models.nbytes(s.state) * len(nodes), "bytes_up": sum(c["bytes-up"] for c in clients)}


def run_round_secagg(grid: Grid, context: Context, cfg: SessionConfig, s: SessionState, rnd: int) -> dict:
    """A synchronous FedAvg round through Flower's SecAgg+ (federated.secagg); the same record as run_round."""
    from .secagg import secagg_round

    t0 = time.monotonic()
    nodes = sorted(grid.get_node_ids())
    orders = _orders(cfg, rnd, cfg.steps, cfg.rank).to_config()
    new, results = secagg_round(grid, context, s.state, rnd, orders, len(nodes), cfg.deadline_s)
    clients = [{"name": str(met.pop("name", node)), "node": node, "sent_in_round": rnd, **met}
               for node, _, met in results]
    rejected = [] if new is not None else [{"client": "(aggregate)", "reason": "SecAgg+ halted or refused"}]
    if new is not None:
        s.state = new
    return {"round": rnd, "seconds": round(time.monotonic() - t0, 3), "deadline_s": cfg.deadline_s, "secagg": True,
            "clients": clients, "errors": [], "rejected": rejected,
            "missing_nodes": sorted(set(nodes) - {c["node"] for c in clients}),
            "bytes_down": models.nbytes(s.state) * len(nodes), "bytes_up": sum(c["bytes-up"] for c in clients)}


def add_noise(state: dict[str, torch.Tensor], noise: float, clip: float, clients: int, seed: int
              ) -> dict[str, torch.Tensor]:
    """The aggregate plus Gaussian noise of Flower's standard deviation for client-side fixed clipping."""
    std = compute_stdv(noise, clip, clients)
    g = torch.Generator().manual_seed(seed)
    return {n: t + torch.randn(t.shape, generator=g) * std for n, t in state.items()}


def evaluate_all(grid: Grid, cfg: SessionConfig, s: SessionState, timeout_s: float,
                 nodes: list[int] | None = None) -> dict[str, float]:
    """Held-out perplexity of the global adapter on every node in `nodes` (default: all connected), by name."""
    nodes = sorted(grid.get_node_ids()) if nodes is None else nodes
    arrays, layout = wire.pack(s.state)
    orders = _orders(cfg, cfg.rounds, cfg.steps, cfg.rank)
    msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({**orders.to_config(), **layout})}),
                    dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
    out = {}
    for m in grid.send_and_receive(msgs, timeout=timeout_s):
        if not m.has_error():
            out[str(m.content["info"]["name"])] = float(m.content["metrics"]["ppl"])
    return out


def _evaluate_round(grid: Grid, cfg: SessionConfig, s: SessionState) -> dict:
    """The global adapter's held-out perplexity on every idle node after a round; "mean_ppl" only when every
    connected node answered (a node still training a late update is not asked, and the mean is None)."""
    t0 = time.monotonic()
    busy = {p.node for p in s.pending.values()}
    nodes = sorted(grid.get_node_ids())
    ppl = evaluate_all(grid, cfg, s, cfg.deadline_s, [n for n in nodes if n not in busy])
    complete = len(ppl) == len(nodes)
    return {"ppl_after": ppl, "mean_ppl": sum(ppl.values()) / len(ppl) if complete and ppl else None,
            "eval_s": round(time.monotonic() - t0, 3)}


def run_session(grid: Grid, cfg: SessionConfig, context: Context | None = None) -> dict:
    """The whole session (resuming after the last finished round in cfg.out); returns and writes its summary."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    mcfg = ModelConfig.from_dir(cfg.model)
    digest = weights_digest(cfg.model)
    start = checkpoint.last_round(out)
    if start:
        state, record = checkpoint.load_round(out, start)
        history = record.get("metrics", {}).get("history", [])
        log.info("resuming after round %d from %s", start, checkpoint.round_dir(out, start))
    else:
        state, history = models.init_state(mcfg, cfg.rank, seed=cfg.seed), []
    s = SessionState(state, history=history)
    wait_for_nodes(grid, cfg.min_clients, cfg.wait_nodes_s)
    full_bytes = params(cfg.model) * 4  # the float32 model a full-model round would send each way
    done = start
    for rnd in range(start + 1, cfg.rounds + 1):
        if cfg.secagg:
            if context is None:
                raise UsageError("secagg needs the ServerApp's context (run_session(grid, cfg, context))")
            record = run_round_secagg(grid, context, cfg, s, rnd)
        else:
            record = run_round(grid, cfg, s, rnd)
        record["full_model_bytes"] = full_bytes
        record["wall_s"] = round(sum(h["seconds"] for h in s.history) + record["seconds"], 3)  # training rounds only
        if cfg.eval_rounds:
            record.update(_evaluate_round(grid, cfg, s))
        s.history.append(record)
        done = rnd
        checkpoint.save_round(out, rnd, s.state, cfg.rank, list(models.TARGETS), digest, cfg.model,
                              {"history": s.history})
        log.info("round %d done in %.1f s: %d update(s), %d rejected, missing %s", rnd, record["seconds"],
                 len(record["clients"]), len(record["rejected"]), record["missing_nodes"])
        mean = record.get("mean_ppl")
        if cfg.target_ppl > 0 and mean is not None and mean <= cfg.target_ppl:
            log.info("round %d reached the target perplexity %.3f (%.3f)", rnd, cfg.target_ppl, mean)
            break
    summary = {"resumed_after": start, "rounds": cfg.rounds, "rounds_done": done, "history": s.history,
               "config": cfg.to_run_config(), "adapter": str(checkpoint.round_dir(out, done))}
    if cfg.evaluate:
        summary["ppl_after"] = evaluate_all(grid, cfg, s, cfg.deadline_s)
    (out / SUMMARY).write_text(json.dumps(summary, indent=1))
    return summary
