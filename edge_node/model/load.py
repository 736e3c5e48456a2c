"""Build a Transformer (or a layer range of one) from a Hugging Face model directory.

Every tensor name and shape is checked against config.json from the headers alone,
before a single weight is read; weights are then read one tensor at a time and fused
(q|k|v, gate|up) so decode runs fewer, larger matmuls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint, TensorInfo
from .config import ModelConfig
from .errors import MissingTensorError, TensorShapeError, UnexpectedTensorError, UsageError
from .layout import LINEARS, LinearSpec, Range, expected_shapes, full_units, fuse_layer, head_counts
from .model import MLP, Attention, Block, Linear, NoAttention, RMSNorm, Transformer

LinearFactory = Callable[[LinearSpec, dict], nn.Module]
__all__ = ["LinearFactory", "build_block", "check_names", "dense_linear", "expected_shapes", "fuse_layer", "load_model",
           "validate"]

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # stored by some old checkpoints, recomputed here


def check_names(ckpt: Checkpoint, want: Iterable[str], ignore: Iterable[str] = (), missing_what: str = "",
                extra_what: str = "") -> dict[str, TensorInfo]:
    """The checkpoint's tensors (less those recomputed here and `ignore`), after naming every missing and
    every unexpected one against `want`."""
    skip = set(ignore)
    have = {n: t for n, t in ckpt.tensors.items() if not n.endswith(_IGNORED_SUFFIXES) and n not in skip}
    missing = sorted(set(want) - set(have))
    if missing:
        raise MissingTensorError(f"{ckpt.dir}: missing tensor(s){missing_what}: {_names(missing)}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise UnexpectedTensorError(f"{ckpt.dir}: unexpected tensor(s){extra_what}: {_names(extra)}")
    return have


def validate(ckpt: Checkpoint, cfg: ModelConfig) -> None:
    """Name every missing, unexpected or misshaped tensor (headers only)."""
    want = expected_shapes(cfg)
    # some tied checkpoints store the head's copy anyway
    have = check_names(ckpt, want, ("lm_head.weight",) if cfg.tie_word_embeddings else ())
    for name, shape in want.items():
        if have[name].shape != shape:
            raise TensorShapeError(
                f"{have[name].file}: tensor {name!r} has shape {list(have[name].shape)}, "
                f"config.json implies {list(shape)}"
            )


def _names(names: list[str], limit: int = 8) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def dense_linear(spec: LinearSpec, t: dict[str, torch.Tensor | None]) -> nn.Module:
    """The plain float Linear for `spec` (the default linear factory)."""
    return Linear(t[spec.name], t.get(spec.bias))


def build_block(cfg: ModelConfig, index: int, t: dict[str, torch.Tensor | None],
                units: dict[str, Range] | None = None, linear: LinearFactory = dense_linear) -> Block:
    """A Block from runtime-form tensors holding the unit ranges `units` (default: the whole layer).

    `linear(spec, tensors)` makes each linear (float, int8, with an adapter...): blocks are built with
    the linear type they need, never patched afterwards. A slice with no KV heads (more tensor-parallel
    ranks than KV heads) gets NoAttention.
    """
    heads, kv_heads = head_counts(cfg, units or full_units(cfg))
    mods = {spec.name: linear(spec, t) for spec in LINEARS if kv_heads or spec.owner != "attn"}
    if kv_heads:
        attn = Attention(mods["wqkv"], mods["wo"], heads, kv_heads, cfg.head_dim)
    else:
        attn = NoAttention(cfg.hidden_size, cfg.head_dim, t.get("bo"))
    mlp = MLP(mods["w13"], mods["w2"])
    eps = cfg.rms_norm_eps
    return Block(index, RMSNorm(t["ln1"], eps), attn, RMSNorm(t["ln2"], eps), mlp, cfg.window_for_layer(index))


def _embedding(ckpt: Checkpoint, cfg: ModelConfig, dtype: torch.dtype, column_major: bool) -> torch.Tensor:
    """The (vocab, hidden) embedding; column-major when it doubles as a packed tied head (Transformer.pack),
    filled a block of rows at a time so the table never exists twice while it is laid out."""
    name = "model.embed_tokens.weight"
    if not column_major:
        return ckpt.get(name, dtype)
    return ckpt.read_into(name, torch.empty(cfg.hidden_size, cfg.vocab_size, dtype=dtype).t())


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None,
               embed: bool | None = None, head: bool | None = None, pack: bool = False) -> Transformer:
    """Load layers [start, end) of a checkpoint; embeddings default to start == 0, the head to end == L.

    pack=True reorders the block weights for oneDNN as they load (faster on x86; see Linear.pack).
    """
    cfg = ModelConfig.from_dir(model_dir)
    end = cfg.num_layers if end is None else end
    if not 0 <= start < end <= cfg.num_layers:
        raise UsageError(f"layer range [{start}, {end}) is outside the model's [0, {cfg.num_layers})")
    embed = start == 0 if embed is None else embed
    head = end == cfg.num_layers if head is None else head
    ckpt = Checkpoint(model_dir)
    validate(ckpt, cfg)

    def get(name: str) -> torch.Tensor:
        return ckpt.get(name, dtype)

    head_linear = None
    if head and not cfg.tie_word_embeddings:  # first, so packing it (a second copy, briefly) adds to no peak
        head_linear = Linear(get("lm_head.weight"))
        if pack:
            head_linear.pack()
    blocks = {}
    for i in range(start, end):
        blocks[i] = build_block(cfg, i, fuse_layer(get, cfg, i))
        if pack:  # per block, so plain and packed copies of the whole model never coexist
            blocks[i].apply(lambda m: m.pack() if isinstance(m, Linear) else None)
    emb = None
    if embed or (head and cfg.tie_word_embeddings):
        emb = _embedding(ckpt, cfg, dtype, column_major=pack and head and cfg.tie_word_embeddings)
    lm_head = None
    if head:
        lm_head = emb if cfg.tie_word_embeddings else head_linear
    norm = RMSNorm(get("model.norm.weight"), cfg.rms_norm_eps) if head else None
    ckpt.close()
    model = Transformer(cfg, blocks, dtype, emb if embed else None, norm, lm_head)
    if pack:
        model.pack()  # blocks are packed already (a no-op for them); this handles the head
    return model
