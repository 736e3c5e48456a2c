"""Chunked prefill: torch float full prefill vs ONNX Runtime float / int8 / int8+shadow chunk graphs.

All ONNX Runtime numbers are CPU execution provider timings (no NPU on this machine).

    .venv/bin/python benchmarks/bench_prefill.py [--models demo,qwen2-0.5b] [--prompt-len 1024]
        [--chunk 256] [--threads 2] [--repeats 3] [--eval-prompts 8]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, median, random_checkpoint  # noqa: E402
from edge_node.model import Transformer, load_model  # noqa: E402
from edgefed.args import calibration_texts  # noqa: E402
from npu_backends.build import (  # noqa: E402
    PrefillOptions,
    calibration_prompts,
    float_graphs,
    open_prefill,
    round_up,
    weights_digest,
)
from npu_backends.evaluate import agreement  # noqa: E402
from npu_backends.export import export_chunk_graphs  # noqa: E402
from npu_backends.prefill import ChunkedPrefill  # noqa: E402
from npu_backends.quantize import MODES, ROTATE_BLOCK, SMOOTH_ALPHA, build_int8, record_calibration  # noqa: E402

DEMO_DIR = Path(__file__).resolve().parent.parent / "models" / "edgefed-demo"


def fp32_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best torch fp32 GEMM rate on this machine with the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def int8_peak_gops(n: int = 2048, repeats: int = 5, threads: int = 2) -> float:
    """Best ONNX Runtime MatMulInteger (u8 x s8 -> s32) rate: the CPU EP's int8 GEMM ceiling."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.randint(-127, 127, (n, n)).astype(np.int8), "w")
    node = helper.make_node("MatMulInteger", ["a", "w"], ["y"])
    graph = helper.make_graph([node], "peak", [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = np.random.randint(0, 255, (n, n)).astype(np.uint8)
    sess.run(None, {"a": a})
    best = min(_timed(lambda: sess.run(None, {"a": a})) for _ in range(repeats))
    onnx.checker.check_model(model)
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def prefill_flops(model: Transformer, tokens: int) -> float:
    """Nominal FLOPs of a causal prefill: linear layers + head on the last token + causal attention."""
    cfg = model.config
    linear = sum(b.attn.wqkv.weight.numel() + b.attn.wo.weight.numel() + b.mlp.w13.weight.numel()
                 + b.mlp.w2.weight.numel() for b in model.blocks.values())
    attn = 2 * 2 * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * tokens * (tokens + 1) / 2
    return 2 * linear * tokens + attn + 2 * cfg.hidden_size * cfg.vocab_size


def torch_runner(model: Transformer, prompt: list[int]):
    def once() -> tuple[float, np.ndarray]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits = model(torch.tensor([prompt]), model.new_cache(), 0, last_only=True)[0, -1].numpy()
            return time.perf_counter() - t0, logits
    return once


def ort_runner(prefill: ChunkedPrefill, prompt: list[int]):
    def once() -> tuple[float, np.ndarray]:
        r = prefill.run(prompt)
        return r.seconds, r.logits
    return once


def interleaved(runners: dict, repeats: int) -> dict[str, tuple[list[float], np.ndarray]]:
    """Each variant once per round, rounds repeated: on a shared machine every variant sees the same load."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    logits = {}
    for k, run in runners.items():  # warm-up round
        _, logits[k] = run()
    for _ in range(repeats):
        for k, run in runners.items():
            t, _ = run()
            times[k].append(t)
    return {k: (times[k], logits[k]) for k in runners}


def model_prompt(name: str, model_dir: Path, length: int, vocab: int) -> tuple[list[int], str]:
    if (model_dir / "tokenizer.json").is_file():
        from edge_node.model import Tokenizer
        from emulation.corpus import corpus_files

        tok, ids = Tokenizer.from_dir(model_dir), []
        for path in corpus_files("heldout"):
            ids += tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
            if len(ids) >= length * 64:
                break
        return ids, "stdlib held-out text"
    return np.random.RandomState(1).randint(0, vocab, length * 64).tolist(), "random token ids"


def bench_model(name: str, model_dir: Path, a: argparse.Namespace, peaks: dict) -> dict:
    model = load_model(model_dir, pack=True)  # the torch engine's fastest layout (oneDNN-packed linears)
    cfg = model.config
    text_ids, source = model_prompt(name, model_dir, a.prompt_len, cfg.vocab_size)
    prompt = text_ids[: a.prompt_len]
    flops = prefill_flops(model, a.prompt_len)
    context = round_up(a.prompt_len, a.chunk)  # graphs hold the prompt: context - chunk past slots
    out = {"model": name, "prompt": source, "tokens": a.prompt_len, "gflop": flops / 1e9, "chunk": a.chunk,
           "context": context, "past_slots": context - a.chunk,
           "int8_recipe": {"smooth_alpha": SMOOTH_ALPHA, "rotate_block": ROTATE_BLOCK, "float_head": True}}
    root = Path(a.cache) / f"{Path(name).name}-graphs-c{a.chunk}"
    opts = PrefillOptions(a.chunk, context, threads=a.threads)
    specs = float_graphs(model, opts, root, weights_digest(model_dir))  # reused while the weights are the same
    variants = {"ORT float32, chunked": specs}
    calib = calibration_prompts(model_dir, calibration_texts(), a.calib_tokens, context, cfg.vocab_size)
    feeds = record_calibration(model, specs, calib, a.threads)
    for mode in MODES:
        variants[f"ORT int8 {mode}, chunked"] = build_int8(specs, feeds, root, mode)
    del feeds
    gc.collect()
    runners = {"torch float32, full prompt": torch_runner(model, prompt)}
    runners |= {label: ort_runner(open_prefill(model, v, opts), prompt) for label, v in variants.items()}
    peaks |= {"fp32_gflops": max(peaks.get("fp32_gflops", 0), fp32_peak_gflops())}
    timed = interleaved(runners, a.repeats)
    t_torch, ref = median(timed["torch float32, full prompt"][0]), timed["torch float32, full prompt"][1]
    out["rows"] = []
    for label, (ts, logits) in timed.items():
        t = median(ts)
        out["rows"].append({"variant": label, "ms": t * 1e3, "best_ms": min(ts) * 1e3,
                            "tokens_per_s": a.prompt_len / t, "speedup_vs_torch": t_torch / t,
                            "fp32_peak_frac": flops / min(ts) / 1e9 / peaks["fp32_gflops"],
                            "max_abs_logit_err": float(np.abs(logits - ref).max()),
                            "top1_last": int(logits.argmax()) == int(ref.argmax())})
    del runners, timed
    gc.collect()
    if a.eval_prompts:
        held = [text_ids[i * a.eval_len:(i + 1) * a.eval_len] for i in range(a.eval_prompts)]
        out["agreement"] = eval_agreement(model, model_dir, root, held, a)
    return out


def eval_agreement(model: Transformer, model_dir: Path, root: Path, prompts: list[list[int]],
                   a: argparse.Namespace) -> dict:
    """Top-1 agreement of every int8 variant with float over every position of the held-out prompts."""
    context = round_up(a.eval_len, a.chunk)
    specs = export_chunk_graphs(model, root / "all", a.chunk, context, all_logits=True)
    calib = calibration_prompts(model_dir, calibration_texts(), a.calib_tokens, context, model.config.vocab_size)
    feeds = record_calibration(model, specs, calib, a.threads)
    opts = PrefillOptions(a.chunk, context, threads=a.threads)
    ref = open_prefill(model, specs, opts)
    res = {m: agreement(ref, open_prefill(model, build_int8(specs, feeds, root / "all", m), opts), prompts)
           for m in MODES}
    return {m: {**r.__dict__, "error_recovered_vs_clip": res["clip"].recovered_by(r),
                "error_recovered_vs_minmax": res["minmax"].recovered_by(r)} for m, r in res.items()}


def table(result: dict) -> str:
    lines = [f"**{result['model']}** ({result['tokens']}-token prompt, {result['prompt']}, "
             f"{result['gflop']:.1f} GFLOP nominal)", "",
             "| variant | prefill ms (median) | best ms | tokens/s | vs torch | fp32 peak (best) "
             "| max abs logit err | top-1 |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['ms']:.0f} | {r['best_ms']:.0f} | {r['tokens_per_s']:.0f} "
                     f"| {r['speedup_vs_torch']:.2f}x "
                     f"| {100 * r['fp32_peak_frac']:.0f}% | {r['max_abs_logit_err']:.3g} | {r['top1_last']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="demo,qwen2-0.5b")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--eval-prompts", type=int, default=8, help="held-out prompts for top-1 agreement (0: skip)")
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--cache", default="/tmp/edgefed-bench")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    peaks = {"fp32_gflops": fp32_peak_gflops(), "int8_gops": int8_peak_gops(threads=a.threads)}
    print(f"machine: {machine()}; measured peaks: fp32 {peaks['fp32_gflops']:.0f} GFLOP/s (torch), "
          f"int8 {peaks['int8_gops']:.0f} GOP/s (ORT MatMulInteger); ONNX Runtime CPU execution provider")
    results = []
    for name in a.models.split(","):
        if Path(name).is_dir():
            model_dir = Path(name)
        else:
            model_dir = DEMO_DIR if name == "demo" else random_checkpoint(name, Path(a.cache) / name)
        if not (model_dir / "config.json").is_file():
            print(f"skipping {name}: {model_dir} has no config.json")
            continue
        # the all-rows head is too costly at a 150k vocabulary; such models are random-weight shapes anyway
        small_vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"] <= 32768
        eval_prompts = a.eval_prompts if small_vocab else 0
        r = bench_model(name, model_dir, argparse.Namespace(**{**vars(a), "eval_prompts": eval_prompts}), peaks)
        results.append(r)
        print(table(r), "\n")
        if "agreement" in r:
            print(json.dumps(r["agreement"], indent=1), "\n")
        gc.collect()
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"peaks": peaks, "machine": machine(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
