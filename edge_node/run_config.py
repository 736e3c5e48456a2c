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
from quant.codec import CODECS, DEFAULT_CODEC

DTYPES = ("float32", "bfloat16", "float16")
ALLREDUCE = ("star", "gloo")
EXIT_MODES = ("standalone", "collaborative")
EXIT_CRITERIA = ("max_prob", "margin")
DEFAULT_TIMEOUT_S = 10.0  # every call to the cloud tier


@dataclass(frozen=True)
class EarlyExitOptions:
    """Early exit as a run asks for it (`generate --exits`, `tp-generate --exits`, a deployment's exit heads);
    exits=None is the off switch (the full model's tokens).

    In a serving group these are the deployment's heads, cloud tier and split; each request names its own mode
    and threshold (`threshold`, `mode` here are what a request without its own gets)."""

    exits: str | None = None  # exits.json, or "auto": the heads saved beside the model (or the shards)
    threshold: float = 0.9
    criterion: str = "max_prob"
    mode: str = "standalone"  # | "collaborative"
    cloud: str | None = None  # HOST:PORT of `edgefed cloud-serve`
    split: int | None = None  # k (default: the last exit layer); standalone: the edge's last layer (default L)
    codec: str = DEFAULT_CODEC
    timeout_s: float = DEFAULT_TIMEOUT_S
    # The heads' layers as a deployment recorded them (so the coordinator knows what requests may ask without
    # reading the heads); when set, a rank whose heads have other layers refuses to start. (): not recorded.
    layers: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.mode not in EXIT_MODES:
            raise UsageError(f"exit mode must be standalone or collaborative, got {self.mode!r}")
        if self.mode == "collaborative" and not self.cloud:
            raise UsageError("collaborative mode needs the cloud tier's address (--cloud HOST:PORT)")
        if not (isinstance(self.threshold, int | float) and 0.0 <= self.threshold <= 1.0):
            raise UsageError(f"exit threshold must be in [0, 1], got {self.threshold!r}")
        if self.criterion not in EXIT_CRITERIA:
            raise UsageError(f"exit criterion must be one of {', '.join(EXIT_CRITERIA)}, got {self.criterion!r}")
        if self.split is not None and (not isinstance(self.split, int) or self.split < 1):
            raise UsageError(f"exit split k must be a layer index >= 1, got {self.split!r}")
        if self.codec not in CODECS:
            raise UsageError(f"exit codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if not (isinstance(self.timeout_s, int | float) and self.timeout_s > 0):
            raise UsageError(f"cloud timeout must be > 0 seconds, got {self.timeout_s!r}")

    def check_layers(self, heads_layers: tuple[int, ...], where: str) -> None:
        """Refuse heads whose layers differ from the ones recorded (a deployment's heads replaced on a node)."""
        if self.layers and tuple(heads_layers) != self.layers:
            raise UsageError(f"{where}: exit heads at layers {list(heads_layers)}, the run configuration records "
                             f"{list(self.layers)}")


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
    exits: EarlyExitOptions | None = None  # early exit (heads, threshold, mode, cloud tier); None: off

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
        if self.exits is not None and (self.window is not None or self.memory_mb is not None or self.prefill):
            raise UsageError("early exit runs with every layer resident and torch prefill: drop the window, the "
                             "memory budget and ONNX Runtime prefill")
        if self.exits is not None and self.logprobs:
            raise UsageError("log-probabilities are not reported with early exit: drop logprobs (or the exits)")
        if self.exits is not None and self.exits.cloud and self.exits.timeout_s >= self.timeout_s:
            # the other ranks wait for rank 0's next message while it waits for the cloud tier
            raise UsageError(f"the cloud timeout ({self.exits.timeout_s:g} s) must be shorter than the ranks' "
                             f"timeout ({self.timeout_s:g} s)")

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
        if raw.get("exits") is not None:
            raw["exits"] = EarlyExitOptions(**_known(EarlyExitOptions, raw["exits"], "exits"))
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
