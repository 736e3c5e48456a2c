"""Load test of the fleet: `edgefed coordinator` + 2 `edgefed node` daemons (real `edgefed serve` ranks, mutual
TLS) on loopback, the demo model deployed tensor-parallel across both, and N concurrent streaming `openai`
clients for S seconds. Reports requests completed and failed, p50/p99 time to first token (queueing included)
and per-token latency (between streamed chunks), and the node/coordinator processes' CPU on this machine.

    .venv/bin/python benchmarks/bench_fleet_load.py --clients 8 --seconds 60 [--max-tokens 32] [--json]

Every process it starts is stopped at the end (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from tests.coordinator.fleet import Fleet, wait_until  # noqa: E402

PROMPTS = ["def fibonacci(n):", "import os\n\ndef main():", "class Stack:", "def read_lines(path):",
           "for i in range(10):", "def parse_args(argv):", "with open(", "def merge_sort(xs):"]


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _client(base_url: str, key: str, idx: int, deadline: float, max_tokens: int, out: dict, lock: threading.Lock):
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=key, timeout=120, max_retries=0)
    n = 0
    while time.monotonic() < deadline:
        prompt = PROMPTS[(idx + n) % len(PROMPTS)]
        n += 1
        t0 = time.monotonic()
        first, last, gaps, tokens = None, None, [], 0
        try:
            stream = client.completions.create(model="edgefed-demo", prompt=prompt, max_tokens=max_tokens,
                                               temperature=0, stream=True)
            for chunk in stream:
                if not chunk.choices or not chunk.choices[0].text:
                    continue
                now = time.monotonic()
                tokens += 1
                if first is None:
                    first = now - t0
                else:
                    gaps.append(now - last)
                last = now
            with lock:
                out["completed"] += 1
                out["ttft"].append(first if first is not None else float("nan"))
                out["gaps"].extend(gaps)
                out["tokens"] += tokens
        except Exception as e:  # a failed request is counted and named, never hidden
            with lock:
                out["failed"] += 1
                out["errors"].append(f"{type(e).__name__}: {e}"[:300])


def run(args: argparse.Namespace) -> dict:
    import psutil

    tmp = Path(tempfile.mkdtemp(prefix="edgefed-fleet-load-"))
    fleet = Fleet(tmp, heartbeat=1.0, lost_after=10.0, tls=True)
    try:
        fleet.start_coordinator()
        token, key = fleet.token(), fleet.admin_key()
        for name in ("node-a", "node-b"):
            fleet.start_node(name, token, rank_mode=None)
        wait_until(lambda: all(fleet.node_state(n) == "alive" for n in ("node-a", "node-b")), 120, "the nodes")
        out = subprocess.run([sys.executable, "-m", "edgefed", "deploy", "--coordinator", fleet.http, "--model",
                              str(args.model), "--nodes", "2", "--admin-key", key, "--wait", "180", "--json"],
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise SystemExit(f"deploy failed: {out.stderr}")
        procs = [psutil.Process(p.pid) for p in fleet.procs.procs.values()]
        procs += [c for p in procs for c in p.children(recursive=True)]
        cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
        res = {"completed": 0, "failed": 0, "ttft": [], "gaps": [], "tokens": 0, "errors": []}
        lock = threading.Lock()
        t0 = time.monotonic()
        deadline = t0 + args.seconds
        threads = [threading.Thread(target=_client, args=(f"http://{fleet.http}/v1", key, i, deadline,
                                                          args.max_tokens, res, lock)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        cpu = sum(sum(p.cpu_times()[:2]) for p in procs if p.is_running()) - cpu0
        return {
            "clients": args.clients, "seconds": round(wall, 1), "max_tokens": args.max_tokens,
            "completed": res["completed"], "failed": res["failed"], "tokens": res["tokens"],
            "tokens_per_s": round(res["tokens"] / wall, 2),
            "ttft_p50_ms": round(1000 * _percentile(res["ttft"], 0.5), 1),
            "ttft_p99_ms": round(1000 * _percentile(res["ttft"], 0.99), 1),
            "token_p50_ms": round(1000 * _percentile(res["gaps"], 0.5), 1),
            "token_p99_ms": round(1000 * _percentile(res["gaps"], 0.99), 1),
            "token_mean_ms": round(1000 * statistics.fmean(res["gaps"]), 1) if res["gaps"] else None,
            "fleet_cpu_s": round(cpu, 1), "errors": res["errors"][:5], "machine": machine(),
        }
    finally:
        fleet.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model", default=str(ROOT / "models" / "edgefed-demo"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    r = run(args)
    if args.json:
        print(json.dumps(r))
        return
    print("| clients | seconds | completed | failed | tokens/s | TTFT p50 / p99 (ms) | per-token p50 / p99 (ms) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {r['clients']} | {r['seconds']} | {r['completed']} | {r['failed']} | {r['tokens_per_s']} | "
          f"{r['ttft_p50_ms']} / {r['ttft_p99_ms']} | {r['token_p50_ms']} / {r['token_p99_ms']} |")
    print(r["machine"])
    for e in r["errors"]:
        print("error:", e)


if __name__ == "__main__":
    main()
