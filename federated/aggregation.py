"""Aggregating LoRA updates: pure functions over adapter tensors, no processes, no Flower types.

An adapter state is a dict from PEFT's saved names ("base_model.model.model.layers.0.self_attn.q_proj.lora_A
.weight", shape (r, in); "...lora_B.weight", shape (out, r)) to float32 tensors. Three rules:

* FedAvg over A and B separately (the FlowerTune baseline): sum_i w_i A_i and sum_i w_i B_i. Note that
  avg(B) @ avg(A) != avg(B @ A); that bias is what FFA-LoRA removes.
* FFA-LoRA: A is frozen at its shared initialisation and only B is trained and sent, so the average of
  the B's gives exactly the average of the updates B_i @ A.
* HetLoRA (mixed ranks): each client's A (r_i, in) and B (out, r_i) are zero-padded to the largest rank R,
  averaged with the weights, and each client receives the global adapter truncated back to its own rank
  (A[:r_i], B[:, :r_i]).

An update is validated against the expected names and shapes before it can be averaged; one with a missing
or unknown tensor, a wrong shape, or a NaN/Inf value is rejected and reported, never averaged in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
RULES = ("fedavg", "ffa", "hetlora")


@dataclass(frozen=True)
class Update:
    """One client's reply: its adapter tensors (all of them, or only the B's under FFA-LoRA) and its weight
    (number of training examples, or tokens)."""

    client: str
    tensors: Mapping[str, torch.Tensor]
    weight: float
    rank: int | None = None  # its LoRA rank (HetLoRA); None: the global rank
    staleness: int = 0  # rounds since the global state it started from (FedCompass)


@dataclass(frozen=True)
class Rejection:
    client: str
    reason: str


@dataclass(frozen=True)
class Sorted:
    accepted: list[Update] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def is_a(name: str) -> bool:
    return ".lora_A." in name


def is_b(name: str) -> bool:
    return ".lora_B." in name


def lora_rank(state: Mapping[str, torch.Tensor]) -> int:
    """The rank of an adapter state (the rows of its A's, or the columns of its B's)."""
    ranks = {t.shape[0] for n, t in state.items() if is_a(n)} | {t.shape[1] for n, t in state.items() if is_b(n)}
    if len(ranks) != 1:
        raise ValueError(f"adapter state has no single LoRA rank (found {sorted(ranks)})")
    return ranks.pop()


def sent_names(global_state: Mapping[str, torch.Tensor], rule: str) -> list[str]:
    """The tensors a client sends back under `rule` (FFA-LoRA: only the B's)."""
    return sorted(n for n in global_state if rule != "ffa" or is_b(n))


def expected_shapes(global_state: Mapping[str, torch.Tensor], rule: str, rank: int | None = None
                    ) -> dict[str, tuple[int, ...]]:
    """Name -> shape an update must have; under HetLoRA truncated to the client's rank."""
    out = {}
    for n in sent_names(global_state, rule):
        shape = tuple(global_state[n].shape)
        if rule == "hetlora" and rank is not None:
            shape = (rank, shape[1]) if is_a(n) else (shape[0], rank)
        out[n] = shape
    return out


def check_update(update: Update, global_state: Mapping[str, torch.Tensor], rule: str) -> str | None:
    """Why `update` must not be averaged in (None: it is fine)."""
    if not (isinstance(update.weight, int | float) and math.isfinite(update.weight) and update.weight > 0):
        return f"weight {update.weight!r} is not a positive finite number"
    if rule == "hetlora":
        top = lora_rank(global_state)
        if update.rank is None or not 1 <= update.rank <= top:
            return f"rank {update.rank!r} is outside [1, {top}]"
    want = expected_shapes(global_state, rule, update.rank if rule == "hetlora" else None)
    missing = sorted(set(want) - set(update.tensors))
    if missing:
        return f"missing tensor(s) {_few(missing)}"
    extra = sorted(set(update.tensors) - set(want))
    if extra:
        return f"unexpected tensor(s) {_few(extra)}"
    for name, shape in want.items():
        t = update.tensors[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return f"tensor {name!r} is not a float tensor"
        if tuple(t.shape) != shape:
            return f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}"
        if not bool(torch.isfinite(t).all()):
            return f"tensor {name!r} holds NaN or Inf"
    return None


def _few(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def sort_updates(updates: Sequence[Update], global_state: Mapping[str, torch.Tensor], rule: str) -> Sorted:
    """Split updates into those fit to average and those rejected (each logged with its reason)."""
    out = Sorted()
    for u in updates:
        reason = check_update(u, global_state, rule)
        if reason is None:
            out.accepted.append(u)
        else:
            log.warning("rejected the update of client %s: %s", u.client, reason)
            out.rejected.append(Rejection(u.client, reason))
    return out


def _weights(updates: Sequence[Update], staleness_decay: float | None) -> list[float]:
    w = [u.weight * staleness_weight(u.staleness, staleness_decay) for u in updates]
    total = sum(w)
    return [x / total for x in w]


def staleness_weight(staleness: int, decay: float | None) -> float:
    """FedCompass-style weight of a late update: 1 when fresh, (1 + s)^-decay when s rounds stale."""
    return 1.0 if not decay or staleness <= 0 else (1.0 + staleness) ** -decay


def fedavg(updates: Sequence[Update], names: Sequence[str], staleness_decay: float | None = None) -> State:
    """Weighted average of every tensor in `names` over the updates (A and B averaged separately)."""
    if not updates:
        raise ValueError("no updates to average")
    w = _weights(updates, staleness_decay)
    return {n: sum(wi * u.tensors[n].float() for wi, u in zip(w, updates, strict=True)) for n in names}


def pad_to_rank(name: str, t: torch.Tensor, rank: int) -> torch.Tensor:
    """A (r, in) -> (rank, in), B (out, r) -> (out, rank), zeros in the added rows / columns."""
    if is_a(name):
        return torch.cat([t.float(), t.new_zeros(rank - t.shape[0], t.shape[1])], 0)
    return torch.cat([t.float(), t.new_zeros(t.shape[0], rank - t.shape[1])], 1)


def truncate(state: Mapping[str, torch.Tensor], rank: int) -> State:
    """The global adapter cut to a client's rank: A[:rank], B[:, :rank]."""
    return {n: (t[:rank] if is_a(n) else t[:, :rank]).contiguous() if is_a(n) or is_b(n) else t
            for n, t in state.items()}


def hetlora(updates: Sequence[Update], global_state: Mapping[str, torch.Tensor],
            staleness_decay: float | None = None) -> State:
    """Zero-pad every update to the global rank, then the weighted average."""
    top = lora_rank(global_state)
    padded = [Update(u.client, {n: pad_to_rank(n, t, top) for n, t in u.tensors.items()}, u.weight, top, u.staleness)
              for u in updates]
    return fedavg(padded, sorted(global_state), staleness_decay)


def aggregate(rule: str, global_state: Mapping[str, torch.Tensor], updates: Sequence[Update],
              staleness_decay: float | None = None) -> tuple[State, Sorted]:
    """The next global adapter from the valid updates (the global one unchanged when none is valid)."""
    if rule not in RULES:
        raise ValueError(f"aggregation rule must be one of {', '.join(RULES)}, got {rule!r}")
    s = sort_updates(updates, global_state, rule)
    new = dict(global_state)
    if not s.accepted:
        log.warning("no valid update this round: the global adapter stays as it was")
        return new, s
    if rule == "hetlora":
        new.update(hetlora(s.accepted, global_state, staleness_decay))
    else:  # FFA-LoRA averages the B's it received; A stays the global (frozen) one
        new.update(fedavg(s.accepted, sent_names(global_state, rule), staleness_decay))
    return new, s
