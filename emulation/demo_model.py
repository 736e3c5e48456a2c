"""Build edgefed's embedded default model: a small Llama trained on the Python standard library.

``edgefed build-demo-model`` trains, from scratch
and on CPU, a byte-level BPE tokenizer and a ~6 M parameter LlamaForCausalLM on the
train split of :mod:`emulation.corpus`, evaluates it on the held-out module files, and
writes an ordinary Hugging Face model directory (bfloat16 safetensors, tokenizer.json,
configs, MODEL_CARD.md) that both transformers and edgefed's own runtime load.

Determinism: same seed, same step count, same torch version, same CPU kind and the same
``--threads`` give byte-identical weights. A time budget only chooses the step count
(measured on the first warmup steps, where the learning rate does not depend on it), so
the model card's rebuild command pins ``--steps`` to reproduce a time-budgeted build.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# As in edgefed/cli.py: idle OpenMP workers sleep instead of spinning, which matters on a
# busy 2-core machine. Must happen before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from emulation import corpus  # noqa: E402
from emulation.demo_model_files import (  # noqa: E402,F401  (re-exported: one import for callers)
    EOT,
    OUTPUT_FILES,
    REPETITION_PENALTY,
    SAMPLE_NEW_TOKENS,
    SAMPLE_PROMPT,
    BuildResult,
    check_out_dir,
    model_card,
    rebuild_command,
    save_model_dir,
)

if TYPE_CHECKING:
    from transformers import LlamaConfig

DEFAULT_MINUTES = 14.0  # leaves headroom under the 15 minute promise on a 2-core machine


def default_model_dir() -> Path:
    """The committed demo model: ``<repo root>/models/edgefed-demo``."""
    return Path(__file__).resolve().parent.parent / "models" / "edgefed-demo"


@dataclass(frozen=True)
class DemoModelSpec:
    """Architecture, data and optimiser settings of one build."""

    name: str = "default"
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 2
    tie_embeddings: bool = True
    seq_len: int = 512
    # Compute-bound on 2 cores: small batches (more updates per token) and lr 1e-3 won
    # short trials against 3e-3 and 5e-4.
    batch_size: int = 8  # sequences per optimiser step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    zero_init_residual: bool = True  # o_proj/down_proj start at 0: faster early training
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16_autocast: bool = True  # used only where the CPU has native bfloat16 kernels
    max_corpus_bytes: int | None = None  # cap on train text (tiny builds for tests)
    max_eval_tokens: int | None = None  # None scores every held-out window

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


DEFAULT_SPEC = DemoModelSpec()
#: Seconds-fast preset for tests and smoke runs; the model it makes is not useful.
TINY_SPEC = DemoModelSpec(
    name="tiny",
    vocab_size=384,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    seq_len=32,
    batch_size=4,
    warmup_steps=2,
    max_corpus_bytes=60_000,
    max_eval_tokens=256,
)
PRESETS = {spec.name: spec for spec in (DEFAULT_SPEC, TINY_SPEC)}


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style: any bytes round-trip); ``<|endoftext|>`` is id 0.

    Encoding adds no special tokens.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # No BOS is added to prompts (GPT-2 style): training windows start mid-document anyway,
    # and BOS == PAD == 0 would make transformers' generate() mask a leading BOS out.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def encode_stream(tokenizer: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """All documents as one token stream, each preceded by ``<|endoftext|>``, plus a final one."""
    eot_id = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids.append(eot_id)
        ids.extend(encoding.ids)
    ids.append(eot_id)
    return torch.tensor(ids, dtype=torch.long)


def llama_config(spec: DemoModelSpec, vocab_size: int, eot_id: int) -> LlamaConfig:
    """The transformers config for ``spec`` (transformers is imported only when building)."""
    from transformers import LlamaConfig  # noqa: F811

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
    )


def lr_at(step: int, total: int, spec: DemoModelSpec) -> float:
    """Linear warmup to ``spec.lr``, then cosine decay to ``lr * min_lr_ratio`` at ``total``."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = min(1.0, (step - spec.warmup_steps) / max(1, total - spec.warmup_steps))
    floor = spec.lr * spec.min_lr_ratio
    return floor + (spec.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batches(stream: torch.Tensor, spec: DemoModelSpec, seed: int) -> Iterator[torch.Tensor]:
    """Endless (batch, seq_len + 1) windows; order fixed by ``seed``, reshuffled each epoch."""
    window = spec.seq_len + 1
    for epoch in range(sys.maxsize):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        # A fresh offset each epoch so windows do not always cut the stream at the same places.
        offset = int(torch.randint(spec.seq_len, (1,), generator=generator)) if epoch else 0
        count = (len(stream) - offset - 1) // spec.seq_len
        if count < spec.batch_size:
            raise ValueError(f"train stream of {len(stream)} tokens is too short for one batch")
        starts = offset + torch.randperm(count, generator=generator) * spec.seq_len
        for first in range(0, count - spec.batch_size + 1, spec.batch_size):
            chosen = starts[first : first + spec.batch_size]
            yield stream[chosen[:, None] + torch.arange(window)]


def causal_lm_loss(model, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of (batch, n + 1) ``tokens``, computed in float32."""
    logits = model(input_ids=tokens[:, :-1]).logits
    flat = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, tokens[:, 1:].reshape(-1), reduction=reduction)


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, spec: DemoModelSpec, bf16: bool) -> tuple[float, int]:
    """Mean next-token loss over non-overlapping windows of ``stream``; returns (loss, tokens).

    With ``spec.max_eval_tokens`` set, an evenly spaced subset of windows is scored, so
    every part of the held-out set still counts.
    """
    window = spec.seq_len + 1
    count = (len(stream) - 1) // spec.seq_len
    starts = torch.arange(count) * spec.seq_len
    if spec.max_eval_tokens is not None and count * spec.seq_len > spec.max_eval_tokens:
        keep = max(1, spec.max_eval_tokens // spec.seq_len)
        starts = starts[torch.linspace(0, count - 1, keep).round().long()]
    model.eval()
    total, scored = 0.0, 0
    for first in range(0, len(starts), spec.batch_size):
        chunk = stream[starts[first : first + spec.batch_size, None] + torch.arange(window)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            total += float(causal_lm_loss(model, chunk, reduction="sum"))
        scored += chunk.shape[0] * spec.seq_len
    model.train()
    return total / max(1, scored), scored


@torch.no_grad()
def greedy_sample(model, tokenizer: Tokenizer, prompt: str, new_tokens: int) -> str:
    """Greedy continuation (with the shipped repetition penalty) and no KV cache: slow but tiny,
    and independent of generate()."""
    model.eval()
    from edge_node.model import Sampler, SamplingConfig

    choose = Sampler(SamplingConfig(greedy=True, repetition_penalty=REPETITION_PENALTY))
    ids = tokenizer.encode(prompt).ids
    eot_id = tokenizer.token_to_id(EOT)
    for _ in range(new_tokens):
        context = torch.tensor([ids[-model.config.max_position_embeddings :]])
        next_id = choose(model(input_ids=context).logits[0, -1].float(), ids)
        if next_id == eot_id:
            break
        ids.append(next_id)
    return tokenizer.decode(ids, skip_special_tokens=True)


@contextmanager
def _deterministic_torch(seed: int, threads: int) -> Iterator[None]:
    """Seed, pin threads and forbid nondeterministic kernels; restore the caller's state after."""
    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(old_threads)
            torch.use_deterministic_algorithms(old_deterministic)


def _read_texts(files: Sequence[Path], max_bytes: int | None) -> list[str]:
    texts, used = [], 0
    for path in files:
        if max_bytes is not None and used >= max_bytes:
            break
        text = corpus.read_source(path)
        texts.append(text)
        used += len(text.encode("utf-8"))
    return texts


def _use_bf16(spec: DemoModelSpec) -> bool:
    return spec.bf16_autocast and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def build_demo_model(
    out_dir: Path,
    spec: DemoModelSpec = DEFAULT_SPEC,
    *,
    minutes: float | None = DEFAULT_MINUTES,
    steps: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> BuildResult:
    """Train tokenizer and model, evaluate on held-out files, write the model directory.

    Training ends after ``steps`` steps or when the ``minutes`` budget (for the whole
    build, from this call) is spent, whichever comes first; at least one must be given.
    """
    if steps is None and not minutes:
        raise ValueError("give --steps, a positive --minutes budget, or both")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be at least 1, not {steps}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    threads = threads or len(os.sched_getaffinity(0))
    deadline = time.monotonic() + minutes * 60 if minutes else math.inf
    with _deterministic_torch(seed, threads):
        return _build(out_dir, spec, deadline, steps, seed, threads, progress)


def _build(
    out_dir: Path,
    spec: DemoModelSpec,
    deadline: float,
    steps: int | None,
    seed: int,
    threads: int,
    progress: bool,
) -> BuildResult:
    from transformers import LlamaForCausalLM

    started = time.monotonic()
    train_texts = _read_texts(corpus.corpus_files("train"), spec.max_corpus_bytes)
    heldout_texts = _read_texts(corpus.corpus_files("heldout"), None)
    tokenizer = train_tokenizer(train_texts, spec.vocab_size)
    train_stream = encode_stream(tokenizer, train_texts)
    heldout_stream = encode_stream(tokenizer, heldout_texts)

    model = LlamaForCausalLM(llama_config(spec, tokenizer.get_vocab_size(), tokenizer.token_to_id(EOT)))
    if spec.zero_init_residual:
        _zero_residual_outputs(model)
    use_bf16 = _use_bf16(spec)
    eval_tokens = min(len(heldout_stream), spec.max_eval_tokens or len(heldout_stream))
    run = _train(model, train_stream, spec, seed, steps, deadline, eval_tokens, use_bf16, progress)

    # Evaluate exactly the weights that ship (rounded to bfloat16), computed as in training.
    model = model.to(torch.bfloat16).to(torch.float32)
    heldout_loss, heldout_tokens = evaluate(model, heldout_stream, spec, use_bf16)
    result = BuildResult(
        out_dir=out_dir,
        spec=spec,
        seed=seed,
        threads=threads,
        compute="bfloat16 autocast" if use_bf16 else "float32",
        num_parameters=sum(p.numel() for p in model.parameters()),
        schedule_steps=run.schedule,
        steps=run.steps,
        tokens_seen=run.steps * spec.tokens_per_step,
        train_tokens=len(train_stream),
        heldout_tokens=heldout_tokens,
        train_files=len(train_texts),
        heldout_files=len(heldout_texts),
        final_train_loss=run.loss,
        heldout_loss=heldout_loss,
        train_seconds=run.seconds,
        total_seconds=time.monotonic() - started,
        sample=greedy_sample(model, tokenizer, SAMPLE_PROMPT, SAMPLE_NEW_TOKENS),
    )
    save_model_dir(out_dir, model, tokenizer, result)
    return result


@dataclass(frozen=True)
class _TrainRun:
    steps: int  # optimiser steps taken
    schedule: int  # length of the learning-rate schedule (== steps unless the clock cut it short)
    loss: float  # exponentially smoothed train loss at the end
    seconds: float


def _train(
    model,
    stream: torch.Tensor,
    spec: DemoModelSpec,
    seed: int,
    steps: int | None,
    deadline: float,
    eval_tokens: int,
    bf16: bool,
    progress: bool,
) -> _TrainRun:
    """The optimisation loop; with no ``steps`` it sizes the schedule to the time budget."""
    from tqdm.auto import tqdm

    model.train()
    optimizer = _make_optimizer(model, spec)
    calibration = max(1, min(8, spec.warmup_steps))
    schedule = steps if steps is not None else sys.maxsize
    bar = tqdm(total=steps, desc="build-demo-model", unit="step", disable=not progress)
    smoothed, done, train_deadline = math.nan, 0, deadline
    started = first_step_done = time.monotonic()
    for step, tokens in enumerate(batches(stream, spec, seed)):
        if step >= schedule or time.monotonic() >= train_deadline:
            break
        lr = lr_at(step, schedule, spec)
        value = _train_step(model, optimizer, tokens, lr, spec, bf16)
        done = step + 1
        smoothed = value if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * value
        bar.set_postfix(loss=f"{smoothed:.3f}", lr=f"{lr:.2e}")
        bar.update(1)
        if done == 1:
            first_step_done = time.monotonic()  # the first step pays one-off set-up costs
        if done == calibration and steps is None:
            # Warmup steps so far do not depend on the schedule length, so fixing it here
            # keeps the build reproducible with --steps <schedule>.
            per_step = (time.monotonic() - (first_step_done if done > 1 else started)) / max(1, done - 1)
            # Scoring a token costs less than training on it: a safe over-estimate.
            train_deadline = deadline - (15.0 + per_step * eval_tokens / spec.tokens_per_step)
            schedule = max(done, done + int(0.97 * (train_deadline - time.monotonic()) / per_step))
            bar.total = schedule
            bar.refresh()
    bar.close()
    schedule = done if schedule == sys.maxsize else schedule
    return _TrainRun(steps=done, schedule=schedule, loss=smoothed, seconds=time.monotonic() - started)


def _train_step(model, optimizer, tokens: torch.Tensor, lr: float, spec: DemoModelSpec, bf16: bool) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = causal_lm_loss(model, tokens)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _zero_residual_outputs(model) -> None:
    # Each block then starts as the identity, which in trials cut the loss after 100
    # steps from 5.9 to 5.5; the architecture, and so every loader, is unchanged.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter.zero_()


def _make_optimizer(model, spec: DemoModelSpec) -> torch.optim.Optimizer:
    # No weight decay on norms (1-D): decaying their gains only fights the normalisation.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": spec.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)
