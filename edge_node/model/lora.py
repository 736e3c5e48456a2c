"""LoRA deltas in the runtime's weight layout: pure math over tensors already in memory.

A PEFT LoRA adapter adds scaling * B @ A to a Hugging Face linear's weight (A: (r, in), B: (out, r)). The
runtime fuses q|k|v and gate|up into one linear (edge_node.model.layout), so a part's delta lands in its rows
of the fused weight; a tensor-parallel rank takes the rows (or input columns) of the delta it owns, exactly as
it takes those of the weight, so merging into shards equals sharding the merged model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .layout import BY_NAME, LINEARS, PEFT_TARGETS, LinearSpec, Range, full_units, part_rows, unit_size


@dataclass(frozen=True)
class LoraWeights:
    """An adapter's tensors by (layer, PEFT module name such as "q_proj"): (A (r, in), B (out, r))."""

    scaling: float  # lora_alpha / r (or / sqrt(r) with rsLoRA)
    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    def layers(self) -> list[int]:
        return sorted({i for i, _ in self.pairs})


def part_shape(cfg: ModelConfig, peft_name: str) -> tuple[int, int]:
    """(out, in) of the Hugging Face linear PEFT calls `peft_name` ("q_proj")."""
    linear, index = PEFT_TARGETS[peft_name]
    spec = BY_NAME[linear]
    return unit_size(cfg, spec.parts[index].rows), unit_size(cfg, spec.cols)


def layer_deltas(cfg: ModelConfig, lora: LoraWeights, layer: int) -> dict[str, torch.Tensor]:
    """Runtime linear name -> its full (fused) float32 delta for one layer; linears the adapter leaves alone
    are absent."""
    out: dict[str, torch.Tensor] = {}
    for spec in LINEARS:
        rows = part_rows(cfg, spec)
        for i, part in enumerate(spec.parts):
            pair = lora.pairs.get((layer, part.peft_name))
            if pair is None:
                continue
            a, b = pair
            if spec.name not in out:
                out[spec.name] = torch.zeros(rows[-1][1], unit_size(cfg, spec.cols))
            lo, hi = rows[i]
            out[spec.name][lo:hi] = lora.scaling * (b.float() @ a.float())  # (out, r) @ (r, in)
    return out


def slice_delta(cfg: ModelConfig, spec: LinearSpec, delta: torch.Tensor, units: dict[str, Range]) -> torch.Tensor:
    """A rank's part of a full fused delta: its rows of a "rows" linear, its input columns of a "cols" one
    (as layout.slice_layer slices the weight)."""
    if spec.split == "rows":
        return torch.cat([delta[lo:hi] for lo, hi in part_rows(cfg, spec, units)]).contiguous()
    lo, hi = units[spec.cols]
    return delta[:, lo:hi].contiguous()


def merge_layer(cfg: ModelConfig, tensors: dict[str, torch.Tensor | None], lora: LoraWeights, layer: int,
                units: dict[str, Range] | None = None) -> dict[str, torch.Tensor | None]:
    """A layer's runtime-form tensors (the whole layer, or a rank's slice with `units`) with the adapter merged
    in; the sum is taken in float32, then stored in each weight's own dtype."""
    units = units or full_units(cfg)
    out = dict(tensors)
    for name, delta in layer_deltas(cfg, lora, layer).items():
        w = tensors[name]
        d = slice_delta(cfg, BY_NAME[name], delta, units)
        if tuple(w.shape) != tuple(d.shape):
            raise ValueError(f"layer {layer} {name}: weight {list(w.shape)} and LoRA delta {list(d.shape)} differ")
        out[name] = (w.float() + d).to(w.dtype)
    return out
