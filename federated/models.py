"""The adapter a federated session trains: LoRA configs, its initial state, peft models on a frozen base, and the
adapter's tensors in and out of a peft model (PEFT's saved names, the only tensors that travel)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from edge_node.model.config import ModelConfig
from edge_node.model.layout import PEFT_TARGETS
from edge_node.model.lora import part_shape

TARGETS = tuple(PEFT_TARGETS)  # q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
ALPHA_PER_RANK = 2.0  # lora_alpha = 2 r: the same scaling at every rank, so HetLoRA's padded ranks agree
PREFIX = "base_model.model.model.layers"


def _peft():
    """peft, imported after bitsandbytes is (quietly): peft imports it when installed."""
    from quant.bnb import import_bitsandbytes

    import_bitsandbytes()
    import peft

    return peft


def lora_config(rank: int, targets: Sequence[str] = TARGETS):
    LoraConfig = _peft().LoraConfig  # noqa: N806

    return LoraConfig(r=rank, lora_alpha=ALPHA_PER_RANK * rank, target_modules=list(targets), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")


def _module_path(peft_name: str) -> str:
    return ("self_attn." if PEFT_TARGETS[peft_name][0] in ("wqkv", "wo") else "mlp.") + peft_name


def init_state(cfg: ModelConfig, rank: int, targets: Sequence[str] = TARGETS, seed: int = 0) -> dict[str, torch.Tensor]:
    """The initial global adapter as peft initialises LoRA (A ~ U(+-1/sqrt(in)), i.e. kaiming-uniform with
    a = sqrt(5); B = 0), seeded, from the model's config alone (no weights loaded)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(cfg.num_layers):
        for t in targets:
            rows, cols = part_shape(cfg, t)
            name = f"{PREFIX}.{i}.{_module_path(t)}"
            bound = 1 / math.sqrt(cols)
            out[f"{name}.lora_A.weight"] = (torch.rand(rank, cols, generator=g) * 2 - 1) * bound  # (r, in)
            out[f"{name}.lora_B.weight"] = torch.zeros(rows, rank)  # (out, r)
    return out


def attach(base, rank: int, targets: Sequence[str] = TARGETS, freeze_a: bool = False):
    """A peft LoRA model around a frozen base; with freeze_a (FFA-LoRA) only the B's train."""
    model = _peft().get_peft_model(base, lora_config(rank, targets))
    if freeze_a:
        for n, p in model.named_parameters():
            if ".lora_A." in n:
                p.requires_grad_(False)
    return model


def get_state(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved names, float32, detached copies."""
    return {n: t.detach().float().clone() for n, t in _peft().get_peft_model_state_dict(model).items()}


def set_state(model, state: Mapping[str, torch.Tensor]) -> None:
    """Load adapter tensors (saved names) into a peft model; every LoRA tensor must be given."""
    result = _peft().set_peft_model_state_dict(model, dict(state))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"adapter state does not fit the model: missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}")


def nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
