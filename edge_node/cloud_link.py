"""The edge side of the edge -> cloud link (CE-CoLLM): typed messages, the transport interface, and the
collaborative generation driver.

The edge runs layers [0, k). A token confident at an exit leaves on the edge; an unconfident one sends its
layer-k hidden state, with those of earlier exited tokens not yet uploaded, to the cloud tier, which catches up
their deep KV, runs [k, L) and answers. Every position's layer-k state crosses the link exactly once, so the
prompt is never resent. If the cloud cannot be reached or refuses, the edge answers with its exit head at k
from then on (standalone) and the result says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from edge_node.early_exit import (
    EarlyExitResult,
    EdgeStepper,
    ExitHeads,
    ExitPolicy,
    StepClock,
    TokenRecord,
    check_logits,
)
from edge_node.model.decode import check_prompt
from edge_node.model.errors import EdgefedError, UsageError
from edge_node.model.model import Transformer
from edge_node.model.sampling import Sampler, SamplingConfig
from edge_node.run_config import DEFAULT_TIMEOUT_S, EarlyExitOptions  # re-exported: callers import them here
from quant.codec import DEFAULT_CODEC, Encoded, check_codec, encode


class CloudUnavailable(EdgefedError):
    """The cloud tier could not be reached in time (connection refused, deadline passed)."""


class CloudRefused(EdgefedError):
    """The cloud tier answered with an error: unknown or expired session, memory bound, mismatch."""


@dataclass(frozen=True)
class SessionSpec:
    session: str
    model_digest: str  # weights_digest of the checkpoint: edge and cloud must run the same model
    split: int  # k: the cloud runs [k, L)
    codec: str = DEFAULT_CODEC
    repetition_penalty: float = 1.0  # greedy decoding with CTRL's penalty, as the edge applies it


@dataclass(frozen=True)
class Upload:
    """Layer-k hidden states of positions [pos0, pos0 + rows), and the input token id at each position."""

    session: str
    pos0: int
    states: Encoded
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class CloudAnswer:
    token: int
    cloud_ms: float  # the cloud's own compute time for this call
    layer_evals: int  # token x layer evaluations it ran (catch-up included)


class CloudTransport(Protocol):
    """How the edge reaches the cloud tier: in-process (tests, benchmarks) or gRPC (`GrpcTransport`)."""

    def open(self, spec: SessionSpec) -> None: ...

    def append(self, up: Upload) -> None: ...

    def infer(self, up: Upload) -> CloudAnswer: ...

    def close(self, session: str) -> None: ...


# ---------------------------------------------------------------------------------------------- driver
class _Uplink:
    """Layer-k states waiting to go up, with their token ids; position `sent` is the next the cloud lacks."""

    def __init__(self, session: str, codec: str):
        self.session, self.codec = session, codec
        self.rows: list[torch.Tensor] = []
        self.sent = 0
        self.bytes = 0

    def add(self, h: torch.Tensor | None) -> None:
        if h is not None:
            self.rows.append(h[0])  # (n, hidden)

    def take(self, history: Sequence[int]) -> Upload:
        x = torch.cat(self.rows) if self.rows else torch.empty(0)
        up = Upload(self.session, self.sent, encode(x, self.codec), tuple(history[self.sent:self.sent + len(x)]))
        self.rows, self.sent = [], self.sent + len(x)
        self.bytes += up.states.nbytes + 4 * len(up.tokens)
        return up

    @property
    def pending(self) -> int:
        return sum(r.shape[0] for r in self.rows)


@torch.inference_mode()
def generate_collaborative(model: Transformer, heads: ExitHeads | None, policy: ExitPolicy, split: int,
                           transport: CloudTransport, spec: SessionSpec, prompt_ids: Sequence[int],
                           max_new_tokens: int, repetition_penalty: float = 1.0, eos_ids: Sequence[int] = (),
                           push_every: int = 0, on_token: Callable[[int], None] | None = None,
                           keep_session: bool = False,
                           on_record: Callable[[TokenRecord, EarlyExitResult], None] | None = None,
                           stepper: EdgeStepper | None = None) -> EarlyExitResult:
    """Greedy generation with the edge on [0, split) and the cloud on [split, L).

    push_every > 0 uploads exited tokens' states in the background once that many wait (else they ride
    with the next cloud request). With policy OFF every token is answered by the cloud (the naive split).
    keep_session: at the end, catch up the edge's own deferred layers, upload every remaining state and
    leave the session open (a follow-up turn continues it without resending anything); else close it.
    on_record(record, result so far) is called for each token before on_token(token). `stepper`: one built
    for [0, split) with an outbox (a tensor-parallel edge).
    """
    cfg = model.config
    if not 0 < split < cfg.num_layers:
        raise UsageError(f"the split k must be in [1, {cfg.num_layers}), got {split}")
    if spec.split != split:
        raise UsageError(f"session spec names split {spec.split}, the edge runs {split}")
    check_codec(spec.codec)
    check_prompt(prompt_ids, cfg.max_position_embeddings, cfg.vocab_size)
    stepper = stepper or EdgeStepper(model, heads, policy, split, keep_outbox=True)
    if stepper.end != split or not stepper.stack.keep_outbox:
        raise UsageError(f"the stepper runs [0, {stepper.end}) without an outbox; the split is {split}")
    fallback = heads is not None and split in heads.layers  # the head that answers when the cloud is lost
    sampler = Sampler(SamplingConfig(repetition_penalty=repetition_penalty))
    uplink = _Uplink(spec.session, spec.codec)
    result = EarlyExitResult([], [], "length", "collaborative", cloud="used")
    cloud_ok = _open(transport, spec, result)
    ids, pos, history, eos = list(prompt_ids), 0, list(prompt_ids), set(eos_ids)
    clock = StepClock()
    while len(result.token_ids) < max_new_tokens:
        if pos + len(ids) > cfg.max_position_embeddings:
            result.stop_reason = "context"
            break
        layer, h, logits = stepper.step(ids, pos)
        states = stepper.stack.drain()
        rec = None
        if cloud_ok:
            uplink.add(states)
            if layer is None:
                rec = _ask_cloud(transport, uplink, history, result, cfg.num_layers)
                cloud_ok = rec is not None
            elif push_every and uplink.pending >= push_every:
                cloud_ok = _push(transport, uplink, history, result)
        if rec is None:
            where = "edge"
            if layer is None:  # no cloud: the edge's own head at k answers
                if not fallback:
                    raise CloudUnavailable(f"the cloud tier is unavailable ({result.cloud_error}) and there is no "
                                           f"exit head at layer {split} to continue on the edge")
                layer, logits, where = split, stepper.head_logits(split, h), "edge-fallback"
            check_logits(logits, pos + len(ids) - 1, len(result.token_ids))
            rec = TokenRecord(sampler(logits, history), layer, where)
        rec.edge_ms = clock.lap() - rec.cloud_ms
        result.records.append(rec)
        token = rec.token
        pos += len(ids)
        result.token_ids.append(token)
        history.append(token)
        if on_record:
            on_record(rec, result)
        if on_token:
            on_token(token)
        if token in eos:
            result.stop_reason = "eos"
            break
        ids = [token]
    if cloud_ok and keep_session:
        stepper.stack.catch_up()
        uplink.add(stepper.stack.drain())
        if uplink.pending:
            _push(transport, uplink, history, result)
    elif cloud_ok:
        _close(transport, spec.session)
    result.edge_layer_evals = stepper.stack.layer_evals
    result.extras = {"stepper": stepper, "uplink_bytes": uplink.bytes, "split": split}
    return result


def _open(transport: CloudTransport, spec: SessionSpec, result: EarlyExitResult) -> bool:
    try:
        transport.open(spec)
        return True
    except (CloudUnavailable, CloudRefused) as e:
        result.cloud, result.cloud_error = "unreachable", str(e)
        return False


def _ask_cloud(transport: CloudTransport, uplink: _Uplink, history: list[int], result: EarlyExitResult,
               num_layers: int) -> TokenRecord | None:
    up = uplink.take(history)
    t0 = time.perf_counter()
    try:
        answer = transport.infer(up)
    except (CloudUnavailable, CloudRefused) as e:
        result.cloud, result.cloud_error = "lost", str(e)
        return None
    result.cloud_layer_evals += answer.layer_evals
    return TokenRecord(answer.token, num_layers, "cloud", cloud_ms=(time.perf_counter() - t0) * 1e3,
                       cloud_compute_ms=answer.cloud_ms, up_bytes=up.states.nbytes + 4 * len(up.tokens),
                       round_trips=1)


def _push(transport: CloudTransport, uplink: _Uplink, history: list[int], result: EarlyExitResult) -> bool:
    up = uplink.take(history)
    try:
        transport.append(up)
        return True
    except (CloudUnavailable, CloudRefused) as e:
        result.cloud, result.cloud_error = "lost", str(e)
        return False


def _close(transport: CloudTransport, session: str) -> None:
    try:
        transport.close(session)
    except (CloudUnavailable, CloudRefused):
        pass  # the session expires on the cloud by itself


# ---------------------------------------------------------------------------------------------- gRPC
class GrpcTransport:
    """CloudTransport over gRPC (proto/cloud.proto); every call has a deadline of `timeout_s`.

    UNAVAILABLE, DEADLINE_EXCEEDED and the like become CloudUnavailable; a status the cloud chose (NOT_FOUND,
    RESOURCE_EXHAUSTED, ...) becomes CloudRefused with its message.
    """

    def __init__(self, address: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        import grpc

        from edge_node.rpc import cloud_pb2, cloud_pb2_grpc

        self.address, self.timeout_s = address, timeout_s
        self._grpc, self._pb = grpc, cloud_pb2
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                               ("grpc.max_send_message_length", 64 << 20)])
        self.stub = cloud_pb2_grpc.CloudStub(self.channel)

    def _call(self, method, request):
        grpc = self._grpc
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            detail = e.details() if hasattr(e, "details") else str(e)
            if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
                        grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
                raise CloudRefused(f"cloud tier {self.address} refused ({code.name}): {detail}") from None
            name = code.name if code is not None else "error"
            raise CloudUnavailable(f"cloud tier {self.address} unavailable ({name}): {detail}") from None

    def _states(self, up: Upload):
        s = up.states
        return self._pb.HiddenStates(session=up.session, pos0=up.pos0, codec=s.codec, rows=s.rows, cols=s.cols,
                                     data=s.data, scales=s.scales, tokens=list(up.tokens))

    def open(self, spec: SessionSpec) -> None:
        self._call(self.stub.Open, self._pb.OpenRequest(
            session=spec.session, model_digest=spec.model_digest, split=spec.split, codec=spec.codec,
            repetition_penalty=spec.repetition_penalty))

    def append(self, up: Upload) -> None:
        self._call(self.stub.Append, self._states(up))

    def infer(self, up: Upload) -> CloudAnswer:
        r = self._call(self.stub.Infer, self._states(up))
        return CloudAnswer(r.token, r.cloud_ms, r.layer_evals)

    def close(self, session: str) -> None:
        self._call(self.stub.Close, self._pb.CloseRequest(session=session))

    def stats(self) -> dict[str, float]:
        return dict(self._call(self.stub.Stats, self._pb.StatsRequest()).values)

    def shutdown(self) -> None:
        self.channel.close()


# ---------------------------------------------------------------------------------------------- runtime entry
def exit_policy(heads: ExitHeads | None, opts: EarlyExitOptions) -> tuple[ExitPolicy, int | None]:
    """(the policy, the split k) `opts` asks of `heads`: exits at or below k live, k = opts.split or the last head."""
    from edge_node.early_exit import OFF

    split = opts.split or (heads.layers[-1] if heads else None)
    if heads is None:
        return OFF, split
    return ExitPolicy.uniform([i for i in heads.layers if split is None or i <= split], opts.threshold,
                              opts.criterion), split


def generate_early_exit(model: Transformer, heads: ExitHeads | None, opts: EarlyExitOptions,
                        prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig,
                        eos_ids: Sequence[int], model_digest: str = "",
                        on_token: Callable[[int], None] | None = None,
                        on_record: Callable[[TokenRecord, EarlyExitResult], None] | None = None,
                        make_stepper: Callable[[ExitPolicy, int, bool], EdgeStepper] | None = None
                        ) -> EarlyExitResult:
    """One generation as `opts` asks, on a loaded model (its first layers at least: [0, k) collaborative,
    [0, opts.split or L) standalone) and its heads; model_digest names the weights to the cloud tier.
    make_stepper(policy, end, keep_outbox): the edge's stepper, where it is not the whole-width default (a
    tensor-parallel rank 0's)."""
    import uuid

    from edge_node.early_exit import generate_standalone

    policy, split = exit_policy(heads, opts)
    if opts.mode == "standalone":
        end = opts.split or model.config.num_layers
        stepper = make_stepper(policy, end, False) if make_stepper else None
        return generate_standalone(model, heads, policy, prompt_ids, max_new_tokens, sampling, eos_ids, end,
                                   on_token, on_record, stepper)
    if split is None:
        raise UsageError("collaborative mode needs the split k: give --split or exit heads (--exits)")
    if not sampling.greedy:
        raise UsageError("collaborative mode decodes greedily (the cloud answers with argmax): drop the "
                         "sampling flags")
    spec = SessionSpec(uuid.uuid4().hex, model_digest, split, opts.codec, sampling.repetition_penalty)
    transport = GrpcTransport(opts.cloud, opts.timeout_s)
    try:
        stepper = make_stepper(policy, split, True) if make_stepper else None
        return generate_collaborative(model, heads, policy, split, transport, spec, prompt_ids, max_new_tokens,
                                      sampling.repetition_penalty, eos_ids, on_token=on_token, on_record=on_record,
                                      stepper=stepper)
    finally:
        transport.shutdown()


def run_early_exit(model_dir: str, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig,
                   eos_ids: Sequence[int], opts: EarlyExitOptions, dtype: torch.dtype = torch.float32,
                   on_token: Callable[[int], None] | None = None) -> dict:
    """Load the edge part and its exit heads, generate, and report where every token was answered."""
    from pathlib import Path

    from edge_node.early_exit import load_exit_heads
    from edge_node.model.config import ModelConfig
    from edge_node.model.formats import weights_digest
    from edge_node.model.load import load_model

    cfg = ModelConfig.from_dir(model_dir)
    heads = None
    if opts.exits is not None:
        heads = load_exit_heads(Path(model_dir) if opts.exits == "auto" else Path(opts.exits), cfg)
    _, split = exit_policy(heads, opts)
    t0 = time.perf_counter()
    if opts.mode == "standalone":
        model = load_model(model_dir, dtype, end=opts.split or cfg.num_layers, head=True, pack=True)
        digest = ""
    else:
        if split is None:
            raise UsageError("collaborative mode needs the split k: give --split or exit heads (--exits)")
        model = load_model(model_dir, dtype, end=split, head=True, pack=True)
        digest = weights_digest(model_dir)
    result = generate_early_exit(model, heads, opts, prompt_ids, max_new_tokens, sampling, eos_ids, digest,
                                 on_token)
    return exit_summary(result, heads, opts, time.perf_counter() - t0)


def exit_summary(result: EarlyExitResult, heads: ExitHeads | None, opts: EarlyExitOptions, seconds: float) -> dict:
    """The JSON record of an early-exit generation: tokens, where each was answered, the cloud's state, timings."""
    policy, _ = exit_policy(heads, opts)
    ms = [r.edge_ms + r.cloud_ms for r in result.records]
    return {"token_ids": result.token_ids, "stop_reason": result.stop_reason, "exit_mode": result.mode,
            "exits": "off" if not policy.enabled else {"layers": list(policy.layers), "threshold": opts.threshold,
                                                       "criterion": opts.criterion},
            "usage": result.usage(), "token_where": [r.key for r in result.records], "cloud": result.cloud,
            "cloud_error": result.cloud_error, "uplink_bytes": result.extras.get("uplink_bytes", 0),
            "ttft_ms": round(ms[0], 3) if ms else 0.0,
            "tpot_ms": round(sum(ms[1:]) / (len(ms) - 1), 3) if len(ms) > 1 else 0.0,
            "seconds": round(seconds, 3)}
