"""The weight layout of a Llama-family layer, in one table.

For every runtime linear: the Hugging Face modules fused into it (in order along its output rows), the
unit its rows and columns are measured in, how tensor parallelism splits it, whether it may be
quantized, and the PEFT target-module names that map onto it. Loading (fusing), checkpoint
validation, sharding, int8 shards, ONNX export (un-fusing) and LoRA all read this table; none of them
spells out q/k/v or gate/up again.

Units: "hidden" (hidden_size), "q" (query heads x head_dim), "kv" (KV heads x head_dim), "mlp"
(intermediate_size). A tensor-parallel rank owns a range of each unit (whole KV-head groups with their
query heads, a range of MLP columns; all of "hidden"): a "rows" linear keeps its rows in the rank's
ranges, a "cols" linear its input columns, and the allreduce sums the "cols" linears' partial outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import ModelConfig

Range = tuple[int, int]  # half-open


@dataclass(frozen=True)
class Part:
    module: str  # Hugging Face module under model.layers.{i}., e.g. "self_attn.q_proj"
    rows: str  # unit of its output rows

    @property
    def peft_name(self) -> str:
        """The name PEFT's target_modules use for it ("q_proj")."""
        return self.module.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class LinearSpec:
    name: str  # runtime weight name
    bias: str  # runtime bias name
    owner: str  # "attn" | "mlp": the module holding it (and the attribute it sits under is `name`)
    parts: tuple[Part, ...]  # fused in this order along the output rows
    cols: str  # unit of the input columns
    split: str  # "rows" | "cols": what tensor parallelism divides among ranks
    bias_flag: str  # the ModelConfig field saying whether biases exist
    quantize: bool = True  # int8 / int4 weight-only modes may quantize it

    def has_bias(self, cfg: ModelConfig) -> bool:
        return bool(getattr(cfg, self.bias_flag))


LINEARS: tuple[LinearSpec, ...] = (
    LinearSpec("wqkv", "bqkv", "attn", (Part("self_attn.q_proj", "q"), Part("self_attn.k_proj", "kv"),
                                        Part("self_attn.v_proj", "kv")), "hidden", "rows", "qkv_bias"),
    LinearSpec("wo", "bo", "attn", (Part("self_attn.o_proj", "hidden"),), "q", "cols", "o_bias"),
    LinearSpec("w13", "b13", "mlp", (Part("mlp.gate_proj", "mlp"), Part("mlp.up_proj", "mlp")), "hidden", "rows",
               "mlp_bias"),
    LinearSpec("w2", "b2", "mlp", (Part("mlp.down_proj", "hidden"),), "mlp", "cols", "mlp_bias"),
)
BY_NAME = {s.name: s for s in LINEARS}
NORMS = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}  # runtime name -> HF module
PEFT_TARGETS = {p.peft_name: (s.name, i) for s in LINEARS for i, p in enumerate(s.parts)}  # -> (linear, part)
TENSOR_NAMES = (*NORMS, *(n for s in LINEARS for n in (s.name, s.bias)))  # every runtime-form tensor of a layer


def unit_size(cfg: ModelConfig, unit: str) -> int:
    return {"hidden": cfg.hidden_size, "q": cfg.num_attention_heads * cfg.head_dim,
            "kv": cfg.num_key_value_heads * cfg.head_dim, "mlp": cfg.intermediate_size}[unit]


def rank_units(cfg: ModelConfig, kv_heads: Range, mlp: Range) -> dict[str, Range]:
    """Each unit's range owned by a rank holding KV heads [a, b) (with their query heads) and MLP columns."""
    d, (a, b) = cfg.head_dim, kv_heads
    g = cfg.kv_groups
    return {"hidden": (0, cfg.hidden_size), "q": (a * g * d, b * g * d), "kv": (a * d, b * d), "mlp": mlp}


def full_units(cfg: ModelConfig) -> dict[str, Range]:
    return rank_units(cfg, (0, cfg.num_key_value_heads), (0, cfg.intermediate_size))


def head_counts(cfg: ModelConfig, units: dict[str, Range]) -> tuple[int, int]:
    """(query heads, KV heads) of a layer slice with these unit ranges."""
    (q0, q1), (k0, k1) = units["q"], units["kv"]
    return (q1 - q0) // cfg.head_dim, (k1 - k0) // cfg.head_dim


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF Llama-family checkpoint holds, with its shape, from the config alone."""
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes |= {f"{p}{hf}.weight": (h,) for hf in NORMS.values()}
        for spec in LINEARS:
            for part in spec.parts:
                rows = unit_size(cfg, part.rows)
                shapes[f"{p}{part.module}.weight"] = (rows, unit_size(cfg, spec.cols))
                if spec.has_bias(cfg):
                    shapes[f"{p}{part.module}.bias"] = (rows,)
    return shapes


def fuse_layer(get: Callable[[str], torch.Tensor], cfg: ModelConfig, index: int) -> dict[str, torch.Tensor | None]:
    """One layer's tensors in runtime form (e.g. wqkv = [q; k; v]); absent biases are None."""
    p = f"model.layers.{index}."
    out: dict[str, torch.Tensor | None] = {rt: get(f"{p}{hf}.weight") for rt, hf in NORMS.items()}
    for spec in LINEARS:
        out[spec.name] = _cat([get(f"{p}{part.module}.weight") for part in spec.parts])
        out[spec.bias] = _cat([get(f"{p}{part.module}.bias") for part in spec.parts]) if spec.has_bias(cfg) else None
    return out


def _cat(xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs)


def part_rows(cfg: ModelConfig, spec: LinearSpec, units: dict[str, Range] | None = None) -> list[Range]:
    """Where each part's rows lie in the fused weight of a full layer, restricted to `units` (default: all)."""
    units = units or full_units(cfg)
    out, offset = [], 0
    for part in spec.parts:
        lo, hi = units[part.rows] if spec.split == "rows" else (0, unit_size(cfg, part.rows))
        out.append((offset + lo, offset + hi))
        offset += unit_size(cfg, part.rows)
    return out


def unfuse(cfg: ModelConfig, spec: LinearSpec, fused: torch.Tensor) -> list[torch.Tensor]:
    """A full layer's fused weight (or bias) back into its parts, in the table's order."""
    return [fused[a:b] for a, b in part_rows(cfg, spec)]


def slice_layer(t: dict[str, torch.Tensor | None], cfg: ModelConfig, units: dict[str, Range],
                rank: int) -> dict[str, torch.Tensor]:
    """A rank's part of one full layer in runtime form. Biases of "cols" linears live on rank 0 only:
    they are added once, after the allreduce sums the partial outputs."""
    out = {rt: t[rt] for rt in NORMS}
    for spec in LINEARS:
        w, b = t[spec.name], t[spec.bias]
        if spec.split == "rows":
            rows = part_rows(cfg, spec, units)
            out[spec.name] = _cat([w[lo:hi] for lo, hi in rows])
            if b is not None:
                out[spec.bias] = _cat([b[lo:hi] for lo, hi in rows])
        else:
            lo, hi = units[spec.cols]
            out[spec.name] = w[:, lo:hi]
            if b is not None and rank == 0:
                out[spec.bias] = b
    return {k: v.contiguous() for k, v in out.items()}
