"""A frozen base model in transformers, quantized by bitsandbytes (nf4 4-bit or int8) or float32: what federated
LoRA clients train on (FlowerTune's recipe, on the CPU).

bitsandbytes 0.50 runs nf4 and int8 on the CPU. On CPUs with AVX512-BF16 it tries to fetch an optional faster
4-bit GEMV kernel from the Hugging Face hub (`kernels` package) at import and logs a warning when it cannot;
that kernel serves only bf16 one-row inference (`gemv_4bit`), and bitsandbytes falls back to its own bundled
CPU kernel, so training is unaffected: the warning is silenced here rather than installing `kernels` (which
would download code at run time).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from edge_node.model.errors import UsageError

QUANTS = ("nf4", "int8", "float32")
BYTES_PER_PARAM = {"nf4": 0.5 + 0.0625, "int8": 1.0 + 0.03, "float32": 4.0}  # weights + per-block absmax / scales


def import_bitsandbytes():
    """bitsandbytes, imported with its optional-kernel warning silenced (see the module docstring)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        logger.setLevel(level)
    return bitsandbytes


def quantization_config(quant: str):
    """transformers' BitsAndBytesConfig for `quant` (None for float32)."""
    if quant not in QUANTS:
        raise UsageError(f"quantization must be one of {', '.join(QUANTS)}, got {quant!r}")
    if quant == "float32":
        return None
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                  bnb_4bit_compute_dtype=torch.float32)
    # bitsandbytes casts float32 inputs to float16 for its int8 matmul and warns on every call: said once here
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base(model_dir: str | Path, quant: str = "nf4"):
    """The frozen transformers causal LM of `model_dir`, its linears quantized by bitsandbytes, on the CPU."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import_bitsandbytes()  # transformers imports it even for a float base: silence it first
    q = quantization_config(quant)
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, device_map="cpu",
                                                 **({"quantization_config": q} if q is not None else {}))
    for p in model.parameters():
        p.requires_grad_(False)
    if quant == "nf4":
        keep_4bit_trainable(model)
    return model


def keep_4bit_trainable(model) -> int:
    """Turn off bitsandbytes' CPU packing of 4-bit weights; returns how many linears it touched.

    bitsandbytes 0.50.2, on a CPU with AVX512-BF16, repacks a Linear4bit's weight for its bf16 `gemv_4bit` kernel
    the first time the layer runs in eval mode without grad (evaluating perplexity), and never unpacks it when
    training resumes: the layer then computes in bfloat16 through an op without autograd support, so gradients
    do not flow through the frozen base to earlier layers' adapters (torch warns "an autograd kernel was not
    registered ... silently incorrect behavior"). With packing off, every pass dequantizes nf4 to float32 and uses
    torch's linear: exact gradients, float32 evaluation.
    """
    bnb = import_bitsandbytes()
    count = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            count += 1
    return count


def base_bytes(params: int, quant: str) -> int:
    """Approximate resident bytes of a base model of `params` parameters stored as `quant`."""
    return int(params * BYTES_PER_PARAM[quant])
