"""Helpers shared by the benchmarks: random checkpoints of named shapes, medians, the machine line."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import torch

SHAPES = {
    # SmolLM2-135M: the single-node bar (llama.cpp / transformers figures in the brief)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0),
    # Llama-3.2-1B: the sliding-window / disk-offload bar
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         tie_word_embeddings=True, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Qwen2-0.5B: the prefill bar
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True, rope_theta=1000000.0),
}


def random_checkpoint(shape: str, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write (once) a random checkpoint of a named shape; weights ~N(0, 0.02) as at init."""
    if (out / "config.json").is_file():
        return out
    import transformers as tf

    arch = "qwen2" if shape.startswith("qwen2") else "llama"
    pair = (tf.Qwen2Config, tf.Qwen2ForCausalLM) if arch == "qwen2" else (tf.LlamaConfig, tf.LlamaForCausalLM)
    cfg_cls, model_cls = pair
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**SHAPES[shape], bos_token_id=1, eos_token_id=2))
    model.to(dtype).save_pretrained(out)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads"
