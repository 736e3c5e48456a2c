"""Options of an ONNX Runtime chunked prefill: a plain frozen record, light to import and to send to a rank."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillOptions:
    chunk: int = 128
    context: int = 1024  # tokens the graphs hold, so the longest prompt; past slots = context - chunk
    groups: int = 1  # layer-block subgraphs
    provider: str = "cpu"
    strict: bool = False
    int8: bool = False
    shadow: bool = False  # with int8: tight clip + float shadow of the hot channels
    out_of_order: bool = False  # schedule cells over the accelerator and CPU queues
    threads: int | None = None
    graph_dir: str | None = None  # keep / reuse exported graphs here
    calib_tokens: int = 1024
    hot_fraction: float = 1 / 64
    # with int8: block-wise 8-bit weights and dynamic int8 activations (ORT's MatMulNBits, CPU EP): the
    # recipe that keeps >= 99% top-1 agreement on a real pretrained model (benchmarks/README.md, issue 16)
    block: bool = False
    # with int8: per-token int8 activations on Hadamard-rotated linear inputs, GPTQ-rounded int8 weights
    # (u8 x s8 GEMM, standard ONNX ops): ~98% top-1 on SmolLM2-135M at static int8's speed (issue 16)
    token: bool = False
    # with int8: token plus two-pass activations for o, two-level weights for down and fused column scales
    # (ONNX Runtime's MatMulIntegerToFloat): ~98.4% top-1 on SmolLM2-135M at ~0.85x token's speed (issue 16)
    token2: bool = False
    # with int8: every linear's input quantized twice, the second pass on an 11x finer grid as more input
    # channels of the same GEMM, down's weights' rounding residual too: >= 99% top-1 on SmolLM2-135M at ~1.33x
    # torch float with fused attention (issue 16)
    fine: bool = False
    # every layer through ONNX Runtime's GroupQueryAttention (a CPU/CUDA contrib op that reads only the
    # written past slots); False: standard ONNX ops only (MatMul, Softmax, an additive mask over every slot), for
    # an execution provider that must take every node (--strict on an accelerator)
    fused_attention: bool = True

    @property
    def fused(self) -> bool:
        """Whether the graphs take GroupQueryAttention: the op runs on the CPU EP, so a strict session on an
        accelerator (no CPU fall-back) gets plain attention, which its compiler can take."""
        return self.fused_attention and not (self.strict and self.provider != "cpu")

    @property
    def int8_mode(self) -> str | None:
        if not self.int8:
            return None
        for mode in ("block", "token", "token2", "fine"):
            if getattr(self, mode):
                return mode
        return "shadow" if self.shadow else "minmax"


def round_up(n: int, chunk: int) -> int:
    """n rounded up to a whole number of chunks (at least one)."""
    return max(chunk, -(-n // chunk) * chunk)
