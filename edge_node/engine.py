"""Tensor-parallel generation over shards: one rank's process, fed by the sliding-window scheduler.

Rank 0 holds the embeddings and the head: each step it broadcasts a header (token count, position) and
the embedded input, every rank runs its slice of every layer (two allreduces per layer, passed to the
model as `reduce`), and rank 0 turns the last hidden state into logits and samples with the same
decode loop as single-node generation. The other ranks serve steps until rank 0 broadcasts "stop".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import torch
from safetensors import safe_open

from edge_node.collectives import Comm
from edge_node.memory import ShardReader, SlidingWindow, own_peak_rss_mb, window_for_budget
from edge_node.model.generate import check_prompt, decode_loop
from edge_node.model.kv_cache import kv_bytes_per_token
from edge_node.model.load import build_block
from edge_node.model.model import Linear, RMSNorm, Transformer
from edge_node.model.sampling import Sampler, SamplingConfig
from edge_node.shard import LINEARS, Manifest, ShardError, ShardFile, verify_file

if TYPE_CHECKING:
    from npu_backends.build import PrefillOptions

_STOP, _RUN, _KV = 1, 0, 2  # step header flags; _KV: rank 0 sends the prompt's KV-head slices
_MARGIN = 48 << 20  # activations, logits and allocator slack on top of blocks and KV cache


@dataclass(frozen=True)
class TPOptions:
    shards: Path
    rank: int = 0
    master: str = "127.0.0.1:29500"
    window: int | None = None  # blocks resident; None = all (unless memory_mb is set)
    memory_mb: float | None = None
    allreduce: str = "star"
    timeout_s: float = 60.0
    drop_page_cache: bool = False
    threads: int | None = None
    ort_prefill: PrefillOptions | None = None  # rank 0 only: prefill on ONNX Runtime, then scatter the KV


@dataclass
class StepTimes:
    compute_ms: list[float] = field(default_factory=list)
    comm_ms: list[float] = field(default_factory=list)
    io_wait_ms: list[float] = field(default_factory=list)


class HeadChunk(torch.nn.Module):
    """lm_head rows [v0, v1) (float or int8)."""

    def __init__(self, vocab: tuple[int, int], linear: torch.nn.Module):
        super().__init__()
        self.vocab, self.linear = vocab, linear

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h)


class NoAttention(torch.nn.Module):
    """A rank with no attention heads (more ranks than KV heads): its partial o_proj output is zero
    (plus o_proj's bias on rank 0), and it still takes part in the allreduce."""

    def __init__(self, hidden: int, head_dim: int, bias: torch.Tensor | None):
        super().__init__()
        self.hidden, self.heads, self.kv_heads, self.head_dim = hidden, 0, 0, head_dim
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor, *_) -> torch.Tensor:
        y = x.new_zeros(*x.shape[:-1], self.hidden)  # (B, S, hidden)
        return y if self.bias is None else y + self.bias


def _linear(t: dict[str, torch.Tensor], name: str, bias: torch.Tensor | None = None) -> torch.nn.Module:
    if name + ".scale" in t:
        from quant.int8 import Int8Linear

        return Int8Linear(t[name], t[name + ".scale"], bias)
    return Linear(t[name], bias)


class RankEngine:
    """One rank: its shards, window, KV cache and communicator."""

    def __init__(self, opts: TPOptions, comm: Comm, max_tokens: int):
        self.opts, self.comm, self.rank = opts, comm, opts.rank
        self.manifest = m = Manifest.load(opts.shards)
        if comm.world != m.nodes:
            raise ShardError(f"{opts.shards} is sharded for {m.nodes} nodes, not {comm.world}")
        self.cfg = m.config
        self.dtype = torch.bfloat16 if m.weights == "bfloat16" else torch.float32
        self.model = Transformer(self.cfg, {}, self.dtype)  # rotary, masks, cache: no blocks of its own
        self.cache = self.model.new_cache()
        files = m.stream_files(self.rank)
        self.layers = len(m.rank_files(self.rank, "layer"))
        self.head_chunks = len(files) - self.layers
        kv = m.plan.slices[self.rank].kv_heads
        per_token = kv_bytes_per_token(kv[1] - kv[0], self.cfg.head_dim, self.cfg.num_layers, self.dtype)
        self.kv_bytes = per_token * max_tokens
        self.block_bytes = max(f.bytes for f in files)
        if self.rank == 0:
            self._open_embeddings(m.rank_files(0, "embed")[0])
        w = self._window(len(files))
        self.window = SlidingWindow(files, self._build, w, ShardReader(opts.drop_page_cache))
        self.times = StepTimes()
        self.prefill = None
        if opts.ort_prefill is not None:  # graphs exported ahead; the model here is config + rotary only
            from npu_backends.build import open_prefill_dir

            self.prefill = open_prefill_dir(self.model, opts.ort_prefill)
        self.prefill_report: dict = {}

    def _window(self, blocks: int) -> int | None:
        if self.opts.memory_mb is None:
            return self.opts.window
        fixed = psutil.Process().memory_info().rss + self.kv_bytes + _MARGIN
        return window_for_budget(int(self.opts.memory_mb * 2**20), self.block_bytes, fixed, blocks)

    def _open_embeddings(self, f: ShardFile) -> None:
        verify_file(f)  # read by rows, never whole: so hashed once here
        self._embed = safe_open(str(f.path), framework="pt")
        self._embed_int8 = "embed.scale" in self._embed.keys()
        self.norm = RMSNorm(self._embed.get_tensor("norm").to(self.dtype), self.cfg.rms_norm_eps)

    def _build(self, f: ShardFile, t: dict[str, torch.Tensor]) -> torch.nn.Module:
        if f.kind == "head":
            return HeadChunk(f.vocab, _linear(t, "lm_head"))
        block = build_block(self.cfg, f.layer, {k: t.get(k) for k in
                                                ("ln1", "ln2", "wqkv", "wo", "w13", "w2", "bqkv", "bo", "b13", "b2")})
        if "wqkv.scale" in t:  # int8 shards: swap in the int8 matmul (as gpt-fast's quantize does)
            owners = {"wqkv": block.attn, "wo": block.attn, "w13": block.mlp, "w2": block.mlp}
            bias = {"wqkv": "bqkv", "wo": "bo", "w13": "b13", "w2": "b2"}
            for name in LINEARS:
                setattr(owners[name], name, _linear(t, name, t.get(bias[name])))
        if t["wo"].shape[1] == 0:
            block.attn = NoAttention(self.cfg.hidden_size, self.cfg.head_dim, t.get("bo"))
        return block

    def embed(self, ids: list[int]) -> torch.Tensor:
        emb = self._embed.get_slice("embed")
        rows = torch.cat([emb[i: i + 1] for i in ids])  # (S, hidden): a few rows, not the table
        if self._embed_int8:
            scales = self._embed.get_slice("embed.scale")
            rows = rows.float() * torch.cat([scales[i: i + 1] for i in ids])[:, None]
        return rows.to(self.dtype)[None]  # (1, S, hidden)

    def _run_layers(self, h: torch.Tensor, pos0: int) -> torch.Tensor:
        return self.model.run_blocks(h, self.window.stream(self.layers), self.cache, pos0, self.comm.allreduce)

    @torch.inference_mode()
    def step(self, ids: list[int], pos0: int) -> torch.Tensor:
        """Rank 0: run ids at [pos0, ...) across all ranks; last-position logits (vocab,)."""
        t0, c0, w0 = time.perf_counter(), self.comm.comm_s, self.window.io_wait_s
        self.comm.broadcast(torch.tensor([len(ids), pos0, _RUN]), "step header")
        h = self.comm.broadcast(self.embed(ids).float(), "input hidden states").to(self.dtype)
        h = self._run_layers(h, pos0)
        hl = self.norm(h[:, -1:])  # (1, 1, hidden)
        logits = torch.cat([chunk(hl) for chunk in self.window.stream(self.head_chunks)], dim=-1)
        self._record(t0, c0, w0)
        return logits[0, -1].float()

    @torch.inference_mode()
    def prefill_ort(self, ids: list[int]) -> torch.Tensor:
        """Rank 0: the whole prompt through the ONNX Runtime graphs, every rank handed its KV slice."""
        t0, c0, w0 = time.perf_counter(), self.comm.comm_s, self.window.io_wait_s
        r = self.prefill.run(ids)
        n = r.kv.length
        self.comm.broadcast(torch.tensor([n, 0, _KV]), "step header")
        for rank, sl in enumerate(self.manifest.plan.slices):
            a, b = sl.kv_heads
            for i in range(self.cfg.num_layers) if a < b else ():
                k = torch.from_numpy(np.ascontiguousarray(r.kv.k[i][:, a:b, :n]))  # (1, Hkv_rank, n, D)
                v = torch.from_numpy(np.ascontiguousarray(r.kv.v[i][:, a:b, :n]))
                if rank == 0:
                    self._store_kv(i, k, v)
                else:
                    self.comm.send(k, rank, f"prefill K of layer {i} to rank {rank}")
                    self.comm.send(v, rank, f"prefill V of layer {i} to rank {rank}")
        self._record(t0, c0, w0)
        self.prefill_report = {"prefill": "ort", "prefill_provider": r.provider,
                               "prefill_ms": round(r.seconds * 1e3, 3)}
        return torch.from_numpy(r.logits).float()

    def _receive_kv(self, n: int) -> None:
        a, b = self.manifest.plan.slices[self.rank].kv_heads
        for i in range(self.cfg.num_layers) if a < b else ():
            k = self.comm.recv(torch.empty(1, b - a, n, self.cfg.head_dim), 0, f"prefill K of layer {i}")
            v = self.comm.recv(torch.empty(1, b - a, n, self.cfg.head_dim), 0, f"prefill V of layer {i}")
            self._store_kv(i, k, v)

    def _store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.layer(layer, k.shape[1], k.shape[3]).update(0, k.to(self.dtype), v.to(self.dtype))

    @torch.inference_mode()
    def score(self, ids: list[int]) -> torch.Tensor:
        """Logits at every position (S, vocab) of one sequence, on a fresh cache: evaluation, one rank only."""
        if self.comm.world != 1:
            raise ShardError("score() runs on 1-node shards only")
        h = self.model.run_blocks(self.embed(ids), self.window.stream(self.layers), self.model.new_cache(), 0)
        hn = self.norm(h)  # (1, S, hidden)
        return torch.cat([chunk(hn) for chunk in self.window.stream(self.head_chunks)], dim=-1)[0].float()

    def _record(self, t0: float, c0: float, w0: float) -> None:
        total = (time.perf_counter() - t0) * 1e3
        comm, io = (self.comm.comm_s - c0) * 1e3, (self.window.io_wait_s - w0) * 1e3
        self.times.comm_ms.append(comm)
        self.times.io_wait_ms.append(io)
        self.times.compute_ms.append(total - comm - io)

    @torch.inference_mode()
    def serve(self) -> None:
        """Ranks > 0: run steps until rank 0 says stop."""
        while True:
            header = self.comm.broadcast(torch.zeros(3, dtype=torch.long), "step header (waiting for rank 0)")
            n, pos0, flag = header.tolist()
            if flag == _STOP:
                return
            if flag == _KV:
                self._receive_kv(n)
                continue
            t0, c0, w0 = time.perf_counter(), self.comm.comm_s, self.window.io_wait_s
            h = self.comm.broadcast(torch.empty(1, n, self.cfg.hidden_size), "input hidden states")
            self._run_layers(h.to(self.dtype), pos0)
            self._record(t0, c0, w0)

    def stop(self) -> None:
        self.comm.broadcast(torch.tensor([0, 0, _STOP]), "stop")

    def stats(self) -> torch.Tensor:
        """[peak RSS MiB, bytes read, bytes per token pass, window, bytes the block layer read] of this rank."""
        w = self.window
        per_pass = w.streamed_bytes_per_pass
        disk = psutil.Process().io_counters().read_bytes  # what really came from the device, not page cache
        return torch.tensor([own_peak_rss_mb(), float(w.reader.bytes_read), float(per_pass), float(w.window),
                             float(disk)], dtype=torch.float64)

    def close(self) -> None:
        self.window.close()


def run_rank(opts: TPOptions, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
             eos_ids: tuple[int, ...] = (), keep_logits: bool = False, comm: Comm | None = None) -> dict | None:
    """Run one rank to completion; rank 0 returns the result dict, the others None."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    manifest_nodes = Manifest.load(opts.shards).nodes
    own_comm = comm is None
    comm = comm or Comm(opts.rank, manifest_nodes, opts.master, opts.timeout_s, opts.allreduce)
    engine = None
    try:
        engine = RankEngine(opts, comm, len(prompt) + max_new_tokens)
        if opts.rank != 0:
            engine.serve()
            comm.gather(engine.stats())
            result = None
        else:
            result = _lead(engine, prompt, max_new_tokens, sampling, eos_ids, keep_logits)
    finally:
        if engine is not None:
            engine.close()
    if own_comm:  # only after success: tearing down a group with a dead peer can block
        comm.close()
    return result


def _lead(engine: RankEngine, prompt: list[int], max_new: int, sampling: SamplingConfig, eos_ids: tuple[int, ...],
          keep_logits: bool) -> dict:
    cfg = engine.cfg
    check_prompt(prompt, cfg.max_position_embeddings, cfg.vocab_size)
    logits: list[torch.Tensor] = []

    def step(ids: list[int], pos0: int) -> torch.Tensor:
        out = engine.prefill_ort(ids) if pos0 == 0 and engine.prefill else engine.step(ids, pos0)
        if keep_logits:
            logits.append(out.clone())
        return out

    try:
        result = decode_loop(step, prompt, max_new, Sampler(sampling), eos_ids, cfg.max_position_embeddings)
    finally:
        engine.stop()
    stats = torch.stack(engine.comm.gather(engine.stats()))  # (ranks, 5)
    t = engine.times
    per_token = [{"compute_ms": round(c, 3), "comm_ms": round(m, 3), "io_wait_ms": round(w, 3)}
                 for c, m, w in zip(t.compute_ms, t.comm_ms, t.io_wait_ms, strict=True)]
    decode = per_token[1:] or per_token
    out = {
        "token_ids": result.token_ids, "ttft_ms": round(result.ttft_ms, 3), "tpot_ms": round(result.tpot_ms, 3),
        "peak_rss_mb": round(float(stats[0, 0]), 1), "stop_reason": result.stop_reason,
        "nodes": engine.comm.world, "allreduce": engine.comm.mode, "weights": engine.manifest.weights,
        "per_rank_peak_rss_mb": [round(float(x), 1) for x in stats[:, 0]],
        "per_rank_window": [int(x) for x in stats[:, 3]],
        "pinned_blocks": engine.window.pinned,
        "block_mb": round(engine.block_bytes / 2**20, 2), "kv_cache_mb": round(engine.kv_bytes / 2**20, 3),
        "bytes_read_per_token": int(stats[:, 2].sum()), "bytes_read_total": int(stats[:, 1].sum()),
        "disk_read_bytes_total": int(stats[:, 4].sum()),
        "per_token": per_token, **engine.prefill_report,
        "per_token_mean": {k: round(sum(d[k] for d in decode) / len(decode), 3) for k in decode[0]} if decode else {},
    }
    if keep_logits:
        out["logits"] = logits
    return out
