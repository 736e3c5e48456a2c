"""ONNX Runtime execution-provider profiles, detection, and strict no-CPU-fallback sessions.

Users of vendor NPU stacks report silent fall-back to the CPU. Here the provider a
session really runs on is read back from the session and reported with every result,
and `strict=True` turns any fall-back (a missing provider, or nodes the accelerator
cannot take) into an error instead of a slow run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from edge_node.model import EdgefedError


class ProviderError(EdgefedError):
    """A requested execution provider is absent, or strict mode refused a CPU fall-back."""


@dataclass(frozen=True)
class ProviderProfile:
    name: str  # our short name: the --provider value
    ep: str  # ONNX Runtime's provider name
    device: str  # the unit it targets, in words
    options: dict[str, str] = field(default_factory=dict)


# Options are the documented ones for each EP's NPU path; a device may need more (paths, cache dirs).
PROFILES: dict[str, ProviderProfile] = {
    "cpu": ProviderProfile("cpu", "CPUExecutionProvider", "CPU"),
    "qnn": ProviderProfile("qnn", "QNNExecutionProvider", "Qualcomm Hexagon HTP", {
        "backend_path": "libQnnHtp.so", "htp_performance_mode": "burst",
        "htp_graph_finalization_optimization_mode": "3"}),
    "openvino": ProviderProfile("openvino", "OpenVINOExecutionProvider", "Intel NPU", {
        "device_type": "NPU", "precision": "FP16"}),
    "vitisai": ProviderProfile("vitisai", "VitisAIExecutionProvider", "AMD Ryzen AI NPU", {
        "config_file": "vaip_config.json"}),
    "coreml": ProviderProfile("coreml", "CoreMLExecutionProvider", "Apple Neural Engine", {
        "MLComputeUnits": "CPUAndNeuralEngine", "ModelFormat": "MLProgram", "RequireStaticInputShapes": "1"}),
}


def available() -> dict[str, bool]:
    """Which profiles this onnxruntime build can run (installed EP libraries, not a probe of the hardware)."""
    have = set(ort.get_available_providers())
    return {name: p.ep in have for name, p in PROFILES.items()}


def profile(name: str) -> ProviderProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ProviderError(f"unknown provider {name!r}; known: {', '.join(PROFILES)}") from None


def session_options(strict: bool, threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: QDQ graphs draw benign "unused initializer" warnings
    if threads:
        so.intra_op_num_threads = threads
    if strict:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return so


def providers_for(name: str, strict: bool) -> list[tuple[str, dict[str, str]]]:
    """The provider list for a session; CPU is appended as the fall-back unless strict."""
    p = profile(name)
    if not available()[name]:
        have = ", ".join(n for n, ok in available().items() if ok)
        msg = (f"execution provider {p.ep} ({name}, {p.device}) is not in this onnxruntime build "
               f"(available: {have})")
        if strict:
            raise ProviderError(msg + "; --strict forbids falling back to the CPU")
        warnings.warn(msg + "; falling back to the CPU execution provider", stacklevel=2)
        return [("CPUExecutionProvider", {})]
    chosen = [(p.ep, dict(p.options))]
    if name != "cpu" and not strict:
        chosen.append(("CPUExecutionProvider", {}))
    return chosen


def make_session(model_path: str | Path, provider: str = "cpu", strict: bool = False,
                 threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession on `provider`; in strict mode any fall-back to the CPU raises ProviderError."""
    so = session_options(strict and provider != "cpu", threads)
    try:
        # MatMul+Add -> Gemm fusion runs before the QDQ fusions and would turn a biased int8 linear
        # layer (Qwen2's q|k|v) back into float weights dequantized on every run.
        sess = ort.InferenceSession(str(model_path), sess_options=so, providers=providers_for(provider, strict),
                                    disabled_optimizers=["MatMulAddFusion"])
    except ProviderError:
        raise
    except Exception as e:  # ORT raises its own Fail/RuntimeException types here
        if strict:
            raise ProviderError(f"{provider}: session creation failed in strict mode: {e}") from None
        raise
    used = used_provider(sess)
    if strict and used != profile(provider).ep:
        raise ProviderError(f"{provider}: the session runs on {used}, not {profile(provider).ep}")
    return sess


def used_provider(sess: ort.InferenceSession) -> str:
    """The provider that takes the graph first (ORT lists a session's providers by priority)."""
    return sess.get_providers()[0]
