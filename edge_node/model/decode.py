"""Autoregressive generation over a Transformer: prefill, then one token at a time."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import native
from .errors import NonFiniteError, PromptError
from .model import Transformer
from .sampling import Sampler, SamplingConfig


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated ids only
    ttft_ms: float  # prompt in -> first token out
    tpot_ms: float  # mean time per output token after the first
    stop_reason: str  # "eos" | "length" | "context"
    step_ms: list[float] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)  # per generated token, when asked for (see top_logprobs)


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> dict:
    """The chosen token's log-probability and the k most likely tokens', under the model's distribution
    at that position (before any repetition penalty or temperature), as the OpenAI API reports them."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(lp, min(k, lp.numel()))
    return {"token_id": token, "logprob": float(lp[token]),
            "top_logprobs": [{"token_id": int(i), "logprob": float(v)} for v, i in zip(values, ids, strict=True)]}


def check_prompt(prompt_ids: Sequence[int], max_positions: int, vocab_size: int) -> None:
    if len(prompt_ids) == 0:
        raise PromptError("the prompt is empty: give at least one token")
    if len(prompt_ids) > max_positions:
        raise PromptError(
            f"the prompt has {len(prompt_ids)} tokens, more than max_position_embeddings={max_positions}"
        )
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise PromptError(f"prompt token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")


@torch.inference_mode()
def generate(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), eos_ids: Sequence[int] = (),
             on_token: Callable[[int], None] | None = None,
             step: Callable[[list[int], int], torch.Tensor] | None = None, logprobs: int = 0) -> GenerationResult:
    """Generate up to max_new_tokens after prompt_ids; stops at an EOS id or the context limit.

    `step(ids, pos0)` replaces the model's own forward (e.g. a prefill on ONNX Runtime, then torch).
    """
    cfg = model.config
    check_prompt(prompt_ids, cfg.max_position_embeddings, cfg.vocab_size)
    step = step or _forward_fn(model)
    return decode_loop(step, list(prompt_ids), max_new_tokens, Sampler(sampling), eos_ids,
                       cfg.max_position_embeddings, on_token, logprobs)


def _forward_fn(model: Transformer) -> Callable[[list[int], int], torch.Tensor]:
    """Prompts through the model's forward; single tokens through the native decode step where it runs
    this model (edge_node.model.native: float32 math, every layer in one call), else the same forward."""
    cache = model.new_cache()
    fused = native.NativeDecoder.of(model) if native.enabled() else None

    def step(ids: list[int], pos0: int) -> torch.Tensor:
        if fused is not None and len(ids) == 1:
            return fused.step(ids[0], pos0, cache)
        x = torch.tensor([ids], dtype=torch.long)
        return model(x, cache, pos0, last_only=True)[0, -1]

    return step


def decode_loop(step: Callable[[list[int], int], torch.Tensor], prompt: list[int], max_new_tokens: int,
                sampler: Sampler, eos_ids: Sequence[int], max_positions: int,
                on_token: Callable[[int], None] | None = None, logprobs: int = 0) -> GenerationResult:
    """Shared by every engine: `step(ids, pos0)` runs ids at positions [pos0, ...) and returns last logits.

    logprobs=K > 0 records the top-K log-probabilities at every generated position.
    """
    out: list[int] = []
    lps: list[dict] = []
    times: list[float] = []
    eos = set(eos_ids)
    reason = "length"
    t0 = time.perf_counter()
    ids, pos = prompt, 0
    history = list(prompt)  # the repetition penalty sees prompt and output, as transformers' does
    while len(out) < max_new_tokens:
        if pos + len(ids) > max_positions:
            reason = "context"
            break
        logits = step(ids, pos)
        if not bool(torch.isfinite(logits).all()):  # NaN would otherwise be "sampled" as token 0 or an EOS
            raise NonFiniteError(f"the logits at position {pos + len(ids) - 1} are not finite (NaN or Inf) after "
                                 f"{len(out)} generated token(s): the activations overflowed or a weight is corrupt")
        token = sampler(logits, history)
        times.append(time.perf_counter())
        if logprobs:
            lps.append(top_logprobs(logits, token, logprobs))
        pos += len(ids)
        out.append(token)
        history.append(token)
        if on_token:
            on_token(token)
        if token in eos:
            reason = "eos"
            break
        ids = [token]
    ttft = (times[0] - t0) * 1e3 if times else 0.0
    steps = [(b - a) * 1e3 for a, b in zip(times, times[1:], strict=False)]
    tpot = sum(steps) / len(steps) if steps else 0.0
    return GenerationResult(out, ttft, tpot, reason, steps, lps)
