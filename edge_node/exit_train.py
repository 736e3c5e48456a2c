"""Training exit heads on a frozen model by distillation (KL to the final layer's distribution).

Hidden states at the exit layers and at the last layer are computed once (one forward per text chunk), then
each head's adapter and norm are fitted: the adapter starts from the ridge-regression map from layer e's hidden
state to the last layer's (closed form, cheap), then a few Adam steps minimise KL(p_final || p_exit) over
random minibatches of cached rows. The model and its lm_head stay frozen. Texts arrive as token ids: the
runtime never reads a corpus itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edge_node.early_exit import ExitHeads, check_exit_layers
from edge_node.model.errors import UsageError
from edge_node.model.model import Transformer


@dataclass(frozen=True)
class ExitTrainConfig:
    layers: tuple[int, ...]
    steps: int = 200
    batch: int = 256
    lr: float = 1e-3
    adapter: bool = True
    ridge: float = 1e-2  # relative ridge of the closed-form adapter start (0: no closed-form start)
    seed: int = 0
    weight_decay: float = 0.0  # decoupled (AdamW) decay of the adapter only: towards the identity map

    def __post_init__(self):
        if self.steps < 0 or self.batch <= 0 or self.lr <= 0 or self.ridge < 0 or self.weight_decay < 0:
            raise UsageError(f"exit training needs steps >= 0, batch > 0, lr > 0, ridge >= 0, weight_decay >= 0, "
                             f"got {self}")


@dataclass
class HiddenCache:
    """Rows computed once: the input of each exit layer, and the last layer's output (before the final norm)."""

    at: dict[int, torch.Tensor]  # layer -> (N, hidden) float32
    final: torch.Tensor  # (N, hidden) float32

    @property
    def rows(self) -> int:
        return self.final.shape[0]


@torch.inference_mode()
def collect_hidden(model: Transformer, sequences: Iterable[Sequence[int]], layers: Iterable[int]) -> HiddenCache:
    """Run every sequence through the whole model once, keeping the hidden states at `layers` and at the end."""
    layers = check_exit_layers(model.config, layers)
    bounds = [*layers, model.config.num_layers]
    at: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    final: list[torch.Tensor] = []
    for seq in sequences:
        if len(seq) == 0:
            continue
        cache = model.new_cache()
        h = model.embed_tokens(torch.tensor([list(seq)], dtype=torch.long))  # (1, S, hidden)
        frm = 0
        for b in bounds:
            h = model.forward_range(h, cache, 0, frm, b)
            (at[b] if b in at else final).append(h[0].float())
            frm = b
    if not final:
        raise UsageError("no training text: every sequence was empty")
    return HiddenCache({i: torch.cat(v) for i, v in at.items()}, torch.cat(final))


def teacher_head(model: Transformer) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """(lm_head weight float32 (vocab, hidden), final-norm function) of the frozen model, unpacked."""
    w = model.lm_head
    if w is None or model.norm is None:
        raise UsageError("exit training needs the model's head and final norm (load the whole model)")
    return w.detach().float(), lambda h: model.norm(h.to(model.dtype)).float()


def agreement(model: Transformer, heads: ExitHeads, cache: HiddenCache, chunk: int = 512) -> dict[int, float]:
    """Fraction of rows where each exit head's top-1 equals the final layer's."""
    w, norm = teacher_head(model)
    out = {}
    spans = range(0, cache.rows, chunk)
    with torch.no_grad():
        ref = torch.cat([F.linear(norm(cache.final[i:i + chunk]), w).argmax(-1) for i in spans])
        for layer, h in cache.at.items():
            head = heads.heads[str(layer)]
            got = torch.cat([F.linear(head.features(h[i:i + chunk]), w).argmax(-1) for i in spans])
            out[layer] = float((got == ref).float().mean())
    return out


def train_exit_heads(model: Transformer, cache: HiddenCache, cfg: ExitTrainConfig,
                     on_step: Callable[[int, float], None] | None = None) -> ExitHeads:
    """Fit one head per layer of cfg.layers on cached rows; returns heads with training metadata."""
    layers = check_exit_layers(model.config, cfg.layers)
    missing = [i for i in layers if i not in cache.at]
    if missing:
        raise UsageError(f"no cached hidden states at layer(s) {missing}")
    w, norm = teacher_head(model)
    heads = ExitHeads.untrained(model.config, layers, model.norm.weight, cfg.adapter)
    if cfg.adapter and cfg.ridge > 0:
        for i in layers:
            _ridge_start(heads.heads[str(i)], cache.at[i], cache.final, cfg.ridge)
    gen = torch.Generator().manual_seed(cfg.seed)
    adapter = [p for n, p in heads.named_parameters() if "adapter" in n]
    rest = [p for n, p in heads.named_parameters() if "adapter" not in n]
    opt = torch.optim.AdamW([{"params": adapter, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
    loss_value = float("nan")
    for step in range(cfg.steps):
        idx = torch.randint(0, cache.rows, (min(cfg.batch, cache.rows),), generator=gen)
        with torch.no_grad():
            target = torch.log_softmax(F.linear(norm(cache.final[idx]), w), dim=-1)  # (B, vocab)
        loss = sum(_kl(F.linear(heads.heads[str(i)].features(cache.at[i][idx]), w), target) for i in layers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = float(loss.detach()) / len(layers)
        if on_step:
            on_step(step, loss_value)
    heads.requires_grad_(False)
    heads.meta = {"trained": {"rows": cache.rows, "steps": cfg.steps, "batch": cfg.batch, "lr": cfg.lr,
                              "ridge": cfg.ridge, "adapter": cfg.adapter, "weight_decay": cfg.weight_decay,
                              "final_kl": loss_value}}
    return heads


def _kl(student_logits: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """KL(target || student), mean over rows (float32)."""
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    return (target_logp.exp() * (target_logp - logq)).sum(-1).mean()


@torch.no_grad()
def _ridge_start(head, x: torch.Tensor, y: torch.Tensor, ridge: float) -> None:
    """Adapter so that x + x A^T + b ~ y in least squares (ridge relative to x's scale)."""
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    gram = xc.T @ xc  # (hidden, hidden)
    lam = ridge * gram.diagonal().mean()
    m = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0]), xc.T @ yc)  # (hidden, hidden): y ~ x m
    head.adapter_w.copy_(m.T - torch.eye(m.shape[0]))  # residual form: x + x (m - I)
    head.adapter_b.copy_(ym - xm @ m)


def token_chunks(texts: Iterable[str], encode: Callable[[str], list[int]], seq_len: int, max_tokens: int,
                 per_text: int | None = 1) -> list[list[int]]:
    """Up to max_tokens ids as chunks of at most seq_len, at most `per_text` chunks from each text (None: all),
    so a corpus of many files is sampled across them rather than from its first few."""
    if seq_len <= 1 or max_tokens <= 0:
        raise UsageError(f"need seq_len > 1 and max_tokens > 0, got {seq_len}, {max_tokens}")
    out, total = [], 0
    for text in texts:
        ids = encode(text)
        starts = range(0, len(ids) - 1, seq_len)
        for start in starts if per_text is None else starts[:per_text]:
            chunk = ids[start:start + min(seq_len, max_tokens - total)]
            if len(chunk) < 2:
                continue
            out.append(chunk)
            total += len(chunk)
            if total >= max_tokens:
                return out
    return out
