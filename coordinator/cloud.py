"""The cloud tier's context manager (CE-CoLLM): per-session deep-layer KV, deferred catch-up, expiry, a memory bound.

Plain state, no sockets: `coordinator.cloud_server` is a thin gRPC servicer over it, and `InProcessTransport`
lets an edge talk to it directly (tests, benchmarks). The cloud holds layers [k, L), the final norm and the head.
A session keeps the KV of [k, L) for its positions; hidden states of tokens the edge answered itself are queued
as they arrive and run through [k, L) (as one chunk, in front of the next question) before any answer, so every
deep layer's KV is the full model's and nothing is ever copied from another layer.

Memory: a session's bytes are its KV for the positions it holds (per-token bytes x tokens) plus its queued hidden
states; their sum over sessions never exceeds `CloudLimits.max_bytes`. A request that would cross it first drops
expired sessions, then the least recently used other ones; if this session alone would cross it, it is refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edge_node.cloud_link import CloudAnswer, CloudRefused, CloudUnavailable, SessionSpec, Upload
from edge_node.model.errors import EdgefedError, UsageError
from edge_node.model.kv_cache import KVCache, kv_bytes_per_token
from edge_node.model.model import Transformer
from edge_node.model.sampling import Sampler, SamplingConfig
from quant.codec import CodecError, check_codec, decode


class CloudError(EdgefedError):
    """A request the cloud refuses; `code` says why (the gRPC servicer maps it to a status code)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class CloudLimits:
    max_bytes: int = 1 << 30  # KV + queued hidden states over all sessions
    session_ttl_s: float = 300.0  # a session idle this long is dropped
    max_sessions: int = 256

    def __post_init__(self):
        if self.max_bytes <= 0 or self.session_ttl_s <= 0 or self.max_sessions <= 0:
            raise UsageError(f"cloud limits must be positive, got {self}")


class CloudSession:
    def __init__(self, spec: SessionSpec, cache: KVCache, now: float):
        self.spec = spec
        self.cache = cache
        self.queue: list[torch.Tensor] = []  # (n, hidden) float32 rows at layer k, positions [kv_len, received)
        self.tokens: list[int] = []  # the input token id at every position received (the penalty's history)
        self.sampler = Sampler(SamplingConfig(repetition_penalty=spec.repetition_penalty))
        self.last_used = now

    @property
    def received(self) -> int:
        return len(self.tokens)

    @property
    def queued(self) -> int:
        return sum(q.shape[0] for q in self.queue)


class CloudContextManager:
    """Sessions over one cloud model part [k, L) (+ norm and head); thread-safe (one lock: the CPU is the limit)."""

    def __init__(self, model: Transformer, model_digest: str, limits: CloudLimits = CloudLimits(),
                 clock: Callable[[], float] = time.monotonic):
        ids = model.layer_ids
        cfg = model.config
        if model.head is None or ids[-1] != cfg.num_layers - 1 or ids != list(range(ids[0], cfg.num_layers)):
            raise UsageError(f"the cloud part must hold layers [k, {cfg.num_layers}) and the head, it holds {ids}")
        self.model, self.digest, self.limits, self.clock = model, model_digest, limits, clock
        self.split = ids[0]
        self.token_kv_bytes = kv_bytes_per_token(cfg.num_key_value_heads, cfg.head_dim, len(ids), model.dtype)
        self.row_bytes = cfg.hidden_size * 4  # a queued hidden state (float32)
        self.sessions: dict[str, CloudSession] = {}
        self.lock = threading.Lock()
        self.counters = dict(sessions_opened=0, sessions_expired=0, sessions_evicted=0, requests=0,
                             tokens_answered=0, tokens_received=0, layer_evals=0, refused=0)

    # -------------------------------------------------------------------------------- requests
    def open(self, spec: SessionSpec) -> None:
        with self.lock:
            self._expire()
            if spec.model_digest != self.digest:
                raise self._refuse("mismatch", f"session {spec.session}: the edge runs model {spec.model_digest[:12]}, "
                                               f"this cloud tier serves {self.digest[:12]}")
            if spec.split != self.split:
                raise self._refuse("mismatch", f"session {spec.session}: the edge splits at layer {spec.split}, "
                                               f"this cloud tier runs from layer {self.split}")
            try:
                check_codec(spec.codec)
            except CodecError as e:
                raise self._refuse("bad_payload", str(e)) from None
            if spec.session in self.sessions:
                raise self._refuse("exists", f"session {spec.session} is already open")
            while len(self.sessions) >= self.limits.max_sessions:
                self._evict_lru(keep=None)
            self.sessions[spec.session] = CloudSession(spec, self.model.new_cache(), self.clock())
            self.counters["sessions_opened"] += 1

    def append(self, up: Upload) -> None:
        """Queue positions the edge answered itself; their deep KV is computed before the next answer."""
        with self.lock:
            self._receive(up)

    @torch.inference_mode()
    def infer(self, up: Upload) -> CloudAnswer:
        """Queue `up`, catch up every queued position through [k, L), answer the last one's next token."""
        t0 = time.perf_counter()
        with self.lock:
            s = self._receive(up)
            if up.states.rows == 0:
                raise self._refuse("bad_payload", f"session {up.session}: nothing to answer (no hidden states)")
            h, evals = self._run_queue(s)
            logits = self.model.logits(h[:, -1:])[0, -1].float()
            if not bool(torch.isfinite(logits).all()):
                raise self._refuse("non_finite", f"session {up.session}: logits at position {s.received - 1} "
                                                 f"are not finite")
            token = s.sampler(logits, s.tokens)
            self.counters["tokens_answered"] += 1
        return CloudAnswer(token, (time.perf_counter() - t0) * 1e3, evals)

    def catch_up(self, session: str) -> int:
        """Compute the deep KV of every queued position now (e.g. while idle); returns how many ran."""
        with self.lock:
            s = self.sessions.get(session)
            if s is None:
                raise self._refuse("unknown_session", f"session {session} is unknown here")
            n = s.queued
            if n:
                self._run_queue(s)
            return n

    @torch.inference_mode()
    def _run_queue(self, s: CloudSession) -> tuple[torch.Tensor, int]:
        pos0 = s.cache.length(self.split)
        x = torch.cat(s.queue)[None].to(self.model.dtype)  # (1, n, hidden) at positions [pos0, pos0 + n)
        s.queue = []
        h = self.model.forward_range(x, s.cache, pos0, self.split, self.model.config.num_layers)
        evals = x.shape[1] * len(self.model.layer_ids)
        self.counters["layer_evals"] += evals
        return h, evals

    def close(self, session: str) -> None:
        with self.lock:
            self.sessions.pop(session, None)

    def expire(self) -> int:
        """Drop idle sessions now (the server calls this periodically); returns how many."""
        with self.lock:
            return self._expire()

    # -------------------------------------------------------------------------------- accounting
    def session_bytes(self, s: CloudSession) -> int:
        return s.cache.length(self.split) * self.token_kv_bytes + s.queued * self.row_bytes

    @property
    def used_bytes(self) -> int:
        return sum(self.session_bytes(s) for s in self.sessions.values())

    def metrics(self) -> dict:
        """Gauges and counters for /metrics (names without the edgefed_cloud_ prefix)."""
        with self.lock:
            allocated = sum(s.cache.nbytes + s.queued * self.row_bytes for s in self.sessions.values())
            return {"sessions": len(self.sessions), "memory_used_bytes": self.used_bytes,
                    "memory_allocated_bytes": allocated, "memory_bound_bytes": self.limits.max_bytes,
                    "queued_tokens": sum(s.queued for s in self.sessions.values()), **self.counters}

    # -------------------------------------------------------------------------------- internals
    def _receive(self, up: Upload) -> CloudSession:
        self._expire()
        self.counters["requests"] += 1
        s = self.sessions.get(up.session)
        if s is None:
            raise self._refuse("unknown_session", f"session {up.session} is unknown here (expired, evicted or "
                                                  f"never opened)")
        if up.pos0 != s.received:
            raise self._refuse("position", f"session {up.session}: hidden states start at position {up.pos0}, "
                                           f"the cloud holds {s.received} positions")
        if up.states.codec != s.spec.codec or up.states.cols != self.model.config.hidden_size:
            raise self._refuse("bad_payload", f"session {up.session}: payload {up.states.codec} "
                                              f"({up.states.rows}, {up.states.cols}), expected {s.spec.codec} "
                                              f"rows of {self.model.config.hidden_size}")
        if up.states.rows != len(up.tokens):
            raise self._refuse("bad_payload", f"session {up.session}: {up.states.rows} hidden states but "
                                              f"{len(up.tokens)} token ids")
        try:
            rows = decode(up.states)
        except CodecError as e:
            raise self._refuse("bad_payload", f"session {up.session}: {e}") from None
        self._reserve(s, rows.shape[0] * (self.token_kv_bytes + self.row_bytes))
        s.last_used = self.clock()
        if rows.shape[0]:
            s.queue.append(rows)
            s.tokens.extend(int(t) for t in up.tokens)
            self.counters["tokens_received"] += rows.shape[0]
        return s

    def _reserve(self, s: CloudSession, extra: int) -> None:
        """Make room for `extra` bytes more in session s (KV and queue, worst case) or refuse."""
        bound = self.limits.max_bytes
        if self.session_bytes(s) + extra > bound:
            self.sessions.pop(s.spec.session, None)
            raise self._refuse("memory", f"session {s.spec.session} would hold {self.session_bytes(s) + extra} "
                                         f"bytes, over the cloud's bound of {bound}: session dropped")
        while self.used_bytes + extra > bound:
            self._evict_lru(keep=s.spec.session)

    def _evict_lru(self, keep: str | None) -> None:
        others = [x for x in self.sessions.values() if x.spec.session != keep]
        victim = min(others, key=lambda x: x.last_used)
        del self.sessions[victim.spec.session]
        self.counters["sessions_evicted"] += 1

    def _expire(self) -> int:
        now = self.clock()
        dead = [k for k, s in self.sessions.items() if now - s.last_used > self.limits.session_ttl_s]
        for k in dead:
            del self.sessions[k]
        self.counters["sessions_expired"] += len(dead)
        return len(dead)

    def _refuse(self, code: str, message: str) -> CloudError:
        self.counters["refused"] += 1
        return CloudError(code, message)


class InProcessTransport:
    """The edge's CloudTransport over a CloudContextManager in the same process (tests, benchmarks).

    `fail_after` makes every call after that many raise CloudUnavailable (an emulated lost link).
    """

    def __init__(self, manager: CloudContextManager, fail_after: int | None = None):
        self.manager, self.fail_after, self.calls = manager, fail_after, 0

    def _call(self, fn, *args):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise CloudUnavailable(f"the in-process link is down (after {self.fail_after} call(s))")
        try:
            return fn(*args)
        except CloudError as e:
            raise CloudRefused(f"cloud refused ({e.code}): {e}") from None

    def open(self, spec: SessionSpec) -> None:
        self._call(self.manager.open, spec)

    def append(self, up: Upload) -> None:
        self._call(self.manager.append, up)

    @torch.inference_mode()
    def infer(self, up: Upload) -> CloudAnswer:
        return self._call(self.manager.infer, up)

    def close(self, session: str) -> None:
        self._call(self.manager.close, session)
