"""The tensor-parallel plan (which KV heads and MLP columns each rank owns) and the streaming sharder.

Attention is split by whole KV-head groups (a rank gets KV heads [a, b) and their query heads: q/k/v
rows, o_proj columns); the MLP by intermediate columns (gate/up rows, down_proj columns). Both follow
the per-rank ratios, so splits may be uneven; with more nodes than KV heads some ranks hold no
attention heads, only MLP columns. o_proj and down_proj biases live on rank 0 only, since
they are added once after the allreduce sums the partial outputs.

The sharder reads the source checkpoint one layer at a time and writes one safetensors file per
(rank, layer) in runtime (fused) form, plus rank 0's embeddings, final norm and lm_head (in vocab
chunks no bigger than a layer file, so the head streams through the same window as the layers).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_node.model import layout
from edge_node.model.config import ModelConfig
from edge_node.model.errors import CheckpointError, EdgefedError
from edge_node.model.formats import (
    ST_NAMES,
    TORCH_NAMES,
    ChecksumError,
    prepare_out_dir,
    sha256_file,
    torch_name,
    verify_sha256,
    weights_digest,
    write_streaming,
    write_tensors,
)
from edge_node.model.layout import fuse_layer
from quant.checkpoint import FloatSource

FORMAT = "edgefed-tp-shards/1"
MANIFEST = "manifest.json"
WEIGHTS = ("float32", "bfloat16", "int8")
QUANTIZED = tuple(s.name for s in layout.LINEARS if s.quantize)  # int8 mode's matrices; norms and biases stay float32
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json")


class ShardError(EdgefedError):
    """A shard plan cannot be made, or a shard directory is incomplete."""


ShardChecksumError = ChecksumError  # a shard file's sha256 differs from the manifest's


@dataclass(frozen=True)
class RankSlice:
    rank: int
    kv_heads: tuple[int, int]  # half-open range of KV heads
    mlp: tuple[int, int]  # half-open range of intermediate columns

    def units(self, cfg: ModelConfig) -> dict[str, tuple[int, int]]:
        """This rank's range of every layout unit (see edge_node.model.layout)."""
        return layout.rank_units(cfg, self.kv_heads, self.mlp)


@dataclass(frozen=True)
class TPPlan:
    ratios: tuple[float, ...]
    slices: tuple[RankSlice, ...]

    @property
    def nodes(self) -> int:
        return len(self.slices)


def split_by_ratio(total: int, ratios: list[float] | tuple[float, ...], minimum: int = 1) -> list[int]:
    """Integer parts of `total` proportional to ratios (largest remainder), each at least `minimum`."""
    n = len(ratios)
    if n == 0 or any(r <= 0 for r in ratios):
        raise ShardError(f"ratios must be positive, got {list(ratios)}")
    if total < minimum * n or (minimum == 0 and total == 0):
        raise ShardError(f"cannot split {total} into {n} parts of at least {minimum}")
    exact = [total * r / sum(ratios) for r in ratios]
    parts = [int(e) for e in exact]
    by_remainder = sorted(range(n), key=lambda i: (parts[i] - exact[i], i))  # most-shortchanged first
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    for i in range(n):  # lift tiny shares to the minimum, taking from the biggest
        while parts[i] < minimum:
            parts[max(range(n), key=lambda j: parts[j])] -= 1
            parts[i] += 1
    return parts


def _ranges(counts: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def mlp_unit(intermediate: int, nodes: int) -> int:
    """MLP columns go to ranks in whole units of 64 (or 32, 16) where the size allows: matmul kernels
    (the int8 one above all) want the reduction dimension of down_proj in multiples of 16."""
    return next((u for u in (64, 32, 16) if intermediate % u == 0 and intermediate // u >= nodes), 1)


def make_plan(cfg: ModelConfig, nodes: int, ratios: list[float] | None = None) -> TPPlan:
    """KV heads and MLP columns per rank, proportional to ratios (even when None)."""
    ratios = list(ratios) if ratios else [1.0] * nodes
    if len(ratios) != nodes:
        raise ShardError(f"--ratios has {len(ratios)} values for {nodes} nodes")
    if not 1 <= nodes <= cfg.intermediate_size:
        raise ShardError(f"{nodes} nodes: need 1 <= nodes <= intermediate_size={cfg.intermediate_size}")
    # More nodes than KV heads: the extra ranks hold no attention heads, only MLP columns (and still
    # join both allreduces of every layer, adding zeros for attention).
    kv_min = 1 if nodes <= cfg.num_key_value_heads else 0
    kv = _ranges(split_by_ratio(cfg.num_key_value_heads, ratios, minimum=kv_min))
    unit = mlp_unit(cfg.intermediate_size, nodes)
    mlp = _ranges([unit * n for n in split_by_ratio(cfg.intermediate_size // unit, ratios)])
    return TPPlan(tuple(ratios), tuple(RankSlice(r, kv[r], mlp[r]) for r in range(nodes)))


def slice_layer(t: dict[str, torch.Tensor | None], cfg: ModelConfig, s: RankSlice) -> dict[str, torch.Tensor]:
    """A rank's part of one layer in runtime form (fused tensors from layout.fuse_layer)."""
    return layout.slice_layer(t, cfg, s.units(cfg), s.rank)


def encode(tensors: dict[str, torch.Tensor], weights: str, quantized: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Cast to the shard dtype; in int8 mode the `quantized` matrices become int8 + '<name>.scale'."""
    from quant.int8 import quantize_rows

    out: dict[str, torch.Tensor] = {}
    for name, x in tensors.items():
        if weights == "int8" and name in quantized:
            out[name], out[name + ".scale"] = quantize_rows(x)
        elif weights == "bfloat16":
            out[name] = x.to(torch.bfloat16).contiguous()
        else:
            out[name] = x.to(torch.float32).contiguous()
    return out


class _Writer:
    def __init__(self, out: Path):
        self.out, self.files = out, []

    def write(self, rel: str, rank: int, kind: str, tensors: dict[str, torch.Tensor], **extra) -> int:
        return self._record(rel, rank, kind, write_tensors(self._path(rel), tensors), extra)

    def write_streaming(self, rel: str, rank: int, kind: str, entries, **extra) -> int:
        return self._record(rel, rank, kind, write_streaming(self._path(rel), entries), extra)

    def _path(self, rel: str) -> Path:
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _record(self, rel: str, rank: int, kind: str, header: dict, extra: dict) -> int:
        path = self.out / rel
        meta = {n: {"shape": h["shape"], "dtype": torch_name(h["dtype"])} for n, h in header.items()}
        size = path.stat().st_size
        self.files.append({"path": rel, "rank": rank, "kind": kind, **extra, "tensors": meta, "bytes": size,
                           "sha256": sha256_file(path)})
        return size


def _stale_shard_file(path: Path) -> bool:
    """What an earlier `edgefed shard` wrote (rank directories, manifest, copied model files)."""
    return (path.is_dir() and path.name.startswith("rank")) or path.name in (MANIFEST, *_COPIED)


def write_shards(model_dir: str | Path, out_dir: str | Path, nodes: int, ratios: list[float] | None = None,
                 weights: str = "float32", force: bool = False) -> dict:
    """Shard a checkpoint for `nodes` ranks, reading one layer at a time; returns the manifest."""
    if weights not in WEIGHTS:
        raise ShardError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    model_dir, out = Path(model_dir), Path(out_dir)
    cfg = ModelConfig.from_dir(model_dir)
    plan = make_plan(cfg, nodes, ratios)
    ckpt = FloatSource(model_dir, cfg)  # validated; an edgefed-quantized source reads back dequantized
    prepare_out_dir(out, model_dir, force, _stale_shard_file, ShardError)
    w = _Writer(out)

    def get(name: str) -> torch.Tensor:
        return ckpt.get(name)

    biggest = 0
    for i in range(cfg.num_layers):
        fused = fuse_layer(get, cfg, i)  # one layer in RAM at a time
        for s in plan.slices:
            part = encode(slice_layer(fused, cfg, s), weights, QUANTIZED)
            size = w.write(f"rank{s.rank}/layer{i:04d}.safetensors", s.rank, "layer", part, layers=[i, i + 1])
            biggest = max(biggest, size) if s.rank == 0 else biggest
        del fused
    _write_rank0_extras(w, ckpt, cfg, weights, biggest, get)
    ckpt.close()
    for name in _COPIED:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    manifest = {
        "format": FORMAT, "nodes": nodes, "ratios": list(plan.ratios), "weights": weights,
        "plan": [{"rank": s.rank, "kv_heads": list(s.kv_heads), "mlp": list(s.mlp)} for s in plan.slices],
        "config": json.loads((model_dir / "config.json").read_text()), "files": w.files,
        "weights_digest": weights_digest(model_dir),  # what ONNX graphs exported from the source must match
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _write_rank0_extras(w: _Writer, ckpt: FloatSource, cfg: ModelConfig, weights: str, chunk_bytes: int, get) -> None:
    """Embeddings + final norm in one file (read by rows), lm_head in vocab chunks of about a layer's size.

    The (vocab, hidden) tables are the only tensors bigger than a layer: they are read and written in
    row chunks, so the sharder never holds more than about one layer.
    """
    row_bytes = cfg.hidden_size * TORCH_NAMES[weights].itemsize
    rows = max(1, min(cfg.vocab_size, chunk_bytes // row_bytes))
    chunks = [(v0, min(cfg.vocab_size, v0 + rows)) for v0 in range(0, cfg.vocab_size, rows)]
    embed_name = "model.embed_tokens.weight"
    head_name = embed_name if cfg.tie_word_embeddings else "lm_head.weight"
    norm = encode({"norm": get("model.norm.weight")}, weights, ())
    scales: list[torch.Tensor] = []

    def embed_parts():
        for v0, v1 in chunks:
            part = encode({"embed": _rows(ckpt, embed_name, v0, v1)}, weights, ("embed",))
            if "embed.scale" in part:
                scales.append(part["embed.scale"])
            yield part["embed"]

    dtype = ST_NAMES[TORCH_NAMES[weights]]
    entries = [("embed", dtype, (cfg.vocab_size, cfg.hidden_size), embed_parts)]
    if weights == "int8":
        entries.append(("embed.scale", "F32", (cfg.vocab_size,), lambda: [torch.cat(scales)]))
    entries.append(("norm", "F32" if weights == "int8" else dtype, (cfg.hidden_size,), lambda: [norm["norm"]]))
    w.write_streaming("rank0/embed.safetensors", 0, "embed", entries)
    for k, (v0, v1) in enumerate(chunks):
        w.write(f"rank0/head{k:04d}.safetensors", 0, "head",
                encode({"lm_head": _rows(ckpt, head_name, v0, v1)}, weights, ("lm_head",)), vocab=[v0, v1])


def _rows(ckpt: FloatSource, name: str, v0: int, v1: int) -> torch.Tensor:
    """Rows [v0, v1) of a source tensor as float32, read through a short-lived mapping."""
    return ckpt.rows(name, v0, v1)


@dataclass(frozen=True)
class ShardFile:
    path: Path
    rank: int
    kind: str  # "layer" | "embed" | "head"
    bytes: int
    sha256: str
    layer: int | None = None
    vocab: tuple[int, int] | None = None


@dataclass(frozen=True)
class Manifest:
    dir: Path
    nodes: int
    weights: str
    config: ModelConfig
    plan: TPPlan
    files: tuple[ShardFile, ...]
    weights_digest: str | None = None  # formats.weights_digest of the source checkpoint (None: older shards)

    @classmethod
    def load(cls, shard_dir: str | Path, rank: int | None = None) -> Manifest:
        """Read and check a manifest against itself (plan, layers, vocab chunks) and the files on disk.

        rank None: every rank's files must be on disk. rank R: only what rank R reads (its layer files, and for
        rank 0 the embeddings and head chunks), as on a node that was sent only its own rank's files; the
        manifest itself is still checked whole."""
        d = Path(shard_dir)
        path = d / MANIFEST
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ShardError(f"{path}: not found (is {d} a directory written by `edgefed shard`?)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else raw
            raise ShardError(f"{path}: format {found!r}, expected {FORMAT!r}")
        for key, kind in (("nodes", int), ("weights", str), ("ratios", list), ("plan", list), ("config", dict),
                          ("files", list)):
            if not isinstance(raw.get(key), kind) or isinstance(raw.get(key), bool):
                raise ShardError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
        if raw["weights"] not in WEIGHTS:
            raise ShardError(f"{path}: field 'weights' is {raw['weights']!r}, expected one of {', '.join(WEIGHTS)}")
        cfg = ModelConfig.from_dict(raw["config"], f"{path} (config)")
        plan = _check_plan(raw, cfg, path)
        if rank is not None and not (isinstance(rank, int) and 0 <= rank < plan.nodes):
            raise ShardError(f"{path}: rank {rank!r} is not one of this {plan.nodes}-node plan's ranks")
        files = tuple(_shard_file(d, f, path, i) for i, f in enumerate(raw["files"]))
        _check_files(files, cfg, plan.nodes, path)
        for f in files:
            if rank is None or f.rank == rank:
                _check_on_disk(f, path)
        digest = raw.get("weights_digest")
        return cls(d, raw["nodes"], raw["weights"], cfg, plan, files, digest if isinstance(digest, str) else None)

    def rank_files(self, rank: int, kind: str) -> list[ShardFile]:
        found = [f for f in self.files if f.rank == rank and f.kind == kind]
        return sorted(found, key=lambda f: (f.layer or 0, f.vocab or (0, 0)))

    def stream_files(self, rank: int) -> list[ShardFile]:
        """What rank `rank` streams per token, in order: its layers, then (rank 0) the head chunks."""
        return self.rank_files(rank, "layer") + self.rank_files(rank, "head")


def _check_plan(raw: dict, cfg: ModelConfig, path: Path) -> TPPlan:
    """The manifest's plan must be the one its config, node count and ratios give (an edited `nodes` or
    plan would otherwise run part of the model)."""
    try:
        ratios = [float(r) for r in raw["ratios"]]
        want = make_plan(cfg, raw["nodes"], ratios)
        got = tuple(RankSlice(int(p["rank"]), tuple(p["kv_heads"]), tuple(p["mlp"])) for p in raw["plan"])
    except (ShardError, KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{path}: inconsistent 'nodes', 'ratios' and 'plan' ({e})") from None
    if got != want.slices:
        raise ShardError(f"{path}: the plan for {len(got)} rank(s) does not match 'nodes' = {raw['nodes']} and "
                         f"'ratios' = {ratios} (was the manifest edited?)")
    return want


def _shard_file(d: Path, f: object, path: Path, i: int) -> ShardFile:
    try:
        layers, vocab = f.get("layers"), f.get("vocab")
        out = ShardFile(d / str(f["path"]), int(f["rank"]), str(f["kind"]), int(f["bytes"]), str(f["sha256"]),
                        int(layers[0]) if layers is not None else None,
                        (int(vocab[0]), int(vocab[1])) if vocab is not None else None)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        raise ShardError(f"{path}: files[{i}] lacks a valid path, rank, kind, bytes or sha256") from None
    return out


def _check_on_disk(f: ShardFile, path: Path) -> None:
    if not f.path.is_file():
        raise CheckpointError(f"{path}: lists missing shard file(s) {f.path} (rank {f.rank}'s {f.kind})")
    size = f.path.stat().st_size
    if size != f.bytes:
        raise CheckpointError(f"{f.path}: {size} bytes on disk, the manifest says {f.bytes}")


def rank_paths(manifest: dict, rank: int) -> set[str]:
    """The manifest's file paths (relative) that rank `rank` reads: what a node running only that rank needs
    besides the manifest and the copied model files (pure; on a raw manifest as write_shards returns it)."""
    return {f["path"] for f in manifest["files"] if f["rank"] == rank}


def _check_files(files: tuple[ShardFile, ...], cfg: ModelConfig, nodes: int, path: Path) -> None:
    """Every rank holds one file per layer; rank 0 also the embeddings and head chunks covering the vocabulary."""
    for rank in range(nodes):
        layers = sorted(f.layer for f in files if f.rank == rank and f.kind == "layer")
        if layers != list(range(cfg.num_layers)):
            raise ShardError(f"{path}: rank {rank} has layer files {layers}, expected 0..{cfg.num_layers - 1}")
    chunks = sorted(f.vocab for f in files if f.rank == 0 and f.kind == "head")
    ends = [0] + [b for _, b in chunks]
    if [a for a, _ in chunks] != ends[:-1] or ends[-1] != cfg.vocab_size:
        raise ShardError(f"{path}: rank 0's head chunks {chunks} do not cover the vocabulary [0, {cfg.vocab_size})")
    if sum(f.rank == 0 and f.kind == "embed" for f in files) != 1:
        raise ShardError(f"{path}: rank 0 needs exactly one embeddings file")
    strays = sorted({f.rank for f in files} - set(range(nodes)))
    if strays:
        raise ShardError(f"{path}: files for rank(s) {strays} of a {nodes}-node plan")


def verify_file(f: ShardFile) -> None:
    """Hash a whole file once and compare with the manifest (the streamed files verify as they are read)."""
    verify_sha256(f.path, f.sha256)
