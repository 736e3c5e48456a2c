"""The inference link (proto/inference.proto): its records, their protobuf serde, and the client the
coordinator's API layer calls a serving group's rank 0 with.

Protobuf types stop here: callers and the server (edge_node.serving) see these frozen dataclasses. The module
imports no torch, so a coordinator can use the client without loading the model runtime. Values are checked by
the server (edge_node.serving.check_request), which answers INVALID_ARGUMENT naming the field; the client
raises InferenceError carrying the gRPC status and that field.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from edge_node.model.errors import EdgefedError, UsageError
from edge_node.rpc import inference_pb2 as pb
from edge_node.rpc import inference_pb2_grpc as pb_grpc

FIELD_METADATA = "x-edgefed-field"  # trailing metadata of an INVALID_ARGUMENT answer: the offending field
STOP_REASONS = ("eos", "stop", "length", "context", "cancelled")


class InferenceError(EdgefedError):
    """A Generate or Health call failed: `code` is the gRPC status, `field` the request field at fault."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code, self.details, self.field = code, message, field


@dataclass(frozen=True)
class ExitParams:
    """A request's early exit: mode ("standalone" | "collaborative" | "off"), threshold, criterion ("max_prob" |
    "margin"); "" and None take the group's defaults (its run configuration's)."""

    mode: str = ""
    threshold: float | None = None
    criterion: str = ""


@dataclass(frozen=True)
class ExitUsage:
    """Where an early-exit request's tokens were answered, and the cloud tier's state at the end."""

    answered: tuple[tuple[str, int], ...] = ()  # ("edge@15", n), ("cloud", m), ... sorted by where
    cloud: str = "none"  # "used" | "lost" | "unreachable" | "none"
    cloud_error: str = ""

    @property
    def cloud_tokens(self) -> int:
        return dict(self.answered).get("cloud", 0)

    @property
    def edge_tokens(self) -> int:
        return sum(n for where, n in self.answered if where != "cloud")


@dataclass(frozen=True)
class GenerateParams:
    """One request, in token ids (the caller tokenizes). None means the server's default; see the proto."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float | None = None  # None or 0: greedy
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int = 0
    repetition_penalty: float | None = None
    request_id: str = ""
    early_exit: ExitParams | None = None  # None: the plain model

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(self.prompt_ids))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


@dataclass(frozen=True)
class TokenEvent:
    id: int
    index: int  # 0 for the first generated token
    step_ms: float  # since the previous token (the first: since the request started running)
    logprob: float | None = None  # with logprobs > 0: the chosen token's log-probability ...
    top_logprobs: tuple[tuple[int, float], ...] = ()  # ... and the K most likely (id, logprob)
    exit: str = ""  # early exit: where it was answered ("edge@15", "edge-fallback@20", "cloud"); "" otherwise
    cloud: str = ""  # early exit: the cloud tier so far ("used", "lost", "unreachable", "none")
    cloud_error: str = ""


@dataclass(frozen=True)
class FinalEvent:
    request_id: str
    stop_reason: str  # one of STOP_REASONS
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    total_ms: float = 0.0
    exits: ExitUsage | None = None  # a request with early_exit: where its tokens were answered


Event = TokenEvent | FinalEvent


@dataclass(frozen=True)
class Health:
    ready: bool
    world_size: int
    vocab_size: int
    max_positions: int
    eos_token_ids: tuple[int, ...]
    config_sha256: str
    queued: int
    busy: bool
    served: int
    exit_layers: tuple[int, ...] = ()  # layers with an exit head (empty: no early exit)
    exit_cloud: bool = False  # a cloud tier is configured (collaborative early exit)


def params_to_pb(p: GenerateParams) -> pb.GenerateRequest:
    m = pb.GenerateRequest(request_id=p.request_id, prompt_ids=p.prompt_ids, max_new_tokens=p.max_new_tokens,
                           top_k=p.top_k, stop_token_ids=p.stop_token_ids, logprobs=p.logprobs)
    for name in ("temperature", "top_p", "seed", "repetition_penalty"):
        if getattr(p, name) is not None:
            setattr(m, name, getattr(p, name))
    if p.early_exit is not None:
        ee = p.early_exit
        m.early_exit.CopyFrom(pb.EarlyExit(mode=ee.mode, threshold=ee.threshold, criterion=ee.criterion))
        if ee.threshold is None:
            m.early_exit.ClearField("threshold")
    return m


def params_from_pb(m: pb.GenerateRequest) -> GenerateParams:
    def opt(name: str):
        return getattr(m, name) if m.HasField(name) else None

    return GenerateParams(prompt_ids=tuple(m.prompt_ids), max_new_tokens=m.max_new_tokens,
                          temperature=opt("temperature"), top_p=opt("top_p"), top_k=m.top_k, seed=opt("seed"),
                          stop_token_ids=tuple(m.stop_token_ids), logprobs=m.logprobs,
                          repetition_penalty=opt("repetition_penalty"), request_id=m.request_id,
                          early_exit=ExitParams(m.early_exit.mode, m.early_exit.threshold
                                                if m.early_exit.HasField("threshold") else None, m.early_exit.criterion)
                          if m.HasField("early_exit") else None)


def event_to_pb(e: Event) -> pb.GenerateEvent:
    if isinstance(e, TokenEvent):
        t = pb.Token(id=e.id, index=e.index, step_ms=e.step_ms, exit=e.exit, cloud=e.cloud, cloud_error=e.cloud_error)
        if e.logprob is not None:
            t.logprob.CopyFrom(pb.Logprob(logprob=e.logprob,
                                          top=[pb.TopLogprob(id=i, logprob=lp) for i, lp in e.top_logprobs]))
        return pb.GenerateEvent(token=t)
    final = pb.Final(
        request_id=e.request_id, stop_reason=e.stop_reason,
        usage=pb.Usage(prompt_tokens=e.prompt_tokens, completion_tokens=e.completion_tokens),
        timings=pb.Timings(queue_ms=e.queue_ms, ttft_ms=e.ttft_ms, tpot_ms=e.tpot_ms, total_ms=e.total_ms))
    if e.exits is not None:
        x = e.exits
        final.exits.CopyFrom(pb.ExitUsage(answered=dict(x.answered), edge_tokens=x.edge_tokens,
                                          cloud_tokens=x.cloud_tokens, cloud=x.cloud, cloud_error=x.cloud_error))
    return pb.GenerateEvent(final=final)


def event_from_pb(m: pb.GenerateEvent) -> Event:
    kind = m.WhichOneof("event")
    if kind == "token":
        t = m.token
        where = dict(exit=t.exit, cloud=t.cloud, cloud_error=t.cloud_error)
        if t.HasField("logprob"):
            return TokenEvent(t.id, t.index, t.step_ms, t.logprob.logprob,
                              tuple((x.id, x.logprob) for x in t.logprob.top), **where)
        return TokenEvent(t.id, t.index, t.step_ms, **where)
    if kind == "final":
        f = m.final
        exits = None
        if f.HasField("exits"):
            exits = ExitUsage(tuple(sorted(f.exits.answered.items())), f.exits.cloud, f.exits.cloud_error)
        return FinalEvent(f.request_id, f.stop_reason, f.usage.prompt_tokens, f.usage.completion_tokens,
                          f.timings.queue_ms, f.timings.ttft_ms, f.timings.tpot_ms, f.timings.total_ms, exits)
    raise InferenceError(grpc.StatusCode.INTERNAL, "the server sent an event that is neither a token nor final")


def health_to_pb(h: Health) -> pb.HealthReply:
    return pb.HealthReply(ready=h.ready, world_size=h.world_size, vocab_size=h.vocab_size,
                          max_positions=h.max_positions, eos_token_ids=h.eos_token_ids,
                          config_sha256=h.config_sha256, queued=h.queued, busy=h.busy, served=h.served,
                          exit_layers=h.exit_layers, exit_cloud=h.exit_cloud)


def health_from_pb(m: pb.HealthReply) -> Health:
    return Health(m.ready, m.world_size, m.vocab_size, m.max_positions, tuple(m.eos_token_ids), m.config_sha256,
                  m.queued, m.busy, m.served, tuple(m.exit_layers), m.exit_cloud)


def _error(e: grpc.RpcError) -> InferenceError:
    field = next((v for k, v in (e.trailing_metadata() or ()) if k == FIELD_METADATA), None)
    return InferenceError(e.code(), e.details() or "", field)


class GenerateStream:
    """The events of one Generate call, in order: TokenEvent per token, then one FinalEvent. Iterating raises
    InferenceError on a failed call; cancel() (or leaving a `with` block early) stops the generation."""

    def __init__(self, call):
        self._call = call

    def __iter__(self) -> Iterator[Event]:
        try:
            for m in self._call:
                yield event_from_pb(m)
        except grpc.RpcError as e:
            raise _error(e) from None

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()  # a no-op once the call has finished


class InferenceClient:
    """A channel to one serving group's rank 0.

    `credentials`: grpc channel credentials (edge_node.tls.channel_credentials_for(bundle) with the
    coordinator's bundle), or None with insecure=True for plain text. `server_name`: the name the server's
    certificate is checked against when it differs from the address's host (a node's certificate name).
    """

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None, *, insecure: bool = False,
                 server_name: str | None = None, options: Sequence[tuple[str, object]] = ()):
        opts = list(options) + ([("grpc.ssl_target_name_override", server_name)] if server_name else [])
        if credentials is not None:
            self._channel = grpc.secure_channel(address, credentials, options=opts)
        elif insecure:
            self._channel = grpc.insecure_channel(address, options=opts)
        else:
            raise UsageError("an inference client needs TLS credentials, or insecure=True for plain text")
        self._stub = pb_grpc.InferenceStub(self._channel)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the channel connects, or raise InferenceError(UNAVAILABLE) after timeout_s."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise InferenceError(grpc.StatusCode.UNAVAILABLE, f"no connection within {timeout_s:g} s") from None

    def health(self, timeout_s: float = 5.0) -> Health:
        try:
            return health_from_pb(self._stub.Health(pb.HealthRequest(), timeout=timeout_s))
        except grpc.RpcError as e:
            raise _error(e) from None

    def generate(self, params: GenerateParams, timeout_s: float | None = None) -> GenerateStream:
        """Start one generation; the whole call (queueing included) ends with DEADLINE_EXCEEDED after
        timeout_s, which also stops the generation on the server."""
        return GenerateStream(self._stub.Generate(params_to_pb(params), timeout=timeout_s))

    def generate_all(self, params: GenerateParams, timeout_s: float | None = None
                     ) -> tuple[list[TokenEvent], FinalEvent]:
        """Every token event and the final event of one generation."""
        tokens: list[TokenEvent] = []
        for e in self.generate(params, timeout_s):
            if isinstance(e, FinalEvent):
                return tokens, e
            tokens.append(e)
        raise InferenceError(grpc.StatusCode.INTERNAL, "the stream ended without a final event")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
