"""int8 against float on real text: top-1 agreement and logit error over every prompt position."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .prefill import ChunkedPrefill


@dataclass(frozen=True)
class Agreement:
    positions: int
    top1: float  # share of positions whose argmax matches the reference
    mean_abs_err: float  # mean over positions of mean |logit difference|
    max_abs_err: float

    def recovered_by(self, better: Agreement) -> float:
        """Share of this variant's mean logit error that `better` removes (1.0 = all of it)."""
        return 1.0 - better.mean_abs_err / self.mean_abs_err if self.mean_abs_err else 0.0


def agreement(reference: ChunkedPrefill, test: ChunkedPrefill, prompts: Sequence[Sequence[int]]) -> Agreement:
    """Compare two prefills row by row (use graphs exported with all_logits=True to see every position)."""
    same = total = 0
    err_sum, err_max = 0.0, 0.0
    for p in prompts:
        ref = np.concatenate(reference.run(p).rows)  # (positions, vocab)
        got = np.concatenate(test.run(p).rows)
        diff = np.abs(ref - got)
        same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += ref.shape[0]
        err_sum += float(diff.mean(-1).sum())
        err_max = max(err_max, float(diff.max()))
    return Agreement(total, same / total, err_sum / total, err_max)
