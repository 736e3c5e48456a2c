"""Tiny random checkpoints made on the fly with transformers' save_pretrained (the reference)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)


def make_checkpoint(path, arch: str = "llama", tie: bool = False, max_shard_size=None, seed: int = 0,
                    dtype: torch.dtype = torch.float32, **overrides):
    """Save a tiny random HF model of `arch` to path and return the transformers model (float32, eval)."""
    import transformers as tf

    classes = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}
    config_cls, model_cls = classes[arch]
    config = config_cls(**{**TINY, "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(path, **kwargs)
    return model.float() if dtype != torch.float32 else model




def copy_model(src: Path, dst: Path, char_tokenizer: bool = False) -> Path:
    """A copy of the model directory src at dst; with char_tokenizer, a tokenizer.json mapping each printable
    ASCII character to id (code - 32), so text prompts work on a tiny random model."""
    shutil.copytree(src, dst)
    if char_tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel({chr(c): c - 32 for c in range(32, 127)}, unk_token="?"))
        tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        tok.save(str(dst / "tokenizer.json"))
    return dst
