"""The workload: completions through the coordinator's OpenAI-compatible API, streamed so that time to first
token and ms/token are measured per request, with a concurrency limit and an optional arrival rate. With early
exit, each request sends the `early_exit` field and its record keeps where its tokens were answered (the usage
of the stream's last chunk): at the edge, at the cloud, or at the edge because the cloud was unreachable."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    index: int
    prompt: str
    max_tokens: int
    phase: str = "workload"  # "workload", or "after faults" (the service answering once every fault is applied)


def plan_requests(prompts: list[str], count: int, max_tokens: int, phase: str = "workload",
                  first: int = 0) -> list[Request]:
    """`count` requests cycling through the prompts (pure)."""
    return [Request(first + i, prompts[i % len(prompts)], max_tokens, phase) for i in range(count)]


def exit_split(usage: dict | None) -> dict | None:
    """Where a request's tokens were answered, from its usage (pure): {"edge", "cloud", "fallback" (at the edge,
    the cloud unreachable or lost), "cloud_status", "cloud_error"}; None without the early_exit extension."""
    ex = (usage or {}).get("exits")
    if not isinstance(ex, dict):
        return None
    per = ex.get("per_exit") or {}
    out = {"edge": 0, "cloud": 0, "fallback": 0}
    for where, n in per.items():
        out["cloud" if where == "cloud" else "fallback" if where.startswith("edge-fallback") else "edge"] += int(n)
    out["cloud_status"] = usage.get("cloud", "none")
    if usage.get("cloud_error"):
        out["cloud_error"] = str(usage["cloud_error"])[:300]
    return out


def one_request(client, model: str, req: Request, t0: float, early_exit: dict | None = None) -> dict:
    """Stream one completion; a failure is recorded as the request's error, never raised."""
    start = time.monotonic()
    rec = {"index": req.index, "phase": req.phase, "start_s": round(start - t0, 3), "tokens": 0, "exits": None,
           "error": None}
    first = None
    extra = {"extra_body": {"early_exit": early_exit}, "stream_options": {"include_usage": True}} if early_exit \
        else {}
    try:
        stream = client.completions.create(model=model, prompt=req.prompt, max_tokens=req.max_tokens, temperature=0,
                                           stream=True, **extra)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                first = first or time.monotonic()
                rec["tokens"] += 1
            if getattr(chunk, "usage", None) is not None:
                rec["exits"] = exit_split(chunk.usage.model_dump())
    except Exception as e:  # noqa: BLE001 - every failure (HTTP, timeout, reset) is the request's record
        rec["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    end = time.monotonic()
    rec.update(end_s=round(end - t0, 3), total_ms=round((end - start) * 1e3, 2))
    if first is not None:
        rec["ttft_ms"] = round((first - start) * 1e3, 2)
        if rec["tokens"] > 1:
            rec["ms_per_token"] = round((end - first) * 1e3 / (rec["tokens"] - 1), 2)
            rec["tokens_per_s"] = round((rec["tokens"] - 1) / (end - first), 2)
    elif rec["error"] is None:
        rec["error"] = "no tokens came back"
    return rec


def run_workload(client, model: str, requests: list[Request], concurrency: int, rate_per_s: float, t0: float,
                 done: list[dict], stop: threading.Event | None = None, early_exit: dict | None = None) -> list[dict]:
    """Send the requests (at most `concurrency` at once; with rate_per_s > 0, request i not before i / rate);
    each record is appended to `done` as it finishes (the progress display reads it)."""
    lock = threading.Lock()
    begin = time.monotonic()

    def go(i: int, req: Request) -> None:
        if rate_per_s > 0:
            time.sleep(max(0.0, begin + i / rate_per_s - time.monotonic()))
        if stop is not None and stop.is_set():
            return
        rec = one_request(client, model, req, t0, early_exit)
        with lock:
            done.append(rec)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="workload") as pool:
        for f in [pool.submit(go, i, r) for i, r in enumerate(requests)]:
            f.result()
    return done
