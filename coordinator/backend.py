"""What the user API asks of whatever runs a model: one generation request in token ids, events back.

The API layer (coordinator/api.py) owns text: tokenizing, chat templates, stop strings, detokenizing. A backend
sees only ids, so a remote one (ranks on device nodes, over gRPC) and the in-process one here are
interchangeable. A backend is any object with

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]

an async iterator (an `async def` with `yield` is the usual way) that yields one TokenEvent per generated
token, in order, then exactly one FinishEvent, then stops. Failures raise BackendError (or PromptError for a
prompt the model cannot take). The caller may stop early, at any point, by `aclose()` or by cancelling the
task awaiting it: the backend must then stop generating (LocalBackend stops between two tokens). Every wait
for a next event is bounded by the caller; a backend need not time out on its own, but may.

A remote backend is a thin adapter: send the request, turn each streamed token id into a TokenEvent and the
final message into a FinishEvent, and cancel the call in a `finally:`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge_node.model.errors import EdgefedError, UsageError

# a model EOS id; one of the request's stop ids; max_new_tokens reached; the context is full. Any other reason
# (a remote "cancelled") is a failure to the API.
FINISH_REASONS = ("eos", "stop", "length", "context")


class BackendError(EdgefedError):
    """The backend failed to produce a generation (a rank died, a node was lost, the model raised)."""


EXIT_MODES = ("standalone", "collaborative", "off")


@dataclass(frozen=True)
class EarlyExitRequest:
    """A request's early exit (a deployment with exit heads only): "off" is the full model's tokens exactly."""

    mode: str = "standalone"  # | "collaborative" (layers [k, L) on the cloud tier) | "off"
    threshold: float = 0.9  # a token leaves at an exit iff its confidence is strictly greater
    criterion: str = "max_prob"  # | "margin"

    def __post_init__(self):
        if self.mode not in EXIT_MODES:
            raise UsageError(f"early_exit.mode must be one of {', '.join(EXIT_MODES)}, got {self.mode!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UsageError(f"early_exit.threshold must be in [0, 1], got {self.threshold}")


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None  # None: a fresh random seed
    stop_ids: tuple[int, ...] = ()  # ids that end the generation (as the model's EOS ids do), kept in the output
    repetition_penalty: float | None = None  # None: the model's generation_config.json default
    request_id: str = ""
    early_exit: EarlyExitRequest | None = None  # None: the plain model (a backend without exit heads takes only that)

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(self.prompt_ids))
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise UsageError(f"top_p must be in [0, 1], got {self.top_p}")


@dataclass(frozen=True)
class ExitInfo:
    """Where an early-exit token was answered ("edge@15", "edge-fallback@20", "cloud") and the cloud tier's state
    so far ("used", "lost", "unreachable"; "none" when no cloud is involved)."""

    where: str
    cloud: str = "none"
    cloud_error: str = ""


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    exit: ExitInfo | None = None  # set for a request with early_exit


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # one of FINISH_REASONS
    ttft_ms: float = 0.0  # as the backend measured it (prompt in -> first token), queueing excluded
    tpot_ms: float = 0.0  # mean per-token time after the first


class Backend(Protocol):
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        """TokenEvent per token, then one FinishEvent; closing the iterator early cancels the generation."""
        ...


class _Cancelled(Exception):
    """Raised inside the decode loop (from its per-token callback) to stop a generation nobody waits for."""


@dataclass(frozen=True)
class _Failure:
    error: Exception


def sampling_for(request: GenerationRequest, default_penalty: float):
    """The runtime's SamplingConfig for a request: temperature 0 (or top_p 0) is greedy, as OpenAI's API reads it."""
    from edge_node.model.sampling import SamplingConfig

    penalty = default_penalty if request.repetition_penalty is None else request.repetition_penalty
    if request.temperature == 0 or request.top_p == 0:
        return SamplingConfig(greedy=True, repetition_penalty=penalty)
    return SamplingConfig(greedy=False, temperature=request.temperature, top_p=request.top_p, seed=request.seed,
                          repetition_penalty=penalty)


class LocalBackend:
    """A model in this process: single-node generation in a worker thread per request, cancellable between tokens.

    The model is loaded once (float or edgefed-quantized checkpoint) and shared; each request has its own KV cache.
    With `adapter` (a PEFT LoRA directory, e.g. a federated session's OUT/round-NNNN), the adapter is merged into
    the float weights as they load (edge_node.adapters.load_adapted, checked against the base first): serve it
    beside the base under `edge_node.adapters.adapted_name(base, adapter)`.
    With `exits` (an exits.json from `edgefed train-exits`, or "auto": the one beside the model), requests may ask
    for early exit (GenerationRequest.early_exit); `cloud` (HOST:PORT of `edgefed cloud-serve`) enables the
    collaborative mode, with the split k = `split` or the last exit layer.
    """

    def __init__(self, model_dir: str | Path, dtype: str = "float32", threads: int | None = None, pack: bool = True,
                 adapter: str | Path | None = None, exits: str | Path | None = None, cloud: str | None = None,
                 split: int | None = None, cloud_timeout_s: float = 10.0):
        import torch

        from edge_node.model.formats import TORCH_NAMES
        from edge_node.model.generation_config import eos_ids, repetition_penalty
        from quant.checkpoint import load_any

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = Path(model_dir)
        self.adapter = Path(adapter) if adapter is not None else None
        if self.adapter is None:
            self.model = load_any(self.model_dir, TORCH_NAMES[dtype], pack=pack)
        else:
            from edge_node.adapters import load_adapted

            self.model = load_adapted(self.model_dir, self.adapter, TORCH_NAMES[dtype], pack=pack)
        self.eos_ids = eos_ids(self.model_dir, self.model.config)
        self.repetition_penalty = repetition_penalty(self.model_dir)
        self.context_length = self.model.config.max_position_embeddings
        self._init_exits(exits, cloud, split, cloud_timeout_s)
        self._workers: dict[threading.Thread, threading.Event] = {}  # running generations and their cancel flags
        self._lock = threading.Lock()

    def _init_exits(self, exits: str | Path | None, cloud: str | None, split: int | None, timeout_s: float) -> None:
        from edge_node.early_exit import load_exit_heads

        self.exit_heads, self.cloud, self.split, self.cloud_timeout_s = None, cloud, split, timeout_s
        self.model_digest = ""
        if exits is None:
            if cloud is not None or split is not None:
                raise UsageError("a cloud address or a split needs exit heads (exits)")
            return
        self.exit_heads = load_exit_heads(self.model_dir if str(exits) == "auto" else Path(exits), self.model.config)
        if split is not None and not 0 < split < self.model.config.num_layers:
            raise UsageError(f"the split k must be in [1, {self.model.config.num_layers}), got {split}")
        if cloud is not None:
            from edge_node.model.formats import weights_digest

            self.model_digest = weights_digest(self.model_dir)

    @property
    def exit_layers(self) -> tuple[int, ...]:
        """The layers with an exit head (empty: this backend takes no early_exit requests)."""
        return tuple(self.exit_heads.layers) if self.exit_heads is not None else ()

    def _exit_options(self, ee: EarlyExitRequest):
        from edge_node.cloud_link import EarlyExitOptions

        if self.exit_heads is None:
            raise UsageError("early_exit: this deployment has no exit heads")
        if ee.mode == "collaborative" and self.cloud is None:
            raise UsageError("early_exit.mode: collaborative needs a cloud tier, and this deployment has none")
        return EarlyExitOptions(exits="loaded", threshold=ee.threshold, criterion=ee.criterion, mode=ee.mode,
                                cloud=self.cloud, split=self.split, timeout_s=self.cloud_timeout_s)

    @property
    def active(self) -> int:
        """Generations whose worker thread is still running (0 once every cancelled one has stopped)."""
        with self._lock:
            return len(self._workers)

    def close(self, timeout_s: float = 10.0) -> None:
        """Cancel every generation and wait for its thread, so none is inside torch when the process exits."""
        with self._lock:
            workers = list(self._workers.items())
        for _, cancel in workers:
            cancel.set()
        for thread, _ in workers:
            thread.join(timeout_s)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        sampling = sampling_for(request, self.repetition_penalty)  # bad values fail here, before a thread starts
        ee = request.early_exit
        opts = self._exit_options(ee) if ee is not None and ee.mode != "off" else None
        full_layers = self.model.config.num_layers

        def post(event: object) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shut down): nobody is listening
                cancel.set()

        def on_token(token: int) -> None:
            if cancel.is_set():
                raise _Cancelled
            post(TokenEvent(token, None if ee is None else ExitInfo(f"edge@{full_layers}")))

        def on_record(rec, result) -> None:
            if cancel.is_set():
                raise _Cancelled
            post(TokenEvent(rec.token, ExitInfo(rec.key, result.cloud, result.cloud_error)))

        def run():
            if opts is None:
                from edge_node.model.decode import generate

                return generate(self.model, request.prompt_ids, request.max_new_tokens, sampling,
                                (*self.eos_ids, *request.stop_ids), on_token=on_token)
            from edge_node.cloud_link import generate_early_exit

            return generate_early_exit(self.model, self.exit_heads, opts, request.prompt_ids, request.max_new_tokens,
                                       sampling, (*self.eos_ids, *request.stop_ids), self.model_digest,
                                       on_record=on_record)

        def work() -> None:
            try:
                result = run()
                if opts is None:
                    post(FinishEvent(result.stop_reason, result.ttft_ms, result.tpot_ms))
                else:
                    ms = [r.edge_ms + r.cloud_ms for r in result.records]
                    post(FinishEvent(result.stop_reason, ms[0] if ms else 0.0,
                                     sum(ms[1:]) / (len(ms) - 1) if len(ms) > 1 else 0.0))
            except _Cancelled:
                pass
            except Exception as e:  # any failure reaches the caller as an event, never a dead thread
                post(_Failure(e))
            finally:
                with self._lock:
                    self._workers.pop(threading.current_thread(), None)

        thread = threading.Thread(target=work, name=f"generate-{request.request_id or id(request)}", daemon=True)
        with self._lock:
            self._workers[thread] = cancel
        thread.start()
        try:
            while True:
                event = await events.get()
                if isinstance(event, _Failure):
                    if isinstance(event.error, EdgefedError):
                        raise event.error
                    raise BackendError(f"generation failed: {type(event.error).__name__}: {event.error}")
                yield event
                if isinstance(event, FinishEvent):
                    return
        finally:
            cancel.set()  # the worker stops at its next token
