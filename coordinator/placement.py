"""Placement: which nodes run a model, with what split ratios, and how much memory each rank may use.

Pure functions over frozen records. `place(nodes, model)` picks nodes (by measured speed and free memory,
or the ones named), gives each a share of the model proportional to its speed, but no bigger than what
its memory and disk hold, and returns the ratios `edge_node.shard.make_plan` / `write_shards` take (rank
order = node order) with each rank's memory budget for the sliding window (`RunConfig.memory_mb`).

Memory of one rank (bytes): the runtime (interpreter, torch, buffers: `Policy.runtime_bytes`), its KV
cache for `Policy.context_tokens` tokens over its KV heads, and its weights: all of its shard files
(resident), or at least `Policy.min_window` of them (streamed through the sliding window; slower, since
every token reads the rest from disk). Placement first looks for a split where every rank holds its whole
slice; only when the fleet cannot hold the model that way does it fall back to streaming. Shares are
continuous here, but the plan splits whole KV heads and MLP column units, so every candidate split is
checked on the exact plan and a rank that does not fit gets a smaller cap and the split is redone.

Re-planning after a lost node is the same call on the remaining nodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_node.model import layout
from edge_node.model.config import ModelConfig
from edge_node.model.errors import EdgefedError
from edge_node.model.kv_cache import kv_bytes_per_token
from edge_node.shard import WEIGHTS, RankSlice, make_plan

MiB = 2**20
_FILE_OVERHEAD = 4096  # a safetensors header, rounded up
_RATIO_DIGITS = 4  # ratios are rounded (readable manifests); the plan is checked on the rounded values
_ROUNDS = 200


class PlacementError(EdgefedError):
    """The fleet cannot run the model: too few usable nodes, or not enough memory or disk."""


@dataclass(frozen=True)
class NodeFacts:
    """What a node reported (Register / Heartbeat)."""

    name: str
    cores: int
    memory_available: int  # bytes
    disk_free: int  # bytes
    gflops: float  # the measured speed figure (matmul probe)
    state: str = "ready"  # only "ready" nodes are placed


@dataclass(frozen=True)
class ModelFacts:
    """A model's sizes as placement needs them: its config and the dtype its shards are written in."""

    config: ModelConfig
    weights: str = "float32"  # edge_node.shard.WEIGHTS

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise PlacementError(f"weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")

    @classmethod
    def from_dir(cls, model_dir: str | Path, weights: str = "float32") -> ModelFacts:
        return cls(ModelConfig.from_dir(Path(model_dir)), weights)

    @property
    def element_bytes(self) -> int:
        """Bytes per stored weight of a quantizable matrix."""
        return {"float32": 4, "bfloat16": 2, "int8": 1}[self.weights]

    @property
    def plain_bytes(self) -> int:
        """Bytes per stored element of norms, biases (and int8 mode's float32 tensors)."""
        return 2 if self.weights == "bfloat16" else 4

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache is kept in the compute dtype: bfloat16 shards compute in bfloat16, others in float32."""
        return torch.bfloat16 if self.weights == "bfloat16" else torch.float32

    def kv_bytes_per_token(self, kv_heads: int | None = None) -> int:
        """Bytes one token adds to the cache of `kv_heads` heads (all heads by default) over every layer."""
        c = self.config
        heads = c.num_key_value_heads if kv_heads is None else kv_heads
        return kv_bytes_per_token(heads, c.head_dim, c.num_layers, self.kv_dtype)

    def layer_bytes(self, s: RankSlice | None = None) -> int:
        """One layer's shard file for slice `s` (the whole layer by default)."""
        c = self.config
        full = RankSlice(0, (0, c.num_key_value_heads), (0, c.intermediate_size))
        s = s or full
        units = s.units(c)
        span = {u: b - a for u, (a, b) in units.items()}
        total = len(layout.NORMS) * c.hidden_size * self.plain_bytes + _FILE_OVERHEAD
        for spec in layout.LINEARS:
            rows = sum(span[p.rows] if spec.split == "rows" else layout.unit_size(c, p.rows) for p in spec.parts)
            cols = span[spec.cols] if spec.split == "cols" else layout.unit_size(c, spec.cols)
            if self.weights == "int8" and spec.quantize:
                total += rows * cols + rows * 4  # int8 weights + a float32 scale per output row
            else:
                total += rows * cols * self.plain_bytes
            if spec.has_bias(c) and (spec.split == "rows" or s.rank == 0):  # "cols" biases: rank 0 only
                total += rows * self.plain_bytes
        return total

    def table_bytes(self) -> int:
        """One (vocab, hidden) table: the embeddings, or the head (int8: + a scale per row)."""
        c = self.config
        return c.vocab_size * c.hidden_size * self.element_bytes + (c.vocab_size * 4 if self.weights == "int8" else 0)

    @property
    def total_bytes(self) -> int:
        """All shard bytes of a one-rank plan: layers, embeddings (+ final norm) and head."""
        return self.config.num_layers * self.layer_bytes() + 2 * self.table_bytes() + self.config.hidden_size * 4


@dataclass(frozen=True)
class Policy:
    """How placement sizes ranks; the defaults fit the runtime as measured (see module docstring)."""

    # KV cache reserved per rank; None: the model's whole context, as the serving rank's engine sizes it
    # (edge_node.serving: RankEngine(..., max_position_embeddings)), so its window from the budget agrees
    context_tokens: int | None = None
    runtime_bytes: int = 320 * MiB  # a rank's RSS before weights and KV (~225 MiB measured) + the engine's margin
    memory_fraction: float = 0.9  # of a node's available memory one rank may take
    disk_fraction: float = 0.95  # of a node's free disk its shard files may take
    min_window: int = 2  # layer blocks resident when streaming: one computing, one prefetching
    max_nodes: int | None = None  # picked automatically: at most this many (None: the model's KV heads)

    def __post_init__(self):
        bad = [f"{k}={v!r}" for k, v, ok in (
            ("context_tokens", self.context_tokens, self.context_tokens is None or self.context_tokens >= 1),
            ("runtime_bytes", self.runtime_bytes, self.runtime_bytes >= 0),
            ("memory_fraction", self.memory_fraction, 0 < self.memory_fraction <= 1),
            ("disk_fraction", self.disk_fraction, 0 < self.disk_fraction <= 1),
            ("min_window", self.min_window, self.min_window >= 1),
            ("max_nodes", self.max_nodes, self.max_nodes is None or self.max_nodes >= 1)) if not ok]
        if bad:
            raise PlacementError(f"placement policy out of range: {', '.join(bad)}")

    def context(self, cfg: ModelConfig) -> int:
        return self.context_tokens or cfg.max_position_embeddings


@dataclass(frozen=True)
class RankPlacement:
    rank: int
    node: str
    ratio: float
    kv_heads: tuple[int, int]
    mlp: tuple[int, int]
    shard_bytes: int  # its shard files on disk
    block_bytes: int  # its biggest streamed file (one layer, or a head chunk)
    kv_bytes: int  # its KV cache for the policy's context
    memory_full: int  # everything resident
    memory_min: int  # streaming with the minimum window
    memory_budget: int  # what it may use: min(memory_full, its share of the node's memory)
    resident: bool  # the budget holds every block

    @property
    def memory_mb(self) -> float:
        """For RunConfig.memory_mb (the engine derives its window from it)."""
        return self.memory_budget / MiB


@dataclass(frozen=True)
class Placement:
    ratios: tuple[float, ...]  # edge_node.shard.make_plan's ratios, one per rank
    ranks: tuple[RankPlacement, ...]
    context_tokens: int
    weights: str

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(r.node for r in self.ranks)

    @property
    def resident(self) -> bool:
        return all(r.resident for r in self.ranks)


# ---------------------------------------------------------------- sizes of one rank


@dataclass(frozen=True)
class _Need:
    shard: int
    block: int
    kv: int
    full: int
    minimum: int


def rank_needs(model: ModelFacts, s: RankSlice, policy: Policy) -> _Need:
    """Disk and memory of rank `s.rank` holding slice `s` (exact sizes of its shard files, up to headers)."""
    c = model.config
    layer = model.layer_bytes(s)
    kv = model.kv_bytes_per_token(s.kv_heads[1] - s.kv_heads[0]) * policy.context(c)
    layers = c.num_layers * layer
    head = model.table_bytes() if s.rank == 0 else 0  # streamed in chunks no bigger than a rank-0 layer file
    embed = model.table_bytes() + c.hidden_size * 4 if s.rank == 0 else 0  # read by rows, not held
    base = policy.runtime_bytes + kv
    return _Need(shard=layers + head + embed, block=layer, kv=kv, full=base + layers + head,
                 minimum=base + min(policy.min_window, c.num_layers) * layer)


def _linear(model: ModelFacts, policy: Policy, rank: int) -> tuple[float, ...]:
    """Continuous approximation of a rank's needs as fixed + share x per-share (memory full, memory min,
    disk), used to cap shares before the exact check: (full0, full1, min0, min1, disk0, disk1)."""
    c = model.config
    whole = RankSlice(rank, (0, c.num_key_value_heads), (0, c.intermediate_size))
    empty_layer = model.layer_bytes(RankSlice(rank, (0, 0), (0, 0)))
    per_layer = model.layer_bytes(whole) - empty_layer
    kv = model.kv_bytes_per_token() * policy.context(c)
    head = model.table_bytes() if rank == 0 else 0
    embed = model.table_bytes() + c.hidden_size * 4 if rank == 0 else 0
    w = min(policy.min_window, c.num_layers)
    full0 = policy.runtime_bytes + c.num_layers * empty_layer + head
    min0 = policy.runtime_bytes + w * empty_layer
    disk0 = c.num_layers * empty_layer + head + embed
    return full0, c.num_layers * per_layer + kv, min0, w * per_layer + kv, disk0, c.num_layers * per_layer


def _cap(fixed: float, per_share: float, room: float) -> float:
    return (room - fixed) / per_share if per_share > 0 else (math.inf if room >= fixed else -math.inf)


# ---------------------------------------------------------------- shares


def water_fill(weights: Sequence[float], caps: Sequence[float]) -> list[float] | None:
    """Shares summing to 1, proportional to `weights` except where a share would exceed its cap (the excess
    goes to the others, again by weight). None when the caps cannot add up to 1 or one is not positive."""
    if not weights or min(weights) <= 0 or min(caps) <= 0 or sum(min(c, 1.0) for c in caps) < 1 - 1e-12:
        return None
    shares: dict[int, float] = {}
    while True:
        free = [i for i in range(len(weights)) if i not in shares]
        rest = 1.0 - sum(shares.values())
        total = sum(weights[i] for i in free)
        over = [i for i in free if rest * weights[i] / total > caps[i]]
        if not over:
            shares |= {i: rest * weights[i] / total for i in free}
            return [shares[i] for i in range(len(weights))]
        shares |= {i: caps[i] for i in over}
        if len(shares) == len(weights):
            return [shares[i] for i in range(len(weights))]


def _rounded(shares: list[float]) -> tuple[float, ...]:
    floor = 10.0 ** -_RATIO_DIGITS
    return tuple(max(floor, round(s, _RATIO_DIGITS)) for s in shares)


def _split(model: ModelFacts, nodes: list[NodeFacts], policy: Policy, resident: bool) -> Placement | None:
    """Shares ∝ speed within each node's caps (full residency, or the streaming minimum), checked on the
    exact plan; a rank that overflows gets its cap lowered and the split is redone."""
    caps = []
    for rank, n in enumerate(nodes):
        full0, full1, min0, min1, disk0, disk1 = _linear(model, policy, rank)
        mem = policy.memory_fraction * n.memory_available
        mem_cap = _cap(full0, full1, mem) if resident else _cap(min0, min1, mem)
        caps.append(min(mem_cap, _cap(disk0, disk1, policy.disk_fraction * n.disk_free)))
    speeds = [n.gflops for n in nodes]
    for _ in range(_ROUNDS):
        shares = water_fill(speeds, caps)
        if shares is None:
            return None
        ratios = _rounded(shares)
        try:
            plan = make_plan(model.config, len(nodes), list(ratios))
        except EdgefedError:
            return None
        ranks, over = [], False
        for s, n in zip(plan.slices, nodes, strict=True):
            need = rank_needs(model, s, policy)
            room = int(policy.memory_fraction * n.memory_available)
            fits_disk = need.shard <= policy.disk_fraction * n.disk_free
            fits_mem = (need.full if resident else need.minimum) <= room
            if not (fits_disk and fits_mem):
                caps[s.rank] = shares[s.rank] * 0.9
                over = True
                continue
            budget = min(need.full, room)
            ranks.append(RankPlacement(s.rank, n.name, ratios[s.rank], s.kv_heads, s.mlp, need.shard, need.block,
                                       need.kv, need.full, need.minimum, budget, budget >= need.full))
        if not over:
            return Placement(ratios, tuple(ranks), policy.context(model.config), model.weights)
    return None


# ---------------------------------------------------------------- choosing nodes


def _check_node(n: NodeFacts) -> None:
    for field, value in (("cores", n.cores), ("memory_available", n.memory_available), ("disk_free", n.disk_free),
                         ("gflops", n.gflops)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or value != value:
            raise PlacementError(f"node {n.name!r}: {field} must be a positive number, got {value!r}")


def _order(nodes: list[NodeFacts]) -> list[NodeFacts]:
    """Rank order: the node with the most free memory is rank 0 (it also holds the embeddings and head),
    the rest by speed."""
    if not nodes:
        return []
    first = max(nodes, key=lambda n: (n.memory_available, n.gflops, n.name))
    rest = sorted((n for n in nodes if n is not first), key=lambda n: (-n.gflops, -n.memory_available, n.name))
    return [first, *rest]


def _select(nodes: Sequence[NodeFacts], want: int | Sequence[str] | None, policy: Policy,
            cfg: ModelConfig) -> list[list[NodeFacts]]:
    """The candidate groups of ready nodes to try, in order, each in rank order (explicit names: one group)."""
    by_name = {n.name: n for n in nodes}
    if len(by_name) != len(nodes):
        raise PlacementError("node names must be unique")
    ready = [n for n in nodes if n.state == "ready"]
    for n in ready:
        _check_node(n)
    if want is not None and not isinstance(want, int):
        names = list(want)
        if not names or len(set(names)) != len(names):
            raise PlacementError(f"give one or more distinct node names, got {names}")
        unknown = [x for x in names if x not in by_name]
        if unknown:
            raise PlacementError(f"unknown node(s) {unknown}; known: {sorted(by_name)}")
        down = [f"{x} ({by_name[x].state})" for x in names if by_name[x].state != "ready"]
        if down:
            raise PlacementError(f"node(s) not ready: {', '.join(down)}")
        return [_order([by_name[x] for x in names])]
    if not ready:
        raise PlacementError(f"no ready node (of {len(nodes)} known)")
    if want is not None:
        if isinstance(want, bool) or want < 1:
            raise PlacementError(f"the node count must be a positive integer, got {want!r}")
        if want > len(ready):
            raise PlacementError(f"{want} node(s) asked for, {len(ready)} ready")
        counts = [want]
    else:
        limit = min(len(ready), policy.max_nodes or cfg.num_key_value_heads)
        counts = list(range(limit, 0, -1))  # the most nodes first: more cores and memory per token
    # nodes by speed, ties by memory: the fastest `k` form the group of k
    fastest = sorted(ready, key=lambda n: (-n.gflops, -n.memory_available, n.name))
    groups = [_order(fastest[:k]) for k in counts]
    if want is None:  # the largest group may include a node too small to hold a share: also try the biggest k
        biggest = sorted(ready, key=lambda n: (-n.memory_available, -n.gflops, n.name))
        groups += [_order(biggest[:k]) for k in counts]
    return groups


def place(nodes: Sequence[NodeFacts], model: ModelFacts, want: int | Sequence[str] | None = None,
          policy: Policy = Policy()) -> Placement:
    """Nodes, shares and memory budgets for `model` on `nodes`.

    `want`: None (automatic: up to Policy.max_nodes, by default the model's KV-head count), a node count,
    or the names of the nodes to use. Whole-slice residency is preferred over streaming for any group;
    raises PlacementError naming what is needed and what is available when nothing fits.
    """
    if isinstance(want, str):
        want = (want,)
    groups = _select(nodes, want, policy, model.config)
    for resident in (True, False):
        for group in groups:
            if len(group) > model.config.intermediate_size:
                continue
            found = _split(model, group, policy, resident)
            if found is not None:
                return found
    raise PlacementError(_shortfall(model, groups[0], policy))


def _shortfall(model: ModelFacts, group: list[NodeFacts], policy: Policy) -> str:
    c = model.config
    ctx = policy.context(c)
    n = len(group)
    weights = model.total_bytes
    kv = model.kv_bytes_per_token() * ctx
    need_full = n * policy.runtime_bytes + weights - model.table_bytes() + kv  # the embeddings are read by rows
    need_min = n * policy.runtime_bytes + kv + min(policy.min_window, c.num_layers) * model.layer_bytes()
    have = sum(policy.memory_fraction * g.memory_available for g in group)
    disk = sum(policy.disk_fraction * g.disk_free for g in group)
    nodes = ", ".join(f"{g.name} {g.memory_available / MiB:.0f} MiB free, {g.disk_free / MiB:.0f} MiB disk"
                      for g in group)
    usable = (f"usable: {have / MiB:.0f} MiB of memory ({policy.memory_fraction:.0%} of free) and "
              f"{disk / MiB:.0f} MiB of disk ({policy.disk_fraction:.0%} of free) on {nodes}")
    if disk < weights:
        return f"not enough disk for the model on {n} node(s): its shards take {weights / MiB:.0f} MiB; {usable}"
    even = [_linear(model, policy, r) for r in range(n)]
    small = [g.name for g, (_, _, m0, m1, d0, d1) in zip(group, even, strict=True)
             if policy.memory_fraction * g.memory_available < m0 + m1 / n or policy.disk_fraction * g.disk_free < d0]
    hint = (f"; node(s) {', '.join(small)} cannot hold even an even share (drop them or give more memory)"
            if small and have >= need_min else "")
    return (f"not enough memory for the model on {n} node(s): it needs {need_full / MiB:.0f} MiB to hold "
            f"{weights / MiB:.0f} MiB of {model.weights} weights resident (at least {need_min / MiB:.0f} MiB to "
            f"stream them), with a {kv / MiB:.0f} MiB KV cache for {ctx} tokens and "
            f"{policy.runtime_bytes / MiB:.0f} MiB of runtime per rank; {usable}{hint}")
