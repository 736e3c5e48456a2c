"""Error-compensating rounding of the int8 weights (GPTQ, Frantar et al.), from calibration inputs.

Rounding each weight to its nearest int8 level ignores how the errors of one output channel's weights
combine on real inputs. GPTQ rounds the input rows of W one at a time and moves each row's rounding
error onto the rows not rounded yet, weighted by the inverse of the inputs' second moment H = X^T X, so
that X @ W_q stays close to X @ W on the calibration inputs, not just W_q to W. The scales (one per output
channel, symmetric) are the plain quantizer's: only the integers change, so the graph and its run-time
cost are exactly those of the plain rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .outliers import linear_input_probe

DAMP = 0.01  # added to H's diagonal, as a share of its mean: keeps H invertible (dead channels)
TINY = 1e-12


def input_moments(path: str | Path, feeds: Sequence[dict[str, np.ndarray]],
                  names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per weight MatMul of the float graph at `path` (or the named ones): H = X^T X (in, in) over every
    row of the calibration feeds (float64)."""
    sess, outputs, targets = linear_input_probe(path, names)
    moments: dict[str, np.ndarray] = {}
    for feed in feeds:
        for x, arr in zip(outputs, sess.run(outputs, feed), strict=True):
            flat = arr.reshape(-1, arr.shape[-1]).astype(np.float64)
            moments[x] = moments.get(x, 0.0) + flat.T @ flat
    return {node: moments[x] for node, (x, _) in targets.items()}


def gptq_int8(w: np.ndarray, h: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """W (in, out) float and H (in, in) -> (int8 (in, out), scale (out,)): symmetric, one scale per output
    channel (as dynamic.quantize_weight), integers chosen by GPTQ's error feedback over the input rows."""
    w = w.astype(np.float64).copy()
    k = w.shape[0]
    scale = np.maximum(np.abs(w).max(axis=0), TINY) / 127.0  # (out,)
    h = h.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(k)] += DAMP * np.mean(np.diag(h))
    # upper Cholesky factor of H^-1: row i holds how row i's error spreads over the rows after it
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)  # the sweep itself in float32: 2x faster
    w, scale = w.astype(np.float32), scale.astype(np.float32)
    q = np.zeros_like(w)
    for i0 in range(0, k, block):
        i1 = min(i0 + block, k)
        wb, err = w[i0:i1].copy(), np.zeros((i1 - i0, w.shape[1]), np.float32)
        hb = hinv[i0:i1, i0:i1]
        for j in range(i1 - i0):
            row = wb[j]
            qr = np.clip(np.round(row / scale), -127, 127)
            q[i0 + j] = qr
            e = (row - qr * scale) / hb[j, j]
            wb[j + 1:] -= np.outer(hb[j, j + 1:], e)
            err[j] = e
        w[i1:] -= hinv[i0:i1, i1:].T @ err
    return q.astype(np.int8), scale.astype(np.float32)
