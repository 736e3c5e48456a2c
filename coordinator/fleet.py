"""The coordinator's deployments as the HTTP API sees them: a model name answered by its newest deployment,
through a Backend that calls the serving group's rank 0 (edge_node.inference_client).

When the group fails mid-request (a rank crashed, a node was lost: the deployment turns failed or degraded,
seen by polling its state while tokens stream, or the call itself fails), the request is retried on the
deployment that re-planning puts in its place (coordinator.recovery), continuing from the tokens already
sent: the prompt plus those tokens is the new prompt, so a greedy continuation is the same text the
uninterrupted run would have given. All of it within `retry_timeout_s`; past that, or when no replacement
can come (re-planning gave up or is off), the request ends with a BackendError naming the cause.

RequestRecorder wraps the HTTP app so that every completion request leaves a record in the state, whether
it reached a deployment or not: done, failed (a client error such as an unknown model or a bad field, or a
backend error; with the HTTP status and the error message) or cancelled (the client went away). The backend
fills in what only it knows (the deployment that answered, token counts) through a context variable.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from coordinator.api import Deployment
from coordinator.backend import BackendError, ExitInfo, FinishEvent, GenerationRequest, TokenEvent
from coordinator.state import DeploymentRecord, RequestRecord, State
from edge_node.inference_client import ExitParams, FinalEvent, GenerateParams, InferenceClient, InferenceError
from edge_node.inference_client import TokenEvent as WireToken
from edge_node.model.errors import PromptError

_REASONS = {"eos": "eos", "stop": "eos", "length": "length", "context": "context"}
_FINAL = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
          grpc.StatusCode.PERMISSION_DENIED)
GAVE_UP = "not re-planned"  # coordinator.recovery's word in a deployment's detail when no replacement will come
log = logging.getLogger("edgefed.coordinator")


@dataclass
class RequestLog:
    """What the backend learns of the HTTP request being served (RequestRecorder reads it at the end)."""

    request_id: str
    deployment_id: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: str = ""  # the backend's: done | failed | cancelled ("": no backend was reached)
    error: str = ""


_REQUEST: contextvars.ContextVar[RequestLog | None] = contextvars.ContextVar("edgefed_request", default=None)


class _GroupLost(Exception):
    """The serving group failed under a request; a replacement may take it over."""


class RemoteBackend:
    """coordinator.backend's Backend for one model name, over its newest deployment's rank 0."""

    def __init__(self, name: str, resolve: Callable[[], DeploymentRecord | None],
                 make_client: Callable[[DeploymentRecord], InferenceClient], state: State | None = None,
                 replan: bool = True, retry_timeout_s: float = 120.0, poll_s: float = 0.5, timeout_s: float = 600.0):
        self.name, self.resolve, self.make_client, self.state = name, resolve, make_client, state
        self.replan, self.retry_timeout_s, self.poll_s, self.timeout_s = replan, retry_timeout_s, poll_s, timeout_s
        self._lock = threading.Lock()
        self._clients: dict[str, InferenceClient] = {}

    def client(self, dep: DeploymentRecord) -> InferenceClient:
        with self._lock:
            for old in [k for k in self._clients if k != dep.deployment_id]:  # a replaced group's channel
                self._clients.pop(old).close()
            if dep.deployment_id not in self._clients:
                self._clients[dep.deployment_id] = self.make_client(dep)
            return self._clients[dep.deployment_id]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        """The generation, recorded in the state as a request (done, failed or cancelled, with its counts):
        through the HTTP request's RequestLog when RequestRecorder serves it, else as a record of its own."""
        rec = _REQUEST.get()
        own = rec is None and self.state is not None
        if rec is None:
            rec = RequestLog(request.request_id or f"req-{uuid.uuid4().hex[:16]}")
        dep = self.resolve()
        rec.deployment_id, rec.prompt_tokens, rec.completion_tokens = dep.deployment_id if dep else "", \
            len(request.prompt_ids), 0
        if own:
            self.state.add_request(RequestRecord(rec.request_id, rec.deployment_id, time.time(), "running",
                                                 rec.prompt_tokens))
        rec.status, rec.error = "cancelled", ""
        try:
            async for event in self._generate(request, rec):
                rec.completion_tokens += isinstance(event, TokenEvent)
                rec.status = "done" if isinstance(event, FinishEvent) else rec.status
                yield event
        except Exception as e:
            rec.status, rec.error = "failed", str(e)
            raise
        finally:
            if own:
                self.state.finish_request(rec.request_id, rec.status, time.time(), rec.prompt_tokens,
                                          rec.completion_tokens, rec.error, deployment_id=rec.deployment_id)

    async def _generate(self, request: GenerationRequest, rec: RequestLog) -> AsyncIterator[TokenEvent | FinishEvent]:
        produced: list[int] = []
        deadline = time.monotonic() + self.retry_timeout_s
        cause = ""
        while True:
            dep = await self._running(deadline, cause)
            rec.deployment_id = dep.deployment_id  # the one answering (a replacement after a retry)
            part = replace(request, prompt_ids=(*request.prompt_ids, *produced),
                           max_new_tokens=request.max_new_tokens - len(produced))
            try:
                async for event in self._once(dep, part):
                    if isinstance(event, TokenEvent):
                        produced.append(event.token_id)
                    yield event
                    if isinstance(event, FinishEvent):
                        return
                raise _GroupLost(f"deployment {dep.deployment_id}: the stream ended without a final event")
            except _GroupLost as e:
                cause = str(e)
                if not self.replan:
                    raise BackendError(cause) from None

    async def _running(self, deadline: float, cause: str) -> DeploymentRecord:
        """The model's newest deployment once it runs; BackendError when none will within the deadline."""
        while True:
            dep = self.resolve()
            if dep is None:
                raise BackendError(f"no deployment of {self.name}" + (f" ({cause})" if cause else ""))
            if dep.state == "running":
                return dep
            why = f"deployment {dep.deployment_id} is {dep.state}" + (f": {dep.detail}" if dep.detail else "")
            final = dep.state in ("failed", "degraded") and (not self.replan or GAVE_UP in dep.detail)
            if final or time.monotonic() > deadline:
                waited = "" if final else f" (waited {self.retry_timeout_s:g} s for it to run)"
                raise BackendError(why + waited + (f"; earlier: {cause}" if cause else ""))
            await asyncio.sleep(self.poll_s)

    async def _once(self, dep: DeploymentRecord, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        """One Generate call on `dep`'s rank 0; _GroupLost when the call fails or the group stops running."""
        ee = request.early_exit
        params = GenerateParams(request.prompt_ids, request.max_new_tokens, request.temperature, request.top_p,
                                seed=request.seed, stop_token_ids=request.stop_ids,
                                repetition_penalty=request.repetition_penalty, request_id=request.request_id,
                                early_exit=None if ee is None else ExitParams(ee.mode, ee.threshold, ee.criterion))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stream = self.client(dep).generate(params, timeout_s=self.timeout_s)

        def post(item: object) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody listens
                stream.cancel()

        def work() -> None:
            try:
                for e in stream:
                    post(e)
            except InferenceError as e:
                post(e)
            post(None)

        threading.Thread(target=work, name=f"remote-{request.request_id}", daemon=True).start()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(events.get(), self.poll_s)
                except TimeoutError:
                    self._check_still_running(dep)
                    continue
                if item is None:
                    return
                if isinstance(item, InferenceError):
                    raise self._error(dep, item)
                if isinstance(item, WireToken):  # an early-exit request's tokens say where they were answered
                    yield TokenEvent(item.id, ExitInfo(item.exit, item.cloud, item.cloud_error) if ee else None)
                elif isinstance(item, FinalEvent):
                    if item.stop_reason == "cancelled":
                        raise _GroupLost(f"deployment {dep.deployment_id}: rank 0 cancelled the generation")
                    yield FinishEvent(_REASONS.get(item.stop_reason, "eos"), item.ttft_ms, item.tpot_ms)
                    return
        finally:
            stream.cancel()  # a client that went away (or a lost group) stops the generation on the ranks

    def _check_still_running(self, dep: DeploymentRecord) -> None:
        now = self.state.get_deployment(dep.deployment_id) if self.state is not None else dep
        if now is None or now.state != "running":
            state, detail = (now.state, now.detail) if now else ("gone", "")
            raise _GroupLost(f"deployment {dep.deployment_id} turned {state} mid-request" +
                             (f": {detail}" if detail else ""))

    def _error(self, dep: DeploymentRecord, e: InferenceError) -> Exception:
        if e.field == "prompt_ids":
            return PromptError(e.details)
        message = f"deployment {dep.deployment_id}: rank 0 answered {e.code.name}: {e.details}"
        return BackendError(message) if e.code in _FINAL else _GroupLost(message)


class FleetDeployments(Mapping[str, Deployment]):
    """Deployments by model name (the model directory's name), read from the state at each lookup: the
    newest deployment of a model that is not stopped answers to its name."""

    def __init__(self, state: State, make_client: Callable[[DeploymentRecord], InferenceClient],
                 replan: bool = True, retry_timeout_s: float = 120.0):
        self.state, self.make_client, self.replan, self.retry_timeout_s = state, make_client, replan, retry_timeout_s
        self._cache: dict[tuple[str, str], Deployment] = {}
        self._lock = threading.Lock()

    def _current(self) -> dict[str, DeploymentRecord]:
        out: dict[str, DeploymentRecord] = {}
        for d in self.state.list_deployments():  # oldest first: the newest wins
            if d.state != "stopped":
                out[Path(d.model).name] = d
        return out

    def __getitem__(self, name: str) -> Deployment:
        rec = self._current()[name]
        layers, cloud = self._exits(rec)
        key = (name, rec.model, layers, cloud)
        with self._lock:
            if key not in self._cache:
                backend = RemoteBackend(name, lambda: self._current().get(name), self.make_client, self.state,
                                        self.replan, self.retry_timeout_s)
                self._cache[key] = Deployment.for_model(name, rec.model, backend, exit_layers=layers,
                                                        exit_cloud=cloud)
            return self._cache[key]

    def _exits(self, rec: DeploymentRecord) -> tuple[tuple[int, ...], bool]:
        """The deployment's exit-head layers and whether it has a cloud tier, from rank 0's run configuration."""
        from edge_node.run_config import RunConfig

        rank0 = [a for a in self.state.assignments(rec.deployment_id) if a.rank == 0]
        exits = RunConfig.from_json(rank0[0].run_config_json).exits if rank0 else None
        return (exits.layers, bool(exits.cloud)) if exits is not None else ((), False)

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


_RECORDED = ("/v1/completions", "/v1/chat/completions")
_STREAM_END = b"data: [DONE]"  # the API's last event of a stream (coordinator.api)
_BODY_PEEK = 64 * 1024  # request bytes kept to read the model name from; response bytes kept for the error


class RequestRecorder:
    """ASGI middleware: every POST to the completion routes leaves a request record in `state`.

    The record is added as "running" when the request arrives and finished when the response has ended:
    done (2xx, the answer sent whole), failed (any other status, or an error event inside a stream, with the
    HTTP status and the error's message) or cancelled (the client disconnected first; HTTP status 499).
    """

    def __init__(self, app, state: State, clock: Callable[[], float] = time.time):
        self.app, self.state, self.clock = app, state, clock

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in _RECORDED:
            await self.app(scope, receive, send)
            return
        rec = RequestLog(f"req-{uuid.uuid4().hex[:16]}")
        body, out = bytearray(), bytearray()
        seen = {"status": 0, "complete": False, "gone": False, "stream_error": ""}
        self._try(self.state.add_request, RequestRecord(rec.request_id, "", self.clock(), "running"))

        async def receive_() -> dict:
            message = await receive()
            if message["type"] == "http.request" and len(body) < _BODY_PEEK:
                body.extend(message.get("body", b"")[:_BODY_PEEK - len(body)])
            elif message["type"] == "http.disconnect" and not seen["complete"]:
                seen["gone"] = True
            return message

        held: list[dict] = []

        async def send_(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                held.append(message)  # a client reads the status from the headers alone (urllib does):
                return  # they go out with the first body part, after the record has its ending
            if message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk.startswith(b'data: {"error"') and not seen["stream_error"]:
                    seen["stream_error"] = _error_message(chunk[6:])
                if seen["status"] != 200 and len(out) < _BODY_PEEK:
                    out.extend(chunk[:_BODY_PEEK - len(out)])
                ends = not message.get("more_body", False) or chunk.startswith(_STREAM_END)
                if ends and not seen["gone"]:
                    seen["complete"] = True  # recorded before the client has the answer (a stream's [DONE]
                    self._finish(rec, seen, bytes(body), bytes(out))  # included): a crash or a test reading
                    # the state right after cannot see it unfinished
            while held:
                await send(held.pop(0))
            await send(message)

        token = _REQUEST.set(rec)
        try:
            await self.app(scope, receive_, send_)
        except BaseException as e:
            seen["status"], seen["stream_error"] = seen["status"] or 500, f"{type(e).__name__}: {e}"
            raise
        finally:
            _REQUEST.reset(token)
            self._finish(rec, seen, bytes(body), bytes(out))

    def _finish(self, rec: RequestLog, seen: dict, body: bytes, out: bytes) -> None:
        if seen.get("recorded"):
            return
        seen["recorded"] = True
        status = seen["status"]
        if seen["gone"] or status == 499 or (status == 200 and not seen["complete"]):
            state, error, status = "cancelled", "the client disconnected", 499
        elif 200 <= status < 300 and not seen["stream_error"]:
            state, error = "done", ""
        else:
            state = "failed"
            error = seen["stream_error"] or _error_message(out) or rec.error or f"HTTP {status}"
        self._try(self.state.finish_request, rec.request_id, state, self.clock(), rec.prompt_tokens,
                  rec.completion_tokens, error[:2000], deployment_id=rec.deployment_id, http_status=status,
                  model=_model_name(body))

    @staticmethod
    def _try(fn, *args, **kw) -> None:
        try:
            fn(*args, **kw)
        except Exception as e:  # a record that cannot be written must not fail the request itself
            log.error("request record not written: %s: %s", type(e).__name__, e)


def _error_message(data: bytes) -> str:
    """The message of OpenAI's error body ({"error": {"message": ...}}), or "" when it is not one."""
    try:
        doc = json.loads(data.decode("utf-8", "replace").strip())
        return str(doc["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return ""


def _model_name(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    model = doc.get("model") if isinstance(doc, dict) else None
    return model[:200] if isinstance(model, str) else ""
