"""The edgefed quantized checkpoint format (version 1): what a directory written by `edgefed quantize` holds.

config.json is the source's plus
    "quantization_config": {"quant_method": "edgefed", "weights": "int8" | "int4", "group_size": G, "format": 1,
                            "lm_head": "float" | "int8" | "int4"[, "scale_dtype": "float32" | "float16"]}
(int8: G = -1 for one scale per output row, as GPTQ spells per-channel, or a group size; int4: a group size).
model.safetensors keeps the Hugging Face names. Every linear the layout table lets quantize
(edge_node.model.layout.LINEARS, per Hugging Face module), and the head where lm_head says so (int4 only in an
int4 checkpoint, with its G; an int8 head has the int8 checkpoint's G, and one scale per row in an int4
checkpoint), is stored as
    int8, G = -1: <module>.weight       I8   (out, in)      w ~= weight * weight_scale[:, None]
                  <module>.weight_scale F32  (out,)
    int8, G > 0:  <module>.weight       I8   (out, in)      w ~= weight * weight_scale + weight_zero, per group
                  <module>.weight_scale BF16 (out, in / G)  of G input columns (asymmetric: the group's [min, max];
                  <module>.weight_zero  BF16 (out, in / G)  with "scale_dtype": "float32" (or "float16"), both F32
                                                            (F16) and each group symmetric (zero 0) or asymmetric,
                                                            whichever fits better)
    int4: <module>.weight       U8   (out, in / 2)  codes q in [0, 15], column 2j in the low nibble of byte j
          <module>.weight_scale BF16 (out, in / G)  w ~= (q - 8) * weight_scale + weight_zero, per group of G
          <module>.weight_zero  BF16 (out, in / G)  input columns (bfloat16: what torch's int4 kernel computes with)
Norms, biases and the embedding table stay float, as stored in the source; a tied model with a quantized
head gets a quantized copy of the embedding as `lm_head.*`, the float table staying for lookups.

The head's default follows the weights, from measurements on a SmolLM2-135M-shaped model (2 threads, x86
AVX-512; decode ms/token) and on the demo model's held-out text (top-1 agreement with float):
                     float head     int8 head      int4 head
    int8 checkpoint  35.7, 99.8%    33.6, 99.0%    -              -> float head by default
    int4 checkpoint  30.6, 97.2%    27.5, 97.1%    25.1, 95.5%    -> int8 head by default
An int8 model is the accurate choice, and its head copy buys 6% for 28 MB and most of its top-1 disagreements;
in an int4 model the int8 head is 10% faster at no measurable cost in agreement or perplexity, and it also
lowers the load's peak RSS (the float head is a column-major copy of the table made at load). `--lm-head`
chooses another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_node.model.config import ModelConfig, read_json
from edge_node.model.errors import CheckpointError, ModelConfigError, UsageError
from edge_node.model.layout import LINEARS, expected_shapes

from .int4 import GROUP_SIZES

METHOD, FORMAT = "edgefed", 1
WEIGHTS = ("int8", "int4")
# 32, as llama.cpp's Q4_0/Q4_1: on SmolLM2-135M-Instruct (from a Q4_1 file) top-1 agreement with float is 97.1%
# at 32 against 79% at 64 (its weights sit on a group-32 grid), at the same decode speed (26.1 vs 26.2 ms/token)
DEFAULT_GROUP_SIZE = 32
# int8: one scale per row (-1) by default, for speed. --group-size 32 follows a group-wise source grid: on
# SmolLM2-135M-Instruct (weights from a Q4_1 file) top-1 agreement with float is 98.9% against 96.4% per row, but
# its kernel (int4 pairs, quant/int8.py) runs the block linears 1.4-1.8x slower at one token (benchmarks/README.md)
# `--group-size 32` (float32 scales and zeros by default, each group symmetric or asymmetric, whichever fits better)
# with `--lm-head int8` is the layout the native decode step (edge_node/model/native) runs fastest and most exactly:
# on SmolLM2-135M-Instruct (weights from a Q4_1 file, embedding on a Q8_0 grid) it reproduces every weight and the
# head exactly (benchmarks/README.md).
DEFAULT_INT8_GROUP_SIZE = -1
HEAD = "lm_head.weight"
HEADS = ("float", "int8", "int4")
DEFAULT_HEAD = {"int8": "float", "int4": "int8"}  # measured: see the module docstring
SCALE_DTYPES = ("bfloat16", "float32", "float16")
SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}


class QuantConfigError(ModelConfigError):
    """config.json's quantization_config is not one this edgefed reads."""


class QuantizeError(UsageError):
    """A quantization cannot be made as asked: unknown --weights, a bad group size, a bad --out."""


class TensorDtypeError(CheckpointError):
    """A quantized checkpoint's tensor has another dtype than its format says."""


@dataclass(frozen=True)
class QuantConfig:
    weights: str  # "int8" | "int4"
    group_size: int = -1  # input columns per scale (and zero); int8 also -1: one scale per output row
    lm_head: str = "float"  # "float" | "int8" | "int4" (int4 only with int4 weights)
    scale_dtype: str = "bfloat16"  # group-wise int8: "float32" (the default since format 1 gained it) or "bfloat16"

    @classmethod
    def make(cls, weights: str, group_size: int | None = None, lm_head: str | None = None,
             scale_dtype: str | None = None) -> QuantConfig:
        """From the command line's --weights, --group-size, --lm-head and --scale-dtype (defaults above)."""
        if scale_dtype is not None and (scale_dtype not in SCALE_DTYPES or weights == "int4" and
                                        scale_dtype != "bfloat16"):
            raise QuantizeError(f"--scale-dtype must be bfloat16 or (group-wise int8) float32 or float16, got "
                                f"{scale_dtype!r}")
        if weights not in WEIGHTS:
            raise QuantizeError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        lm_head = lm_head or DEFAULT_HEAD[weights]
        if lm_head not in HEADS or (lm_head == "int4" and weights != "int4"):
            raise QuantizeError(f"--lm-head must be float, int8 or (with --weights int4) int4, got {lm_head!r}")
        if weights == "int8":
            group_size = DEFAULT_INT8_GROUP_SIZE if group_size is None else group_size
            if group_size != -1 and group_size not in GROUP_SIZES:
                raise QuantizeError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))} or -1 (one "
                                    f"scale per output row) for int8, got {group_size}")
            return cls("int8", group_size, lm_head, scale_dtype or ("float32" if group_size != -1 else "bfloat16"))
        group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if group_size not in GROUP_SIZES:
            raise QuantizeError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))} for int4, "
                                f"got {group_size}")
        return cls("int4", group_size, lm_head)

    def to_json(self) -> dict:
        out = {"quant_method": METHOD, "weights": self.weights, "group_size": self.group_size, "format": FORMAT,
               "lm_head": self.lm_head}
        return out | ({"scale_dtype": self.scale_dtype} if self.scale_dtype != "bfloat16" else {})

    def mode(self, name: str) -> str:
        """How the float weight `name` is stored: "int8", "int4" or "float"."""
        return self.lm_head if name == HEAD else self.weights

    def group(self, name: str) -> int:
        """Input columns per scale of the quantized weight `name` (-1: one scale per row): an int8 head in an int4
        checkpoint keeps one scale per row."""
        return self.group_size if self.mode(name) == self.weights else -1

    @classmethod
    def from_config(cls, raw: dict, source: str) -> QuantConfig | None:
        """The quantization_config of a parsed config.json; None for a float checkpoint."""
        q = raw.get("quantization_config")
        if q is None:
            return None
        where = f"{source}: quantization_config"
        if not isinstance(q, dict) or q.get("quant_method") != METHOD:
            method = q.get("quant_method") if isinstance(q, dict) else q
            raise QuantConfigError(f"{where}: quant_method {method!r} is not {METHOD!r} (edgefed reads float "
                                   f"checkpoints and those `edgefed quantize` writes)")
        if q.get("format") != FORMAT:
            raise QuantConfigError(f"{where}: format {q.get('format')!r}, expected {FORMAT}")
        weights, group = q.get("weights"), q.get("group_size")
        if weights not in WEIGHTS:
            raise QuantConfigError(f"{where}: weights {weights!r}, expected one of {', '.join(WEIGHTS)}")
        if group not in GROUP_SIZES and not (weights == "int8" and group == -1):
            want = " or ".join(map(str, GROUP_SIZES if weights == "int4" else (-1, *GROUP_SIZES)))
            raise QuantConfigError(f"{where}: group_size {group!r} for {weights}, expected {want}")
        head = q.get("lm_head", "float")
        if head not in HEADS or (head == "int4" and weights != "int4"):
            raise QuantConfigError(f"{where}: lm_head {head!r}, expected float, int8 or (in an int4 checkpoint) int4")
        scale_dtype = q.get("scale_dtype", "bfloat16")
        if scale_dtype not in SCALE_DTYPES or scale_dtype != "bfloat16" and weights != "int8":
            raise QuantConfigError(f"{where}: scale_dtype {scale_dtype!r}, expected bfloat16 or (int8) float32 "
                                   f"or float16")
        return cls(weights, group, head, scale_dtype)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> QuantConfig | None:
        path = Path(model_dir) / "config.json"
        return cls.from_config(read_json(path), str(path))

    def params(self, name: str, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], str]]:
        """The tensors (name -> (shape, safetensors dtype)) storing the float weight `name` of `shape`."""
        rows, cols = shape
        base = name.removesuffix(".weight")
        if self.mode(name) == "int8" and self.group(name) == -1:
            return {name: ((rows, cols), "I8"), f"{base}.weight_scale": ((rows,), "F32")}
        groups = (rows, cols // self.group(name))
        codes = ((rows, cols), "I8") if self.mode(name) == "int8" else ((rows, cols // 2), "U8")
        sd = SAFETENSORS_DTYPE[self.scale_dtype] if self.mode(name) == "int8" else "BF16"
        return {name: codes, f"{base}.weight_scale": (groups, sd), f"{base}.weight_zero": (groups, sd)}


def quantized_weights(cfg: ModelConfig, q: QuantConfig) -> dict[str, tuple[int, int]]:
    """Hugging Face name -> (out, in) of every float weight a checkpoint quantized as `q` stores quantized (the
    head last, if quantized: a tied model's is a copy of the embedding)."""
    shapes = expected_shapes(cfg)
    names = [f"model.layers.{n}.{part.module}.weight" for n in range(cfg.num_layers)
             for spec in LINEARS if spec.quantize for part in spec.parts]
    head = {HEAD: (cfg.vocab_size, cfg.hidden_size)} if q.lm_head != "float" else {}
    return {**{n: shapes[n] for n in names}, **head}


def check_group_size(cfg: ModelConfig, q: QuantConfig) -> None:
    """Refuse a group size that does not divide some weight's in_features, naming the first such weight."""
    if q.group_size == -1:
        return
    weights = {n: s for n, s in quantized_weights(cfg, q).items() if q.group(n) != -1}
    for name, (_, cols) in weights.items():
        if cols % q.group_size:
            fits = [g for g in GROUP_SIZES if all(c % g == 0 for _, c in weights.values())]
            if q.weights == "int8":
                fits.append(-1)
            hint = (f"use --group-size {' or '.join(map(str, fits))}" if fits
                    else f"no {q.weights} group size fits this model")
            raise QuantizeError(f"group size {q.group_size} does not divide in_features {cols} of tensor "
                                f"{name!r}: {hint}")


def expected_tensors(cfg: ModelConfig, q: QuantConfig) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """Every tensor of a quantized checkpoint: name -> (shape, safetensors dtype, or None for any float dtype)."""
    out: dict[str, tuple[tuple[int, ...], str | None]] = {n: (s, None) for n, s in expected_shapes(cfg).items()}
    for name, shape in quantized_weights(cfg, q).items():
        out.update(q.params(name, shape))
    return out
