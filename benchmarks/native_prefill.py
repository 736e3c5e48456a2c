"""A native int8 row for the prefill benchmark (issue 16): the same prompt, chunk by chunk, through a group-wise
int8 copy of the model (`edgefed quantize --weights int8 --group-size 32 --scale-dtype float16`, float head) whose
linears run edgefed's packed VNNI GEMM (edge_node/model/native: block-wise int8 weights, each token's input in two
int8 levels per block of 32). It is a CPU kernel, not an ONNX Runtime graph: the row says what a block-wise int8
GEMM at integer speed gives, next to ORT's int8 variants."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

QUANTIZE = ["--weights", "int8", "--group-size", "32", "--scale-dtype", "float16"]


def int8_copy(model_dir: Path, cache: Path) -> Path:
    """The quantized copy, made once per source directory (a stamp marks a finished one)."""
    out = cache / f"{model_dir.name}-int8-g32-f16"
    if not (out / ".done").is_file():
        subprocess.run([sys.executable, "-m", "edgefed", "quantize", "--model", str(model_dir), *QUANTIZE,
                        "--out", str(out), "--force"], check=True, capture_output=True, text=True)
        (out / ".done").touch()
    return out


def load_packed(path: Path):
    from edge_node.model import native
    from quant.checkpoint import load_any

    model = load_any(path, pack=True)
    packed = model.blocks["0"].mlp.w13.native_weight()
    if packed is None or packed.kind not in (native.Q8P, native.Q4P):
        raise RuntimeError("the native int8 row needs AVX512-VNNI and the native kernels (EDGEFED_NATIVE on)")
    return model


def chunked_logits(model, prompt: list[int], chunk: int, last_only: bool) -> np.ndarray:
    """The prompt in chunks of `chunk` tokens through one KV cache: the last row's logits, or every row's."""
    cache, rows = model.new_cache(), []
    with torch.inference_mode():
        for c in range(0, len(prompt), chunk):
            out = model(torch.tensor([prompt[c: c + chunk]]), cache, c, last_only=last_only)[0]
            rows.append(out[-1:] if last_only else out)
    return torch.cat(rows).float().numpy()


def runner(model, prompt: list[int], chunk: int):
    def once() -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        logits = chunked_logits(model, prompt, chunk, last_only=True)[-1]
        return time.perf_counter() - t0, logits
    return once


def agreement(float_model, model, prompts: list[list[int]], chunk: int) -> dict:
    """Top-1 agreement and logit errors over every position, against the float model's full prompt."""
    from npu_backends.evaluate import Tally

    tally = Tally()
    for p in prompts:
        with torch.inference_mode():
            ref = float_model(torch.tensor([p]), float_model.new_cache(), 0)[0].float().numpy()
        tally.add(ref, chunked_logits(model, p, chunk, last_only=False))
    return tally.result().__dict__
