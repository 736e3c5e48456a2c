"""A testbed run's report: report.json, PNG plots, index.html showing them together, a console summary table.

The report is a plain dict (JSON-ready) with these parts, each optional except `run`:
  run       scenario name, mode (isolated / loopback) and why, latency mode (netem / injected), wall time, notes,
            deployments (each one the coordinator made, re-plans included: state, detail, its ranks' nodes)
  requests  per request: start_s, ttft_ms, ms_per_token, tokens_per_s, tokens, error, and with early exit `exits`:
            tokens answered at the edge, at the cloud, and at the edge because the cloud was unreachable
            ("fallback"), the cloud's status (used / lost / unreachable / none) and its error
  nodes     per node: caps, peak_memory_mb, memory_mb ([t_s, MB] samples), tx_bytes / rx_bytes, ended (how)
  per_token per decoded token: compute_ms, comm_ms, io_wait_ms
  rounds    per federated round: round, perplexity, bytes, wall_s
  faults    per fault: at_s, kind, node (for a fault given by rank: the node that held it), rank, applied_s, result
  cloud     the cloud tier: host, address, split k, link (and how it is emulated), peak memory, its /metrics figures
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

PLOTS = ("latency_cdf", "memory", "per_token", "throughput", "perplexity", "exit_split")
SPLIT = (("edge", "at the edge"), ("cloud", "at the cloud"), ("fallback", "at the edge, cloud unreachable"))


def summary(report: dict) -> dict:
    """Headline figures of a run (pure)."""
    reqs = report.get("requests", [])
    ok = [r for r in reqs if not r.get("error")]
    split = [r["exits"] for r in ok if r.get("exits")]

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        s = sorted(values)
        return round(s[min(len(s) - 1, math.ceil(q * len(s)) - 1)], 2)

    ttft = [r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None]
    mspt = [r["ms_per_token"] for r in ok if r.get("ms_per_token") is not None]
    tokens = sum(r.get("tokens", 0) for r in ok)
    # over the span the requests ran (set-up and deploy excluded); the run's wall time without request times
    spans = [(r["start_s"], r["end_s"]) for r in reqs if r.get("start_s") is not None and r.get("end_s") is not None]
    wall = (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else report.get("run", {}).get("wall_s") or 0
    fired = [f["applied_s"] for f in report.get("faults", []) if f.get("applied_s") is not None]
    after = [r for r in reqs if fired and (r.get("start_s") or 0) >= min(fired)]  # started once a fault had fired
    return {
        "requests": len(reqs), "ok": len(ok), "errors": len(reqs) - len(ok),
        "after_fault": len(after), "after_fault_ok": sum(1 for r in after if not r.get("error")),
        "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p95": pct(ttft, 0.95),
        "ms_per_token_p50": pct(mspt, 0.5), "ms_per_token_p95": pct(mspt, 0.95),
        "tokens": tokens, "tokens_per_s": round(tokens / wall, 2) if wall else None,
        "tokens_edge": sum(x.get("edge", 0) for x in split), "tokens_cloud": sum(x.get("cloud", 0) for x in split),
        "tokens_cloud_unreachable": sum(x.get("fallback", 0) for x in split),
        "requests_cloud_unreachable": sum(1 for x in split if x.get("cloud_status") in ("lost", "unreachable")),
        "oom_kills": sorted(n for n, v in report.get("nodes", {}).items() if "OOM" in (v.get("ended") or "")),
    }


def console_table(report: dict) -> str:
    """The summary and one line per node, as aligned text."""
    run, s = report.get("run", {}), summary(report)
    lines = [f"testbed {run.get('scenario', '?')}: {run.get('mode', '?')} nodes"
             + (f" ({run['why_loopback']})" if run.get("why_loopback") else "")
             + f", latency {run.get('latency_mode', '?')}, {run.get('wall_s', 0):.1f} s",
             f"requests {s['ok']}/{s['requests']} ok, {s['errors']} errors; TTFT p50 {_f(s['ttft_ms_p50'])} ms "
             f"p95 {_f(s['ttft_ms_p95'])} ms; {_f(s['ms_per_token_p50'])} ms/token p50; "
             f"{_f(s['tokens_per_s'])} tokens/s"]
    if report.get("run", {}).get("early_exit"):
        lines.append(exit_line(report["run"]["early_exit"], s))
    rows = [("node", "cap MB", "peak MB", "sent KB", "recv KB", "ended")]
    for name, n in report.get("nodes", {}).items():
        caps = n.get("caps", {})
        rows.append((name, _f(caps.get("memory_mb")), _f(n.get("peak_memory_mb")), _kb(n.get("tx_bytes")),
                     _kb(n.get("rx_bytes")), n.get("ended") or "running to the end"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for f in report.get("faults", []):
        rank = f" (rank {f['rank']})" if f.get("rank") is not None else ""
        lines.append(f"fault at {f['at_s']:g} s: {f['kind']} {f.get('node') or ''}{rank} -> {f.get('result', '')}")
    if report.get("faults"):
        lines.append(f"after the first fault: {s['after_fault_ok']}/{s['after_fault']} requests ok")
    if report.get("cloud"):
        lines.append(cloud_line(report["cloud"]))
    for d in run.get("deployments", []):
        lines.append(f"deployment {d['deployment_id']} on {', '.join(d['nodes']) or '-'}: {d['state']}"
                     + (f" ({d['detail']})" if d.get("detail") else ""))
    for note in run.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def exit_line(ee: dict, s: dict) -> str:
    """The early-exit summary line: where the tokens were answered."""
    if not ee.get("applied"):
        return f"early exit ({ee.get('mode')}, threshold {_f(ee.get('threshold'))}): not applied"
    total = s["tokens_edge"] + s["tokens_cloud"] + s["tokens_cloud_unreachable"]
    share = (lambda n: f" ({n / total:.0%})") if total else (lambda n: "")
    return (f"early exit ({ee['mode']}, threshold {_f(ee['threshold'])}): tokens at the edge {s['tokens_edge']}"
            f"{share(s['tokens_edge'])}, at the cloud {s['tokens_cloud']}{share(s['tokens_cloud'])}, at the edge "
            f"with the cloud unreachable {s['tokens_cloud_unreachable']}{share(s['tokens_cloud_unreachable'])} "
            f"({s['requests_cloud_unreachable']} request(s))")


def cloud_line(c: dict) -> str:
    m = c.get("metrics") or {}
    used = f"{m['memory_used_bytes'] / 2**20:.1f} of {m['memory_bound_bytes'] / 2**20:.0f} MB bound, " \
        if "memory_used_bytes" in m and "memory_bound_bytes" in m else ""
    figures = f"{used}{_f(m.get('requests'))} requests" if m else c.get("metrics_error", "no /metrics")
    return (f"cloud tier at {c.get('address')} (layers [{c.get('split')}, L)), peak {_f(c.get('peak_memory_mb'))} "
            f"MB, {figures}; {c.get('ended') or 'running to the end'}")


def _f(v) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, (int, float)) else str(v)


def _kb(v) -> str:
    return "-" if v is None else f"{v / 1024:.0f}"


def write_report(report: dict, out: str | Path) -> dict[str, Path]:
    """report.json, one PNG per plot and index.html under `out`; their paths by name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {**report, "summary": summary(report)}
    paths = {"json": out / "report.json"}
    paths["json"].write_text(json.dumps(report, indent=2, sort_keys=True))
    paths.update(plots(report, out))
    paths["html"] = out / "index.html"
    paths["html"].write_text(page(report, [paths[p].name for p in PLOTS]))
    return paths


def plots(report: dict, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    for name in PLOTS:
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        drawn = globals()[f"_plot_{name}"](ax, report)
        if not drawn:
            ax.text(0.5, 0.5, "not part of this run" if drawn is None else "no data", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
        fig.tight_layout()
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name])
        plt.close(fig)
    return paths


def _plot_latency_cdf(ax, report: dict) -> bool:
    ok = [r for r in report.get("requests", []) if not r.get("error")]
    ax.set_title("request latency CDF")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests")
    drawn = False
    for key, label in (("ttft_ms", "time to first token"), ("total_ms", "whole request")):
        values = sorted(r[key] for r in ok if r.get(key) is not None)
        if values:
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=label)
            drawn = True
    if drawn:
        ax.legend()
    return drawn


def _plot_memory(ax, report: dict) -> bool:
    ax.set_title("memory per node (dashed: cap; dotted red: faults)")
    ax.set_xlabel("s from the workload's start")
    ax.set_ylabel("MB")
    drawn = False
    for name, n in report.get("nodes", {}).items():
        pts = n.get("memory_mb") or []
        if pts:
            line, = ax.plot([t for t, _ in pts], [m for _, m in pts], label=name)
            cap = n.get("caps", {}).get("memory_mb")
            if cap:
                ax.axhline(cap, color=line.get_color(), linestyle="--", linewidth=0.8)
            drawn = True
    if drawn:
        _fault_lines(ax, report)
        ax.legend(fontsize="small")
    return drawn


def _fault_lines(ax, report: dict) -> None:
    for f in report.get("faults", []):
        if f.get("applied_s") is not None:
            ax.axvline(f["applied_s"], color="red", linestyle=":", linewidth=1)


def _plot_per_token(ax, report: dict) -> bool:
    rows = report.get("per_token", [])
    ax.set_title("per-token time: compute / comm / io wait")
    ax.set_xlabel("token")
    ax.set_ylabel("ms")
    if not rows:
        return False
    x = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    for key in ("compute_ms", "comm_ms", "io_wait_ms"):
        ys = [r.get(key, 0.0) for r in rows]
        ax.bar(x, ys, bottom=bottom, label=key.removesuffix("_ms").replace("_", " "), width=1.0)
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.legend(fontsize="small")
    return True


def _plot_throughput(ax, report: dict) -> bool:
    ok = [r for r in report.get("requests", []) if not r.get("error") and r.get("end_s") is not None]
    ax.set_title("throughput over time")
    ax.set_xlabel("s from the workload's start")
    ax.set_ylabel("tokens/s (completed, 5 s bins)")
    if not ok:
        return False
    end = max(r["end_s"] for r in ok)
    bins = [0.0] * (int(end // 5) + 1)
    for r in ok:
        bins[int(r["end_s"] // 5)] += r.get("tokens", 0) / 5
    ax.plot([5 * i + 2.5 for i in range(len(bins))], bins, marker="o")
    _fault_lines(ax, report)
    return True


def _plot_exit_split(ax, report: dict) -> bool | None:
    reqs = [r for r in report.get("requests", []) if r.get("exits")]
    ax.set_title("where each request's tokens were answered")
    ax.set_xlabel("request")
    ax.set_ylabel("tokens")
    if not report.get("run", {}).get("early_exit", {}).get("applied"):
        return None
    if not reqs:
        return False
    x = [r["index"] for r in reqs]
    bottom = [0] * len(reqs)
    for key, label in SPLIT:
        ys = [r["exits"].get(key, 0) for r in reqs]
        ax.bar(x, ys, bottom=bottom, label=label)
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set_ylim(0, max(max(bottom), 1) * 1.4)  # room for the legend above the bars
    ax.legend(fontsize="small", ncols=3, loc="upper center")
    return True


def _plot_perplexity(ax, report: dict) -> bool | None:
    rounds = [r for r in report.get("rounds", []) if r.get("perplexity") is not None]
    ax.set_title("perplexity over federated rounds")
    ax.set_xlabel("round")
    ax.set_ylabel("perplexity")
    if not report.get("rounds"):
        return None
    if rounds:
        ax.plot([r["round"] for r in rounds], [r["perplexity"] for r in rounds], marker="o")
    return bool(rounds)


def page(report: dict, images: list[str]) -> str:
    """index.html: the run, the summary, every plot, the nodes; a line says how many plots the browser shows."""
    run, s = report.get("run", {}), report.get("summary") or summary(report)
    esc = html.escape
    run_rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in run.items())
    sum_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_f(v))}</td></tr>" for k, v in s.items())
    nodes = "".join(
        f"<tr><td>{esc(name)}</td><td>{esc(_f(n.get('caps', {}).get('memory_mb')))}</td>"
        f"<td>{esc(_f(n.get('peak_memory_mb')))}</td><td>{_kb(n.get('tx_bytes'))}</td><td>{_kb(n.get('rx_bytes'))}</td>"
        f"<td>{esc(n.get('ended') or 'running to the end')}</td></tr>" for name, n in report.get("nodes", {}).items())
    split = "".join(
        f"<tr><td>{r['index']}</td><td>{esc(r.get('phase', ''))}</td>"
        + "".join(f"<td>{r['exits'].get(k, 0)}</td>" for k, _ in SPLIT)
        + f"<td>{esc(r['exits'].get('cloud_status', ''))}</td><td>{esc(r['exits'].get('cloud_error', ''))}</td></tr>"
        for r in report.get("requests", []) if r.get("exits"))
    ee = run.get("early_exit")
    exits = "" if not ee else (
        f"<h2>early exit</h2><p>{esc(exit_line(ee, s))}</p>"
        + (f"<p>{esc(cloud_line(report['cloud']))}</p>" if report.get("cloud") else "")
        + "<table><tr><th>request</th><th>phase</th>" + "".join(f"<th>{esc(lbl)}</th>" for _, lbl in SPLIT)
        + f"<th>cloud</th><th>cloud error</th></tr>{split}</table>")
    figs = "".join(f'<figure><img src="{esc(i)}" alt="{esc(i)}"><figcaption>{esc(i)}</figcaption></figure>'
                   for i in images)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgefed testbed: {esc(str(run.get('scenario', '')))}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;margin:0.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}} figure{{display:inline-block;margin:0.5em}}
img{{width:480px}}</style></head>
<body><h1>edgefed testbed: {esc(str(run.get('scenario', '')))}</h1>
<p id="shown">plots not yet loaded</p>
<h2>run</h2><table>{run_rows}</table>
<h2>summary</h2><table>{sum_rows}</table>
{exits}
<h2>plots</h2>{figs}
<h2>nodes</h2><table><tr><th>node</th><th>cap MB</th><th>peak MB</th><th>sent KB</th><th>recv KB</th><th>ended</th></tr>
{nodes}</table>
<script>window.addEventListener("load", function () {{
  var imgs = Array.from(document.images), ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }});
  document.getElementById("shown").textContent = ok.length + " of " + imgs.length + " plots shown";
}});</script>
</body></html>
"""
