"""What a demo-model build writes: the model directory, its MODEL_CARD.md, and the build record.

See :mod:`emulation.demo_model` for the build itself.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from emulation import corpus

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from emulation.demo_model import DemoModelSpec

EOT = "<|endoftext|>"
SAMPLE_PROMPT = "def fibonacci(n):"
SAMPLE_NEW_TOKENS = 48
#: Shipped in generation_config.json. A model this small loops under plain greedy decoding
#: ("name, name, name, ..."); CTRL's penalty of 1.2 breaks the loops. transformers' generate
#: and edgefed both apply it by default; --repetition-penalty 1 turns it off.
REPETITION_PENALTY = 1.2
#: Everything a build writes; a build refuses an --out directory holding anything else.
OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "MODEL_CARD.md",
)


@dataclass(frozen=True)
class BuildResult:
    """What a build did; every number here also lands in MODEL_CARD.md."""

    out_dir: Path
    spec: DemoModelSpec
    seed: int
    threads: int
    compute: str
    num_parameters: int
    schedule_steps: int
    steps: int
    tokens_seen: int
    train_tokens: int
    heldout_tokens: int
    train_files: int
    heldout_files: int
    final_train_loss: float
    heldout_loss: float
    train_seconds: float
    total_seconds: float
    sample: str

    @property
    def heldout_perplexity(self) -> float:
        return math.exp(self.heldout_loss)


def rebuild_command(result: BuildResult) -> str:
    """CLI line that reproduces ``result`` bit for bit (same CPU kind and library versions)."""
    preset = "" if result.spec.name == "default" else f" --preset {result.spec.name}"
    return (
        f"edgefed build-demo-model --out {result.out_dir.as_posix()}{preset} --seed {result.seed}"
        f" --steps {result.schedule_steps} --minutes 0 --threads {result.threads}"
    )


def model_card(result: BuildResult) -> str:
    """MODEL_CARD.md for a build: data, split, architecture, training numbers, rebuild, license."""
    import tokenizers
    import transformers

    spec = result.spec
    truncated = result.steps < result.schedule_steps
    note = (
        f"\n**Note:** the time limit stopped training at step {result.steps} of a "
        f"{result.schedule_steps}-step schedule; the rebuild command runs the full schedule.\n"
        if truncated
        else ""
    )
    architecture = (
        f"LlamaForCausalLM, {spec.num_layers} layers, hidden {spec.hidden_size}, MLP {spec.intermediate_size}, "
        f"{spec.num_heads} heads / {spec.num_kv_heads} KV heads (GQA), "
        + ("tied embeddings" if spec.tie_embeddings else "separate lm_head")
    )
    tokenizer = (
        f"byte-level BPE, {spec.vocab_size:,} tokens, `{EOT}` (id 0) is BOS, EOS and PAD; "
        "it separates documents in training and is not added to prompts"
    )
    init = "normal(0, 0.02)" + (", attention and MLP output projections zero" if spec.zero_init_residual else "")
    optimiser = (
        f"AdamW (0.9, 0.95), lr {spec.lr:g}, {spec.warmup_steps} warmup steps then cosine to "
        f"{spec.lr * spec.min_lr_ratio:g}, weight decay {spec.weight_decay:g}, grad clip {spec.grad_clip:g}"
    )
    return f"""# edgefed-demo

A small Llama-architecture causal language model of Python source code, built by edgefed
itself (`emulation/demo_model.py`) so that the project ships a real model with no
download. It writes plausible-looking Python; it is a test and demo fixture, not a
useful code assistant.

## Training data

The `.py` sources of the Python {platform.python_version()} standard library
(`sysconfig.get_paths()["stdlib"]`), excluding site-packages, test suites (`test/`,
`tests/`, `idle_test/`), `pydoc_data`, `__phello__`, gencodec-generated codec tables,
empty files and files that are not UTF-8. Split by module file, deterministically:
a file is held out when the SHA-256 of its relative path falls in the lowest
{corpus.HELDOUT_FRACTION:.0%} of hash space, and every multi-file package holds out at
least its lowest-hashed file (see `emulation/corpus.py`).

| split | files | tokens |
|---|---:|---:|
| train | {result.train_files} | {result.train_tokens:,} |
| held-out | {result.heldout_files} | {result.heldout_tokens:,} evaluated |

## Model

| | |
|---|---|
| architecture | {architecture} |
| parameters | {result.num_parameters:,} |
| context | {spec.seq_len} tokens (RoPE, theta 10000) |
| tokenizer | {tokenizer} |
| weights | bfloat16 safetensors |

## Training

| | |
|---|---|
| preset | {spec.name} |
| steps | {result.steps} (schedule {result.schedule_steps}) |
| batch | {spec.batch_size} x {spec.seq_len} = {spec.tokens_per_step:,} tokens per step |
| tokens seen | {result.tokens_seen:,} |
| init | {init} |
| optimiser | {optimiser} |
| compute | CPU, {result.threads} threads, {result.compute} |
| train time | {result.train_seconds / 60:.1f} min (whole build {result.total_seconds / 60:.1f} min) |
| seed | {result.seed} |
| versions | torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__} |
{note}
## Evaluation

On the held-out module files, with the shipped bfloat16 weights ({result.compute} compute):

| | |
|---|---:|
| final train loss (smoothed) | {result.final_train_loss:.4f} |
| held-out loss | {result.heldout_loss:.4f} |
| held-out perplexity | {result.heldout_perplexity:.2f} |

Greedy continuation of `{SAMPLE_PROMPT}` ({SAMPLE_NEW_TOKENS} new tokens at most, float32 compute, with the
repetition penalty {REPETITION_PENALTY} that `generation_config.json` sets; without it greedy decoding falls
into loops such as `_from_from_from`):

```python
{result.sample}
```

## Rebuild

```
{rebuild_command(result)}
```

Same seed, steps and threads on the same CPU kind and library versions give a
byte-identical `model.safetensors`.

## License

The training data, the Python standard library sources, is distributed under the
PSF License Agreement (Python Software Foundation License Version 2); see the
`LICENSE.txt` of your Python installation. The model weights are derived from those
sources.
"""


def check_out_dir(out_dir: Path) -> None:
    """Refuse to write into a directory holding anything but a previous build's files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir():
        strangers = sorted(p.name for p in out_dir.iterdir() if p.name not in OUTPUT_FILES)
        if strangers:
            raise ValueError(
                f"--out {out_dir} holds files a demo-model build did not write "
                f"({', '.join(strangers)}); choose an empty or new directory"
            )


def save_model_dir(out_dir: Path, model, tokenizer: Tokenizer, result: BuildResult) -> None:
    """Write config, bfloat16 safetensors, tokenizer files and MODEL_CARD.md into ``out_dir``."""
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    eot_id = tokenizer.token_to_id(EOT)
    model = model.to(torch.bfloat16)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out_dir, safe_serialization=True)
    # save_pretrained leaves the weights owner-only (0600); the directory is meant to be shared.
    (out_dir / "model.safetensors").chmod(0o644)
    GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
                     repetition_penalty=REPETITION_PENALTY).save_pretrained(out_dir)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(result.spec))
    (out_dir / "MODEL_CARD.md").write_text(model_card(result), encoding="utf-8")


def _tokenizer_config(spec: DemoModelSpec) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        # Source code must round-trip: no " ," -> "," style clean-up on decode.
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.seq_len,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
