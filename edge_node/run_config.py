"""One frozen run configuration: what a generation run needs, built once (from the command line, or
from a coordinator's job) and handed whole to every process that takes part.

A tensor-parallel launcher sends it to each rank as JSON, so an option the user sets reaches every rank
without being re-spelled as flags; each rank reports the digest of the configuration it ran, so a
mismatch is visible.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from edge_node.model.errors import UsageError
from edge_node.model.sampling import SamplingConfig
from npu_backends.options import PrefillOptions

DTYPES = ("float32", "bfloat16", "float16")
ALLREDUCE = ("star", "gloo")


@dataclass(frozen=True)
class RunConfig:
    model: str | None = None  # a Hugging Face model directory (single node) ...
    shards: str | None = None  # ... or a directory written by `edgefed shard` (tensor parallel)
    prompt_ids: tuple[int, ...] = ()
    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    dtype: str | None = None  # compute dtype; None: float32 for a model, the shards' own dtype for shards
    threads: int | None = None  # torch (and ONNX Runtime) intra-op threads; None: torch's choice
    logprobs: int = 0  # top-K log-probabilities per generated token (0 = none)
    prefill: PrefillOptions | None = None  # ONNX Runtime chunked prefill; None: torch prefills
    window: int | None = None  # layer blocks resident per rank (None: all, unless memory_mb)
    memory_mb: float | None = None  # per-rank memory budget the window is derived from
    allreduce: str = "star"
    timeout_s: float = 60.0  # every wait on another rank
    drop_page_cache: bool = False
    adapter: str | None = None  # a PEFT LoRA adapter directory merged into the weights at load (edge_node/adapters.py)

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(self.prompt_ids))
        if (self.model is None) == (self.shards is None):
            raise UsageError("a run needs exactly one of a model directory and a shard directory")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.allreduce not in ALLREDUCE:
            raise UsageError(f"allreduce must be one of {', '.join(ALLREDUCE)}, got {self.allreduce!r}")
        if self.window is not None and self.memory_mb is not None:
            raise UsageError("give a window or a memory budget, not both")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"run configuration: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise UsageError("run configuration: expected a JSON object")
        raw = _known(cls, raw, "run configuration")
        raw["sampling"] = SamplingConfig(**_known(SamplingConfig, raw.get("sampling") or {}, "sampling"))
        if raw.get("prefill") is not None:
            raw["prefill"] = PrefillOptions(**_known(PrefillOptions, raw["prefill"], "prefill"))
        return cls(**raw)

    @property
    def sha256(self) -> str:
        """Digest of the whole configuration (what each rank reports it ran)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def _known(cls: type, raw: Any, what: str) -> dict:
    if not isinstance(raw, dict):
        raise UsageError(f"{what}: expected a JSON object")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UsageError(f"{what}: unknown field(s) {', '.join(unknown)}")
    return dict(raw)
