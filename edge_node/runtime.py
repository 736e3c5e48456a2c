"""Single-node generation from a RunConfig: load, optionally prefill on ONNX Runtime, decode.

What `edgefed generate` runs, and what a device agent's runtime child will run: one function from a
frozen configuration to a result record, with no argparse and no printing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from edge_node.memory import own_peak_rss_mb
from edge_node.model import generate
from edge_node.model.errors import UsageError
from edge_node.model.formats import TORCH_NAMES
from edge_node.model.generation_config import eos_ids
from edge_node.run_config import RunConfig
from quant.checkpoint import load_any


def generate_local(run: RunConfig, on_token: Callable[[int], None] | None = None,
                   calibration: Iterable[str] = ()) -> dict:
    """Generate on this node; returns token ids, timings, stop reason, peak RSS (and prefill, logprobs).

    `calibration`: texts for int8 prefill graphs that still have to be built (random ids when empty).
    """
    if run.model is None:
        raise UsageError("single-node generation needs a model directory")
    if run.threads:
        torch.set_num_threads(run.threads)
    dtype = TORCH_NAMES[run.dtype or "float32"]
    if run.adapter is not None:  # a PEFT LoRA adapter, checked against the model and merged into its weights
        from edge_node.adapters import load_adapted

        model = load_adapted(run.model, run.adapter, dtype, pack=True)
    else:
        model = load_any(run.model, dtype, pack=True)  # float or edgefed-quantized
    report: dict = {}
    step = None
    if run.prefill is not None:
        from npu_backends.build import prefill_step

        def on_prefill(result) -> None:
            report.update(prefill="ort", prefill_provider=result.provider,
                          prefill_ms=round(result.seconds * 1e3, 3))

        step = prefill_step(model, run.model, run.prefill, calibration, on_prefill)
    result = generate(model, run.prompt_ids, run.max_new_tokens, run.sampling, eos_ids(run.model, model.config),
                      on_token=on_token, step=step, logprobs=run.logprobs)
    out = {"token_ids": result.token_ids, "ttft_ms": round(result.ttft_ms, 3), "tpot_ms": round(result.tpot_ms, 3),
           "peak_rss_mb": round(own_peak_rss_mb(), 1), "stop_reason": result.stop_reason, **report}
    if run.logprobs:
        out["logprobs"] = result.logprobs
    return out
