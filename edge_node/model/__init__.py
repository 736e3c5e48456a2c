"""edgefed's one model definition: HF Llama-family checkpoints, decoder over [start, end), KV cache, sampling."""

from .config import ModelConfig
from .errors import (
    CheckpointError,
    EdgefedError,
    MissingTensorError,
    ModelConfigError,
    PromptError,
    TensorShapeError,
    UnexpectedTensorError,
    UnsupportedArchitectureError,
    UsageError,
)
from .generate import GenerationResult, generate
from .kv_cache import KVCache
from .load import load_model
from .model import Transformer
from .sampling import Sampler, SamplingConfig
from .tokenizer import Tokenizer

__all__ = [
    "CheckpointError", "EdgefedError", "GenerationResult", "KVCache", "MissingTensorError", "ModelConfig",
    "ModelConfigError", "PromptError", "Sampler", "SamplingConfig", "TensorShapeError", "Tokenizer",
    "Transformer", "UnexpectedTensorError", "UnsupportedArchitectureError", "UsageError", "generate", "load_model",
]
