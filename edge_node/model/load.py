"""Build a Transformer (or a layer range of one) from a Hugging Face model directory.

Every tensor name and shape is checked against config.json from the headers alone,
before a single weight is read; weights are then read one tensor at a time and fused
(q|k|v, gate|up) so decode runs fewer, larger matmuls.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import MissingTensorError, TensorShapeError, UnexpectedTensorError
from .model import MLP, Attention, Block, Linear, RMSNorm, Transformer

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # stored by some old checkpoints, recomputed here


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF Llama-family checkpoint holds, with its shape, from the config alone."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        layer = {
            "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
        }
        if cfg.qkv_bias:
            layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
        if cfg.o_bias:
            layer["self_attn.o_proj.bias"] = (h,)
        if cfg.mlp_bias:
            layer |= {"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (h,)}
        shapes |= {p + k: v for k, v in layer.items()}
    return shapes


def validate(ckpt: Checkpoint, cfg: ModelConfig) -> None:
    """Name every missing, unexpected or misshaped tensor (headers only)."""
    want = expected_shapes(cfg)
    have = {n: t for n, t in ckpt.tensors.items() if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        have.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    missing = sorted(set(want) - set(have))
    if missing:
        raise MissingTensorError(f"{ckpt.dir}: missing tensor(s): {_names(missing)}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise UnexpectedTensorError(f"{ckpt.dir}: unexpected tensor(s): {_names(extra)}")
    for name, shape in want.items():
        if have[name].shape != shape:
            raise TensorShapeError(
                f"{have[name].file}: tensor {name!r} has shape {list(have[name].shape)}, "
                f"config.json implies {list(shape)}"
            )


def _names(names: list[str], limit: int = 8) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def fuse_layer(get, cfg: ModelConfig, index: int) -> dict[str, torch.Tensor | None]:
    """One layer's tensors in runtime form: wqkv = [q; k; v], w13 = [gate; up]; biases likewise."""
    p = f"model.layers.{index}."
    a, m = p + "self_attn.", p + "mlp."
    out = {
        "ln1": get(p + "input_layernorm.weight"),
        "ln2": get(p + "post_attention_layernorm.weight"),
        "wqkv": torch.cat([get(a + f"{x}_proj.weight") for x in "qkv"]),
        "wo": get(a + "o_proj.weight"),
        "w13": torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")]),
        "w2": get(m + "down_proj.weight"),
        "bqkv": torch.cat([get(a + f"{x}_proj.bias") for x in "qkv"]) if cfg.qkv_bias else None,
        "bo": get(a + "o_proj.bias") if cfg.o_bias else None,
        "b13": torch.cat([get(m + "gate_proj.bias"), get(m + "up_proj.bias")]) if cfg.mlp_bias else None,
        "b2": get(m + "down_proj.bias") if cfg.mlp_bias else None,
    }
    return out


def build_block(cfg: ModelConfig, index: int, t: dict[str, torch.Tensor | None]) -> Block:
    """A Block from runtime-form tensors; head counts come from the shapes, so a rank's slice works too."""
    d = cfg.head_dim
    heads = t["wo"].shape[1] // d
    kv_heads = (t["wqkv"].shape[0] - heads * d) // (2 * d)
    attn = Attention(Linear(t["wqkv"], t["bqkv"]), Linear(t["wo"], t["bo"]), heads, kv_heads, d)
    mlp = MLP(Linear(t["w13"], t["b13"]), Linear(t["w2"], t["b2"]))
    eps = cfg.rms_norm_eps
    return Block(index, RMSNorm(t["ln1"], eps), attn, RMSNorm(t["ln2"], eps), mlp, cfg.window_for_layer(index))


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None,
               embed: bool | None = None, head: bool | None = None, pack: bool = False) -> Transformer:
    """Load layers [start, end) of a checkpoint; embeddings default to start == 0, the head to end == L.

    pack=True reorders the block weights for oneDNN as they load (faster on x86; see Linear.pack).
    """
    cfg = ModelConfig.from_dir(model_dir)
    end = cfg.num_layers if end is None else end
    if not 0 <= start < end <= cfg.num_layers:
        raise ValueError(f"layer range [{start}, {end}) is outside the model's [0, {cfg.num_layers})")
    embed = start == 0 if embed is None else embed
    head = end == cfg.num_layers if head is None else head
    ckpt = Checkpoint(model_dir)
    validate(ckpt, cfg)

    def get(name: str) -> torch.Tensor:
        return ckpt.get(name, dtype)

    blocks = {}
    for i in range(start, end):
        blocks[i] = build_block(cfg, i, fuse_layer(get, cfg, i))
        if pack:  # per block, so plain and packed copies of the whole model never coexist
            blocks[i].apply(lambda m: m.pack() if isinstance(m, Linear) else None)
    emb = get("model.embed_tokens.weight") if embed or (head and cfg.tie_word_embeddings) else None
    lm_head = None
    if head:
        lm_head = emb if cfg.tie_word_embeddings else get("lm_head.weight")
    norm = RMSNorm(get("model.norm.weight"), cfg.rms_norm_eps) if head else None
    ckpt.close()
    model = Transformer(cfg, blocks, dtype, emb if embed else None, norm, lm_head)
    if pack:
        model.pack()  # blocks are packed already (a no-op for them); this handles the head
    return model
