"""Real model: edgefed against llama.cpp (llama-cpp-python) and transformers, one checkpoint, same threads.

    .venv/bin/python benchmarks/bench_real.py --model ~/.cache/edgefed/models/SmolLM2-135M-Instruct \
        [--threads 2] [--rounds 3] [--prompt-len 128] [--new 64] [--out /tmp]

Needs the bench extra (`pip install -e '.[bench]'`: llama-cpp-python, built from source, transformers and
sentencepiece, which llama.cpp's converter imports). Preparation, cached under --cache (keyed by the
checkpoint's config and safetensors size/mtime, and by the llama-cpp-python version for GGUFs):
- GGUF f32 and Q8_0 from llama.cpp's own convert_hf_to_gguf.py (vendored in the llama-cpp-python sdist:
  the sdist is downloaded once with pip into --llama-src and the converter unpacked there; or --converter),
  Q4_0 from the f32 GGUF with llama.cpp's quantizer (llama_cpp.llama_model_quantize);
- edgefed int8 (one scale per row), int8 g32 (groups of 32) and int4 directories from `edgefed quantize`.

Timed runs are interleaved: every round runs each engine once, each in a fresh subprocess (so peak RSS is
that engine's own), in an order rotated by one each round. Each run loads the model, warms up (4 tokens
after a 16-token prompt), then times greedy decoding of exactly --new tokens after the same --prompt-len
token prompt (held-out stdlib source, emulation.corpus) with EOS ignored. TTFT runs from the call to the
first token; decode time per token is the mean gap between later tokens (edgefed's own definition).
edgefed and transformers run with OMP_WAIT_POLICY=PASSIVE (as the edgefed CLI sets it); llama.cpp runs
with whatever the environment holds. Every engine gets --threads threads.

Quality, untimed: each engine's greedy tokens against edgefed float32's (tokens until the first divergence,
and matching positions); top-1 agreement with edgefed float32 and perplexity over --eval-windows windows of
--eval-len held-out tokens (all positions scored in one forward) for edgefed's variants and llama.cpp's GGUFs.
Prints a markdown table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.llama_cpp_src import find_converter, gguf_tensor_types, run_logged  # noqa: E402

CACHE = Path.home() / ".cache" / "edgefed"

# name -> (engine, what it runs)
ENGINES: dict[str, tuple[str, str]] = {
    "edgefed float32": ("edgefed", "float32"),
    "edgefed bfloat16": ("edgefed", "bfloat16"),
    "edgefed int8": ("edgefed", "int8"),
    "edgefed int8 rows": ("edgefed", "int8-rows"),
    "edgefed int4": ("edgefed", "int4"),
    "llama.cpp f32": ("llama", "f32"),
    "llama.cpp Q8_0": ("llama", "q8_0"),
    "llama.cpp Q4_0": ("llama", "q4_0"),
    "transformers float32": ("transformers", "float32"),
    # the torch path of the same checkpoints (EDGEFED_NATIVE=0): what the native decode step replaces
    "edgefed float32 torch": ("edgefed", "float32"),
    "edgefed int8 torch": ("edgefed", "int8"),
    "edgefed int4 torch": ("edgefed", "int4"),
}
TORCH_ONLY = {"edgefed float32 torch", "edgefed int8 torch", "edgefed int4 torch"}
REFERENCE = "edgefed float32"
RATIOS = [("edgefed int8", "llama.cpp Q8_0"), ("edgefed int8 rows", "llama.cpp Q8_0"),
          ("edgefed int4", "llama.cpp Q4_0"), ("edgefed float32", "llama.cpp f32"),
          ("edgefed float32", "transformers float32"), ("edgefed float32", "edgefed float32 torch"),
          ("edgefed int8", "edgefed int8 torch"), ("edgefed int4", "edgefed int4 torch")]
WARMUP_PROMPT, WARMUP_NEW = 16, 4


# ---------------------------------------------------------------- helpers (no torch in the parent process)

def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM), as edge_node.memory.own_peak_rss_mb reads it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def machine_line(threads: int) -> str:
    """benchmarks.common.machine()'s line, without importing torch into the parent."""
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(int(sys.argv[2])); "
            "from benchmarks.common import machine; print(machine())")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(threads)], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "llama-cpp-python", "gguf"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def checkpoint_key(model_dir: Path) -> str:
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def dir_mb(path: Path) -> float:
    files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / 2**20


# ---------------------------------------------------------------- preparation (cached)

def gguf_files(model_dir: Path, out_dir: Path, converter: Path, threads: int) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {t: out_dir / f"{t}.gguf" for t in ("f32", "q8_0", "q4_0")}
    for outtype in ("f32", "q8_0"):
        if files[outtype].is_file():
            continue
        print(f"converting {model_dir} to GGUF {outtype} with {converter}", file=sys.stderr)
        tmp = files[outtype].with_suffix(".partial")
        with tempfile.TemporaryDirectory() as cwd:
            run_logged([sys.executable, str(converter), str(model_dir), "--outtype", outtype, "--outfile", str(tmp)],
                       out_dir / f"convert-{outtype}.log", cwd=Path(cwd))
        tmp.rename(files[outtype])
    if not files["q4_0"].is_file():
        print("quantizing the f32 GGUF to Q4_0 with llama.cpp (llama_model_quantize)", file=sys.stderr)
        tmp = files["q4_0"].with_suffix(".partial")
        worker({"kind": "llama-quantize", "src": str(files["f32"]), "dst": str(tmp), "threads": threads},
               env=dict(os.environ))
        tmp.rename(files["q4_0"])
    return files


# what -> `edgefed quantize` flags: int8 in the native step's layout (groups of 32, float32 scales, int8 head; like
# Q8_0), int8 with the defaults (one scale per row, float head), int4 with the defaults (groups of 32, int8 head)
QUANTIZED = {"int8": ["--weights", "int8", "--group-size", "32", "--lm-head", "int8", "--scale-dtype", "float16"],
             "int8-rows": ["--weights", "int8"], "int4": ["--weights", "int4"]}


def edgefed_quantized(model_dir: Path, out_dir: Path) -> dict[str, Path]:
    dirs = {w: out_dir / w for w in QUANTIZED}
    edgefed = Path(sys.executable).parent / "edgefed"
    cmd0 = [str(edgefed)] if edgefed.is_file() else [sys.executable, "-m", "edgefed"]
    from quant.format import DEFAULT_GROUP_SIZE, DEFAULT_INT8_GROUP_SIZE

    for what, d in dirs.items():
        # copies made with other defaults are made again
        flags = hashlib.sha256(" ".join(QUANTIZED[what]).encode()).hexdigest()[:8]
        stamp = d / f".done-g{DEFAULT_GROUP_SIZE}-i8g{DEFAULT_INT8_GROUP_SIZE}-{flags}"
        if stamp.is_file():
            continue
        print(f"edgefed quantize {' '.join(QUANTIZED[what])} -> {d}", file=sys.stderr)
        out_dir.mkdir(parents=True, exist_ok=True)
        run_logged(cmd0 + ["quantize", "--model", str(model_dir), *QUANTIZED[what], "--out", str(d), "--force"],
                   out_dir / f"quantize-{what}.log")
        stamp.touch()
    return dirs


def held_out_tokens(model_dir: Path, prompt_len: int, windows: int, window_len: int) -> dict:
    """The prompt: the first prompt_len tokens of the first held-out stdlib file that has them; the evaluation
    windows: the first window_len tokens of each of the next `windows` held-out files long enough."""
    sys.path.insert(0, str(ROOT))
    from edge_node.model.tokenizer import Tokenizer
    from emulation.corpus import corpus_files, read_source, relative_name

    tok = Tokenizer.from_dir(model_dir)
    prompt, prompt_file, evals, eval_files = None, None, [], []
    for f in corpus_files("heldout"):
        ids = tok.encode(read_source(f), add_special_tokens=False)
        if prompt is None:
            if len(ids) >= prompt_len:
                prompt, prompt_file = ids[:prompt_len], relative_name(f)
            continue
        if len(ids) >= window_len:
            evals.append(ids[:window_len])
            eval_files.append(relative_name(f))
            if len(evals) == windows:
                break
    if prompt is None or len(evals) < windows:
        sys.exit("not enough held-out text for the prompt and the evaluation windows")
    return {"prompt": prompt, "prompt_file": prompt_file, "prompt_text": tok.decode(prompt),
            "windows": evals, "window_files": eval_files}


# ---------------------------------------------------------------- subprocess workers

def worker(spec: dict, env: dict) -> dict:
    """Run one job in a fresh interpreter (this file with --worker); returns its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, result_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(json.dumps({**spec, "result": str(result_file)}))
        r = subprocess.run([sys.executable, __file__, "--worker", str(spec_file)], env=env, capture_output=True,
                           text=True)
        if r.returncode != 0 or not result_file.is_file():
            sys.exit(f"worker {spec['kind']} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
        return json.loads(result_file.read_text())


def worker_env(engine: str, threads: int, llama_wait_policy: str | None = None) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    if engine in ("edgefed", "transformers"):
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the edgefed CLI does; an explicit setting wins
    elif llama_wait_policy:
        env["OMP_WAIT_POLICY"] = llama_wait_policy  # ggml's barriers are `omp barrier`s in an OpenMP build
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _timed(gaps_start: float, times: list[float]) -> tuple[float, float]:
    ttft = (times[0] - gaps_start) * 1e3
    steps = [(b - a) * 1e3 for a, b in zip(times, times[1:], strict=False)]
    return ttft, (sum(steps) / len(steps) if steps else 0.0)


def run_edgefed(spec: dict) -> dict:
    import torch

    from edge_node.model.decode import generate
    from quant.checkpoint import load_any

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    model = load_any(spec["path"], getattr(torch, spec["dtype"]), pack=True)
    load_s = time.perf_counter() - t0
    prompt, new = spec["prompt"], spec["new"]
    generate(model, prompt[:WARMUP_PROMPT], WARMUP_NEW)
    r = generate(model, prompt, new)  # no eos_ids: exactly `new` tokens
    return {"ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms, "token_ids": r.token_ids, "load_s": load_s}


def _llama(path: str, threads: int, logits_all: bool, n_ctx: int = 512):
    import llama_cpp

    # n_batch = n_ctx: a prompt or an evaluation window goes through in one batch
    return llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx,
                           logits_all=logits_all, verbose=False)


def run_llama(spec: dict) -> dict:
    import llama_cpp
    import numpy as np

    t0 = time.perf_counter()
    llm = _llama(spec["path"], spec["threads"], False, spec["n_ctx"])
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def greedy(prompt: list[int], new: int) -> tuple[list[int], float, list[float]]:
        # greedy = argmax of the raw logits (temperature 0 / top_k 1); EOS is never checked: exactly `new` tokens
        llm.reset()
        out, times = [], []
        start = time.perf_counter()
        llm.eval(prompt)
        while True:
            # the last position's logits, straight from llama.cpp (Llama.eval keeps none without logits_all)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            token = int(np.argmax(logits))
            times.append(time.perf_counter())
            out.append(token)
            if len(out) == new:
                return out, start, times
            llm.eval([token])

    greedy(spec["prompt"][:WARMUP_PROMPT], WARMUP_NEW)
    tokens, start, times = greedy(spec["prompt"], spec["new"])
    ttft, tpot = _timed(start, times)
    return {"ttft_ms": ttft, "tpot_ms": tpot, "token_ids": tokens, "load_s": load_s}


def run_transformers(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """generate() puts the prompt first, then each new token as it is chosen."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0

    def gen(prompt: list[int], new: int, streamer=None):
        ids = torch.tensor([prompt])
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, streamer=streamer, pad_token_id=model.config.eos_token_id)

    with torch.inference_mode():
        gen(spec["prompt"][:WARMUP_PROMPT], WARMUP_NEW)
        clock = Clock()
        start = time.perf_counter()
        out = gen(spec["prompt"], spec["new"], clock)
    ttft, tpot = _timed(start, clock.times[1:])
    return {"ttft_ms": ttft, "tpot_ms": tpot, "token_ids": out[0, len(spec["prompt"]):].tolist(), "load_s": load_s}


def _scores(logits, window: list[int]) -> tuple[float, list[int]]:
    """Summed NLL of window[1:] and the argmax at each predicting position, from (len, vocab) float logits."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)[:-1]
    target = np.asarray(window[1:])
    m = x.max(axis=1, keepdims=True)
    logz = (m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))
    nll = float((logz - x[np.arange(len(target)), target]).sum())
    return nll, x.argmax(axis=1).tolist()


def _decode_logits(model, window: list[int]):
    """(len, vocab) logits of a window fed one token at a time through the decode step generate uses (the
    native step where it runs: its one-token products are what decode speed is measured on, int8 inputs for
    packed weights included), not through the prompt path."""
    import torch

    from edge_node.model import native

    dec = native.NativeDecoder.of(model)
    cache, rows = model.new_cache(), []
    for pos, t in enumerate(window):
        rows.append(dec.step(t, pos, cache) if dec is not None else model(torch.tensor([[t]]), cache, pos)[0, -1])
    return torch.stack(rows).float().numpy()


def quality_edgefed(spec: dict) -> dict:
    import torch

    from quant.checkpoint import load_any

    torch.set_num_threads(spec["threads"])
    out = {}
    for name, path, dtype in spec["variants"]:
        model = load_any(path, getattr(torch, dtype), pack=True)
        nll, argmax = 0.0, []
        with torch.inference_mode():
            for w in spec["windows"]:
                logits = _decode_logits(model, w)
                n, a = _scores(logits, w)
                nll, argmax = nll + n, argmax + a
        out[name] = {"nll": nll, "argmax": argmax}
        del model
    return out


def quality_llama(spec: dict) -> dict:
    import numpy as np

    out = {}
    for name, path in spec["variants"]:
        llm = _llama(path, spec["threads"], True, spec["n_ctx"])
        nll, argmax = 0.0, []
        for w in spec["windows"]:
            llm.reset()
            llm.eval(w)
            n, a = _scores(np.array(llm.scores[:len(w)]), w)
            nll, argmax = nll + n, argmax + a
        out[name] = {"nll": nll, "argmax": argmax}
        del llm
    return out


def llama_quantize(spec: dict) -> dict:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = spec["threads"]
    rc = llama_cpp.llama_model_quantize(spec["src"].encode(), spec["dst"].encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return {}


WORKERS = {"edgefed": run_edgefed, "llama": run_llama, "transformers": run_transformers,
           "edgefed-quality": quality_edgefed, "llama-quality": quality_llama, "llama-quantize": llama_quantize}


def worker_main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    result = WORKERS[spec["kind"]](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------- the benchmark

def agreement(tokens: list[int], ref: list[int]) -> tuple[int, int]:
    prefix = 0
    for a, b in zip(tokens, ref, strict=False):
        if a != b:
            break
        prefix += 1
    return prefix, sum(a == b for a, b in zip(tokens, ref, strict=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(CACHE / "models" / "SmolLM2-135M-Instruct"),
                    help="Hugging Face directory with float weights (make real-model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--eval-len", type=int, default=256)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of: " + ", ".join(ENGINES))
    ap.add_argument("--cache", default=str(CACHE / "bench-real"), help="GGUFs and edgefed-quantized copies")
    ap.add_argument("--llama-src", default=str(CACHE / "llama.cpp"),
                    help="where the llama-cpp-python sdist is downloaded and llama.cpp's converter unpacked")
    ap.add_argument("--converter", help="llama.cpp's convert_hf_to_gguf.py (default: unpacked into --llama-src)")
    ap.add_argument("--llama-wait-policy", choices=["PASSIVE", "ACTIVE"],
                    help="OMP_WAIT_POLICY for llama.cpp (default: the environment's; llama.cpp's threads then spin)")
    ap.add_argument("--out", default="/tmp", help="directory for bench_real.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker_main(a.worker)
    if a.new < 2:
        ap.error("--new must be at least 2 (decode speed is measured between tokens)")
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")
    if REFERENCE not in engines:
        engines.insert(0, REFERENCE)
    n_ctx = max(512, a.prompt_len + a.new, a.eval_len)  # llama.cpp's context: 512 as asked, more if needed

    model_dir = Path(a.model).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        sys.exit(f"{model_dir}: no config.json (make real-model writes SmolLM2-135M-Instruct)")
    wall0 = time.time()
    key_dir = Path(a.cache).expanduser() / f"{model_dir.name}-{checkpoint_key(model_dir)}"
    paths: dict[str, Path] = {"float32": model_dir, "bfloat16": model_dir}
    if any(ENGINES[e][0] == "llama" for e in engines):
        converter = find_converter(a.converter, Path(a.llama_src).expanduser())
        paths |= gguf_files(model_dir, key_dir / f"gguf-{versions()['llama-cpp-python']}", converter, a.threads)
    if any(ENGINES[e][1] in QUANTIZED for e in engines):
        paths |= edgefed_quantized(model_dir, key_dir / "edgefed")
    data = held_out_tokens(model_dir, a.prompt_len, a.eval_windows, a.eval_len)
    prep_s = time.time() - wall0

    # timed rounds
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    loads: list[tuple[float, float, float]] = []
    for r in range(a.rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for name in order:
            engine, what = ENGINES[name]
            spec = {"kind": engine, "path": str(paths[what]), "threads": a.threads, "prompt": data["prompt"],
                    "new": a.new, "dtype": "float32" if what in QUANTIZED else what, "n_ctx": n_ctx}
            env = worker_env(engine, a.threads, a.llama_wait_policy)
            if name in TORCH_ONLY:
                env["EDGEFED_NATIVE"] = "0"
            res = worker(spec, env)
            res["round"] = r
            runs[name].append(res)
            print(f"round {r + 1}/{a.rounds} {name}: {1e3 / res['tpot_ms']:.1f} tok/s decode, "
                  f"{a.prompt_len / res['ttft_ms'] * 1e3:.0f} tok/s prefill, {res['peak_rss_mb']:.0f} MB",
                  file=sys.stderr)
        loads.append(os.getloadavg())

    # quality (untimed)
    ef_variants = [(n, str(paths[ENGINES[n][1]]), "float32" if ENGINES[n][1] in QUANTIZED else ENGINES[n][1])
                   for n in engines if ENGINES[n][0] == "edgefed" and n not in TORCH_ONLY]
    quality = worker({"kind": "edgefed-quality", "variants": ef_variants, "windows": data["windows"],
                      "threads": a.threads}, worker_env("edgefed", a.threads))
    lc_variants = [(n, str(paths[ENGINES[n][1]])) for n in engines if ENGINES[n][0] == "llama"]
    if lc_variants:
        quality |= worker({"kind": "llama-quality", "variants": lc_variants, "windows": data["windows"],
                           "threads": a.threads, "n_ctx": n_ctx}, worker_env("llama", a.threads, a.llama_wait_policy))
    quality.pop("peak_rss_mb", None)
    n_scored = a.eval_windows * (a.eval_len - 1)

    ref_tokens = runs[REFERENCE][0]["token_ids"]
    ref_argmax = quality[REFERENCE]["argmax"]
    rows = {}
    for name in engines:
        rs = runs[name]
        decode = [1e3 / x["tpot_ms"] for x in rs]
        prefill = [a.prompt_len / x["ttft_ms"] * 1e3 for x in rs]
        prefix, matches = agreement(rs[0]["token_ids"], ref_tokens)
        row = {"decode_tok_s": statistics.median(decode), "prefill_tok_s": statistics.median(prefill),
               "decode_tok_s_rounds": decode, "prefill_tok_s_rounds": prefill,
               "tpot_ms": statistics.median(x["tpot_ms"] for x in rs),
               "ttft_ms": statistics.median(x["ttft_ms"] for x in rs),
               "peak_rss_mb": max(x["peak_rss_mb"] for x in rs), "load_s": statistics.median(x["load_s"] for x in rs),
               "file_mb": dir_mb(paths[ENGINES[name][1]]),
               "greedy_prefix": prefix, "greedy_matches": matches,
               "tokens_same_every_round": all(x["token_ids"] == rs[0]["token_ids"] for x in rs),
               "token_ids": rs[0]["token_ids"]}
        if name in quality:
            q = quality[name]
            row["ppl"] = math.exp(q["nll"] / n_scored)
            row["top1_vs_float32"] = sum(x == y for x, y in zip(q["argmax"], ref_argmax, strict=True)) / n_scored
        rows[name] = row
    ratios = {f"{x} / {y}": {"decode": rows[x]["decode_tok_s"] / rows[y]["decode_tok_s"],
                             "prefill": rows[x]["prefill_tok_s"] / rows[y]["prefill_tok_s"]}
              for x, y in RATIOS if x in rows and y in rows}
    noisy = {n: r["decode_tok_s_rounds"] for n, r in rows.items()
             if len(r["decode_tok_s_rounds"]) > 1
             and (max(r["decode_tok_s_rounds"]) - min(r["decode_tok_s_rounds"])) / r["decode_tok_s"] > 0.25}
    gguf_info = {w: gguf_tensor_types(paths[w]) for w in ("f32", "q8_0", "q4_0") if w in paths}

    mach = machine_line(a.threads)
    vers = versions()
    lines = [f"# {model_dir.name}: prompt {a.prompt_len} tokens ({data['prompt_file']}, held out), {a.new} greedy "
             f"tokens, median of {a.rounds} interleaved rounds, {a.threads} threads per engine",
             f"# {mach}; " + ", ".join(f"{k} {v}" for k, v in vers.items()),
             f"# OMP_WAIT_POLICY: edgefed and transformers {worker_env('edgefed', a.threads).get('OMP_WAIT_POLICY')}, "
             f"llama.cpp {worker_env('llama', a.threads, a.llama_wait_policy).get('OMP_WAIT_POLICY') or 'unset'}",
             "",
             "| engine | weights MB | prefill tok/s | decode tok/s | decode tok/s per round | peak RSS MB "
             "| greedy = f32 prefix | greedy matches | top-1 vs f32 | perplexity |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        per_round = ", ".join(f"{x:.1f}" for x in r["decode_tok_s_rounds"])
        top1 = f"{r['top1_vs_float32']:.2%}" if "top1_vs_float32" in r else "-"
        ppl = f"{r['ppl']:.3f}" if "ppl" in r else "-"
        lines.append(f"| {name} | {r['file_mb']:.0f} | {r['prefill_tok_s']:.0f} | **{r['decode_tok_s']:.1f}** | "
                     f"{per_round} | {r['peak_rss_mb']:.0f} | {r['greedy_prefix']}/{a.new} | "
                     f"{r['greedy_matches']}/{a.new} | {top1} | {ppl} |")
    lines.append("")
    for k, v in ratios.items():
        lines.append(f"- {k}: decode **{v['decode']:.2f}x**, prefill {v['prefill']:.2f}x")
    lines.append(f"- perplexity and top-1 over {a.eval_windows} held-out windows of {a.eval_len} tokens "
                 f"({', '.join(data['window_files'])}): {n_scored} positions; edgefed's logits come from its "
                 f"decode step fed one token at a time (the numerics decode speed is measured on), llama.cpp's "
                 f"from one batch")
    for w, info in gguf_info.items():
        lines.append(f"- GGUF {w}: {info['embedding_head']}; tensor types {info['types']}")
    lines.append(f"- load average (1 min) before the rounds {load_before[0]:.2f}, after each round: "
                 f"{', '.join(f'{x[0]:.2f}' for x in loads)} (2 cores: above ~2, other processes shared them)")
    if noisy:
        lines.append(f"- NOISY: decode tok/s varied by more than 25% of the median across rounds for {noisy}")
    print("\n".join(lines))

    out = Path(a.out) / "bench_real.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": mach, "versions": vers,
        "model": str(model_dir), "threads": a.threads, "rounds": a.rounds, "prompt_len": a.prompt_len, "new": a.new,
        "prompt_file": data["prompt_file"], "prompt_ids": data["prompt"], "window_files": data["window_files"],
        "eval_positions": n_scored, "paths": {k: str(v) for k, v in paths.items()}, "gguf": gguf_info,
        "rows": rows, "ratios": ratios, "noisy": noisy, "loadavg_before": load_before, "loadavg_after_rounds": loads,
        "omp_wait_policy": {"edgefed": worker_env("edgefed", a.threads).get("OMP_WAIT_POLICY"),
                            "transformers": worker_env("transformers", a.threads).get("OMP_WAIT_POLICY"),
                            "llama.cpp": worker_env("llama", a.threads, a.llama_wait_policy).get("OMP_WAIT_POLICY")},
        "prep_s": prep_s, "wall_s": time.time() - wall0,
        "runs": runs}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
