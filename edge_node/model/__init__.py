"""edgefed's one model definition: HF Llama-family checkpoints, decoder over [start, end), KV cache, sampling.

Names are imported on first use (PEP 562), so that `import edge_node.model.errors` (which every package's
errors derive from) and the command line's `--help` do not load torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "CheckpointError": "errors", "EdgefedError": "errors", "MissingTensorError": "errors",
    "ModelConfigError": "errors", "NonFiniteError": "errors", "PromptError": "errors",
    "TensorShapeError": "errors", "UnexpectedTensorError": "errors", "UnsupportedArchitectureError": "errors",
    "UsageError": "errors", "ModelConfig": "config", "GenerationResult": "decode", "generate": "decode",
    "KVCache": "kv_cache", "load_model": "load", "Transformer": "model", "Sampler": "sampling",
    "SamplingConfig": "sampling", "Tokenizer": "tokenizer",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
