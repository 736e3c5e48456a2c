"""Chunked prefill on ONNX Runtime: pad, mask, host KV cache, hand-off to the torch engine.

The prompt is cut into chunks of the graph's fixed N; the last one is padded (so a
prompt shorter than a chunk works) and its logits are read at the last real token.
Padding rows attend causally like real ones, so no row is fully masked (no NaN), and
their K/V are never read: the cache holds them only past the prompt's length, where a fused graph's
op writes them in place. The cache lives on the host as numpy arrays of the graphs' whole
context T and is copied into an edge_node KVCache for decoding. A fused graph's layers
(GroupQueryAttention) read and append to that buffer as it is (bound as both past and present);
a masked graph's read a copy of its first C = T - N slots and return the chunk's rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edge_node.model import KVCache, PromptError, Transformer
from edge_node.model.decode import check_prompt

from .export import GraphSpec, _mask_name, load_specs, output_names, visible_slots
from .providers import make_session, used_provider

NEG = -1e9  # finite "minus infinity": a row never becomes all -inf, so softmax never yields NaN


@dataclass
class HostKV:
    """Per-layer K/V (1, Hkv, T, D) float32 on the host; positions [0, length) are valid."""

    k: dict[int, np.ndarray]
    v: dict[int, np.ndarray]
    length: int = 0

    @classmethod
    def empty(cls, layers: range, kv_heads: int, context: int, head_dim: int) -> HostKV:
        shape = (1, kv_heads, context, head_dim)
        return cls({i: np.zeros(shape, np.float32) for i in layers}, {i: np.zeros(shape, np.float32) for i in layers})


@dataclass
class PrefillResult:
    logits: np.ndarray  # (vocab,) at the last prompt token
    kv: HostKV
    seconds: float
    provider: str
    chunks: int
    chunk_ms: list[float] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)  # per chunk (rows, vocab): all real rows or the last

    @property
    def tokens_per_s(self) -> float:
        return self.kv.length / self.seconds if self.seconds else 0.0


def chunk_mask(pos0: int, n: int, context: int, window: int | None) -> np.ndarray:
    """Additive mask (1, 1, N, C+N) over C past slots then the chunk's own N positions (export.visible_slots)."""
    return np.where(visible_slots(pos0, n, context, window).numpy(), 0.0, NEG).astype(np.float32)[None, None]


class ChunkedPrefill:
    """Runs exported layer-group graphs chunk by chunk; sessions are made once and reused."""

    def __init__(self, model: Transformer, specs: Sequence[GraphSpec], provider: str = "cpu",
                 strict: bool = False, threads: int | None = None, sessions: Sequence | None = None):
        self.model, self.specs = model, list(specs)
        self.chunk, self.context, self.past = specs[0].chunk, specs[0].context, specs[0].past
        self.sessions = list(sessions) if sessions else [make_session(s.path, provider, strict, threads)
                                                          for s in self.specs]
        self.provider = used_provider(self.sessions[0])
        self.inputs = [{i.name for i in s.get_inputs()} for s in self.sessions]
        self.scheduler: Callable | None = None  # e.g. schedule.OutOfOrder; None runs cells in order

    @classmethod
    def from_dir(cls, model: Transformer, graph_dir: str | Path, **kw) -> ChunkedPrefill:
        return cls(model, load_specs(graph_dir), **kw)

    def check(self, prompt: Sequence[int]) -> None:
        cfg = self.model.config
        check_prompt(prompt, cfg.max_position_embeddings, cfg.vocab_size)
        if len(prompt) > self.context:
            raise PromptError(f"the prompt has {len(prompt)} tokens; the exported graphs hold a context "
                              f"of {self.context}: export with a larger --context")

    def chunk_inputs(self, prompt: Sequence[int], c: int) -> dict[str, np.ndarray]:
        """Inputs shared by every layer group for chunk c."""
        n, pos0 = self.chunk, c * self.chunk
        real = list(prompt[pos0 : pos0 + n])
        ids = np.zeros((1, n), np.int64)  # padding id 0: any valid id; its rows are discarded
        ids[0, : len(real)] = real
        cos, sin = self.model.rotary.at(pos0, n)
        feeds = {"input_ids": ids, "cos": cos.float().numpy(), "sin": sin.float().numpy(),
                 "last_index": np.array([len(real) - 1], np.int64)}
        for w in self.specs[0].mask_windows:
            feeds[_mask_name(w)] = chunk_mask(pos0, n, self.past, w)
        if self.specs[0].fused:  # GroupQueryAttention reads the past slots [0, pos0) and the chunk's n rows
            feeds["seqlens_k"] = np.array([pos0 + n - 1], np.int32)
            feeds["total_sequence_length"] = np.array(pos0 + n, np.int32)
        return feeds

    def run_cell(self, g: int, shared: dict[str, np.ndarray], x: np.ndarray | None, kv: HostKV,
                 pos0: int, n_real: int) -> np.ndarray:
        """Layer group g on one chunk: reads past K/V, writes the chunk's real K/V, returns its output."""
        spec, sess = self.specs[g], self.sessions[g]
        feeds = {k: v for k, v in shared.items() if k in self.inputs[g]}
        if not spec.first:
            feeds["hidden_in"] = x
        layers = range(spec.start, spec.end)
        if spec.fused and hasattr(sess, "io_binding"):  # wrappers (calibration, evaluation probes) run plainly
            return _run_in_place(sess, output_names(spec, layers)[0], feeds, layers, kv)
        for i in layers if spec.past else ():
            # (1, Hkv, slots, D): a fused graph's T-slot buffer as it is, else its first C slots made contiguous
            # for ONNX Runtime (a copy)
            feeds[f"past_k_{i}"] = np.ascontiguousarray(kv.k[i][:, :, : spec.past_slots])
            feeds[f"past_v_{i}"] = np.ascontiguousarray(kv.v[i][:, :, : spec.past_slots])
        outs = sess.run(None, feeds)
        # a fused graph's presents are the whole (1, Hkv, T, D) cache with the chunk written at pos0, a masked
        # one's the chunk's own rows (1, Hkv, N, D)
        rows = slice(pos0, pos0 + n_real) if spec.fused else slice(0, n_real)
        for j, i in enumerate(layers):
            kv.k[i][:, :, pos0 : pos0 + n_real] = outs[1 + 2 * j][:, :, rows]  # (1, Hkv, n_real, D)
            kv.v[i][:, :, pos0 : pos0 + n_real] = outs[2 + 2 * j][:, :, rows]
        return outs[0]

    def new_kv(self) -> HostKV:
        cfg = self.model.config
        return HostKV.empty(range(cfg.num_layers), cfg.num_key_value_heads, self.context, cfg.head_dim)

    def run(self, prompt: Sequence[int], scheduler: Callable | None = None) -> PrefillResult:
        """Prefill `prompt`; `scheduler(prefill, prompt, kv)` may replace the in-order loop (see schedule.py)."""
        self.check(prompt)
        scheduler = scheduler or self.scheduler
        kv = self.new_kv()
        t0 = time.perf_counter()
        if scheduler is not None:
            outs, chunk_ms = scheduler(self, prompt, kv)
        else:
            outs, chunk_ms = self._in_order(prompt, kv)
        kv.length = len(prompt)
        seconds = time.perf_counter() - t0
        rows = [self._rows(o, c, len(prompt)) for c, o in enumerate(outs)]
        return PrefillResult(rows[-1][-1], kv, seconds, self.provider, len(outs), chunk_ms, rows)

    def _rows(self, out: np.ndarray, c: int, length: int) -> np.ndarray:
        """The real rows of a chunk's logits (1, N|1, vocab) -> (rows, vocab)."""
        if out.shape[1] == 1:
            return out[0]
        return out[0, : min(self.chunk, length - c * self.chunk)]

    def _in_order(self, prompt: Sequence[int], kv: HostKV) -> tuple[list[np.ndarray], list[float]]:
        n_chunks = -(-len(prompt) // self.chunk)
        times, logits = [], []
        for c in range(n_chunks):
            t = time.perf_counter()
            shared = self.chunk_inputs(prompt, c)
            pos0 = c * self.chunk
            n_real = min(self.chunk, len(prompt) - pos0)
            out = None
            for g in range(len(self.specs)):
                out = self.run_cell(g, shared, out, kv, pos0, n_real)
            logits.append(out)
            times.append((time.perf_counter() - t) * 1e3)
        return logits, times


def _run_in_place(sess, output: str, feeds: dict[str, np.ndarray], layers: range, kv: HostKV) -> np.ndarray:
    """Run a fused graph with every layer's past and present bound to its host buffer (1, Hkv, T, D): ONNX
    Runtime's GroupQueryAttention then writes the chunk's K/V rows into the cache in place (the padding rows
    too, past the prompt, where nothing reads them) and copies nothing else. Returns the graph's first output
    (hidden or logits)."""
    io = sess.io_binding()
    for name, value in feeds.items():
        io.bind_cpu_input(name, value)
    for i in layers:
        for kind, buf in (("k", kv.k[i]), ("v", kv.v[i])):
            io.bind_input(f"past_{kind}_{i}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            io.bind_output(f"present_{kind}_{i}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
    io.bind_output(output, "cpu")
    sess.run_with_iobinding(io)
    return io.get_outputs()[-1].numpy()  # bound last


def kv_heads_of(kv: HostKV, layer: int, heads: tuple[int, int] | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The one KV-head scatter: layer `layer`'s K and V for KV heads [a, b) (all when None) over the
    prompt's positions, each (1, b - a, length, D), contiguous and ready to send or store."""
    a, b = heads if heads is not None else (0, kv.k[layer].shape[1])
    k = torch.from_numpy(np.ascontiguousarray(kv.k[layer][:, a:b, : kv.length])).to(dtype)
    v = torch.from_numpy(np.ascontiguousarray(kv.v[layer][:, a:b, : kv.length])).to(dtype)
    return k, v


def to_kv_cache(kv: HostKV, model: Transformer, cache: KVCache | None = None,
                kv_heads: tuple[int, int] | None = None) -> KVCache:
    """Copy the host cache into an edge_node KVCache for the layers `model` holds (KV heads [a, b) only
    when `kv_heads` is given, as a tensor-parallel rank keeps just its own)."""
    cache = cache if cache is not None else model.new_cache()
    for i in model.layer_ids:
        k, v = kv_heads_of(kv, i, kv_heads, model.dtype)  # (1, Hkv_rank, T, D)
        cache.layer(i, k.shape[1], k.shape[3]).update(0, k, v)
    return cache


def ort_prefill_step(model: Transformer, prefill: ChunkedPrefill,
                     on_prefill: Callable[[PrefillResult], None] | None = None
                     ) -> Callable[[list[int], int], torch.Tensor]:
    """A `step(ids, pos0)` for generate.decode_loop: ORT prefills the prompt, torch decodes the rest."""
    cache = model.new_cache()

    def step(ids: list[int], pos0: int) -> torch.Tensor:
        if pos0 == 0:
            result = prefill.run(ids)
            to_kv_cache(result.kv, model, cache)
            if on_prefill:
                on_prefill(result)
            return torch.from_numpy(result.logits).to(model.dtype)
        x = torch.tensor([ids], dtype=torch.long)
        with torch.inference_mode():
            return model(x, cache, pos0, last_only=True)[0, -1]

    return step
