"""One prompt's prefill timed on torch or ONNX Runtime and checked against float torch on the same model."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from edge_node.model import Transformer

from .build import build_prefill
from .options import PrefillOptions
from .providers import used_provider


def torch_prefill(model: Transformer, prompt: Sequence[int]) -> tuple[np.ndarray, float]:
    """Float torch full-prompt prefill: last-token logits and seconds."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(torch.tensor([list(prompt)]), model.new_cache(), 0, last_only=True)[0, -1]
        return logits.float().numpy(), time.perf_counter() - t0


def measure_prefill(model: Transformer, model_dir: str | Path, prompt: Sequence[int], opts: PrefillOptions | None,
                    calibration: Iterable[str] = ()) -> dict:
    """Prefill `prompt` on torch (opts None) or ONNX Runtime (after a warm-up), against float torch."""
    torch_prefill(model, prompt)  # warm-up
    ref, torch_s = torch_prefill(model, prompt)
    out: dict = {"backend": "torch" if opts is None else "ort", "prompt_tokens": len(prompt)}
    if opts is None:
        logits, seconds, provider, setup = ref, torch_s, "torch (CPU)", 0.0
    else:
        t0 = time.perf_counter()
        prefill = build_prefill(model, model_dir, opts, calibration)
        setup = time.perf_counter() - t0
        prefill.run(prompt)  # warm-up: first runs pay for ORT's allocations
        result = prefill.run(prompt)
        logits, seconds, provider = result.logits, result.seconds, result.provider
        out |= {"chunk": opts.chunk, "context": opts.context, "chunks": result.chunks, "int8": opts.int8_mode,
                "providers": [used_provider(s) for s in prefill.sessions], "out_of_order": opts.out_of_order}
    t0 = time.perf_counter()
    first = int(np.argmax(logits))  # greedy first token: TTFT = prefill + sampling
    ttft = seconds + (time.perf_counter() - t0)
    return out | {"provider": provider, "prefill_tokens_per_s": round(len(prompt) / seconds, 1),
                  "ttft_ms": round(ttft * 1e3, 3), "setup_s": round(setup, 2),
                  "max_abs_logit_error": float(np.abs(logits - ref).max()), "top1_agree": first == int(np.argmax(ref)),
                  "first_token": first, "torch_prefill_tokens_per_s": round(len(prompt) / torch_s, 1)}
