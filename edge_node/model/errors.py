"""Named errors for everything a user can get wrong about a model or a prompt.

Each error says what was wrong and where (file, tensor, field); the CLI prints the
message alone, never a traceback.
"""

from __future__ import annotations


class EdgefedError(Exception):
    """Base of every error edgefed raises on purpose."""


class ModelConfigError(EdgefedError):
    """config.json is missing, unreadable, or lacks a required field."""


class UnsupportedArchitectureError(ModelConfigError):
    """The checkpoint's architecture is not one the runtime implements."""


class CheckpointError(EdgefedError):
    """A weights file is missing, truncated or corrupt."""


class MissingTensorError(CheckpointError):
    """A tensor the model needs is not in the checkpoint."""


class UnexpectedTensorError(CheckpointError):
    """The checkpoint holds tensors the model does not know."""


class TensorShapeError(CheckpointError):
    """A tensor's shape disagrees with config.json."""


class PromptError(EdgefedError):
    """The prompt cannot be run: empty, or longer than the model's context."""


class UsageError(EdgefedError, ValueError):
    """An option or argument cannot be honoured (a bad combination, a value out of range)."""


class NonFiniteError(EdgefedError):
    """Logits turned NaN or Inf during generation (overflow in a low-precision dtype, or corrupt weights)."""
