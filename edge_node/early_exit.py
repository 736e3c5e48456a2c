"""Early exit on the edge: exit heads, confidence, and KV-correct deferred catch-up (LayerSkip / EE-LLM).

An exit head at layer e maps the hidden state leaving layer e-1 (the input of layer e) to logits: an optional
residual adapter initialised to identity (h + h A^T + b, A = b = 0), an RMSNorm (initialised from the model's
final norm) and the model's own frozen lm_head. Untrained, it is the "logit lens".

A token that exits at layer e has KV only for layers [0, e). Its deep KV is never copied from another layer:
its hidden state at e is kept, and when a later token runs layer m >= e, the deferred tokens run layer m first,
batched in front of it as one chunk (`DeferredStack`). Every layer's KV then equals the full model's.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edge_node.model.config import ModelConfig
from edge_node.model.decode import check_prompt
from edge_node.model.errors import CheckpointError, NonFiniteError, UsageError
from edge_node.model.formats import read_header, read_tensor, sha256_file, write_tensors
from edge_node.model.kv_cache import KVCache
from edge_node.model.model import Reduce, Transformer
from edge_node.model.sampling import Sampler, SamplingConfig

EXITS_JSON = "exits.json"
CRITERIA = ("max_prob", "margin")
FORMAT = 1


class ExitHeadError(CheckpointError):
    """An exit-head file that does not fit the model (layers, sizes, tensors, checksum)."""


# ---------------------------------------------------------------------------------------------- exit heads
class ExitHead(nn.Module):
    def __init__(self, norm_weight: torch.Tensor, eps: float, adapter: bool):
        super().__init__()
        hidden = norm_weight.shape[0]
        self.norm = nn.Parameter(norm_weight.detach().float().clone())
        self.eps = eps
        self.adapter_w = nn.Parameter(torch.zeros(hidden, hidden)) if adapter else None
        self.adapter_b = nn.Parameter(torch.zeros(hidden)) if adapter else None

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., hidden) -> the normalised features the lm_head reads (float32)."""
        x = h.float()
        if self.adapter_w is not None:
            x = x + F.linear(x, self.adapter_w, self.adapter_b)  # identity at initialisation
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.norm


class ExitHeads(nn.Module):
    """Exit heads by layer; `logits(layer, h, head)` applies one with the model's frozen head."""

    def __init__(self, config: ModelConfig, heads: dict[int, ExitHead], meta: dict | None = None):
        super().__init__()
        self.config = config
        self.heads = nn.ModuleDict({str(i): h for i, h in sorted(heads.items())})
        self.meta = meta or {}

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(int(i) for i in self.heads))

    @classmethod
    def untrained(cls, config: ModelConfig, layers: Iterable[int], final_norm: torch.Tensor,
                  adapter: bool = True) -> ExitHeads:
        layers = check_exit_layers(config, layers)
        return cls(config, {i: ExitHead(final_norm, config.rms_norm_eps, adapter) for i in layers})

    def logits(self, layer: int, h: torch.Tensor, head: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """h (..., hidden): the input of layer `layer` -> float32 logits (..., vocab); `head` takes `dtype`."""
        z = self.heads[str(layer)].features(h)
        return head(z.to(dtype)).float()


def check_exit_layers(config: ModelConfig, layers: Iterable[int]) -> tuple[int, ...]:
    out = tuple(sorted(set(int(i) for i in layers)))
    bad = [i for i in out if not 0 < i < config.num_layers]
    if not out or bad:
        raise UsageError(f"exit layers must be in [1, {config.num_layers}) for a {config.num_layers}-layer model, "
                         f"got {list(layers)}")
    return out


def save_exit_heads(heads: ExitHeads, path: str | Path) -> Path:
    """Write `path` (JSON config) and the safetensors beside it; returns the JSON path."""
    path = Path(path)
    weights = path.with_suffix(".safetensors")
    tensors = {}
    for i in heads.layers:
        head = heads.heads[str(i)]
        tensors[f"exit.{i}.norm.weight"] = head.norm.detach().contiguous()
        if head.adapter_w is not None:
            tensors[f"exit.{i}.adapter.weight"] = head.adapter_w.detach().contiguous()
            tensors[f"exit.{i}.adapter.bias"] = head.adapter_b.detach().contiguous()
    write_tensors(weights, tensors)
    cfg = heads.config
    doc = {"format": FORMAT, "kind": "edgefed-exit-heads", "layers": list(heads.layers),
           "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
           "adapter": any(heads.heads[str(i)].adapter_w is not None for i in heads.layers),
           "weights": weights.name, "weights_sha256": sha256_file(weights), **heads.meta}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load_exit_heads(path: str | Path, config: ModelConfig) -> ExitHeads:
    """Exit heads from `path` (exits.json, or a model directory holding one), checked against `config`."""
    path = Path(path)
    if path.is_dir():
        path = path / EXITS_JSON
    if not path.is_file():
        raise ExitHeadError(f"{path}: no exit heads here (train them with `edgefed train-exits`)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExitHeadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("kind") != "edgefed-exit-heads" or doc.get("format") != FORMAT:
        raise ExitHeadError(f"{path}: not an edgefed exit-head file of format {FORMAT}")
    for key, want in (("num_layers", config.num_layers), ("hidden_size", config.hidden_size),
                      ("vocab_size", config.vocab_size)):
        if doc.get(key) != want:
            raise ExitHeadError(f"{path}: field {key!r} is {doc.get(key)!r}, the model has {want}")
    layers = check_exit_layers(config, doc.get("layers") or [])
    weights = path.parent / str(doc.get("weights", ""))
    if not weights.is_file():
        raise ExitHeadError(f"{weights}: exit-head weights named by {path} not found")
    if sha256_file(weights) != doc.get("weights_sha256"):
        raise ExitHeadError(f"{weights}: sha256 differs from the one recorded in {path}")
    tensors = _read_all(weights)
    adapter = bool(doc.get("adapter"))
    heads = {}
    for i in layers:
        head = ExitHead(torch.zeros(config.hidden_size), config.rms_norm_eps, adapter)
        for name, p in head.named_parameters():
            key = f"exit.{i}." + _TENSOR_NAMES[name]
            t = tensors.pop(key, None)
            if t is None:
                raise ExitHeadError(f"{weights}: missing tensor {key!r}")
            if tuple(t.shape) != tuple(p.shape):
                raise ExitHeadError(f"{weights}: tensor {key!r} has shape {list(t.shape)}, expected {list(p.shape)}")
            p.data.copy_(t.float())
        heads[i] = head
    if tensors:
        raise ExitHeadError(f"{weights}: unexpected tensor(s) {sorted(tensors)[:8]}")
    meta = {k: v for k, v in doc.items() if k in ("trained",)}
    return ExitHeads(config, heads, meta).requires_grad_(False)


_TENSOR_NAMES = {"norm": "norm.weight", "adapter_w": "adapter.weight", "adapter_b": "adapter.bias"}


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    infos = read_header(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return {name: read_tensor(info, fd) for name, info in infos.items()}
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- confidence
@dataclass(frozen=True)
class ExitPolicy:
    """Which exits are live and how confident a token must be to leave at each.

    `enabled=False` is the explicit off switch: no head is consulted, the output is the full model's.
    A token leaves at exit i iff its confidence is strictly greater than thresholds[i].
    """

    enabled: bool = False
    layers: tuple[int, ...] = ()
    thresholds: tuple[float, ...] = ()
    criterion: str = "max_prob"

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise UsageError(f"exit criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if len(self.layers) != len(self.thresholds):
            raise UsageError(f"{len(self.layers)} exit layer(s) but {len(self.thresholds)} threshold(s)")
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise UsageError(f"exit thresholds must be in [0, 1], got {list(self.thresholds)}")
        if list(self.layers) != sorted(set(self.layers)):
            raise UsageError(f"exit layers must be distinct and ascending, got {list(self.layers)}")

    @classmethod
    def uniform(cls, layers: Sequence[int], threshold: float, criterion: str = "max_prob") -> ExitPolicy:
        return cls(True, tuple(layers), (float(threshold),) * len(layers), criterion)

    def threshold(self, layer: int) -> float | None:
        """The live threshold at `layer`, None where no exit is live."""
        if not self.enabled or layer not in self.layers:
            return None
        return self.thresholds[self.layers.index(layer)]


OFF = ExitPolicy()


def confidence(logits: torch.Tensor) -> tuple[float, float]:
    """(max probability, top-2 margin) of the float32 softmax of logits (vocab,)."""
    p = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(p, min(2, p.numel())).values
    second = float(top[1]) if top.numel() > 1 else 0.0
    return float(top[0]), float(top[0]) - second


def confident(logits: torch.Tensor, threshold: float, criterion: str) -> bool:
    max_prob, margin = confidence(logits)
    return (max_prob if criterion == "max_prob" else margin) > threshold


# ---------------------------------------------------------------------------------------------- deferred KV
class DeferredStack:
    """Layers [start, end) of `model` over one KV cache, where tokens may stop before `end`.

    Layer lengths never grow with depth. The positions a layer m lacks, [len(m), total), each wait as their
    hidden state at the input of their first missing layer; when a token next runs layer m they run it too,
    batched in front of it (positions are contiguous, so the chunk is causal at pos0 = len(m)).
    Positions reaching `end` land in `outbox` in position order when `keep_outbox` (the edge's uplink).
    """

    def __init__(self, model: Transformer, start: int, end: int, cache: KVCache | None = None,
                 keep_outbox: bool = False, reduce: Reduce | None = None):
        self.model, self.start, self.end = model, start, end
        self.reduce = reduce  # a tensor-parallel rank's allreduce (None: a whole-width part)
        self.cache = cache if cache is not None else model.new_cache()
        self.waiting: dict[int, torch.Tensor] = {}  # position -> (hidden,) at the input of its first missing layer
        self.total = 0  # positions fed so far
        self.keep_outbox = keep_outbox
        self.outbox: list[torch.Tensor] = []  # (1, n, hidden) chunks at `end`, in position order
        self.layer_evals = 0  # token x layer evaluations, catch-up included

    def length(self, layer: int) -> int:
        return self.cache.length(layer)

    def advance(self, h: torch.Tensor | None, pos0: int, frm: int, to: int) -> torch.Tensor | None:
        """Run the chunk h (1, S, hidden) at [pos0, pos0+S) from the input of layer `frm` through layer to-1,
        catching up the waiting positions in front of it at every layer; h=None only catches up."""
        if h is not None and pos0 != self.total and frm == self.start:
            raise UsageError(f"new tokens must start at position {self.total}, got {pos0}")
        if h is not None and frm == self.start:
            self.total = pos0 + h.shape[1]
        end_cur = self.total if h is None else pos0
        layer = frm
        while layer < to:
            lo = self.length(layer)
            nxt = layer + 1
            while nxt < to and self.length(nxt) == lo:
                nxt += 1
            n_wait = end_cur - lo
            parts = [torch.stack([self.waiting.pop(q) for q in range(lo, end_cur)])[None]] if n_wait > 0 else []
            if h is not None:
                parts.append(h)
            if parts:
                x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (1, n_wait + S, hidden)
                if self.reduce is None:
                    y = self.model.forward_range(x, self.cache, lo, layer, nxt)
                else:
                    y = self.model.forward_range(x, self.cache, lo, layer, nxt, self.reduce)
                self.layer_evals += x.shape[1] * (nxt - layer)
                if n_wait > 0:
                    self._settle(y[:, :n_wait], lo, nxt)
                h = y[:, n_wait:] if h is not None else None
            layer = nxt
        if h is not None and to == self.end and self.keep_outbox:
            self.outbox.append(h)
        return h

    def defer(self, h: torch.Tensor, pos0: int) -> None:
        """The chunk h (1, S, hidden) at [pos0, ...) stops here: keep its rows for later catch-up."""
        for j in range(h.shape[1]):
            self.waiting[pos0 + j] = h[0, j]

    @torch.inference_mode()
    def catch_up(self) -> None:
        """Run every waiting position through the rest of the layers (KV now complete up to `total`)."""
        self.advance(None, self.total, self.start, self.end)

    def _settle(self, y: torch.Tensor, lo: int, layer: int) -> None:
        if layer == self.end:
            if self.keep_outbox:
                self.outbox.append(y)
            return
        for j in range(y.shape[1]):
            self.waiting[lo + j] = y[0, j]

    def drain(self) -> torch.Tensor | None:
        """Outbox rows (1, n, hidden) collected so far, in position order; empties it."""
        if not self.outbox:
            return None
        out = torch.cat(self.outbox, dim=1)
        self.outbox = []
        return out

    @property
    def waiting_bytes(self) -> int:
        return sum(t.nbytes for t in self.waiting.values())


# ---------------------------------------------------------------------------------------------- edge step
@dataclass
class TokenRecord:
    """Where one generated token came from and what it cost."""

    token: int
    exit_layer: int  # the layer whose head chose it (num_layers: the full model's own head, on edge or cloud)
    where: str  # "edge" | "cloud" | "edge-fallback"
    edge_ms: float = 0.0
    cloud_ms: float = 0.0  # wall time of the cloud call, link included
    cloud_compute_ms: float = 0.0  # the cloud's own compute within it
    up_bytes: int = 0
    round_trips: int = 0

    @property
    def key(self) -> str:
        """Where it was answered, as usage() counts it: "edge@15", "edge-fallback@20" or "cloud"."""
        return "cloud" if self.where == "cloud" else f"{self.where}@{self.exit_layer}"


@dataclass
class EarlyExitResult:
    token_ids: list[int]
    records: list[TokenRecord]
    stop_reason: str
    mode: str  # "standalone" | "collaborative"
    cloud: str = "none"  # "used" | "lost" | "unreachable" | "none"
    cloud_error: str = ""
    edge_layer_evals: int = 0
    cloud_layer_evals: int = 0
    extras: dict = field(default_factory=dict)

    def usage(self) -> dict:
        """Counts by where tokens were answered: {"edge@15": n, "cloud": m, ...}."""
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r.key] = counts.get(r.key, 0) + 1
        return counts


class EdgeStepper:
    """Runs each new chunk through [0, end) on the edge, leaving at the first confident exit.

    `final` is what answers at `end` when nothing exited: "head" (the exit head at end, or the model's own
    head when end == L) or "defer" (return the hidden state for the cloud).
    """

    def __init__(self, model: Transformer, heads: ExitHeads | None, policy: ExitPolicy, end: int,
                 keep_outbox: bool = False, stack: DeferredStack | None = None,
                 embed: Callable[[Sequence[int]], torch.Tensor] | None = None):
        """`stack` and `embed` replace the whole-width defaults: a tensor-parallel rank 0 passes a stack that
        tells the other ranks every step it runs, and its row-wise embedding lookup (ids -> (1, S, hidden))."""
        cfg = model.config
        if (embed is None and model.embed is None) or model.head is None:
            raise UsageError("the edge part needs the embeddings and the lm_head (load it with head=True)")
        live = [i for i in policy.layers if policy.enabled and i <= end]
        need = sorted(set(live) | ({end} if end < cfg.num_layers and policy.enabled else set()))
        missing = [i for i in need if heads is None or i not in heads.layers]
        if policy.enabled and missing:
            raise UsageError(f"no exit head at layer(s) {missing} (heads: {list(heads.layers) if heads else []})")
        self.model, self.heads, self.policy, self.end = model, heads, policy, end
        self.stops = sorted(set(live) | {end})
        if stack is not None and (stack.start, stack.end, stack.keep_outbox) != (0, end, keep_outbox):
            raise UsageError(f"the edge stack runs [{stack.start}, {stack.end}), the stepper [0, {end})")
        self.stack = stack if stack is not None else DeferredStack(model, 0, end, keep_outbox=keep_outbox)
        self._embed = embed or (lambda ids: model.embed_tokens(torch.tensor([list(ids)], dtype=torch.long)))

    def head_logits(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Logits (vocab,) of the last row of h at `layer` (the model's own head at L)."""
        if layer == self.model.config.num_layers:
            return self.model.logits(h[:, -1:])[0, -1].float()
        if self.heads is None or layer not in self.heads.layers:
            raise UsageError(f"no exit head at layer {layer} to answer with")
        return self.heads.logits(layer, h[0, -1], self.model.head, self.model.dtype)

    def step(self, ids: Sequence[int], pos0: int) -> tuple[int | None, torch.Tensor, torch.Tensor | None]:
        """(exit layer or None, h, logits): None means the chunk reached `end` unconfident (h is its state there)."""
        h = self._embed(ids)  # (1, S, hidden)
        frm = 0
        for stop in self.stops:
            h = self.stack.advance(h, pos0, frm, stop)
            frm = stop
            threshold = self.policy.threshold(stop)
            if threshold is not None:
                logits = self.head_logits(stop, h)
                if confident(logits, threshold, self.policy.criterion):
                    if stop < self.end:
                        self.stack.defer(h, pos0)
                    return stop, h, logits
        return None, h, None


# ---------------------------------------------------------------------------------------------- standalone
class StepClock:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        ms, self.t = (now - self.t) * 1e3, now
        return ms


def check_logits(logits: torch.Tensor, pos: int, done: int) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteError(f"the logits at position {pos} are not finite (NaN or Inf) after {done} generated "
                             f"token(s): the activations overflowed or a weight is corrupt")


@torch.inference_mode()
def generate_standalone(model: Transformer, heads: ExitHeads | None, policy: ExitPolicy, prompt_ids: Sequence[int],
                        max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                        eos_ids: Sequence[int] = (), end: int | None = None,
                        on_token: Callable[[int], None] | None = None,
                        on_record: Callable[[TokenRecord, EarlyExitResult], None] | None = None,
                        stepper: EdgeStepper | None = None) -> EarlyExitResult:
    """Every token leaves at its first confident exit, else at layer `end`'s head (default: the whole model).

    With policy OFF and end = L this runs exactly the full model's computation. on_record(record, result so far)
    is called for each token before on_token(token). `stepper`: one built for [0, end) (a tensor-parallel edge).
    """
    cfg = model.config
    end = cfg.num_layers if end is None else end
    if not 0 < end <= cfg.num_layers:
        raise UsageError(f"the edge's last layer must be in [1, {cfg.num_layers}], got {end}")
    if not policy.enabled and end < cfg.num_layers:
        raise UsageError(f"with exits off the edge must run every layer (end={cfg.num_layers}), got end={end}")
    check_prompt(prompt_ids, cfg.max_position_embeddings, cfg.vocab_size)
    stepper = stepper or EdgeStepper(model, heads, policy, end)
    if stepper.end != end:
        raise UsageError(f"the stepper runs [0, {stepper.end}), the generation asks for [0, {end})")
    sampler, eos = Sampler(sampling), set(eos_ids)
    result = EarlyExitResult([], [], "length", "standalone", extras={"stepper": stepper})
    out, records = result.token_ids, result.records
    ids, pos, history = list(prompt_ids), 0, list(prompt_ids)
    clock = StepClock()
    while len(out) < max_new_tokens:
        if pos + len(ids) > cfg.max_position_embeddings:
            result.stop_reason = "context"
            break
        layer, h, logits = stepper.step(ids, pos)
        if layer is None:
            layer, logits = end, stepper.head_logits(end, h)
        check_logits(logits, pos + len(ids) - 1, len(out))
        token = sampler(logits, history)
        records.append(TokenRecord(token, layer, "edge", edge_ms=clock.lap()))
        pos += len(ids)
        out.append(token)
        history.append(token)
        if on_record:
            on_record(records[-1], result)
        if on_token:
            on_token(token)
        if token in eos:
            result.stop_reason = "eos"
            break
        ids = [token]
    result.edge_layer_evals = stepper.stack.layer_evals
    return result
