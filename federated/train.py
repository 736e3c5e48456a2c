"""Local LoRA training and held-out perplexity on a client: plain torch loops over a peft model."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .data import batches


@dataclass(frozen=True)
class TrainResult:
    steps: int
    loss: float  # mean training loss over the steps
    seconds: float
    examples: int  # blocks seen

    @property
    def s_per_step(self) -> float:
        return self.seconds / max(1, self.steps)


def train_local(model, blocks: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int,
                after_step: Callable[[float], None] | None = None) -> TrainResult:
    """`steps` AdamW steps on the trainable (LoRA) parameters; `after_step(step_seconds)` runs after each
    (a straggler's emulated slowdown sleeps there)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses, t0 = [], time.perf_counter()
    for x in batches(blocks, batch_size, steps, seed):
        s0 = time.perf_counter()
        out = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if after_step is not None:
            after_step(time.perf_counter() - s0)
    model.eval()
    seconds = time.perf_counter() - t0
    return TrainResult(steps, sum(losses) / max(1, len(losses)), seconds, steps * batch_size)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token loss) over every block (each predicts tokens 1..S-1 of itself)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i: i + batch_size]
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()  # (B, S, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    return math.exp(total / count)
