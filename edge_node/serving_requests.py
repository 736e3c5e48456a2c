"""What a Generate request may ask of a serving group (proto/inference.proto): every field checked, the first
out of range named (INVALID_ARGUMENT with the field on the wire), and the request's SamplingConfig."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from edge_node.inference_client import ExitParams, GenerateParams
from edge_node.model.errors import UsageError
from edge_node.model.sampling import SamplingConfig
from edge_node.run_config import EXIT_CRITERIA, EXIT_MODES, EarlyExitOptions

MAX_LOGPROBS = 20  # as OpenAI's top_logprobs
MAX_STOP_IDS = 64
MAX_REQUEST_ID = 128


class RequestError(UsageError):
    """A request field out of range; `field` names it (INVALID_ARGUMENT on the wire)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class Limits:
    """What a request is checked against: the model's vocabulary and context, its default penalty."""

    vocab_size: int
    max_positions: int
    default_penalty: float = 1.0
    exit_layers: tuple[int, ...] = ()  # layers with an exit head (empty: early_exit requests are refused)
    exit_cloud: bool = False  # a cloud tier is configured (collaborative early exit)
    exit_default: EarlyExitOptions | None = None  # what an early_exit request leaves out (mode, threshold, ...)

    def with_exit_defaults(self, p: GenerateParams) -> GenerateParams:
        """The request with its early_exit's empty fields filled from the group's defaults."""
        ee, d = p.early_exit, self.exit_default or EarlyExitOptions()
        if ee is None:
            return p
        return replace(p, early_exit=ExitParams(ee.mode or d.mode, d.threshold if ee.threshold is None
                                                else ee.threshold, ee.criterion or d.criterion))


def _ids_in_vocab(ids, field: str, vocab: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise RequestError(field, f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")


def _optional_number(value: float | None, field: str, ok: Callable[[float], bool], want: str) -> None:
    if value is not None and not (math.isfinite(value) and ok(value)):
        raise RequestError(field, f"must be {want}, got {value!r}")


def check_request(p: GenerateParams, limits: Limits) -> SamplingConfig:
    """Every field in range, or RequestError naming the first that is not; the request's SamplingConfig."""
    if len(p.request_id) > MAX_REQUEST_ID:
        raise RequestError("request_id", f"at most {MAX_REQUEST_ID} characters, got {len(p.request_id)}")
    if not p.prompt_ids:
        raise RequestError("prompt_ids", "empty: give at least one token id")
    if len(p.prompt_ids) > limits.max_positions:
        raise RequestError("prompt_ids", f"{len(p.prompt_ids)} tokens, more than the model's context of "
                                         f"{limits.max_positions} positions")
    _ids_in_vocab(p.prompt_ids, "prompt_ids", limits.vocab_size)
    if not 1 <= p.max_new_tokens <= limits.max_positions:
        raise RequestError("max_new_tokens", f"must be in [1, {limits.max_positions}], got {p.max_new_tokens}")
    _optional_number(p.temperature, "temperature", lambda v: v >= 0, "a finite number >= 0 (0: greedy)")
    _optional_number(p.top_p, "top_p", lambda v: 0 < v <= 1, "in (0, 1]")
    if p.top_k < 0:
        raise RequestError("top_k", f"must be >= 0 (0: off), got {p.top_k}")
    if p.seed is not None and p.seed < 0:
        raise RequestError("seed", f"must be >= 0, got {p.seed}")
    if len(p.stop_token_ids) > MAX_STOP_IDS:
        raise RequestError("stop_token_ids", f"at most {MAX_STOP_IDS} ids, got {len(p.stop_token_ids)}")
    _ids_in_vocab(p.stop_token_ids, "stop_token_ids", limits.vocab_size)
    if not 0 <= p.logprobs <= MAX_LOGPROBS:
        raise RequestError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {p.logprobs}")
    _optional_number(p.repetition_penalty, "repetition_penalty", lambda v: v > 0, "a finite number > 0")
    penalty = limits.default_penalty if p.repetition_penalty is None else p.repetition_penalty
    if p.early_exit is not None:
        _check_early_exit(p, limits)
    if not p.temperature:  # None or 0: greedy, as OpenAI's API reads temperature 0
        return SamplingConfig(greedy=True, repetition_penalty=penalty)
    return SamplingConfig(greedy=False, temperature=p.temperature, top_k=p.top_k,
                          top_p=1.0 if p.top_p is None else p.top_p, seed=p.seed, repetition_penalty=penalty)


def _check_early_exit(p: GenerateParams, limits: Limits) -> None:
    ee = p.early_exit
    if ee.mode not in (*EXIT_MODES, "off"):
        raise RequestError("early_exit.mode", f"must be one of {', '.join(EXIT_MODES)}, off, got {ee.mode!r}")
    if ee.mode == "off":  # the plain model, its tokens reported as answered at the last layer
        return
    _optional_number(ee.threshold, "early_exit.threshold", lambda v: 0 <= v <= 1, "in [0, 1]")
    if ee.criterion not in EXIT_CRITERIA:
        raise RequestError("early_exit.criterion", f"must be one of {', '.join(EXIT_CRITERIA)}, got {ee.criterion!r}")
    if not limits.exit_layers:
        raise RequestError("early_exit", "this group was started without exit heads")
    if ee.mode == "collaborative" and not limits.exit_cloud:
        raise RequestError("early_exit.mode", "collaborative needs a cloud tier, and this group has none")
    if ee.mode == "collaborative" and p.temperature:
        raise RequestError("early_exit.mode", "collaborative decodes greedily (the cloud answers with argmax): "
                                              "leave temperature unset or 0")
    if p.logprobs:
        raise RequestError("logprobs", "not reported for early-exit requests: ask with logprobs 0")
