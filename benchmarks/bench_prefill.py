"""Chunked prefill: torch float full prefill vs ONNX Runtime float / int8 chunk graphs (VARIANTS).

All ONNX Runtime numbers are CPU execution provider timings (no NPU on this machine). Top-1 agreement with
the float graphs is measured over every position of --eval-prompts held-out prompts, on the same graphs
that are timed (npu_backends.evaluate: the float head applied to every row on the host), together with
the residual stream's relative error after every layer (where the int8 error enters).

    .venv/bin/python benchmarks/bench_prefill.py [--models smollm2,demo,qwen2-0.5b] [--prompt-len 512]
        [--chunk 128] [--threads 2] [--repeats 5] [--eval-prompts 4] [--variants minmax,token] [--reuse-int8]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

if "--native-int8" in sys.argv:  # edgefed's own setting (edgefed/cli.py): idle OpenMP workers sleep between the
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch ops, so they leave the cores to the native GEMM

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
from npu_backends.evaluate import evaluate  # noqa: E402
from npu_backends.prefill import ChunkedPrefill  # noqa: E402
from npu_backends.quantize import ROLES, ROTATE_BLOCK, SMOOTH_ALPHA, build_int8, int8_path, record_calibration  # noqa: E402

DEMO_DIR = Path(__file__).resolve().parent.parent / "models" / "edgefed-demo"
SMOLLM2_DIR = Path.home() / ".cache" / "edgefed" / "models" / "SmolLM2-135M-Instruct"
SETTLE_S = 0.2  # idle time before every timed run (see interleaved)
EVAL_VOCAB = 65536  # agreement is evaluated up to this vocabulary (the head runs on the host, 128 rows at a time)


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
    """Each variant once per round, rounds repeated: on a shared machine every variant sees the same load.

    Every run starts after a pause of SETTLE_S: ONNX Runtime's intra-op workers spin for ~45 ms after a run
    (a process's CPU time while it sleeps), and a variant started at once shares a core with them (torch
    measured ~3.5% slower right after an ORT run than after one whose workers do not spin)."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    logits = {}
    for k, run in runners.items():  # warm-up round
        _, logits[k] = run()
    for _ in range(repeats):
        for k, run in runners.items():
            time.sleep(SETTLE_S)
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


# label -> build_int8 keyword arguments; the block rows are the real model's per-step account
VARIANTS = {
    "minmax": {"mode": "minmax"},
    "shadow": {"mode": "shadow"},
    "dynamic (per-token)": {"mode": "dynamic"},
    "block32 plain": {"mode": "block", "smooth": None, "rotate": None, "block": 32},
    "block32 + smooth + rotate": {"mode": "block", "block": 32},
    "block16 + smooth": {"mode": "block", "block": 16, "rotate": None},
    "block16 + smooth + rotate": {"mode": "block", "block": 16},
    # per-token int8 at QGEMM speed, step by step: + rotated q|k|v and gate|up inputs, + GPTQ weights
    "token nearest": {"mode": "token", "gptq": False},
    "token": {"mode": "token"},
    # issue 16, session 11: token's column scales fused into the GEMM (MatMulIntegerToFloat), then more bits
    # where they remove the most error per unit of GEMM work: two-pass activations (2p), two-level weights (2L)
    "token fused": {"mode": "token2", "two_pass": (), "two_level": ()},
    "token2": {"mode": "token2"},  # + 2p o, 2L down
    "token2 + 2p gate|up": {"mode": "token2", "two_pass": ("o", "gate", "up")},
    "token2 + 2p gate|up + 2L qkv": {"mode": "token2", "two_pass": ("o", "gate", "up"), "two_level": ("qkv", "down")},
    # session 12: every linear's input in two passes, no smoothing (after the rotation it only adds error) ...
    "token2 + 2p all": {"mode": "token2", "two_pass": ROLES, "smooth": None},
    # ... the second pass on an 11x finer grid as more input channels of the same GEMM (fine), not stacked rows,
    # and down's weights' rounding residual as a third block of rows, not a second set of columns
    "fine": {"mode": "fine"},  # the --fine recipe (quantize.FINE_*, no smoothing)
    "fine + 2L qkv|o": {"mode": "fine", "two_level": ("qkv", "o", "down")},
}


def bench_model(name: str, model_dir: Path, a: argparse.Namespace, peaks: dict) -> dict:
    model = load_model(model_dir, pack=True)  # the torch engine's fastest layout (oneDNN-packed linears)
    cfg = model.config
    text_ids, source = model_prompt(name, model_dir, max(a.prompt_len, a.eval_len), cfg.vocab_size)
    prompt = text_ids[: a.prompt_len]
    flops = prefill_flops(model, a.prompt_len)
    context = round_up(max(a.prompt_len, a.eval_len), a.chunk)  # graphs hold the prompt: context - chunk past slots
    out = {"model": name, "prompt": source, "tokens": a.prompt_len, "gflop": flops / 1e9, "chunk": a.chunk,
           "context": context, "past_slots": context - a.chunk, "calib_tokens": a.calib_tokens,
           "int8_recipe": {"smooth_alpha": SMOOTH_ALPHA, "rotate_block": ROTATE_BLOCK, "float_head": True}}
    opts = PrefillOptions(a.chunk, context, threads=a.threads)
    variants, chosen = {}, [v for v in a.variants.split(",") if v] or list(VARIANTS)
    float_specs = None
    for attention in a.attention.split(","):  # GroupQueryAttention (fused) and/or masked standard ops (plain)
        fused = attention == "fused"
        tag = "" if fused else ", plain attention"
        root = Path(a.cache) / f"{Path(name).name}-graphs-c{a.chunk}-t{context}{'' if fused else '-plain'}"
        specs = float_graphs(model, replace(opts, fused_attention=fused), root, weights_digest(model_dir))
        variants[f"ORT float32, chunked{tag}"] = specs
        float_specs = float_specs or specs
        feeds = None
        for label in chosen:
            built = _built(specs, root, VARIANTS[label]) if a.reuse_int8 else None
            if built is None:
                if feeds is None:
                    calib = calibration_prompts(model_dir, calibration_texts(), a.calib_tokens, context,
                                                cfg.vocab_size)
                    feeds = record_calibration(model, specs, calib, a.threads)
                built = build_int8(specs, feeds, root, **VARIANTS[label])
            variants[f"ORT int8 {label}, chunked{tag}"] = built
        del feeds
        gc.collect()
    specs = float_specs  # the first layout's float graphs: the reference of every variant's agreement
    if a.eval_prompts:  # every position of held-out prompts, from the same graphs that are timed
        held = [text_ids[i * a.eval_len:(i + 1) * a.eval_len] for i in range(a.eval_prompts)]
        judged = [v for v in a.eval_variants.split(",") if v] or chosen
        out["agreement"] = {label: _evaluation(model, specs, v, held, a.threads) for label, v in variants.items()
                            if label.startswith("ORT int8 ")
                            and label.removeprefix("ORT int8 ").split(", chunked")[0] in judged}
    runners = {"torch float32, full prompt": torch_runner(model, prompt)}
    runners |= {label: ort_runner(open_prefill(model, v, opts), prompt) for label, v in variants.items()}
    if a.native_int8:  # a CPU kernel, not an ORT graph: what a block-wise int8 GEMM at integer speed gives
        from benchmarks import native_prefill

        label = "native int8 (edgefed packed VNNI GEMM), chunked"
        packed = native_prefill.load_packed(native_prefill.int8_copy(model_dir, Path(a.cache)))
        if a.eval_prompts:
            out.setdefault("agreement", {})[label] = native_prefill.agreement(model, packed, held, a.chunk)
        runners[label] = native_prefill.runner(packed, prompt, a.chunk)
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
                            "top1_last": int(logits.argmax()) == int(ref.argmax()),
                            **({"agreement": out["agreement"][label]} if label in out.get("agreement", {}) else {})})
    return out


def _built(specs, root: Path, recipe: dict):
    """The int8 copies an earlier run built with `recipe` in root (int8_path names the recipe), or None."""
    import dataclasses

    args = {k: v for k, v in recipe.items() if k != "fraction"}
    paths = [int8_path(s.path, out_dir=root, **args) for s in specs]
    if not all(p.is_file() for p in paths):
        return None
    return [dataclasses.replace(s, path=str(p)) for s, p in zip(specs, paths, strict=True)]


def _evaluation(model: Transformer, ref_specs, specs, prompts: list[list[int]], threads: int) -> dict:
    ev = evaluate(model, ref_specs, specs, prompts, threads)
    return {**ev.agreement.__dict__, "relative_error_per_layer": ev.per_layer()}


def table(result: dict) -> str:
    lines = [f"**{result['model']}** ({result['tokens']}-token prompt, {result['prompt']}, "
             f"{result['gflop']:.1f} GFLOP nominal)", "",
             "| variant | prefill ms (median) | best ms | tokens/s | vs torch | fp32 peak (best) "
             "| top-1 agreement (every position) | mean abs logit err | max abs logit err | hidden rel err "
             "(last layer) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ag = r.get("agreement")
        rel = f"{ag['relative_error_per_layer'][-1]['after_mlp']:.4f}" if ag and "relative_error_per_layer" in ag \
            else ""
        quality = f"{100 * ag['top1']:.2f}% | {ag['mean_abs_err']:.3g} | {ag['max_abs_err']:.3g} | {rel}" if ag \
            else "| | |"
        lines.append(f"| {r['variant']} | {r['ms']:.0f} | {r['best_ms']:.0f} | {r['tokens_per_s']:.0f} "
                     f"| {r['speedup_vs_torch']:.2f}x | {100 * r['fp32_peak_frac']:.0f}% | {quality} |")
    return "\n".join(lines)


def layer_table(result: dict) -> str:
    """Relative error of the residual stream after each layer's MLP, per int8 variant: where error enters."""
    ags = {k: v for k, v in result.get("agreement", {}).items() if "relative_error_per_layer" in v}
    if not ags:
        return ""
    lines = ["| layer | " + " | ".join(k.replace("ORT int8 ", "").replace(", chunked", "") for k in ags) + " |",
             "|---:|" + "---:|" * len(ags)]
    layers = len(next(iter(ags.values()))["relative_error_per_layer"])
    for i in range(layers):
        cells = [f"{v['relative_error_per_layer'][i]['after_attention']:.4f} / "
                 f"{v['relative_error_per_layer'][i]['after_mlp']:.4f}" for v in ags.values()]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=None, help="comma list of demo, smollm2, a shape name or a model "
                    "directory (default: smollm2 when present, else demo)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--variants", default="", help=f"comma list of int8 variants (default all: {','.join(VARIANTS)})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--eval-prompts", type=int, default=4, help="held-out prompts for top-1 agreement (0: skip)")
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--eval-variants", default="", help="comma list: evaluate agreement of these only (default all)")
    ap.add_argument("--attention", default="fused", help="comma list of graph attention layouts: fused (ONNX "
                    "Runtime's GroupQueryAttention over the written past slots) and/or plain (masked standard ops)")
    ap.add_argument("--cache", default="/tmp/edgefed-bench")
    ap.add_argument("--reuse-int8", action="store_true", help="time the int8 graphs an earlier run of this code "
                    "left in --cache (named by their recipe) instead of building them again")
    ap.add_argument("--native-int8", action="store_true", help="add a row: the prompt chunk by chunk through a "
                    "group-wise int8 copy (float16 scales) on edgefed's packed VNNI GEMM (a CPU kernel, not ORT)")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    peaks = {"fp32_gflops": fp32_peak_gflops(), "int8_gops": int8_peak_gops(threads=a.threads)}
    print(f"machine: {machine()}; measured peaks: fp32 {peaks['fp32_gflops']:.0f} GFLOP/s (torch), "
          f"int8 {peaks['int8_gops']:.0f} GOP/s (ORT MatMulInteger); ONNX Runtime CPU execution provider")
    results = []
    models = a.models or ("smollm2" if (SMOLLM2_DIR / "config.json").is_file() else "demo")
    for name in models.split(","):
        if Path(name).is_dir():
            model_dir = Path(name)
        else:
            named = {"demo": DEMO_DIR, "smollm2": SMOLLM2_DIR}
            model_dir = named[name] if name in named else random_checkpoint(name, Path(a.cache) / name)
        if not (model_dir / "config.json").is_file():
            print(f"skipping {name}: {model_dir} has no config.json")
            continue
        # the all-rows head is too costly at a 150k vocabulary; such models are random-weight shapes anyway
        small_vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"] <= EVAL_VOCAB
        eval_prompts = a.eval_prompts if small_vocab else 0
        r = bench_model(name, model_dir, argparse.Namespace(**{**vars(a), "eval_prompts": eval_prompts}), peaks)
        results.append(r)
        print(table(r), "\n")
        print(layer_table(r), "\n", flush=True)
        gc.collect()
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"peaks": peaks, "machine": machine(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
