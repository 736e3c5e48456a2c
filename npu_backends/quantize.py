"""W8A8 static QDQ quantization of the chunk graphs' linear layers (onnxruntime.quantization).

Only the layers' MatMuls whose B is a weight (q|k|v, o, gate, up, down) are quantized:
per-output-channel int8 weights, per-tensor uint8 activations calibrated on sample
text. RoPE, the attention matmuls, the mask and softmax stay float (mllm's split:
they run on the CPU), and so does the lm_head: in a prefill graph it runs for one
row only, so int8 would save nothing there while costing top-1 agreement. Before
quantizing, the float graph is smoothed (smooth.py) and the down projection's input
rotated (rotate.py): both exact in float, they move activation range into the
per-channel weights and spread the heavy tails, where a per-tensor uint8 scale loses
most. Calibration inputs are recorded from the float graphs themselves, so every layer
group is calibrated on the hidden states it really sees.

Static per-tensor activation scales hold on the 6 M-parameter demo model, not on a real
pretrained one (SmolLM2-135M: 92-94% top-1 agreement, issue 16): there the activation scale
is taken when the chunk runs (dynamic.py): per token ("dynamic", standard ONNX ops) or per
token and block of 16 input channels with block-wise int8 weights ("block", ONNX Runtime's
MatMulNBits on the CPU EP), which keeps >= 99% but runs no faster than float on the CPU. "token" keeps
the per-token GEMM and cuts its error instead: the inputs of q|k|v and gate|up are Hadamard-rotated
after their norm (rotate.rotate_inputs: a token's massive channels no longer set its scale alone) and the
int8 weights are rounded by GPTQ (gptq.py) on the calibration inputs.
"token2" spends some of token's speed margin on precision where it buys the most: the inputs of the roles
in TOKEN2_TWO_PASS are quantized twice (the second time their rounding residual, ~15 bits per token in all,
one GEMM over 2N rows), the weights of TOKEN2_TWO_LEVEL get a second int8 level for their rounding residual
(one GEMM over 2 x out columns), and every GEMM applies its column scales in its output stage (ONNX
Runtime's MatMulIntegerToFloat) instead of a Cast and a Mul.
"fine" is the one that holds >= 99% on SmolLM2-135M: every linear's input is quantized twice, but the second
pass (its rounding residual on a grid FINE_STEP times finer) goes into the same GEMM as K more input channels, meeting
the weights on that grid (round(Wq / FINE_STEP)); down's weights' own rounding residual is a third block of rows.
Twice the GEMM work (2.25x with down's third block), and none of the stacked passes' extra output rows, row
scales, splits and adds. No smoothing: after the rotations and with both passes it measured no gain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from edge_node.model import Transformer
from edge_node.model.errors import UsageError

from .export import GraphSpec
from .prefill import ChunkedPrefill

QUANTIZE_OUTPUTS = False


class RecordingSession:
    """Wraps a session and keeps a copy of every feed (the host KV is updated in place, hence copies)."""

    def __init__(self, sess):
        self.sess, self.feeds = sess, []

    def run(self, outputs, feeds):
        self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.sess.run(outputs, feeds)

    def get_providers(self):
        return self.sess.get_providers()

    def get_inputs(self):
        return self.sess.get_inputs()


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def record_calibration(model: Transformer, specs: Sequence[GraphSpec], prompts: Iterable[Sequence[int]],
                       threads: int | None = None) -> list[list[dict[str, np.ndarray]]]:
    """Per layer group, the feeds it receives while the float graphs prefill `prompts`."""
    float_run = ChunkedPrefill(model, specs, "cpu", threads=threads)
    rec = [RecordingSession(s) for s in float_run.sessions]
    run = ChunkedPrefill(model, specs, sessions=rec)
    for p in prompts:
        run.run(list(p)[: run.context])
    return [r.feeds for r in rec]


def weight_matmuls(path: str | Path) -> list[str]:
    """Names of MatMul nodes whose B input is an initializer: the linear layers."""
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    return [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in inits]


def head_matmuls(path: str | Path) -> list[str]:
    """The weight MatMul producing the logits output (the lm_head); empty for a non-last layer group."""
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    return [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in inits and n.output[0] == "logits"]


def quantize_graph(src: str | Path, dst: str | Path, feeds: list[dict[str, np.ndarray]],
                   exclude: Sequence[str] = (), overrides: dict | None = None) -> None:
    """W8A8 QDQ: int8 per-channel weights, uint8 per-tensor activations (MinMax over `feeds`)."""
    g = onnx.load(str(src), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    dynamic = [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] not in inits]
    extra = {"MatMulConstBOnly": True, "ActivationSymmetric": False, "WeightSymmetric": True}
    if not QUANTIZE_OUTPUTS:
        # Keep linear outputs float: ORT then fuses DQ -> MatMul into MatMulIntegerToFloat (int32
        # accumulate, float out) instead of requantizing every output to 8 bits.
        extra["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer advises "pre-processing" on the root logger every call
    try:
        quantize_static(str(src), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(dynamic) + list(exclude), calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=True, extra_options=extra)
    finally:
        root.setLevel(level)


SMOOTH_ALPHA = 0.5  # SmoothQuant migration strength; see smooth.py
BLOCK = 16  # mode "block": input channels per scale (16 reaches 99% on SmolLM2-135M, 32 does not)
ROTATE_BLOCK = 64  # Hadamard block for the down projection's input; see rotate.py
TOKEN_GPTQ = True  # mode "token": GPTQ-rounded weights (gptq.py)
TOKEN_TWO_PASS: tuple[str, ...] = ()  # mode "token": roles whose inputs are quantized in two passes
# mode "token2": the roles whose inputs are quantized in two passes / whose weights get two int8 levels, chosen
# by their error removed per unit of GEMM work on SmolLM2-135M (benchmarks/README.md, issue 16)
TOKEN2_TWO_PASS: tuple[str, ...] = ("o",)
TOKEN2_TWO_LEVEL: tuple[str, ...] = ("down",)
# mode "fine": every linear's input in two passes, the second on a grid FINE_STEP times finer as more input channels
# of the same GEMM; down's weights' rounding residual as a third block (dynamic.quantize_per_token); no smoothing
FINE_STEP = 11  # balances the residual's ~4-bit levels against the ~4-bit weights they meet (round(Wq / 11))
FINE_TWO_PASS: tuple[str, ...] = ("qkv", "o", "gate", "up", "down")
FINE_TWO_LEVEL: tuple[str, ...] = ("down",)
# static W8A8 | tight clip + float shadow | per-token dynamic activations | block-wise 8-bit weights and
# dynamic activations (MatMulNBits) | "token": per-token dynamic activations, the q|k|v, gate|up (and down)
# inputs Hadamard-rotated, GPTQ-rounded weights (ORT's u8 x s8 GEMM, standard ONNX ops) | "token2": token with
# two-pass activations and two-level weights on some roles and fused column scales (com.microsoft). "clip"
# (the tight clip alone, the excess dropped) is gone: on SmolLM2-135M it kept 51% top-1 agreement (issue 16),
# since what it cuts are the tokens every later one reads.
OWN = "own"  # a recipe argument left to the mode's own choice (own_smooth)
MODES = ("minmax", "shadow", "dynamic", "block", "token", "token2", "fine")
PER_TOKEN = ("token", "token2", "fine")  # the modes with rotated norm-fed inputs and GPTQ weights
FUSED = ("token2", "fine")  # the modes whose GEMMs apply their column scales (MatMulIntegerToFloat)
ROLES = ("qkv", "o", "gate", "up", "down")  # a layer's weight MatMuls, in graph order


def build_int8(specs: Sequence[GraphSpec], feeds: list[list[dict[str, np.ndarray]]], out_dir: str | Path,
               mode: str = "shadow", fraction: float = 1 / 64, smooth: float | str | None = OWN,
               rotate: int | None = ROTATE_BLOCK, keep_float: Sequence[str] = (),
               block: int = BLOCK, gptq: bool = TOKEN_GPTQ, two_pass: Sequence[str] | None = None,
               two_level: Sequence[str] | None = None, fine: int | None = None) -> list[GraphSpec]:
    """Quantized copies of the float graphs `specs` in out_dir; `feeds` from record_calibration.

    smooth: SmoothQuant alpha (None: no smoothing; OWN: the mode's own, own_smooth); rotate: Hadamard block of
    the down input (None: none).
    keep_float: linears left float, as "layer.role" (e.g. "1.down", role one of ROLES).
    block: with mode "block", input channels per weight and activation scale.
    gptq: with a PER_TOKEN mode, GPTQ-rounded weights (False: rounded to the nearest level).
    two_pass, two_level: with a PER_TOKEN mode, the ROLES (or single LAYER.ROLE linears) whose inputs are
    quantized in two passes and whose weights get two int8 levels (dynamic.quantize_per_token); None: the mode's
    own (mode_roles).
    fine: the two_pass inputs' residual on a grid this many times finer, as more input channels of the same GEMM
    (0: as stacked rows; None: the mode's own, FINE_STEP for "fine").
    """
    if mode not in MODES:
        raise UsageError(f"int8 mode {mode!r} is not one of {MODES}")
    two_pass, two_level = mode_roles(mode, two_pass, two_level)
    fine, smooth = fine_step(mode, fine), own_smooth(mode, smooth)
    for what, rs in (("two_pass", two_pass), ("two_level", two_level)):
        bad = [r for r in rs if r not in ROLES and not _is_role(r)]
        if bad:
            raise UsageError(f"{what} {bad}: each must be one of {ROLES} or LAYER.ROLE (e.g. 0.down)")
    bad = [k for k in keep_float if not _is_role(k)]
    if bad:
        raise UsageError(f"keep_float {bad}: each must be LAYER.ROLE with ROLE one of {ROLES} (e.g. 1.down)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [dataclasses.replace(spec, path=str(_quantize_group(spec, group_feeds, out, mode, fraction, smooth, rotate,
                                                               keep_float, block, gptq, two_pass, two_level,
                                                               fine)))
            for spec, group_feeds in zip(specs, feeds, strict=True)]


def mode_roles(mode: str, two_pass: Sequence[str] | None = None,
                 two_level: Sequence[str] | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (two-pass, two-level) roles a mode builds with: those given, else token2's TOKEN2_* or fine's FINE_*
    (none for the other modes)."""
    own = {"token2": (TOKEN2_TWO_PASS, TOKEN2_TWO_LEVEL), "fine": (FINE_TWO_PASS, FINE_TWO_LEVEL)}
    own_pass, own_level = own.get(mode, (TOKEN_TWO_PASS, ()))
    return (tuple(two_pass) if two_pass is not None else own_pass,
            tuple(two_level) if two_level is not None else own_level)


def own_smooth(mode: str, smooth: float | str | None = OWN) -> float | None:
    """The SmoothQuant alpha a mode builds with: the one given, else none for "fine" (once every input has two
    passes it measured no gain), SMOOTH_ALPHA for the others."""
    return smooth if smooth != OWN else (None if mode == "fine" else SMOOTH_ALPHA)


def fine_step(mode: str, fine: int | None = None) -> int:
    """The fine grid a mode's two-pass inputs use (dynamic.quantize_per_token): the one given, else FINE_STEP
    for "fine", 0 (stacked rows) for the others."""
    return fine if fine is not None else (FINE_STEP if mode == "fine" else 0)


def _is_role(key: str) -> bool:
    layer, _, role = key.partition(".")
    return layer.isdigit() and role in ROLES


def linear_roles(path: str | Path, start: int = 0) -> dict[str, str]:
    """"layer.role" -> weight MatMul name for a chunk graph of layers [start, ...) (its lm_head left out).

    The exporter writes each layer's linears in the order of ROLES, so the k-th weight MatMul is role
    k % 5 of layer start + k // 5.
    """
    names = [n for n in weight_matmuls(path) if n not in head_matmuls(path)]
    return {f"{start + k // len(ROLES)}.{ROLES[k % len(ROLES)]}": n for k, n in enumerate(names)}


def int8_path(float_path: str | Path, mode: str, smooth: float | str | None = OWN,
              rotate: int | None = ROTATE_BLOCK, out_dir=None, keep_float: Sequence[str] = (),
              block: int = BLOCK, gptq: bool = TOKEN_GPTQ, two_pass: Sequence[str] | None = None,
              two_level: Sequence[str] | None = None, fine: int | None = None) -> Path:
    """Where build_int8 writes the int8 copy of one float graph (the name records the recipe)."""
    two_pass, two_level = mode_roles(mode, two_pass, two_level)
    fine, smooth = fine_step(mode, fine), own_smooth(mode, smooth)
    p = Path(float_path)
    tag = ("" if smooth is None else f"-sq{round(100 * smooth)}") + ("" if not rotate else f"-rot{rotate}")
    tag += f"-b{block}" if mode == "block" else ""
    if mode in PER_TOKEN:
        tag += ("-gptq" if gptq else "-nearest") + "".join(f"-2p{r}" for r in ROLES if r in two_pass)
        tag += "".join(f"-2L{r}" for r in ROLES if r in two_level)
        tag += f"-fine{fine}" if fine and two_pass else ""
        layers = sorted(f"{w}{r}" for w, rs in (("p", two_pass), ("L", two_level)) for r in rs if r not in ROLES)
        tag += "-l" + hashlib.sha1(",".join(layers).encode()).hexdigest()[:8] if layers else ""
    if keep_float:  # which linears stay float, as a short digest of the sorted keys
        tag += "-f" + hashlib.sha1(",".join(sorted(keep_float)).encode()).hexdigest()[:8]
    return Path(out_dir or p.parent) / f"{p.stem}.int8-{mode}{tag}.onnx"


def _stats(path: str | Path, feeds: list[dict[str, np.ndarray]], skip: Sequence[str]) -> dict:
    from .outliers import activation_stats

    return {k: v for k, v in activation_stats(path, feeds).items() if k not in skip}


def _quantize_group(spec: GraphSpec, feeds: list[dict[str, np.ndarray]], out: Path, mode: str, fraction: float,
                    smooth: float | None, rotate: int | None, keep_float: Sequence[str] = (),
                    block: int = BLOCK, gptq: bool = TOKEN_GPTQ, two_pass: Sequence[str] = (),
                    two_level: Sequence[str] = (), fine: int = 0) -> Path:
    from .dynamic import quantize_blockwise, quantize_per_token
    from .gptq import input_moments
    from .outliers import add_clip_and_shadow, strip_main_clips
    from .rotate import rotate_down, rotate_inputs
    from .smooth import smooth_graph

    name = Path(spec.path).stem
    dst = int8_path(spec.path, mode, smooth, rotate, out, keep_float, block, gptq, two_pass, two_level, fine)
    src, exclude = spec.path, head_matmuls(spec.path)  # the head stays float: neither clipped, smoothed nor int8
    roles = linear_roles(spec.path, spec.start)
    exclude += [roles[k] for k in keep_float if k in roles]  # node names survive smoothing and rotation
    steps: list[str] = []  # intermediate float graphs, removed at the end
    stats = None
    # Smoothing and rotation are exact in float, so the recorded feeds (graph inputs) still hold.
    if smooth is not None:
        steps.append(str(out / f"{name}.smooth-float.onnx"))
        stats = smooth_graph(src, steps[-1], _stats(src, feeds, exclude), smooth)  # stats come back as x / s
        src = steps[-1]
    if rotate:
        steps.append(str(out / f"{name}.rotate-float.onnx"))
        exclude += rotate_down(src, steps[-1], rotate)  # the rotations stay float
        src, stats = steps[-1], None  # a rotation mixes channels: measure again
    moments = None
    if mode in PER_TOKEN:
        # the norm-fed linears' inputs rotated too: q|k|v and gate|up (o's input gains nothing measurable)
        steps.append(str(out / f"{name}.rotate-in-float.onnx"))
        exclude += rotate_inputs(src, steps[-1], rotate or ROTATE_BLOCK, exclude=exclude)
        src = steps[-1]
        if gptq:
            moments = input_moments(src, feeds, [n for n in roles.values() if n not in exclude])
    if mode == "shadow":
        steps.append(str(out / f"{name}.{mode}-float.onnx"))
        stats = stats if stats is not None else _stats(src, feeds, exclude)
        exclude += add_clip_and_shadow(src, steps[-1], stats, fraction, shadow=True)
        src = steps[-1]
    if mode in ("dynamic", *PER_TOKEN):
        def of(rs: Sequence[str]) -> list[str]:
            return [n for k, n in roles.items() if mode in PER_TOKEN and (k in rs or k.partition(".")[2] in rs)]

        quantize_per_token(src, dst, exclude, moments, of(two_pass), of(two_level), fused=mode in FUSED,
                           fine=fine)
    elif mode == "block":
        quantize_blockwise(src, dst, exclude, block)
    else:
        quantize_graph(src, dst, feeds, exclude)
    if mode == "shadow":
        strip_main_clips(dst)
    for step in steps:
        for f in (Path(step), Path(step + ".data")):
            f.unlink(missing_ok=True)
    return dst
