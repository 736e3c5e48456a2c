"""Tensor-parallel generation over shards: one rank's process, fed by the sliding-window scheduler.

Rank 0 holds the embeddings and the head: each step it broadcasts a `Step` message (edge_node.protocol:
token count, first position, layer range) and the embedded input, every rank runs its slice of those
layers (two allreduces per layer, passed to the model as `reduce`), and rank 0 turns the last hidden
state into logits and samples with the same decode loop as single-node generation. The other ranks
serve messages until rank 0 sends `Stop`, then report `RankStats`. Every rank runs the one RunConfig
the launcher built. A serving group (edge_node.serving) runs many sequences: rank 0 sends `Reset` before each
(every rank empties its KV cache) and `Ping` while idle (so the others' bounded waits start over).

Early exit (run.exits): every layer stays resident and each rank runs the edge layers [0, k) through a
DeferredStack over its slice, so exited tokens' deep KV is caught up exactly. Rank 0 alone decides: it
evaluates the exit heads on the hidden state after the allreduce (the same on every rank) and tells the
others each layer range to run, or that the chunk exited (`Step` messages, see edge_node.protocol), so every
rank makes the same calls in the same order and the allreduces pair up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil
import torch
from safetensors import safe_open

from edge_node.collectives import Comm
from edge_node.early_exit import DeferredStack, EdgeStepper, ExitHeads, ExitPolicy
from edge_node.memory import ShardReader, SlidingWindow, own_peak_rss_mb, window_for_budget
from edge_node.model.decode import GenerationResult, check_prompt, decode_loop
from edge_node.model.errors import UsageError
from edge_node.model.formats import TORCH_NAMES
from edge_node.model.generation_config import eos_ids
from edge_node.model.kv_cache import kv_bytes_per_token
from edge_node.model.load import build_block
from edge_node.model.model import RMSNorm, Transformer
from edge_node.model.sampling import Sampler
from edge_node.protocol import KVTransfer, Ping, ProtocolError, RankStats, Reset, Step, Stop
from edge_node.run_config import RunConfig
from edge_node.shard import Manifest, ShardError, ShardFile, verify_file
from quant.int8 import linear_factory, make_linear

_MARGIN = 48 << 20  # activations, logits and allocator slack on top of blocks and KV cache


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


class ChunkedHead(torch.nn.Module):
    """The lm_head as rank 0 holds it, in vocab chunks: features (..., hidden) -> logits (..., vocab)."""

    def __init__(self, chunks: list[HeadChunk]):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([chunk(h) for chunk in self.chunks], dim=-1)


class LeadStack(DeferredStack):
    """Rank 0's DeferredStack: each call is announced to the other ranks before it runs here, so every rank
    runs the same layers over the same positions (catch-up included) and the allreduces pair up."""

    def __init__(self, engine: RankEngine, end: int, keep_outbox: bool):
        super().__init__(engine.model, 0, end, engine.cache, keep_outbox, engine.comm.allreduce)
        self.comm = engine.comm

    def advance(self, h: torch.Tensor | None, pos0: int, frm: int, to: int) -> torch.Tensor | None:
        tokens = 0 if h is None else h.shape[1]
        self.comm.broadcast_message(Step(tokens=tokens, pos0=pos0, layers=(frm, to)), "early-exit step")
        if h is not None and frm == self.start:
            self.comm.broadcast(h.float(), "input hidden states")
        return super().advance(h, pos0, frm, to)

    def defer(self, h: torch.Tensor, pos0: int) -> None:
        self.comm.broadcast_message(Step(tokens=h.shape[1], pos0=pos0, exited=True), "early exit")
        super().defer(h, pos0)


class RankEngine:
    """One rank: its shards, window, KV cache and communicator."""

    def __init__(self, run: RunConfig, comm: Comm, max_tokens: int, manifest: Manifest | None = None):
        self.run, self.comm, self.rank = run, comm, comm.rank
        self.manifest = m = manifest or Manifest.load(run.shards)
        if comm.world != m.nodes:
            raise ShardError(f"{run.shards} is sharded for {m.nodes} nodes, not {comm.world}")
        self.cfg = m.config
        stored = torch.bfloat16 if m.weights == "bfloat16" else torch.float32
        self.dtype = TORCH_NAMES[run.dtype] if run.dtype else stored
        self.model = Transformer(self.cfg, {}, self.dtype)  # rotary, masks, cache: no blocks of its own
        self.cache = self.model.new_cache()
        files = m.stream_files(self.rank)
        self.layers = len(m.rank_files(self.rank, "layer"))
        self.head_chunks = len(files) - self.layers
        sl = m.plan.slices[self.rank]
        self.units = sl.units(self.cfg)
        per_token = kv_bytes_per_token(sl.kv_heads[1] - sl.kv_heads[0], self.cfg.head_dim, self.cfg.num_layers,
                                       self.dtype)
        self.kv_bytes = per_token * max_tokens
        self.block_bytes = max(f.bytes for f in files)
        if self.rank == 0:
            self._open_embeddings(m.rank_files(0, "embed")[0])
        w = self._window(len(files))
        self.window = SlidingWindow(files, self._build, w, ShardReader(run.drop_page_cache))
        self.times = StepTimes()
        self.prefill = None
        if run.prefill is not None and self.rank == 0:  # graphs exported ahead; the model: config + rotary
            from npu_backends.build import open_prefill_dir

            # graphs exported from another checkpoint (a fine-tuned copy, same shapes) are refused
            self.prefill = open_prefill_dir(self.model, run.prefill, expected_digest=m.weights_digest)
        self.prefill_report: dict = {}
        self.exit_heads: ExitHeads | None = None
        self.stack: DeferredStack | None = None  # ranks > 0: the running early-exit sequence's
        self._held: torch.Tensor | None = None  # ranks > 0: the chunk an early-exit sequence is running
        if run.exits is not None:
            self._resident_model(files)

    def _resident_model(self, files: list[ShardFile]) -> None:
        """Early exit: the model holds its blocks (all resident) so a DeferredStack can run any layer range."""
        if self.window.pinned or self.window.window < len(files):
            raise UsageError("early exit needs every layer block resident: drop --window and --memory-mb")
        built = list(self.window.stream(len(files)))  # everything is resident: this only lists the blocks
        blocks = {f.layer: b for f, b in zip(files[: self.layers], built, strict=False)}
        if self.rank == 0:
            from edge_node.early_exit import load_exit_heads

            head = ChunkedHead(built[self.layers:])
            self.model = Transformer(self.cfg, blocks, self.dtype, norm=self.norm, lm_head=head)
            heads = self.run.exits.exits  # None: no heads (collaborative: every token to the cloud, the naive split)
            if heads is not None:
                self.exit_heads = load_exit_heads(self.run.shards if heads == "auto" else heads, self.cfg)
                self.run.exits.check_layers(self.exit_heads.layers, f"rank 0 ({heads})")
        else:
            self.model = Transformer(self.cfg, blocks, self.dtype)

    def exit_stepper(self, heads: ExitHeads | None, policy: ExitPolicy, end: int, keep_outbox: bool,
                     request: str = "") -> EdgeStepper:
        """Rank 0: start an early-exit sequence on [0, end) on every rank (KV caches emptied); its stepper."""
        if self.run.exits is None:
            raise UsageError("this group was started without exit heads: early exit is not available")
        if not 0 < end <= self.cfg.num_layers:
            raise UsageError(f"the edge's last layer must be in [1, {self.cfg.num_layers}], got {end}")
        self.reset(request, exit_end=end)
        return EdgeStepper(self.model, heads, policy, end, keep_outbox, LeadStack(self, end, keep_outbox), self.embed)

    def _window(self, blocks: int) -> int | None:
        if self.run.memory_mb is None:
            return self.run.window
        fixed = psutil.Process().memory_info().rss + self.kv_bytes + _MARGIN
        return window_for_budget(int(self.run.memory_mb * 2**20), self.block_bytes, fixed, blocks)

    def _open_embeddings(self, f: ShardFile) -> None:
        verify_file(f)  # read by rows, never whole: so hashed once here
        self._embed = safe_open(str(f.path), framework="pt")
        self._embed_int8 = "embed.scale" in self._embed.keys()
        self.norm = RMSNorm(self._embed.get_tensor("norm").to(self.dtype), self.cfg.rms_norm_eps)

    def _build(self, f: ShardFile, t: dict[str, torch.Tensor]) -> torch.nn.Module:
        # Float tensors in the compute dtype (a copy only when it differs from the stored one); int8
        # weights and their scales stay as stored: the int8 kernel takes them as they are.
        t = {k: v.to(self.dtype) if v.is_floating_point() and not k.endswith(".scale") else v for k, v in t.items()}
        if f.kind == "head":
            return HeadChunk(f.vocab, make_linear(t["lm_head"], t.get("lm_head.scale")))
        return build_block(self.cfg, f.layer, t, self.units, linear_factory)

    def embed(self, ids: list[int]) -> torch.Tensor:
        emb = self._embed.get_slice("embed")
        rows = torch.cat([emb[i: i + 1] for i in ids])  # (S, hidden): a few rows, not the table
        if self._embed_int8:
            scales = self._embed.get_slice("embed.scale")
            rows = rows.float() * torch.cat([scales[i: i + 1] for i in ids])[:, None]
        return rows.to(self.dtype)[None]  # (1, S, hidden)

    def _run_layers(self, h: torch.Tensor, msg: Step) -> torch.Tensor:
        if msg.layers != (0, self.cfg.num_layers):  # the window streams every layer in order, cyclically
            raise ProtocolError(f"rank {self.rank}: asked to run layers {list(msg.layers)}; this engine runs "
                                f"all {self.cfg.num_layers} layers per step")
        return self.model.run_blocks(h, self.window.stream(self.layers), self.cache, msg.pos0, self.comm.allreduce)

    @torch.inference_mode()
    def step(self, ids: list[int], pos0: int, all_logits: bool = False) -> torch.Tensor:
        """Rank 0: run ids at [pos0, ...) across all ranks; last-position logits (vocab,), or every
        position's (S, vocab) with all_logits."""
        t0, c0, w0 = time.perf_counter(), self.comm.comm_s, self.window.io_wait_s
        msg = Step(tokens=len(ids), pos0=pos0, layers=(0, self.cfg.num_layers), all_logits=all_logits)
        self.comm.broadcast_message(msg, "step")
        h = self.comm.broadcast(self.embed(ids).float(), "input hidden states").to(self.dtype)
        h = self._run_layers(h, msg)
        hl = self.norm(h if all_logits else h[:, -1:])  # (1, S or 1, hidden)
        logits = torch.cat([chunk(hl) for chunk in self.window.stream(self.head_chunks)], dim=-1)
        self._record(t0, c0, w0)
        return logits[0].float() if all_logits else logits[0, -1].float()

    @torch.inference_mode()
    def prefill_ort(self, ids: list[int]) -> torch.Tensor:
        """Rank 0: the whole prompt through the ONNX Runtime graphs, every rank handed its KV slice."""
        from npu_backends.prefill import kv_heads_of

        t0, c0, w0 = time.perf_counter(), self.comm.comm_s, self.window.io_wait_s
        r = self.prefill.run(ids)
        n = r.kv.length
        self.comm.broadcast_message(KVTransfer(length=n, layers=(0, self.cfg.num_layers)), "KV transfer")
        for rank, sl in enumerate(self.manifest.plan.slices):
            a, b = sl.kv_heads
            for i in range(self.cfg.num_layers) if a < b else ():
                k, v = kv_heads_of(r.kv, i, (a, b))  # (1, Hkv_rank, n, D)
                if rank == 0:
                    self._store_kv(i, k, v)
                else:
                    self.comm.send(k, rank, f"prefill K of layer {i} to rank {rank}")
                    self.comm.send(v, rank, f"prefill V of layer {i} to rank {rank}")
        self._record(t0, c0, w0)
        self.prefill_report = {"prefill": "ort", "prefill_provider": r.provider,
                               "prefill_ms": round(r.seconds * 1e3, 3)}
        return torch.from_numpy(r.logits).float()

    def _receive_kv(self, msg: KVTransfer) -> None:
        a, b = self.manifest.plan.slices[self.rank].kv_heads
        n = msg.length
        for i in range(*msg.layers) if a < b else ():
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
        """Ranks > 0: run what rank 0 asks until it says stop."""
        while True:
            msg = self.comm.broadcast_message(None, "next message (waiting for rank 0)")
            if isinstance(msg, Stop):
                return
            if isinstance(msg, Ping):
                continue
            if isinstance(msg, Reset):
                self._reset_own(msg.exit_end)
                continue
            if isinstance(msg, KVTransfer):
                self._receive_kv(msg)
                continue
            if not isinstance(msg, Step):
                raise ProtocolError(f"rank {self.rank}: unexpected {type(msg).__name__} from rank 0")
            if msg.adapter is not None:
                raise UsageError(f"rank {self.rank}: adapter {msg.adapter!r} requested; adapters are not built yet")
            if self.stack is not None:
                self._exit_step(msg)
                continue
            t0, c0, w0 = time.perf_counter(), self.comm.comm_s, self.window.io_wait_s
            h = self.comm.broadcast(torch.empty(1, msg.tokens, self.cfg.hidden_size), "input hidden states")
            self._run_layers(h.to(self.dtype), msg)
            self._record(t0, c0, w0)

    def _exit_step(self, msg: Step) -> None:
        """Ranks > 0, in an early-exit sequence: what rank 0's LeadStack just announced, on this rank's slice."""
        a, b = msg.layers
        if msg.exited:
            if self._held is None or self._held.shape[1] != msg.tokens:
                raise ProtocolError(f"rank {self.rank}: told that {msg.tokens} token(s) exited, holding none such")
            self.stack.defer(self._held, msg.pos0)
        elif msg.tokens == 0:
            self.stack.advance(None, msg.pos0, a, b)
        else:
            if a == self.stack.start:
                h = self.comm.broadcast(torch.empty(1, msg.tokens, self.cfg.hidden_size), "input hidden states")
                self._held = h.to(self.dtype)
            elif self._held is None or self._held.shape[1] != msg.tokens:
                raise ProtocolError(f"rank {self.rank}: asked to continue {msg.tokens} token(s) at layer {a}, "
                                    f"holding none such")
            self._held = self.stack.advance(self._held, msg.pos0, a, b)

    def reset(self, request: str = "", exit_end: int = 0) -> None:
        """Rank 0: a new sequence; every rank's KV cache (and step timings) emptied. exit_end > 0: an early-exit
        sequence on the edge layers [0, exit_end) (see exit_stepper)."""
        self.comm.broadcast_message(Reset(request=request, exit_end=exit_end), "reset")
        self._reset_own()

    def _reset_own(self, exit_end: int = 0) -> None:
        self.cache.truncate(0)  # buffers kept: the next sequence reuses them
        self.times = StepTimes()
        self._held = None
        self.stack = None
        if exit_end:
            if self.run.exits is None:
                raise ProtocolError(f"rank {self.rank}: asked for an early-exit sequence; this rank was started "
                                    f"without early exit (configurations differ)")
            self.stack = DeferredStack(self.model, 0, exit_end, self.cache, reduce=self.comm.allreduce)

    def ping(self) -> None:
        """Rank 0, idle: tell the other ranks it is alive (each waits at most run.timeout_s for a message)."""
        self.comm.broadcast_message(Ping(), "ping")

    def stop(self) -> None:
        self.comm.broadcast_message(Stop(), "stop")

    def stats(self) -> RankStats:
        """What this rank read and held, and the digest of the configuration it ran."""
        w = self.window
        disk = psutil.Process().io_counters().read_bytes  # what really came from the device, not page cache
        return RankStats(rank=self.rank, peak_rss_mb=own_peak_rss_mb(), bytes_read=w.reader.bytes_read,
                         bytes_per_pass=w.streamed_bytes_per_pass, window=w.window, disk_read_bytes=disk,
                         config_sha256=self.run.sha256)

    def close(self) -> None:
        self.window.close()


def run_rank(run: RunConfig, rank: int = 0, master: str = "127.0.0.1:29500", keep_logits: bool = False,
             comm: Comm | None = None, iface: str | None = None) -> dict | None:
    """Run one rank of `run` to completion; rank 0 returns the result dict, the others None. `iface` is the
    network interface gloo uses (default: the one that routes to the master); ignored when `comm` is given."""
    if run.shards is None:
        raise UsageError("a tensor-parallel run needs a shard directory")
    if run.threads:
        torch.set_num_threads(run.threads)
    own_comm = comm is None
    manifest = Manifest.load(run.shards)  # checked once: its files are stat-ed against the sizes it records
    comm = comm or Comm(rank, manifest.nodes, master, run.timeout_s, run.allreduce, iface=iface)
    engine = None
    try:
        engine = RankEngine(run, comm, len(run.prompt_ids) + run.max_new_tokens, manifest)
        if comm.rank != 0:
            engine.serve()
            comm.gather_message(engine.stats(), "rank statistics")
            result = None
        elif run.exits is not None:
            result = _lead_exits(engine)
        else:
            result = _lead(engine, keep_logits)
    finally:
        if engine is not None:
            engine.close()
    if own_comm:  # only after success: tearing down a group with a dead peer can block
        comm.close()
    return result


def _lead(engine: RankEngine, keep_logits: bool) -> dict:
    cfg, run = engine.cfg, engine.run
    prompt = list(run.prompt_ids)
    check_prompt(prompt, cfg.max_position_embeddings, cfg.vocab_size)
    logits: list[torch.Tensor] = []
    prefill_logits: list[torch.Tensor] = []

    def step(ids: list[int], pos0: int) -> torch.Tensor:
        if pos0 == 0 and engine.prefill:
            out = engine.prefill_ort(ids)
        elif pos0 == 0 and keep_logits:  # every prompt position's logits, for parity checks
            rows = engine.step(ids, pos0, all_logits=True)
            prefill_logits.append(rows)
            out = rows[-1]
        else:
            out = engine.step(ids, pos0)
        if keep_logits:
            logits.append(out.clone())
        return out

    try:
        result = decode_loop(step, prompt, run.max_new_tokens, Sampler(run.sampling), eos_ids(run.shards, cfg),
                             cfg.max_position_embeddings, logprobs=run.logprobs)
    finally:
        engine.stop()
    out = _report(engine, result, engine.comm.gather_message(engine.stats(), "rank statistics"))
    if keep_logits:
        out["logits"] = logits
        out["prefill_logits"] = prefill_logits[0] if prefill_logits else None
    return out


def _lead_exits(engine: RankEngine) -> dict:
    """Rank 0 of an early-exit run: the edge's generation (standalone, or with the cloud tier) over the group."""
    from edge_node.cloud_link import exit_summary, generate_early_exit

    cfg, run = engine.cfg, engine.run
    check_prompt(list(run.prompt_ids), cfg.max_position_embeddings, cfg.vocab_size)
    digest = engine.manifest.weights_digest or ""
    if run.exits.mode == "collaborative" and not digest:
        raise ShardError(f"{run.shards}: the manifest records no weights digest (shards written by an older "
                         f"edgefed): re-shard to use the cloud tier")
    t0 = time.perf_counter()
    try:
        result = generate_early_exit(engine.model, engine.exit_heads, run.exits, run.prompt_ids, run.max_new_tokens,
                                     run.sampling, eos_ids(run.shards, cfg), digest,
                                     make_stepper=lambda policy, end, keep: engine.exit_stepper(
                                         engine.exit_heads, policy, end, keep))
    finally:
        engine.stop()
    stats = engine.comm.gather_message(engine.stats(), "rank statistics")
    out = exit_summary(result, engine.exit_heads, run.exits, time.perf_counter() - t0)
    out.update({"nodes": engine.comm.world, "allreduce": engine.comm.mode, "weights": engine.manifest.weights,
                "dtype": str(engine.dtype).removeprefix("torch."), "peak_rss_mb": round(stats[0].peak_rss_mb, 1),
                "per_rank_peak_rss_mb": [round(s.peak_rss_mb, 1) for s in stats],
                "per_rank_config_sha256": [s.config_sha256 for s in stats],
                "edge_layer_evals": result.edge_layer_evals})
    return out


def _report(engine: RankEngine, result: GenerationResult, stats: list[RankStats]) -> dict:
    t = engine.times
    per_token = [{"compute_ms": round(c, 3), "comm_ms": round(m, 3), "io_wait_ms": round(w, 3)}
                 for c, m, w in zip(t.compute_ms, t.comm_ms, t.io_wait_ms, strict=True)]
    decode = per_token[1:] or per_token
    out = {
        "token_ids": result.token_ids, "ttft_ms": round(result.ttft_ms, 3), "tpot_ms": round(result.tpot_ms, 3),
        "peak_rss_mb": round(stats[0].peak_rss_mb, 1), "stop_reason": result.stop_reason,
        "nodes": engine.comm.world, "allreduce": engine.comm.mode, "weights": engine.manifest.weights,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "per_rank_peak_rss_mb": [round(s.peak_rss_mb, 1) for s in stats],
        "per_rank_window": [s.window for s in stats],
        "per_rank_config_sha256": [s.config_sha256 for s in stats],
        "pinned_blocks": engine.window.pinned,
        "block_mb": round(engine.block_bytes / 2**20, 2), "kv_cache_mb": round(engine.kv_bytes / 2**20, 3),
        "bytes_read_per_token": sum(s.bytes_per_pass for s in stats),
        "bytes_read_total": sum(s.bytes_read for s in stats),
        "disk_read_bytes_total": sum(s.disk_read_bytes for s in stats),
        "per_token": per_token, **engine.prefill_report,
        "per_token_mean": {k: round(sum(d[k] for d in decode) / len(decode), 3) for k in decode[0]} if decode else {},
    }
    if engine.run.logprobs:
        out["logprobs"] = result.logprobs
    return out
