"""The coordinator's user API: OpenAI-compatible HTTP (JSON and server-sent events), /metrics, /health.

    app = create_app({"demo": local_deployment("models/edgefed-demo", "demo")}, verify_key, verify_admin_key)
    uvicorn.run(app, host="127.0.0.1", port=8000)

`model` in a request names a deployment. The API owns text (prompt and chat template in, stop strings and
detokenized text out); a deployment's Backend (coordinator/backend.py) sees token ids only. Each deployment has
a bounded queue (429 with Retry-After when full); a client that disconnects cancels its generation; every wait
on a backend is bounded (504). Errors have OpenAI's body, {"error": {"message", "type", "param", "code"}}, and
name the field at fault; an error after a stream has started is an SSE error event, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from coordinator.api_queue import Gate, QueueFull
from coordinator.api_schema import ApiError, ChatRequest, CompletionRequest, parse_json, parse_request
from coordinator.api_text import IncrementalDetokenizer, StopMatcher
from coordinator.backend import Backend, EarlyExitRequest, FinishEvent, GenerationRequest, LocalBackend, TokenEvent
from coordinator.metrics import ApiMetrics, NodeSample, QueueSample
from edge_node.model.config import ModelConfig
from edge_node.model.errors import EdgefedError, ModelConfigError, PromptError
from edge_node.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

KeyCheck = Callable[[str], bool]  # an API key -> whether it is valid (constant time: coordinator/security.py)
DeployHandler = Callable[[dict], Awaitable[dict]]  # POST /admin/deployments' JSON body -> its JSON answer


@dataclass(frozen=True)
class Deployment:
    """A model the API serves under `name`: its backend, and what the API needs to turn text into ids and back."""

    name: str
    backend: Backend
    tokenizer: Tokenizer
    context_length: int  # prompt + generated tokens
    vocab_size: int
    max_concurrency: int = 1  # generations at once
    max_queue: int = 16  # requests waiting beyond those; more get 429
    stop_ids: tuple[int, ...] = ()  # ids that end a generation besides the model's EOS ids
    created: int = field(default_factory=lambda: int(time.time()))
    exit_layers: tuple[int, ...] = ()  # layers with an exit head: requests may set early_exit (else a 400)
    exit_cloud: bool = False  # a cloud tier is configured: early_exit.mode "collaborative" is allowed

    @classmethod
    def for_model(cls, name: str, model_dir: str | Path, backend: Backend, **kw) -> Deployment:
        """The deployment of a Hugging Face model directory (its config.json and tokenizer.json) on `backend`."""
        cfg = ModelConfig.from_dir(model_dir)
        return cls(name, backend, Tokenizer.from_dir(model_dir), cfg.max_position_embeddings, cfg.vocab_size, **kw)


def local_deployment(model_dir: str | Path, name: str | None = None, dtype: str = "float32",
                     threads: int | None = None, exits: str | Path | None = None, cloud: str | None = None,
                     split: int | None = None, **kw) -> Deployment:
    """A model served in this process (single node): the fallback with no device nodes, and what tests use.

    exits (an exits.json, or "auto") lets requests ask for early exit; cloud (HOST:PORT of `edgefed cloud-serve`)
    adds the collaborative mode with the split k = split or the last exit layer.
    """
    backend = LocalBackend(model_dir, dtype, threads, exits=exits, cloud=cloud, split=split)
    return Deployment.for_model(name or Path(model_dir).name, model_dir, backend, exit_layers=backend.exit_layers,
                                exit_cloud=cloud is not None, **kw)


@dataclass(frozen=True)
class ApiConfig:
    max_body_bytes: int = 1 << 20  # larger bodies get 413
    queue_timeout_s: float = 60.0  # longest wait for a place to generate (then 504)
    event_timeout_s: float = 60.0  # longest wait for a backend's next event, the first token included (then 504)
    auth_health: bool = False  # require an API key on /health
    auth_metrics: bool = False  # require an API key on /metrics


class _ClientGone(Exception):
    """The client disconnected before the answer was ready."""


_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}  # backend's -> OpenAI's


def _now() -> float:
    return time.perf_counter()


class Generation:
    """One request's run on a deployment: a queue slot, the backend's events, text with stop strings applied.

    `next()` returns (text, finish_reason) pieces until finish_reason is set; `close()` (always, exactly once in
    effect) cancels the backend if it is still generating, frees the slot and counts the request by status.
    """

    def __init__(self, dep: Deployment, gate: Gate, request: GenerationRequest, stops: list[str],
                 metrics: ApiMetrics, config: ApiConfig):
        self.dep, self.gate, self.request, self.metrics, self.config = dep, gate, request, metrics, config
        self.t0 = self._last = _now()
        self.status = 499  # until it ends otherwise: the client went away first
        self.token_ids: list[int] = []  # generated so far
        self.finish_reason: str | None = None
        self._detok = IncrementalDetokenizer(dep.tokenizer.decode, request.prompt_ids)
        self._stop = StopMatcher(stops)
        self._events: AsyncIterator | None = None
        self._started = False
        self._slot_since: float | None = None
        self._closed = False
        self.exits: dict[str, int] = {}  # early exit: tokens by where they were answered ("edge@15", "cloud")
        self.cloud, self.cloud_error = "none", ""

    async def _start(self) -> None:
        try:
            await self.gate.acquire(self.config.queue_timeout_s)
        except QueueFull as e:
            raise self._fail(ApiError(429, f"deployment {self.dep.name!r} is busy: {e}", code="queue_full",
                                      type="rate_limit_error", headers={"Retry-After": str(e.retry_after_s)})) from None
        except TimeoutError:
            raise self._fail(ApiError(504, f"waited {self.config.queue_timeout_s:g} s in deployment "
                                      f"{self.dep.name!r}'s queue", code="queue_timeout",
                                      type="timeout_error")) from None
        self._slot_since = _now()
        self.metrics.prompt_tokens.labels(self.dep.name).inc(len(self.request.prompt_ids))
        try:
            self._events = aiter(self.dep.backend.generate(self.request))
        except Exception as e:  # a backend that fails before its first event is the same failure as one after
            log.exception("backend of %s refused a request", self.dep.name)
            raise self._fail(ApiError(502, f"the backend failed: {type(e).__name__}: {e}", type="backend_error",
                                      code="backend_error")) from None

    async def next(self) -> tuple[str, str | None]:
        if not self._started:
            self._started = True
            await self._start()
        while self.finish_reason is None:
            event = await self._next_event()
            if isinstance(event, TokenEvent):
                self._count_token()
                self.token_ids.append(event.token_id)
                if event.exit is not None:
                    self.exits[event.exit.where] = self.exits.get(event.exit.where, 0) + 1
                    self.cloud, self.cloud_error = event.exit.cloud, event.exit.cloud_error
                text, stopped = self._stop.feed(self._detok.add(event.token_id))
                if stopped:
                    return text, await self._finish("stop")
                if text:
                    return text, None
            elif isinstance(event, FinishEvent) and event.reason in _FINISH:
                text, stopped = self._stop.feed(self._detok.flush())
                text += self._stop.flush()
                return text, await self._finish("stop" if stopped else _FINISH[event.reason])
            else:
                what = f"ended the generation as {event.reason!r}" if isinstance(event, FinishEvent) else \
                    f"sent {type(event).__name__}, not a token or a finish"
                raise self._fail(ApiError(502, f"the backend {what}", type="backend_error", code="backend_error"))
        return "", self.finish_reason

    async def text(self) -> str:
        """The whole answer."""
        parts, reason = [], None
        while reason is None:
            piece, reason = await self.next()
            parts.append(piece)
        return "".join(parts)

    async def _next_event(self) -> object:
        if self._events is None:  # closed: nothing more will come
            raise self._fail(ApiError(502, "the generation was closed", type="backend_error", code="backend_error"))
        try:
            async with asyncio.timeout(self.config.event_timeout_s):
                return await anext(self._events)
        except TimeoutError:
            raise self._fail(ApiError(504, f"the backend of {self.dep.name!r} sent nothing for "
                                      f"{self.config.event_timeout_s:g} s", code="backend_timeout",
                                      type="timeout_error")) from None
        except StopAsyncIteration:
            raise self._fail(ApiError(502, "the backend ended without finishing", type="backend_error",
                                      code="backend_error")) from None
        except PromptError as e:
            raise self._fail(ApiError(400, str(e), param="prompt", code="invalid_prompt")) from None
        except EdgefedError as e:
            raise self._fail(ApiError(502, f"the backend failed: {e}", type="backend_error",
                                      code="backend_error")) from None
        except Exception as e:  # a backend's bug still ends as a named error, not a dropped connection
            log.exception("backend of %s failed", self.dep.name)
            raise self._fail(ApiError(502, f"the backend failed: {type(e).__name__}: {e}", type="backend_error",
                                      code="backend_error")) from None

    def _count_token(self) -> None:
        now, name = _now(), self.dep.name
        hist = self.metrics.token_latency if self.token_ids else self.metrics.ttft
        hist.labels(name).observe(now - (self._last if self.token_ids else self.t0))
        self._last = now
        self.metrics.tokens.labels(name).inc()

    async def _finish(self, reason: str) -> str:
        self.finish_reason, self.status = reason, 200
        await self._close_events()  # a stop string ends the backend's work now, not at its own end
        return reason

    def _fail(self, error: ApiError) -> ApiError:
        self.status = error.status
        return error

    async def _close_events(self) -> None:
        events, self._events = self._events, None
        if events is not None and hasattr(events, "aclose"):
            with suppress(Exception):
                await events.aclose()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._close_events()
        if self._slot_since is not None:
            self.gate.release(_now() - self._slot_since)
        self.metrics.requests.labels(self.dep.name, str(self.status)).inc()


class _EventStream(StreamingResponse):
    """SSE that listens for the client's disconnect whatever the server's ASGI version (the body is cancelled
    at once, not at its next write), and runs `on_close` however it ends."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    with suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.on_close()


async def _disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work: Awaitable):
    """`work`'s result, or _ClientGone (work cancelled) as soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        gone.cancel()
        raise
    gone.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with suppress(BaseException):
        await task
    raise _ClientGone


def _sse(obj: object) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Service:
    """What the routes share: the deployments, their gates, the metrics and the configuration."""

    def __init__(self, deployments: Mapping[str, Deployment], config: ApiConfig,
                 nodes: Callable[[], Iterable[NodeSample]] | None):
        self.deployments, self.config = deployments, config
        self.gates: dict[str, Gate] = {}
        self.metrics = ApiMetrics(self.queues, nodes)

    def queues(self) -> dict[str, QueueSample]:
        return {name: QueueSample(g.waiting, g.running) for name, g in self.gates.items()}

    def deployment(self, name: str) -> Deployment:
        dep = self.deployments.get(name)
        if dep is None:
            raise ApiError(404, f"model {name!r} does not exist (GET /v1/models lists them)", param="model",
                           code="model_not_found")
        return dep

    def gate(self, dep: Deployment) -> Gate:
        gate = self.gates.get(dep.name)
        if gate is None or (gate.concurrency, gate.depth) != (dep.max_concurrency, dep.max_queue):
            if gate is not None and (gate.running or gate.waiting):  # redeployed with new limits: keep the old
                return gate  # gate until it drains, so no admitted request is lost
            gate = self.gates[dep.name] = Gate(dep.max_concurrency, dep.max_queue)
        return gate

    async def read_json(self, request: Request) -> dict:
        """The JSON object a request carries: 415 for another content type, 413 past the size limit."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got {kind or 'none'!r}",
                           code="unsupported_media_type")
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"the request body has {int(length)} bytes, more than the {limit} allowed",
                           code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body is larger than the {limit} bytes allowed",
                               code="body_too_large")
        return parse_json(bytes(body))

    def prompt_ids(self, dep: Deployment, prompt: str | list[int], param: str, chat: bool) -> list[int]:
        ids = dep.tokenizer.encode(prompt, add_special_tokens=not chat) if isinstance(prompt, str) else prompt
        bad = [t for t in ids if t >= dep.vocab_size]
        if bad:
            raise ApiError(400, f"{param}: token id(s) {bad[:5]} outside the vocabulary [0, {dep.vocab_size})",
                           param=param, code="invalid_value")
        if not ids:
            raise ApiError(400, f"{param}: the prompt is empty (0 tokens)", param=param, code="invalid_value")
        if len(ids) >= dep.context_length:
            raise ApiError(400, f"{param}: the prompt has {len(ids)} tokens; model {dep.name!r} holds "
                           f"{dep.context_length} in all, prompt and answer", param=param,
                           code="context_length_exceeded")
        return ids

    def chat_ids(self, dep: Deployment, req: ChatRequest) -> list[int]:
        if not dep.tokenizer.chat_template:
            raise ApiError(400, f"model {dep.name!r} has no chat template: use /v1/completions", param="messages",
                           code="no_chat_template")
        try:
            text = dep.tokenizer.apply_chat_template([m.plain() for m in req.messages])
        except ModelConfigError as e:  # the template refused the conversation (say, roles out of order)
            raise ApiError(400, f"messages: {e}", param="messages", code="invalid_value") from None
        return self.prompt_ids(dep, text, "messages", chat=True)

    def generation(self, dep: Deployment, req: CompletionRequest | ChatRequest, ids: list[int],
                   max_tokens: int | None, explicit: bool) -> Generation:
        room = dep.context_length - len(ids)
        if explicit and max_tokens > room:
            raise ApiError(400, f"max_tokens: {max_tokens} tokens do not fit: the prompt has {len(ids)} of the "
                           f"model's {dep.context_length}, leaving {room}", param="max_tokens",
                           code="context_length_exceeded")
        new = min(max_tokens or room, room)
        greq = GenerationRequest(tuple(ids), new, req.temperature, req.top_p, req.seed, dep.stop_ids,
                                 request_id=uuid.uuid4().hex[:12], early_exit=self.early_exit(dep, req))
        return Generation(dep, self.gate(dep), greq, req.stop, self.metrics, self.config)

    def early_exit(self, dep: Deployment, req: CompletionRequest | ChatRequest) -> EarlyExitRequest | None:
        ee = req.early_exit
        if ee is None:
            return None
        if not dep.exit_layers:
            raise ApiError(400, f"early_exit: model {dep.name!r} has no exit heads (deploy it with an exits file)",
                           param="early_exit", code="unsupported_value")
        if ee.mode == "collaborative":
            if not dep.exit_cloud:
                raise ApiError(400, f"early_exit.mode: model {dep.name!r} has no cloud tier; use standalone",
                               param="early_exit.mode", code="unsupported_value")
            if req.temperature != 0 and req.top_p != 0:
                raise ApiError(400, "early_exit.mode: collaborative decodes greedily (the cloud answers with "
                               "argmax): set temperature to 0", param="early_exit.mode", code="unsupported_value")
        return EarlyExitRequest(ee.mode, ee.threshold, ee.criterion)

    async def respond(self, request: Request, run: Generation, req: CompletionRequest | ChatRequest,
                      chat: bool) -> Response:
        shape = _Shape(run, chat, req.stream_options is not None and req.stream_options.include_usage,
                       req.return_token_ids)
        if not req.stream:
            try:
                text = await _unless_gone(request, run.text())
            finally:
                await run.close()
            return JSONResponse(shape.whole(text))
        try:
            first = await _unless_gone(request, run.next())  # errors before the first token keep their status
        except BaseException:
            await run.close()
            raise
        return _EventStream(shape.stream(first), run.close)


class _Shape:
    """OpenAI's response objects for completions and chat completions, whole and as stream chunks."""

    def __init__(self, run: Generation, chat: bool, include_usage: bool, token_ids: bool):
        self.run, self.chat, self.include_usage, self.token_ids = run, chat, include_usage, token_ids
        self.sent_ids = 0  # generated ids already sent in chunks
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def usage(self) -> dict:
        usage = _usage(len(self.run.request.prompt_ids), len(self.run.token_ids))
        ee = self.run.request.early_exit
        if ee is not None:
            per = dict(sorted(self.run.exits.items()))
            usage["exits"] = {"mode": ee.mode, "per_exit": per, "cloud": per.get("cloud", 0),
                              "edge": sum(n for k, n in per.items() if k != "cloud")}
            usage["cloud"] = self.run.cloud
            if self.run.cloud_error:
                usage["cloud_error"] = self.run.cloud_error
        return usage

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.run.dep.name}

    def whole(self, text: str) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": self.run.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.run.finish_reason}
        if self.token_ids:
            choice["token_ids"] = self.run.token_ids
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": self.usage()}

    def chunk(self, text: str | None, reason: str | None, role: bool = False) -> str:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            obj = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            obj = {**self._head("text_completion"), "choices": [choice]}
        if self.token_ids:
            choice["token_ids"], self.sent_ids = self.run.token_ids[self.sent_ids:], len(self.run.token_ids)
        if self.include_usage:
            obj["usage"] = None
        return _sse(obj)

    async def stream(self, first: tuple[str, str | None]) -> AsyncIterator[str]:
        text, reason = first
        if self.chat:
            yield self.chunk("", None, role=True)
        while True:
            if text:
                yield self.chunk(text, None)
            if reason is not None:
                yield self.chunk(None, reason)
                break
            try:
                text, reason = await self.run.next()
            except ApiError as e:  # after the first byte the status is sent: the error goes in the stream
                yield _sse(e.body())
                break
        if self.include_usage and reason is not None:
            yield _sse({**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                        "usage": self.usage()})
        yield "data: [DONE]\n\n"


def _bearer(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def _auth_error(message: str, code: str) -> ApiError:
    return ApiError(401, message, code=code, type="authentication_error", headers={"WWW-Authenticate": "Bearer"})


def _checker(*checks: KeyCheck, what: str) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        key = _bearer(request)
        if key is None:
            raise _auth_error(f"{what} needs an API key: send the header 'Authorization: Bearer KEY'",
                              "missing_api_key")
        if not any(c(key) for c in checks):
            raise _auth_error(f"the API key is not valid for {what}", "invalid_api_key")
    return check


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> Response:
        return _error_response(e)

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, e: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the status is nginx's "client closed request"

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                        code=code, headers=dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> Response:
        return _error_response(ApiError(400, f"invalid request: {e.errors()[0].get('msg', e)}"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> Response:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return _error_response(ApiError(500, "internal error (logged on the coordinator)", type="server_error"))


def create_app(deployments: Mapping[str, Deployment], verify_key: KeyCheck, verify_admin_key: KeyCheck,
               config: ApiConfig = ApiConfig(), deploy: DeployHandler | None = None,
               nodes: Callable[[], Iterable[NodeSample]] | None = None) -> FastAPI:
    """The HTTP API over `deployments` (read at each request, so the coordinator may add and remove entries).

    verify_key / verify_admin_key: API key -> valid; an admin key is also accepted on /v1/*.
    deploy: handles POST /admin/deployments (501 without one); it may raise ApiError or EdgefedError (400).
    nodes: per-node samples for /metrics, read at each scrape.
    """
    svc = _Service(deployments, config, nodes)
    app = FastAPI(title="edgefed coordinator", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc
    _install_errors(app)
    user = Depends(_checker(verify_key, verify_admin_key, what="this endpoint"))
    admin = Depends(_checker(verify_admin_key, what="admin endpoints"))
    open_or = {True: [user], False: []}

    @app.get("/health", dependencies=open_or[config.auth_health])
    async def health() -> dict:
        return {"status": "ok", "deployments": sorted(deployments)}

    @app.get("/metrics", dependencies=open_or[config.auth_metrics])
    async def metrics() -> Response:
        body, kind = svc.metrics.render()
        return Response(body, media_type=kind)

    def model_card(dep: Deployment) -> dict:
        return {"id": dep.name, "object": "model", "created": dep.created, "owned_by": "edgefed",
                "context_length": dep.context_length}

    @app.get("/v1/models", dependencies=[user])
    async def models() -> dict:
        return {"object": "list", "data": [model_card(d) for _, d in sorted(deployments.items())]}

    @app.get("/v1/models/{name:path}", dependencies=[user])
    async def model(name: str) -> dict:
        return model_card(svc.deployment(name))

    def counted(dep: Deployment, make: Callable[[], Generation]) -> Generation:
        try:
            return make()
        except ApiError as e:  # refused before it reached the queue: still a request to this deployment
            svc.metrics.requests.labels(dep.name, str(e.status)).inc()
            raise

    @app.post("/v1/completions", dependencies=[user])
    async def completions(request: Request) -> Response:
        req = parse_request(CompletionRequest, await svc.read_json(request))
        dep = svc.deployment(req.model)
        run = counted(dep, lambda: svc.generation(
            dep, req, svc.prompt_ids(dep, req.prompt, "prompt", chat=False), req.max_tokens,
            "max_tokens" in req.model_fields_set))
        return await svc.respond(request, run, req, chat=False)

    @app.post("/v1/chat/completions", dependencies=[user])
    async def chat_completions(request: Request) -> Response:
        req = parse_request(ChatRequest, await svc.read_json(request))
        dep = svc.deployment(req.model)
        limit = req.max_completion_tokens or req.max_tokens
        run = counted(dep, lambda: svc.generation(dep, req, svc.chat_ids(dep, req), limit, limit is not None))
        return await svc.respond(request, run, req, chat=True)

    @app.post("/admin/deployments", dependencies=[admin])
    async def admin_deploy(request: Request) -> Response:
        if deploy is None:
            raise ApiError(501, "this coordinator takes no deployments over HTTP", code="not_implemented")
        body = await svc.read_json(request)
        try:
            return JSONResponse(await deploy(body))
        except EdgefedError as e:
            raise ApiError(400, str(e), code="invalid_value") from None

    return app
