"""What a client does in a round, without Flower types: load the frozen base (bitsandbytes nf4 / int8, or
float32), put the global adapter on it at the rank it was given, measure held-out perplexity, train, and hand
back only the adapter tensors it trained (all of them; only the B's under FFA-LoRA).

A process that serves many rounds (federated.warm's ClientApp process) keeps the last peft model and the token
blocks: the next round with the same base, quantization, rank, targets and rule only loads the new global
adapter into it (every LoRA tensor is overwritten, the optimizer is new each round), so a round costs its
training, not a model load. `clear_cache` drops them."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import torch

from edge_node.model.checkpoint import Checkpoint
from edge_node.model.errors import UsageError
from edge_node.model.tokenizer import Tokenizer

from . import data, models, train
from .aggregation import is_b, truncate
from .plan import choose_quant

QUANTS = ("auto", "nf4", "int8", "float32")


@dataclass(frozen=True)
class ClientSettings:
    """The device side, from the SuperNode's node config."""

    name: str
    data: str  # JSON file: {"train": [files], "heldout": [files]} (federated.data.write_client_data)
    model: str = ""  # the base model directory on this device ("" : the one the server names)
    quant: str = "auto"  # auto: the least lossy that fits memory-mb (federated.plan)
    memory_mb: float = 4096.0
    slowdown: float = 1.0  # emulation: every step takes this many times as long (a straggler)
    threads: int = 1

    @classmethod
    def from_config(cls, raw: dict) -> ClientSettings:
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        kw = {}
        for key, value in raw.items():
            if key in known:
                f = known[key]
                kw[f.name] = {"float": float, "int": int}.get(f.type, str)(value)
        for req in ("name", "data"):
            if req not in kw:
                raise UsageError(f"node config lacks {req!r} (give --node-config '{req}=...' to the SuperNode)")
        s = cls(**kw)
        if s.quant not in QUANTS:
            raise UsageError(f"node config quant must be one of {', '.join(QUANTS)}, got {s.quant!r}")
        return s


@dataclass(frozen=True)
class Orders:
    """What the server asks of a client in one round (a Flower ConfigRecord)."""

    round: int
    model: str
    rule: str = "fedavg"
    rank: int = 8
    steps: int = 10
    lr: float = 1e-3
    batch_size: int = 4
    seq_len: int = 128
    train_blocks: int = 256
    eval_blocks: int = 8
    seed: int = 0
    targets: str = ",".join(models.TARGETS)

    def to_config(self) -> dict:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, raw: dict) -> Orders:
        names = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        return cls(**{names[k]: v for k, v in raw.items() if k in names})


@lru_cache(maxsize=4)
def params(model_dir: str) -> int:
    ckpt = Checkpoint(model_dir)
    return sum(int(torch.Size(t.shape).numel()) for t in ckpt.tensors.values())


def pick_quant(s: ClientSettings, model_dir: str) -> str:
    return choose_quant(s.memory_mb, params(model_dir), overhead_mb=256.0)[0] if s.quant == "auto" else s.quant


def _stamp(*paths: Path) -> tuple:
    """What identifies files' contents cheaply (size, modification time): a cache key part."""
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(p), None, None))
    return tuple(out)


@lru_cache(maxsize=8)
def _cached_blocks(data_file: str, split: str, model_dir: str, seq_len: int, max_blocks: int, _stamp: tuple
                   ) -> torch.Tensor:
    tok = Tokenizer.from_dir(model_dir)
    eos = tok.token_id(tok.eos_token)
    return data.token_blocks(data.read_client_texts(data_file, split), tok, seq_len, max_blocks, eos)


def _blocks(s: ClientSettings, o: Orders, model_dir: str, split: str, max_blocks: int) -> torch.Tensor:
    """(N, seq_len) token blocks of the client's split; cached while the data file and the tokenizer are
    unchanged (a data file names its text files: rewrite it, or call clear_cache, when those change)."""
    stamp = _stamp(Path(s.data), *sorted(Path(model_dir).glob("tokenizer*")))
    return _cached_blocks(s.data, split, model_dir, o.seq_len, max_blocks, stamp)


_MODEL: dict[tuple, object] = {}  # at most one peft model: (base, quant, rank, targets, rule) -> model


def clear_cache() -> None:
    """Forget the kept peft model and token blocks (the next round loads the base again)."""
    _MODEL.clear()
    _cached_blocks.cache_clear()


def _model(s: ClientSettings, o: Orders, state: dict[str, torch.Tensor]):
    from quant.bnb import load_base

    model_dir = s.model or o.model
    if not Path(model_dir).is_dir():
        raise UsageError(f"client {s.name}: base model directory {model_dir} not found")
    quant = pick_quant(s, model_dir)
    weights = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".json"))
    key = (str(Path(model_dir).resolve()), _stamp(*weights), quant, o.rank, o.targets, o.rule == "ffa")
    model = _MODEL.get(key)
    if model is None:
        _MODEL.clear()  # free the previous one before loading (peft wraps its base in place: no sharing)
        base = load_base(model_dir, quant)
        model = models.attach(base, o.rank, o.targets.split(","), freeze_a=o.rule == "ffa")
        _MODEL[key] = model
    models.set_state(model, truncate(state, o.rank) if o.rule == "hetlora" else state)
    return model, model_dir, quant


def client_train(s: ClientSettings, o: Orders, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """One round: (the adapter tensors to send, metrics)."""
    torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    model, model_dir, quant = _model(s, o, state)
    heldout = _blocks(s, o, model_dir, "heldout", o.eval_blocks)
    ppl_before = train.perplexity(model, heldout)
    blocks = _blocks(s, o, model_dir, "train", o.train_blocks)

    def slow_down(step_s: float) -> None:
        if s.slowdown > 1:
            time.sleep((s.slowdown - 1) * step_s)

    r = train.train_local(model, blocks, o.steps, o.lr, o.batch_size, o.seed * 1009 + o.round, slow_down)
    out = models.get_state(model)
    if o.rule == "ffa":
        out = {n: t for n, t in out.items() if is_b(n)}
    metrics = {"num-examples": r.examples, "train-loss": r.loss, "ppl-before": ppl_before, "steps": r.steps,
               "s-per-step": r.s_per_step, "train-s": r.seconds, "client-s": time.perf_counter() - t0,
               "rank": o.rank, "bytes-up": models.nbytes(out), "quant-bits": {"nf4": 4, "int8": 8}.get(quant, 32)}
    return out, metrics


def client_evaluate(s: ClientSettings, o: Orders, state: dict[str, torch.Tensor]) -> dict:
    torch.set_num_threads(s.threads)
    model, model_dir, _ = _model(s, o, state)
    return {"ppl": train.perplexity(model, _blocks(s, o, model_dir, "heldout", o.eval_blocks))}
