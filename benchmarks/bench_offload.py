"""A model bigger than the memory cap: edgefed's sliding window (N=1, N=2; float32, int8 shards) against
transformers + accelerate disk offload (TPI-LLM's baseline), on a Llama-3.2-1B-shaped random checkpoint.

    .venv/bin/python benchmarks/bench_offload.py [--cap-mb 1024] [--new 8] [--prompt-len 16]

Each edgefed rank runs in its own cgroup-v1 memory cgroup limited to --cap-mb (when /sys/fs/cgroup/memory
is writable) and derives its window from --memory-mb. "warm" = shard files in the host page cache (as
accelerate's offload files are in its runs); "cold" = every block read from the device (the engine evicts
each file's pages after reading it, posix_fadvise DONTNEED); accelerate runs warm, and cold inside the
cap cgroup with its files evicted first. Needs root for the cgroups; writes only
under --cache (default /tmp/edgefed-bench).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, random_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CGROUP = Path("/sys/fs/cgroup/memory")


def evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def read_all(files: list[Path]) -> float:
    """GB/s reading `files` once, 16 MiB at a time into one reused buffer (as the engine's reader does)."""
    buf = memoryview(bytearray(1 << 24))
    total, t0 = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total / (time.perf_counter() - t0) / 1e9


def read_rates(files: list[Path]) -> dict[str, float]:
    """Device rate (pages evicted first) and page-cache rate (read again at once) over the same files."""
    evict(files)
    cold = read_all(files)
    return {"cold": cold, "warm": read_all(files)}


def shard_files(shards: Path) -> list[Path]:
    return sorted(shards.glob("rank*/*.safetensors"))


def cgroup_prefix(name: str, cap_mb: int) -> tuple[list[str], Path | None]:
    """A command prefix that runs the command inside a fresh memory cgroup capped at cap_mb."""
    group = CGROUP / f"edgefed-bench-{name}"
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(cap_mb << 20))
        (group / "memory.max_usage_in_bytes").write_text("0")
    except OSError:
        return [], None
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"], group


def cgroup_report(group: Path | None) -> dict:
    if group is None:
        return {"cgroup": False}
    read = lambda n: int((group / n).read_text())  # noqa: E731
    out = {"cgroup": True, "cgroup_max_usage_mb": round(read("memory.max_usage_in_bytes") / 2**20, 1),
           "cgroup_failcnt": read("memory.failcnt")}
    oom = (group / "memory.oom_control").read_text()
    out["oom_kills"] = int(oom.split("oom_kill ")[1].split()[0]) if "oom_kill " in oom else 0
    try:
        group.rmdir()
    except OSError:
        pass
    return out


def ensure_shards(model_dir: Path, cache: Path, nodes: int, weights: str) -> Path:
    from edge_node.shard import write_shards

    out = cache / f"tp-{nodes}-{weights}"
    if not (out / "manifest.json").is_file():
        write_shards(model_dir, out, nodes, None, weights, force=True)  # a partial earlier run
    return out


def run_edgefed(shards: Path, nodes: int, a, cold: bool, prompt: list[int]) -> dict:
    if cold:
        evict(shard_files(shards))
    else:  # cache the files from this (uncapped) process: the ranks' reads then hit the host page cache
        read_all(shard_files(shards))
    port = 29600 + (os.getpid() % 300)
    procs, groups = [], []
    threads = max(1, a.threads // nodes)
    for r in range(nodes):
        prefix, group = cgroup_prefix(f"r{r}", a.cap_mb)
        cmd = [*prefix, sys.executable, "-m", "edgefed", "tp-generate", "--shards", str(shards),
               "--rank", str(r), "--master-addr", f"127.0.0.1:{port}", "--memory-mb", str(a.cap_mb * 0.9),
               "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(a.new), "--greedy", "--json",
               "--threads", str(threads), "--timeout", "600", *(["--drop-page-cache"] if cold else [])]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
        groups.append(group)
    outs = [p.communicate() for p in procs]
    cg = [cgroup_report(g) for g in groups]
    if procs[0].returncode:
        return {"error": outs[0][1].strip().splitlines()[-1:], "cgroups": cg}
    res = json.loads(outs[0][0])
    res["cgroups"] = cg
    return res


def run_accelerate(model_dir: Path, a, prompt: list[int], capped: bool, cold: bool = False) -> dict:
    """cold: the checkpoint and offload files are evicted first, so inside the cap cgroup (which is then
    charged for the page cache they fill) every token reads what does not fit from the device, as on a
    device with only that much memory. Warm runs read pages an earlier run left in the host page cache."""
    if cold:
        offload = Path(a.cache) / "accelerate-offload"
        evict([f for f in [*model_dir.iterdir(), *offload.rglob("*")] if f.is_file()])
    prefix, group = cgroup_prefix("accelerate", a.cap_mb) if capped else ([], None)
    cmd = [*prefix, sys.executable, __file__, "--child-accelerate", str(model_dir), "--cap-mb", str(a.cap_mb),
           "--new", str(a.new), "--threads", str(a.threads), "--cache", a.cache,
           "--prompt-ids", ",".join(map(str, prompt))]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    cg = cgroup_report(group)
    if r.returncode:
        return {"error": f"exit {r.returncode} {cg}: {r.stderr.strip().splitlines()[-1:]}"}
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "cgroups": [cg]}


def child_accelerate(a) -> None:
    """transformers + accelerate: max_memory = the cap, the rest offloaded to disk (TPI-LLM's baseline)."""
    import psutil
    import torch
    import transformers

    from edge_node.memory import own_peak_rss_mb

    torch.set_num_threads(a.threads)
    offload = Path(a.cache) / "accelerate-offload"
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        a.child_accelerate, dtype=torch.float32, device_map="auto", max_memory={"cpu": a.cap_mb << 20},
        offload_folder=str(offload)).eval()
    load_s = time.perf_counter() - t0
    stamps: list[float] = []

    class Stamp(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor([[int(x) for x in a.prompt_ids.split(",")]])
    io0 = psutil.Process().io_counters().read_bytes
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                       logits_processor=transformers.LogitsProcessorList([Stamp()]))
    io = psutil.Process().io_counters().read_bytes - io0
    steps = [(b - c) * 1e3 for c, b in zip(stamps, stamps[1:], strict=False)]
    print(json.dumps({"ttft_ms": (stamps[0] - t0) * 1e3, "tpot_ms": sum(steps) / len(steps), "load_s": load_s,
                      "peak_rss_mb": own_peak_rss_mb(), "disk_read_bytes_total": io, "tokens": a.new}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap-mb", type=int, default=1024)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/edgefed-bench")
    ap.add_argument("--configs", default="1-int8,1-float32,2-int8,2-float32")
    ap.add_argument("--modes", default="warm,cold")
    ap.add_argument("--skip-accelerate", action="store_true")
    ap.add_argument("--child-accelerate")
    ap.add_argument("--prompt-ids")
    a = ap.parse_args()
    if a.child_accelerate:
        return child_accelerate(a)
    cache = Path(a.cache)
    model_dir = random_checkpoint("llama-3.2-1b", cache / "llama-3.2-1b")
    prompt = list(range(100, 100 + a.prompt_len))
    configs = [(int(c.split("-")[0]), c.split("-")[1]) for c in a.configs.split(",")]
    shards = {c: ensure_shards(model_dir, cache, *c) for c in configs}
    rates = read_rates(shard_files(shards[configs[0]]))
    print(f"# read rate over {configs[0]} shards: device (cold) {rates['cold']:.2f} GB/s, "
          f"page cache (warm) {rates['warm']:.2f} GB/s", flush=True)
    rows = []
    for capped, cold in ([] if a.skip_accelerate else [(False, False), (True, False), (True, True)]):
        r = run_accelerate(model_dir, a, prompt, capped, cold)
        print(f"accelerate capped={capped} cold={cold}", json.dumps(r), flush=True)
        rows.append((f"transformers + accelerate disk offload, float32{', in the cap cgroup' if capped else ''}",
                     "cold" if cold else "warm", 1, r, None))
    for nodes, weights in configs:
        for mode in a.modes.split(","):
            r = run_edgefed(shards[(nodes, weights)], nodes, a, mode == "cold", prompt)
            print(f"edgefed N={nodes} {weights} {mode}", json.dumps({k: v for k, v in r.items() if k != "per_token"}),
                  flush=True)
            rows.append((f"edgefed N={nodes}, {weights} shards", mode, nodes, r, r.get("bytes_read_per_token")))
    print(f"\n# read rate: device {rates['cold']:.2f} GB/s, page cache {rates['warm']:.2f} GB/s")
    source_gb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e9
    print(f"# Llama-3.2-1B shape (random, float32 source {source_gb:.2f} GB), "
          f"cap {a.cap_mb} MiB per process, prompt {a.prompt_len}, {a.new} new tokens; {machine()}")
    print("| engine | shard files | TTFT ms | ms/token | peak RSS MiB per process "
          "| cgroup max usage MiB (RSS + page cache) | window | bytes read/token | device bytes/token (measured) "
          "| lower bound ms/token (device / page cache) | compute / comm / io-wait ms per token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, mode, _nodes, r, per_tok in rows:
        if "error" in r:
            print(f"| {name} | {mode} | error: {r['error']} |")
            continue
        rss = r.get("per_rank_peak_rss_mb", [round(r["peak_rss_mb"], 1)])
        cg = [c.get("cgroup_max_usage_mb") for c in r.get("cgroups", []) if c.get("cgroup")]
        disk = r.get("disk_read_bytes_total", 0) / max(1, len(r.get("token_ids", [])) or r.get("tokens", 1))
        lb = f"{per_tok / rates['cold'] / 1e6:.0f} / {per_tok / rates['warm'] / 1e6:.0f}" if per_tok else "-"
        pm = r.get("per_token_mean", {})
        brk = " / ".join(f"{pm.get(k, 0):.0f}" for k in ("compute_ms", "comm_ms", "io_wait_ms")) if pm else "-"
        print(f"| {name} | {mode} | {r['ttft_ms']:.0f} | {r['tpot_ms']:.0f} | {rss} | {cg or '-'} "
              f"| {r.get('per_rank_window', '-')} "
              f"| {f'{per_tok / 1e9:.2f} GB' if per_tok else '-'} | {disk / 1e9:.2f} GB | {lb} | {brk} |")


if __name__ == "__main__":
    main()
