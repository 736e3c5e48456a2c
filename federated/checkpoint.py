"""The global adapter checkpointed every round, in PEFT format, so a restarted server resumes from the last
finished round and any round's adapter can be deployed as it is.

    OUT/round-0003/adapter_config.json        peft's LoraConfig
    OUT/round-0003/adapter_model.safetensors  the global LoRA tensors (PEFT's saved names)
    OUT/round-0003/edgefed_adapter.json       base weights digest (edge_node.adapters refuses another base)
    OUT/round-0003/round.json                 round number, metrics, and last of all: written means finished
    OUT/latest -> round-0003                  (a symlink, replaced atomically)

A round directory is written under a temporary name and renamed whole, so a crash mid-write leaves no
half-written round that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edge_node.adapters import BASE, CONFIG, WEIGHTS
from edge_node.model.errors import CheckpointError

from .models import ALPHA_PER_RANK

ROUND = "round.json"


def round_dir(out: str | Path, rnd: int) -> Path:
    return Path(out) / f"round-{rnd:04d}"


def save_round(out: str | Path, rnd: int, state: dict[str, torch.Tensor], rank: int, targets: list[str],
               base_digest: str, base_path: str, metrics: dict) -> Path:
    """Write round `rnd`'s global adapter; returns its directory."""
    out = Path(out)
    final = round_dir(out, rnd)
    tmp = out / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG).write_text(json.dumps(adapter_config(rank, targets, base_path), indent=1))
    save_file({n: t.contiguous() for n, t in state.items()}, str(tmp / WEIGHTS))
    (tmp / BASE).write_text(json.dumps({"base_weights_digest": base_digest}))
    (tmp / ROUND).write_text(json.dumps({"round": rnd, "rank": rank, "metrics": metrics}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    link = out / ".latest.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(final.name)
    os.replace(link, out / "latest")
    return final


def adapter_config(rank: int, targets: list[str], base_path: str) -> dict:
    """adapter_config.json as peft writes it for federated.models.lora_config (peft need not be imported: the
    server stays light; peft's own loader reads this back, tests/federated/test_strategy.py checks)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path, "r": rank,
            "lora_alpha": ALPHA_PER_RANK * rank, "lora_dropout": 0.0, "target_modules": sorted(targets),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None}


def finished_rounds(out: str | Path) -> list[int]:
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for d in out.glob("round-[0-9][0-9][0-9][0-9]"):
        if (d / ROUND).is_file() and (d / WEIGHTS).is_file() and (d / CONFIG).is_file():
            found.append(int(d.name.split("-")[1]))
    return sorted(found)


def load_round(out: str | Path, rnd: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A finished round's global adapter tensors and its round.json record."""
    d = round_dir(out, rnd)
    try:
        record = json.loads((d / ROUND).read_text())
        return load_file(str(d / WEIGHTS)), record
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d}: cannot read round {rnd} ({e})") from None


def last_round(out: str | Path) -> int:
    """The last finished round (0: none)."""
    rounds = finished_rounds(out)
    return rounds[-1] if rounds else 0
