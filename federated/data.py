"""A client's text as fixed-length token blocks: training batches and held-out evaluation blocks.

The texts come in as data (read by the command-line layer from emulation's corpus partitions, or from files a
device holds); this module only tokenizes, blocks and samples them, deterministically for a seed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from edge_node.model.errors import UsageError
from edge_node.model.tokenizer import Tokenizer


def token_blocks(texts: Iterable[str], tok: Tokenizer, seq_len: int, max_blocks: int | None = None,
                 separator: int | None = None) -> torch.Tensor:
    """(N, seq_len) int64: the texts' tokens, each text followed by `separator` (the EOS id), cut into blocks
    (the tail shorter than a block is dropped)."""
    ids: list[int] = []
    want = None if max_blocks is None else max_blocks * seq_len
    for text in texts:
        ids.extend(tok.encode(text, add_special_tokens=False))
        if separator is not None:
            ids.append(separator)
        if want is not None and len(ids) >= want:
            break
    n = len(ids) // seq_len if want is None else min(len(ids) // seq_len, max_blocks)
    if n == 0:
        raise UsageError(f"the texts hold {len(ids)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (N, S)


def batches(blocks: torch.Tensor, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """`steps` batches (B, S) of blocks drawn without replacement within each pass, in a seeded order."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=g)
    at = 0
    for _ in range(steps):
        if at + batch_size > len(order):
            order, at = torch.randperm(len(blocks), generator=g), 0
        yield blocks[order[at: at + batch_size]]
        at += batch_size


def write_client_data(path: str | Path, train: Iterable[str | Path], heldout: Iterable[str | Path]) -> Path:
    """The JSON file a client is pointed at: {"train": [files], "heldout": [files]}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train": [str(p) for p in train], "heldout": [str(p) for p in heldout]}))
    return path


def read_client_texts(path: str | Path, split: str) -> list[str]:
    """The texts of one split of a client data file (written by `write_client_data`)."""
    p = Path(path)
    try:
        files = json.loads(p.read_text())[split]
    except FileNotFoundError:
        raise UsageError(f"{p}: client data file not found") from None
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{p}: expected a JSON object with a list of files under {split!r}") from None
    if not files:
        raise UsageError(f"{p}: no {split} files")
    return [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
