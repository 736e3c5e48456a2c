"""Next-token choice: greedy, or temperature / top-k / top-p sampling with a seeded generator.

A repetition penalty (CTRL's, as Hugging Face's generation_config applies it) first scales the
logits of every token already in the sequence: divided by the penalty when positive, multiplied
when negative. It applies to greedy decoding too, exactly as transformers' generate does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import UsageError


@dataclass(frozen=True)
class SamplingConfig:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None
    repetition_penalty: float = 1.0  # 1.0 = off

    def __post_init__(self):
        if self.temperature <= 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UsageError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.generator = torch.Generator()
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """logits: (vocab,) for the last position; history: the ids so far (prompt + generated)."""
        c = self.config
        if c.repetition_penalty != 1.0 and len(history):
            logits = _penalize(logits, history, c.repetition_penalty)
        if c.greedy:
            return int(torch.argmax(logits))
        scores = logits.float() / c.temperature
        if c.top_k:
            kth = torch.topk(scores, min(c.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if c.top_p < 1.0:
            scores = _top_p(scores, c.top_p)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _penalize(logits: torch.Tensor, history: Sequence[int], penalty: float) -> torch.Tensor:
    seen = torch.tensor(sorted(set(history)), dtype=torch.long)
    picked = logits.gather(0, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(0, seen, picked)


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one)."""
    sorted_scores, order = torch.sort(scores, descending=True)
    cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
    drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= top_p  # mass before this token already enough
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    return torch.empty_like(scores).scatter_(0, order, sorted_scores)
