"""A long-lived serving group: the model loaded once, requests over gRPC (proto/inference.proto), one at a time.

Rank 0 owns the group. Its engine thread takes one request at a time from a short queue (the API layer keeps
the real queue), sends `Reset` so every rank empties its KV cache, then runs the shared decode loop with a
sampler built from that request's own sampling fields, streaming a token event per token. Between requests it
sends `Ping` often enough that no other rank's bounded wait for the next message runs out. Ranks > 0 run the
engine's message loop until `Stop`.

Failures are bounded: a cancelled call (client gone, deadline passed) stops before the next step and the group
serves on; a peer rank that dies makes the step's collective fail within run.timeout_s, the request ends with
UNAVAILABLE, and the process leaves with a non-zero status (the group cannot be repaired in place; its
supervisor reports it and the coordinator re-plans). World size 1 (a model directory, or 1-node shards) runs the
same service without collectives.

In serve mode the RunConfig's prompt_ids, max_new_tokens, sampling and logprobs are not used: each request
carries its own. The KV budget behind --memory-mb is sized for the model's whole context.

A group started with exit heads (RunConfig.exits) also serves early-exit requests: each names its mode and
threshold; the heads, the split k and the cloud tier are the group's. Each token event says where the token was
answered, and the final event how many were answered where and whether the cloud tier was reachable.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import torch

from edge_node.collectives import Comm, CommError
from edge_node.engine import RankEngine
from edge_node.inference_client import (
    FIELD_METADATA,
    ExitUsage,
    FinalEvent,
    GenerateParams,
    Health,
    TokenEvent,
    event_to_pb,
    health_to_pb,
    params_from_pb,
)
from edge_node.model.decode import decode_loop, top_logprobs
from edge_node.model.errors import EdgefedError, NonFiniteError, UsageError
from edge_node.model.formats import TORCH_NAMES
from edge_node.model.generation_config import eos_ids, repetition_penalty
from edge_node.model.sampling import Sampler, SamplingConfig
from edge_node.rpc import inference_pb2_grpc as pb_grpc
from edge_node.run_config import EarlyExitOptions, RunConfig
from edge_node.serving_requests import Limits, RequestError, check_request  # re-exported here too
from edge_node.shard import Manifest, ShardError

MAX_QUEUE = 32  # requests waiting for the group beyond the running one (RESOURCE_EXHAUSTED past it)
_POLL_S = 0.2  # how often idle loops look at their flags


class GroupBackend:
    """Rank 0 of a tensor-parallel group over shards (or 1-node shards): steps run across every rank."""

    def __init__(self, engine: RankEngine):
        self.engine, self.config, self.world = engine, engine.cfg, engine.comm.world
        self.eos = eos_ids(engine.run.shards, engine.cfg)
        self.exit_options, self.exit_heads = engine.run.exits, engine.exit_heads
        self.digest = engine.manifest.weights_digest or ""

    def generate_exits(self, opts: EarlyExitOptions, prompt: list[int], max_new_tokens: int,
                       sampling: SamplingConfig, eos: tuple[int, ...], on_record, request_id: str):
        """One early-exit generation across the group (rank 0 decides every exit; see engine.LeadStack)."""
        from edge_node.cloud_link import generate_early_exit

        engine, heads = self.engine, self.exit_heads
        return generate_early_exit(engine.model, heads, opts, prompt, max_new_tokens, sampling, eos, self.digest,
                                   on_record=on_record, make_stepper=lambda policy, end, keep: engine.exit_stepper(
                                       heads, policy, end, keep, request_id))

    def reset(self, request_id: str) -> None:
        self.engine.reset(request_id)

    def step(self, ids: list[int], pos0: int) -> torch.Tensor:
        return self.engine.step(ids, pos0)

    def ping(self) -> None:
        self.engine.ping()

    def stop(self) -> None:
        self.engine.stop()

    def close(self) -> None:
        self.engine.close()


class LocalBackend:
    """A whole model directory in this process (world size 1): one KV cache, reused request after request."""

    def __init__(self, run: RunConfig):
        from quant.checkpoint import load_any

        self.model = load_any(run.model, TORCH_NAMES[run.dtype or "float32"], pack=True)
        self.config, self.world = self.model.config, 1
        self.eos = eos_ids(run.model, self.config)
        self.cache = self.model.new_cache()
        self.exit_options, self.exit_heads, self.digest = run.exits, None, ""
        if run.exits is not None and run.exits.exits is not None:
            from edge_node.early_exit import load_exit_heads

            heads = run.exits.exits
            self.exit_heads = load_exit_heads(run.model if heads == "auto" else heads, self.config)
            run.exits.check_layers(self.exit_heads.layers, str(heads))
        if run.exits is not None and run.exits.cloud:
            from edge_node.model.formats import weights_digest

            self.digest = weights_digest(run.model)

    def generate_exits(self, opts: EarlyExitOptions, prompt: list[int], max_new_tokens: int,
                       sampling: SamplingConfig, eos: tuple[int, ...], on_record, request_id: str):
        """One early-exit generation on the whole model here (its own DeferredStack and KV cache)."""
        from edge_node.cloud_link import generate_early_exit

        return generate_early_exit(self.model, self.exit_heads, opts, prompt, max_new_tokens, sampling, eos,
                                   self.digest, on_record=on_record)

    def reset(self, request_id: str) -> None:
        self.cache.truncate(0)

    @torch.inference_mode()
    def step(self, ids: list[int], pos0: int) -> torch.Tensor:
        return self.model(torch.tensor([ids], dtype=torch.long), self.cache, pos0, last_only=True)[0, -1]

    def ping(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


Backend = GroupBackend | LocalBackend


@dataclass(frozen=True)
class Failure:
    """A request that ended in an error: the gRPC status and its message."""

    code: grpc.StatusCode
    message: str


class Job:
    """One request on its way through the group; events go to the gRPC handler through `events`."""

    def __init__(self, params: GenerateParams, sampling: SamplingConfig):
        self.params, self.sampling = params, sampling
        self.events: queue.Queue[TokenEvent | FinalEvent | Failure] = queue.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.exits: ExitUsage | None = None  # an early-exit request: where its tokens were answered so far

    def cancel(self) -> None:
        self.cancelled.set()


class _Cancelled(Exception):
    """Raised inside the decode loop, before a step, to end a generation nobody waits for."""


class ServingGroup:
    """Rank 0's side: a bounded queue of requests in front of one backend, run by `run()` in one thread."""

    def __init__(self, backend: Backend, ping_s: float, config_sha256: str, default_penalty: float = 1.0,
                 max_queue: int = MAX_QUEUE):
        self.backend, self.ping_s, self.config_sha256 = backend, ping_s, config_sha256
        cfg = backend.config
        heads, opts = getattr(backend, "exit_heads", None), getattr(backend, "exit_options", None)
        self.limits = Limits(cfg.vocab_size, cfg.max_position_embeddings, default_penalty,
                             tuple(heads.layers) if heads is not None else (), bool(opts is not None and opts.cloud),
                             opts)
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job] = queue.Queue(max_queue)
        self._current: Job | None = None
        self._stopping = False
        self.served = 0
        self.failure: BaseException | None = None
        self.done = threading.Event()

    # --- called from gRPC threads and signal handlers
    def submit(self, job: Job) -> None:
        """Queue a job, or raise GroupUnavailable (queue full, stopping, failed)."""
        if self._stopping or self.done.is_set():
            raise GroupUnavailable(grpc.StatusCode.UNAVAILABLE, "the server is stopping" if self.failure is None
                                   else f"the serving group failed: {self.failure}")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise GroupUnavailable(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{self.max_queue} requests are already waiting") from None

    def shutdown(self) -> None:
        """Stop after the running request (cancelled at its next step); signal-safe: it only sets flags."""
        self._stopping = True
        job = self._current
        if job is not None:
            job.cancelled.set()

    def health(self) -> Health:
        cfg = self.backend.config
        return Health(ready=not (self._stopping or self.done.is_set()), world_size=self.backend.world,
                      vocab_size=cfg.vocab_size, max_positions=cfg.max_position_embeddings,
                      eos_token_ids=tuple(self.backend.eos), config_sha256=self.config_sha256,
                      queued=self._jobs.qsize(), busy=self._current is not None, served=self.served,
                      exit_layers=self.limits.exit_layers, exit_cloud=self.limits.exit_cloud)

    # --- the engine thread
    def run(self) -> None:
        """Serve until shutdown(); raises (after failing the running request) when the group breaks."""
        last = time.monotonic()
        try:
            while not self._stopping:
                try:
                    job = self._jobs.get(timeout=_POLL_S)
                except queue.Empty:
                    if time.monotonic() - last >= self.ping_s:
                        self.backend.ping()
                        last = time.monotonic()
                    continue
                self._current = job
                try:
                    self._run(job)
                finally:
                    self._current, last = None, time.monotonic()
            self.backend.stop()
        except BaseException as e:
            self.failure = e
            raise
        finally:
            self._stopping = True
            self._drain()
            self.done.set()

    def _drain(self) -> None:
        why = "the server is stopping" if self.failure is None else f"the serving group failed: {self.failure}"
        while True:
            try:
                self._jobs.get_nowait().events.put(Failure(grpc.StatusCode.UNAVAILABLE, why))
            except queue.Empty:
                return

    def _run(self, job: Job) -> None:
        p, start = job.params, time.perf_counter()
        queue_ms = (start - job.submitted) * 1e3
        times: list[float] = []
        if job.cancelled.is_set() or self._stopping:  # gone while queued: the group is not touched
            job.events.put(self._final(p, "cancelled", times, start, queue_ms))
            return
        try:
            exits = p.early_exit is not None and p.early_exit.mode != "off"
            reason = self._generate_exits(job, times) if exits else self._generate(job, times)
        except _Cancelled:
            reason = "cancelled"
        except NonFiniteError as e:  # found on rank 0 after a complete step: the group stays consistent
            job.events.put(Failure(grpc.StatusCode.INTERNAL, str(e)))
            return
        except CommError as e:
            job.events.put(Failure(grpc.StatusCode.UNAVAILABLE, f"a peer rank is gone or stalled: {e}"))
            raise
        except Exception as e:  # the group's state is unknown: fail the request, then the process
            job.events.put(Failure(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))
            raise
        self.served += 1
        job.events.put(self._final(p, reason, times, start, queue_ms, job.exits))

    def _generate(self, job: Job, times: list[float]) -> str:
        p, backend = job.params, self.backend
        backend.reset(p.request_id)
        stops, eos = set(p.stop_token_ids), set(backend.eos)
        last: list[torch.Tensor] = []
        t_prev = time.perf_counter()
        where = f"edge@{self.backend.config.num_layers}" if p.early_exit is not None else ""  # early_exit off
        if where:
            job.exits = ExitUsage()

        def step(ids: list[int], pos0: int) -> torch.Tensor:
            if job.cancelled.is_set() or self._stopping:
                raise _Cancelled
            logits = backend.step(ids, pos0)
            last[:] = [logits]
            return logits

        def on_token(token: int) -> None:
            nonlocal t_prev
            now = time.perf_counter()
            times.append(now)
            lp = top_logprobs(last[0], token, p.logprobs) if p.logprobs else None
            job.events.put(TokenEvent(token, len(times) - 1, (now - t_prev) * 1e3,
                                      None if lp is None else lp["logprob"],
                                      () if lp is None else tuple((t["token_id"], t["logprob"])
                                                                  for t in lp["top_logprobs"]),
                                      exit=where, cloud="none" if where else ""))
            if where:
                job.exits = ExitUsage(((where, len(times)),))
            t_prev = now

        result = decode_loop(step, list(p.prompt_ids), p.max_new_tokens, Sampler(job.sampling), eos | stops,
                             self.limits.max_positions, on_token)
        if result.stop_reason == "eos":
            return "eos" if result.token_ids[-1] in eos else "stop"
        return result.stop_reason

    def _generate_exits(self, job: Job, times: list[float]) -> str:
        """An early-exit request: the group's heads, split and cloud tier, the request's mode and threshold."""
        p, backend, ee = job.params, self.backend, job.params.early_exit
        opts = replace(backend.exit_options, mode=ee.mode, threshold=ee.threshold, criterion=ee.criterion)
        eos = set(backend.eos)
        answered: dict[str, int] = {}
        job.exits = ExitUsage()
        t_prev = time.perf_counter()

        def on_record(rec, result) -> None:
            nonlocal t_prev
            now = time.perf_counter()
            times.append(now)
            answered[rec.key] = answered.get(rec.key, 0) + 1
            job.exits = ExitUsage(tuple(sorted(answered.items())), result.cloud, result.cloud_error)
            job.events.put(TokenEvent(rec.token, len(times) - 1, (now - t_prev) * 1e3, exit=rec.key,
                                      cloud=result.cloud, cloud_error=result.cloud_error))
            t_prev = now
            if job.cancelled.is_set() or self._stopping:
                raise _Cancelled

        result = backend.generate_exits(opts, list(p.prompt_ids), p.max_new_tokens, job.sampling,
                                        (*eos, *p.stop_token_ids), on_record, p.request_id)
        if result.stop_reason == "eos":
            return "eos" if result.token_ids[-1] in eos else "stop"
        return result.stop_reason

    @staticmethod
    def _final(p: GenerateParams, reason: str, times: list[float], start: float, queue_ms: float,
               exits: ExitUsage | None = None) -> FinalEvent:
        end = time.perf_counter()
        gaps = [(b - a) * 1e3 for a, b in zip(times, times[1:], strict=False)]
        return FinalEvent(p.request_id, reason, len(p.prompt_ids), len(times), round(queue_ms, 3),
                          round((times[0] - start) * 1e3, 3) if times else 0.0,
                          round(sum(gaps) / len(gaps), 3) if gaps else 0.0, round((end - start) * 1e3, 3), exits)


class GroupUnavailable(EdgefedError):
    """The group takes no request now (queue full, stopping, failed)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class InferenceServicer(pb_grpc.InferenceServicer):
    """Thin: parse and check the request, queue it, relay the group's events; cancel when the caller leaves.
    With `allowed_peers`, only callers presenting one of those certificate names are served (mutual TLS)."""

    def __init__(self, group: ServingGroup, allowed_peers: tuple[str, ...] | None = None):
        self.group, self.allowed_peers = group, allowed_peers

    def _authorize(self, context) -> None:
        if self.allowed_peers is not None:
            from edge_node.tls import require_peer

            require_peer(context, *self.allowed_peers)

    def Health(self, request, context):
        self._authorize(context)
        return health_to_pb(self.group.health())

    def Generate(self, request, context) -> Iterator:
        self._authorize(context)
        try:
            params = self.group.limits.with_exit_defaults(params_from_pb(request))
            job = Job(params, check_request(params, self.group.limits))
            self.group.submit(job)
        except RequestError as e:
            context.set_trailing_metadata(((FIELD_METADATA, e.field),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except GroupUnavailable as e:
            context.abort(e.code, str(e))
        context.add_callback(job.cancel)  # the client cancelled, its deadline passed, or it disconnected
        try:
            yield from self._relay(job, context)
        finally:
            job.cancel()  # a no-op once finished

    def _relay(self, job: Job, context) -> Iterator:
        while True:
            try:
                event = job.events.get(timeout=_POLL_S)
            except queue.Empty:
                if not context.is_active():
                    return
                if self.group.done.is_set() and job.events.empty():  # the engine ended without answering
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"the serving group stopped: {self.group.failure}")
                continue
            if isinstance(event, Failure):
                context.abort(event.code, event.message)
            yield event_to_pb(event)
            if isinstance(event, FinalEvent):
                return


def start_server(group: ServingGroup, listen: str, credentials: grpc.ServerCredentials | None,
                 allowed_peers: tuple[str, ...] | None) -> tuple[grpc.Server, str]:
    """A gRPC server for the group on `listen` (port 0: a free one); returns it and the bound HOST:PORT."""
    from concurrent import futures

    workers = group.max_queue + 4  # every queued request holds a thread while it waits
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference"),
                         maximum_concurrent_rpcs=workers)
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(group, allowed_peers), server)
    try:
        port = (server.add_secure_port(listen, credentials) if credentials is not None
                else server.add_insecure_port(listen))
    except RuntimeError as e:
        raise UsageError(f"--listen {listen}: cannot bind ({e})") from None
    if not port:
        raise UsageError(f"--listen {listen}: cannot bind")
    server.start()
    return server, f"{listen.rpartition(':')[0]}:{port}"


def write_ready(path: str | Path | None, info: dict) -> None:
    """The ready file, written whole (aside, then renamed), so a reader never sees half of it."""
    if path is None:
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def _join_group(run: RunConfig, rank: int, master: str | None, iface: str | None) -> RankEngine:
    """Load this rank's shards and form the group; every rank then reports its config digest (a barrier:
    rank 0 is ready only once every rank has loaded)."""
    manifest = Manifest.load(run.shards, rank=rank)  # a node may hold only this rank's files
    if manifest.nodes > 1 and not master:
        raise UsageError(f"{run.shards} is sharded for {manifest.nodes} nodes: give --master HOST:PORT")
    if not 0 <= rank < manifest.nodes:
        raise UsageError(f"--rank {rank}: {run.shards} is sharded for ranks 0..{manifest.nodes - 1}")
    comm = Comm(rank, manifest.nodes, master or "127.0.0.1:0", run.timeout_s, run.allreduce, iface=iface)
    engine = RankEngine(run, comm, manifest.config.max_position_embeddings, manifest)
    stats = comm.gather_message(engine.stats(), "ready handshake (every rank loaded)")
    if stats is not None:
        other = [s.rank for s in stats if s.config_sha256 != run.sha256]
        if other:
            raise ShardError(f"rank(s) {other} run another configuration than rank 0 (config_sha256 differs)")
    return engine


@dataclass(frozen=True)
class ServeOptions:
    listen: str = "127.0.0.1:0"
    credentials: grpc.ServerCredentials | None = None
    allowed_peers: tuple[str, ...] | None = None  # certificate names served (with credentials)
    ready_file: str | None = None
    iface: str | None = None


class Serving:
    """One `edgefed serve` process: load and join, serve until shutdown() or a broken group.

    `run()` returns the process's exit status: 0 after shutdown(), 2 when the group broke (the caller should
    leave with os._exit then: a gloo group with a dead peer cannot be torn down cleanly).
    """

    def __init__(self, run: RunConfig, rank: int = 0, master: str | None = None,
                 options: ServeOptions | None = None):
        if run.prefill is not None:
            raise UsageError("serve: ONNX Runtime prefill is not supported in serve mode yet (drop prefill)")
        if run.exits is not None and run.exits.exits is None:
            raise UsageError("serve: early exit needs exit heads (exits.exits: an exits.json, or auto)")
        self.run_config, self.rank, self.master = run, rank, master
        self.options = options or ServeOptions()
        self._stop = False
        self.error: BaseException | None = None

    def shutdown(self) -> None:
        """Signal-safe: flags only."""
        self._stop = True
        group = getattr(self, "group", None)
        if group is not None:
            group.shutdown()

    def run(self) -> int:
        run = self.run_config
        if self.options.ready_file:  # a file left by an earlier run would announce a server not yet there
            Path(self.options.ready_file).unlink(missing_ok=True)
        if run.threads:
            torch.set_num_threads(run.threads)
        if run.model is not None:
            if self.rank != 0:
                raise UsageError("serve: a model directory runs as one rank (rank 0); shard it for more")
            backend: Backend = LocalBackend(run)
            engine = None
        else:
            engine = _join_group(run, self.rank, self.master, self.options.iface)
            backend = GroupBackend(engine)
        if self.rank != 0:
            return self._follow(engine)
        return self._lead(backend)

    def _lead(self, backend: Backend) -> int:
        run, o = self.run_config, self.options
        self.group = ServingGroup(backend, min(5.0, run.timeout_s / 4), run.sha256,
                                  repetition_penalty(run.model or run.shards))
        server, address = start_server(self.group, o.listen, o.credentials, o.allowed_peers)
        host, _, port = address.rpartition(":")
        write_ready(o.ready_file, {"rank": 0, "world": backend.world, "address": address, "host": host,
                                   "port": int(port), "tls": o.credentials is not None, "pid": os.getpid(),
                                   "config_sha256": run.sha256})
        worker = threading.Thread(target=self._engine, name="engine", daemon=True)
        worker.start()
        if self._stop:  # a signal that came while loading
            self.group.shutdown()
        while worker.is_alive() and not self._stop:
            worker.join(_POLL_S)
        if self._stop:  # bounded: the running request ends at its next step, a stalled one within the timeout
            worker.join(run.timeout_s + 5)
        server.stop(grace=2).wait(5)
        if self.error is not None or worker.is_alive():
            return 2
        backend.close()
        if engine := getattr(backend, "engine", None):
            engine.comm.close()
        return 0

    def _engine(self) -> None:
        try:
            self.group.run()
        except BaseException as e:  # reported by the caller; the process exits non-zero
            self.error = e

    def _follow(self, engine: RankEngine) -> int:
        """Ranks > 0: serve rank 0's messages in a thread, so that a signal is handled at once."""
        write_ready(self.options.ready_file, {"rank": self.rank, "world": engine.comm.world, "address": None,
                                              "pid": os.getpid(), "config_sha256": self.run_config.sha256})

        def follow() -> None:
            try:
                engine.serve()
            except BaseException as e:
                self.error = e

        worker = threading.Thread(target=follow, name="engine", daemon=True)
        worker.start()
        while worker.is_alive() and not self._stop:
            worker.join(_POLL_S)
        if self._stop and worker.is_alive():
            return 0  # leaving mid-wait: rank 0 sees the peer gone and reports it
        if self.error is not None:
            return 2
        engine.close()
        engine.comm.close()
        return 0
