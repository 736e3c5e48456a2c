"""Single-node decode and prefill: edgefed vs transformers' generate, same checkpoint, same threads, one run.

    .venv/bin/python benchmarks/bench_decode.py [--shape smollm2-135m] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the edgefed CLI does; before torch loads

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, median, random_checkpoint  # noqa: E402
from edge_node.model import generate, load_model  # noqa: E402


def bench_edgefed(model_dir: Path, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    model = load_model(model_dir, pack=True)
    r = generate(model, prompt, new)
    return r.ttft_ms, r.tpot_ms, r.token_ids


def bench_transformers(model_dir: Path, prompt: list[int], new: int, model) -> tuple[float, float, list[int]]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        ttft = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        total = (time.perf_counter() - t0) * 1e3
    # total = prefill + (new-1) decode steps; the prefill is measured just above
    return ttft, (total - ttft) / (new - 1), out[0, len(prompt):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--cache", default="/tmp/edgefed-bench")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model_dir = random_checkpoint(a.shape, Path(a.cache) / a.shape)
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = torch.randint(3, 1000, (a.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    rows: dict[str, list[tuple[float, float]]] = {"edgefed": [], "transformers": []}
    same = True
    for _ in range(a.repeats):
        e = bench_edgefed(model_dir, prompt, a.new)
        t = bench_transformers(model_dir, prompt, a.new, ref)
        rows["edgefed"].append(e[:2])
        rows["transformers"].append(t[:2])
        same &= e[2] == t[2]
    print(f"# {a.shape}, float32, prompt {a.prompt_len}, {a.new} new tokens, median of {a.repeats}; {machine()}")
    print("| engine | TTFT ms | prefill tok/s | ms/token | decode tok/s |")
    print("|---|---|---|---|---|")
    for name, vals in rows.items():
        ttft, tpot = median([v[0] for v in vals]), median([v[1] for v in vals])
        print(f"| {name} | {ttft:.1f} | {a.prompt_len / ttft * 1e3:.0f} | {tpot:.2f} | {1e3 / tpot:.1f} |")
    ratio = median([v[1] for v in rows["transformers"]]) / median([v[1] for v in rows["edgefed"]])
    print(f"decode speed-up vs transformers: {ratio:.2f}x; greedy tokens identical: {same}")


if __name__ == "__main__":
    main()
