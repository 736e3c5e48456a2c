"""Early exit with a cloud tier (CE-CoLLM) on the demo model and SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/bench_early_exit.py [--models demo,smollm2] [--out DIR] [--png PATH]
    .venv/bin/python benchmarks/bench_early_exit.py --plot-from RESULT.json... [--png PATH]

Each model's results are saved as DIR/early_exit_<model>.json (and all of them as DIR/early_exit_results.json);
--plot-from redraws the table and the trade-off PNG from such files without running anything (the SmolLM2 part
takes ~12 min on the shared machine). --quality-only (with --train-tokens, --steps, --ridge, --weight-decay to
try other heads) trains and scores the heads only: top-1, the sweep, and thresholds calibrated per exit.

Per model: exit heads trained by `edge_node.exit_train` on the stdlib corpus' train split (hidden states cached
once), evaluated on held-out stdlib files (the demo model never saw them; SmolLM2 was not trained on this split).

- top-1 agreement of each exit head with the last layer, untrained (final norm + lm_head: the logit lens) and
  trained, on held-out text.
- a threshold sweep (0.3 .. 0.95, and off) per split k, on held-out text with every position given the true
  prefix (teacher forcing; exact for the system, since deferred catch-up keeps every hidden state exact):
  fraction of tokens leaving at each exit, greedy agreement with the full model, perplexity change, cloud
  layer-evaluations and cloud compute (weight MACs) per token against cloud-only serving and against the naive
  split at the same k, uplink bytes per token (float16 codec).
- end-to-end latency per token of greedy collaborative generation (in-process cloud tier, measured compute)
  under an INJECTED link of 20 ms round trip and 50 Mbit/s, against cloud-only (the whole model on the cloud,
  one round trip per token) and the naive split (exits off); measured interleaved in one process.
- the int8 codec's quality cost against float16 at each k.
The machine is shared (2 cores, other jobs running): compute times are medians of interleaved runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.cloud import CloudContextManager, InProcessTransport  # noqa: E402
from edge_node.cloud_link import SessionSpec, generate_collaborative  # noqa: E402
from edge_node.early_exit import OFF, ExitHeads, ExitPolicy  # noqa: E402
from edge_node.exit_train import ExitTrainConfig, HiddenCache, agreement, collect_hidden, token_chunks, train_exit_heads  # noqa: E402,E501
from edge_node.model import Tokenizer, load_model  # noqa: E402
from edge_node.model.decode import generate  # noqa: E402
from emulation.corpus import corpus_files  # noqa: E402
from quant.codec import decode, encode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "demo": dict(dir=ROOT / "models" / "edgefed-demo", exits=(2, 3, 4), splits=(3, 4), train=4096, heldout=2048,
                 gen=48, steps=150),
    "smollm2": dict(dir=Path(os.environ.get("EDGEFED_CACHE", Path.home() / ".cache" / "edgefed")) / "models"
                    / "SmolLM2-135M-Instruct", exits=(15, 20), splits=(15, 20), train=4096, heldout=2048, gen=16,
                    steps=30),
}
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
LATENCY_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
RTT_S, BW_BPS = 0.020, 50e6  # the injected link
PROMPTS = ["def read_config(path):\n", "class Stack:\n    def __init__(self):\n", "import os\n\n\ndef walk(root):\n"]


def texts(split: str, stride: int):
    for p in corpus_files(split)[::stride]:
        yield p.read_text(encoding="utf-8")


def cached_hidden(name: str, model, tok, split: str, tokens: int, layers, cache_dir: Path,
                  train_stride: int = 20) -> tuple[HiddenCache, list]:
    """Hidden states (and the token ids they came from), computed once and kept in cache_dir. The train split is
    sampled one 256-token chunk from every `train_stride`-th file (20: ~7.7k tokens at most)."""
    stride = train_stride if split == "train" else 1
    tag = f"-s{stride}" if split == "train" and stride != 20 else ""
    path = cache_dir / f"{name}-{split}-{tokens}{tag}-{'_'.join(map(str, layers))}.pt"
    if path.is_file():
        blob = torch.load(path)
        return HiddenCache(blob["at"], blob["final"]), blob["chunks"]
    chunks = token_chunks(texts(split, stride), lambda t: tok.encode(t, add_special_tokens=False), 256, tokens)
    cache = collect_hidden(model, chunks, layers)
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"at": cache.at, "final": cache.final, "chunks": chunks}, path)
    return cache, chunks


@torch.no_grad()
def sweep(model, heads: ExitHeads, ev: HiddenCache, chunks, k: int) -> list[dict]:
    """Teacher-forced threshold sweep for split k on held-out rows (predicting each next token in its chunk)."""
    cfg = model.config
    w = model.lm_head.float()
    targets = torch.cat([torch.tensor(c[1:] + [-1]) for c in chunks])  # the next token (-1: none, chunk end)
    scored = targets >= 0
    full_lp = torch.log_softmax(F.linear(model.norm(ev.final).float(), w), -1)
    full_tok = full_lp.argmax(-1)
    exits = [e for e in heads.layers if e <= k]
    lp = {e: torch.log_softmax(F.linear(heads.heads[str(e)].features(ev.at[e]), w), -1) for e in exits}
    conf = {e: lp[e].exp().max(-1).values for e in exits}
    hidden, n = cfg.hidden_size, ev.rows
    layer_macs = _layer_macs(cfg)
    head_macs = cfg.vocab_size * hidden
    full_nll = -full_lp[scored.nonzero()[:, 0], targets[scored]].mean()
    rows = []
    for t in (*THRESHOLDS, None):
        where = torch.full((n,), -1)  # -1: the cloud answers
        if t is not None:
            for e in reversed(exits):  # the first confident exit wins: assign deepest first, then overwrite
                where = torch.where(conf[e] > t, torch.full_like(where, e), where)
        chosen_lp = full_lp.clone()
        for e in exits:
            chosen_lp[where == e] = lp[e][where == e]
        tok = chosen_lp.argmax(-1)
        nll = -chosen_lp[scored.nonzero()[:, 0], targets[scored]].mean()
        cloud_frac = float((where == -1).float().mean())
        cloud_macs = (cfg.num_layers - k) * layer_macs + cloud_frac * head_macs
        naive_macs = (cfg.num_layers - k) * layer_macs + head_macs
        only_macs = cfg.num_layers * layer_macs + head_macs
        rows.append({
            "k": k, "threshold": "off" if t is None else t,
            "exit_frac": {str(e): float((where == e).float().mean()) for e in exits},
            "edge_frac": 1 - cloud_frac,
            "greedy_agreement": float((tok == full_tok).float().mean()),
            "ppl": math.exp(float(nll)), "ppl_full": math.exp(float(full_nll)),
            "cloud_layer_evals_per_token": cfg.num_layers - k,
            "cloud_layer_evals_saved_vs_cloud_only": k / cfg.num_layers,
            "cloud_macs_saved_vs_cloud_only": 1 - cloud_macs / only_macs,
            "cloud_macs_saved_vs_naive_split": 1 - cloud_macs / naive_macs,
            "cloud_requests_per_token": cloud_frac,
            "uplink_bytes_per_token": hidden * 2 + 4,
        })
    return rows


GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))  # 0.3 .. 0.95: per-exit threshold candidates


@torch.no_grad()
def calibrated(model, heads: ExitHeads, ev: HiddenCache, chunks, k: int, target: float = 0.95) -> dict:
    """A threshold per exit, chosen on the first half of the held-out chunks (most tokens on the edge with greedy
    agreement >= target there), and the uniform threshold chosen the same way; both scored on the other half."""
    w = model.lm_head.float()
    full_tok = F.linear(model.norm(ev.final).float(), w).argmax(-1)
    exits = [e for e in heads.layers if e <= k]
    tok, conf = {}, {}
    for e in exits:
        p = torch.softmax(F.linear(heads.heads[str(e)].features(ev.at[e]), w), -1)
        conf[e], tok[e] = p.max(-1)
    half = sum(len(c) for c in chunks[:len(chunks) // 2])
    parts = {"calibration": slice(0, half), "evaluation": slice(half, ev.rows)}

    def score(ts: tuple[float, ...], part: slice) -> tuple[float, float]:
        answer, edge = full_tok[part].clone(), torch.zeros(full_tok[part].shape[0], dtype=torch.bool)
        for e, t in zip(exits, ts, strict=True):  # the first confident exit wins
            leave = (conf[e][part] > t) & ~edge
            answer[leave], edge = tok[e][part][leave], edge | leave
        return float(edge.float().mean()), float((answer == full_tok[part]).float().mean())

    import itertools

    out = {"k": k, "target": target, "calibration_rows": half, "evaluation_rows": ev.rows - half}
    for name, cands in (("uniform", [(t,) * len(exits) for t in GRID]),
                        ("per_exit", list(itertools.product(GRID, repeat=len(exits))))):
        ok = [(score(ts, parts["calibration"]), ts) for ts in cands]
        ok = [(edge, ts) for (edge, agree), ts in ok if agree >= target]
        ts = max(ok)[1] if ok else (1.0,) * len(exits)
        edge, agree = score(ts, parts["evaluation"])
        out[name] = {"thresholds": dict(zip(map(str, exits), ts, strict=True)), "edge_frac": edge,
                     "greedy_agreement": agree, "calibration": dict(zip(("edge_frac", "greedy_agreement"),
                                                                       score(ts, parts["calibration"]), strict=True))}
    return out


def _layer_macs(cfg) -> int:
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    return attn + 3 * h * cfg.intermediate_size


@torch.no_grad()
def codec_cost(model, ev_chunks, k: int) -> dict:
    """Top-1 agreement and perplexity when the layer-k states cross the link as int8 / float16 (teacher forcing)."""
    out = {}
    for codec in ("float16", "int8"):
        agree = total = 0
        nll = 0.0
        for chunk in ev_chunks[:4]:
            ids = torch.tensor([chunk])
            cache = model.new_cache()
            h = model.forward_range(model.embed_tokens(ids), cache, 0, 0, k)
            ref = model.logits(model.forward_range(h, cache, 0, k, model.config.num_layers))[0]
            hq = decode(encode(h[0], codec))[None]
            got = model.logits(model.forward_range(hq, model.new_cache(), 0, k, model.config.num_layers))[0]
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += len(chunk)
            nll += float(F.cross_entropy(got[:-1].float(), ids[0, 1:], reduction="sum"))
        out[codec] = {"top1_vs_float32": agree / total, "ppl": math.exp(nll / (total - len(ev_chunks[:4])))}
    return out


def latency(name: str, spec: dict, model_dir: Path, heads: ExitHeads, tok, k: int, runs: int = 1) -> list[dict]:
    """Per-token latency with the injected link: measured edge/cloud compute + RTT and transfer time."""
    full = load_model(model_dir, pack=True)
    edge = load_model(model_dir, end=k, head=True, pack=True)
    manager = CloudContextManager(load_model(model_dir, start=k, pack=True), "d")
    exits = [e for e in heads.layers if e <= k]
    prompts = [tok.encode(p) for p in PROMPTS]
    samples: dict[str, list[float]] = {}
    edge_frac: dict[str, list[float]] = {}
    n = spec["gen"]
    for r in range(runs):
        for pi, prompt in enumerate(prompts):
            t0 = time.perf_counter()
            res = generate(full, prompt, n)
            full_ms = (time.perf_counter() - t0) * 1e3 / max(1, len(res.token_ids))
            samples.setdefault("cloud-only", []).append(full_ms + RTT_S * 1e3 + 8 * 8 / BW_BPS * 1e3)
            for t in (None, *LATENCY_THRESHOLDS):
                policy = OFF if t is None else ExitPolicy.uniform(exits, t)
                sid = f"{name}-{k}-{t}-{r}-{pi}"
                res = generate_collaborative(edge, heads, policy, k, InProcessTransport(manager),
                                             SessionSpec(sid, "d", k), prompt, n)
                ms = sum(x.edge_ms + x.cloud_ms + (RTT_S * 1e3 + x.up_bytes * 8 / BW_BPS * 1e3
                                                   if x.where == "cloud" else 0) for x in res.records)
                key = "naive split" if t is None else f"exit {t}"
                samples.setdefault(key, []).append(ms / len(res.records))
                edge_frac.setdefault(key, []).append(sum(x.where != "cloud" for x in res.records) / len(res.records))
    return [{"k": k, "config": key, "ms_per_token": statistics.median(v),
             "edge_frac": statistics.mean(edge_frac[key]) if key in edge_frac else 0.0}
            for key, v in samples.items()]


@torch.inference_mode()
def components(model_dir: Path, heads: ExitHeads, k: int, tok, reps: int = 15) -> dict:
    """Median ms of one decode step of each part, interleaved: the full model, the edge [0, k), the cloud's
    layers [k, L), the cloud's norm + head, one exit head."""
    full = load_model(model_dir, pack=True)
    edge = load_model(model_dir, end=k, head=True, pack=True)
    cloud = load_model(model_dir, start=k, pack=True)
    ids = torch.tensor([tok.encode(PROMPTS[0] * 4)[:64]])
    caches = {"full": full.new_cache(), "edge": edge.new_cache(), "cloud": cloud.new_cache()}
    full(ids, caches["full"])
    hk = edge.forward_range(edge.embed_tokens(ids), caches["edge"], 0, 0, k)
    cloud.forward_range(hk, caches["cloud"], 0, k, full.config.num_layers)
    x, num_layers = ids[:, -1:], full.config.num_layers
    times: dict[str, list[float]] = {}
    for i in range(reps):
        pos = ids.shape[1] + i
        steps = {
            "full": lambda p=pos: full(x, caches["full"], p, last_only=True),
            "edge": lambda p=pos: edge.forward_range(edge.embed_tokens(x), caches["edge"], p, 0, k),
            "cloud_layers": lambda p=pos: cloud.forward_range(hk[:, -1:], caches["cloud"], p, k, num_layers),
            "cloud_head": lambda: cloud.logits(hk[:, -1:]),
            "exit_head": lambda: heads.logits(heads.layers[0], hk[0, -1], edge.head),
        }
        for key, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times.setdefault(key, []).append((time.perf_counter() - t0) * 1e3)
    return {key: statistics.median(v) for key, v in times.items()}


def modelled_latency(row: dict, comp: dict, exits: list[int]) -> dict:
    """ms/token from the measured components and the injected link: cloud-only, naive split, this row."""
    link = RTT_S * 1e3 + row["uplink_bytes_per_token"] * 8 / BW_BPS * 1e3
    cloud = comp["cloud_layers"] + comp["cloud_head"]
    heads = sum(row["exit_frac"][str(e)] * (i + 1) for i, e in enumerate(exits))
    heads += row["cloud_requests_per_token"] * len(exits) if row["threshold"] != "off" else 0
    cf = row["cloud_requests_per_token"]
    # an exited token's deep layers still run on the cloud (catch-up, in front of the next request): counted
    # at the one-token cost, an upper bound for a batched chunk
    ee = comp["edge"] + heads * comp["exit_head"] + cf * (link + cloud) + (1 - cf) * comp["cloud_layers"]
    return {"cloud_only_ms": comp["full"] + RTT_S * 1e3 + 8 * 8 / BW_BPS * 1e3,
            "naive_split_ms": comp["edge"] + link + cloud, "early_exit_ms": ee}


def run_model(name: str, out_dir: Path, cache_dir: Path, overrides: dict | None = None,
              quality_only: bool = False) -> dict:
    spec = {**MODELS[name], **(overrides or {})}
    model_dir = spec["dir"]
    if not (model_dir / "config.json").is_file():
        return {"model": name, "skipped": f"{model_dir} not found"}
    tok = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir)
    exits = spec["exits"]
    t0 = time.perf_counter()
    tr, _ = cached_hidden(name, model, tok, "train", spec["train"], exits, cache_dir, spec.get("train_stride", 20))
    ev, ev_chunks = cached_hidden(name, model, tok, "heldout", spec["heldout"], exits, cache_dir)
    t_hidden = time.perf_counter() - t0
    t0 = time.perf_counter()
    heads = train_exit_heads(model, tr, ExitTrainConfig(exits, steps=spec["steps"], ridge=spec.get("ridge", 1e-2),
                                                        weight_decay=spec.get("weight_decay", 0.0)))
    t_train = time.perf_counter() - t0
    untrained = ExitHeads.untrained(model.config, exits, model.norm.weight, adapter=False)
    ridge_only = train_exit_heads(model, tr, ExitTrainConfig(exits, steps=0))
    result = {"model": name, "layers": model.config.num_layers, "train_tokens": tr.rows, "heldout_tokens": ev.rows,
              "hidden_states_s": round(t_hidden, 1), "train_s": round(t_train, 1), "steps": spec["steps"],
              "train_stride": spec.get("train_stride", 20),
              "top1_untrained": agreement(model, untrained, ev), "top1_ridge_only": agreement(model, ridge_only, ev),
              "top1_trained": agreement(model, heads, ev), "sweep": [], "codec": {}, "latency": [],
              "top1_trained_on_train_rows": agreement(model, heads, tr),
              "ridge": spec.get("ridge", 1e-2), "weight_decay": spec.get("weight_decay", 0.0), "calibrated": []}
    for k in spec["splits"]:
        result["calibrated"].append(calibrated(model, heads, ev, ev_chunks, k))
        if quality_only:
            result["sweep"] += sweep(model, heads, ev, ev_chunks, k)
            continue
        comp = components(model_dir, heads, k, tok)
        result.setdefault("components_ms", {})[str(k)] = comp
        rows = sweep(model, heads, ev, ev_chunks, k)
        for row in rows:
            row["modelled"] = modelled_latency(row, comp, [e for e in exits if e <= k])
        result["sweep"] += rows
        result["codec"][str(k)] = codec_cost(model, ev_chunks, k)
        result["latency"] += latency(name, spec, model_dir, heads, tok, k)
        print(json.dumps({"model": name, "k": k, "done": True}), file=sys.stderr, flush=True)
    (out_dir / f"early_exit_{name}.json").write_text(json.dumps(result, indent=1))
    return result


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['model']}: skipped ({r['skipped']})\n")
            continue
        lines.append(f"**{r['model']}** ({r['layers']} layers; heads trained on {r['train_tokens']} train-split "
                     f"tokens, {r['steps']} KL steps, {r['train_s']} s; hidden states {r['hidden_states_s']} s; "
                     f"evaluated on {r['heldout_tokens']} held-out tokens)\n")
        lines.append("| exit | top-1 untrained | ridge start only | trained |\n|---|---|---|---|")
        for e in r["top1_trained"]:
            lines.append(f"| {e} | {r['top1_untrained'][e]:.1%} | {r['top1_ridge_only'][e]:.1%} | "
                         f"{r['top1_trained'][e]:.1%} |")
        lines.append("\n| k | threshold | tokens at each exit | on edge | greedy agreement | ppl (full) | "
                     "cloud layer-evals saved vs cloud-only | cloud MACs saved vs cloud-only / vs naive split | "
                     "cloud requests / token | uplink B/token | ms/token modelled: cloud-only / naive split / this |"
                     "\n|---|---|---|---|---|---|---|---|---|---|---|")
        for s in r["sweep"]:
            m = s["modelled"]
            fr = ", ".join(f"{e}: {v:.1%}" for e, v in s["exit_frac"].items())
            lines.append(f"| {s['k']} | {s['threshold']} | {fr} | {s['edge_frac']:.1%} | {s['greedy_agreement']:.1%} "
                         f"| {s['ppl']:.2f} ({s['ppl_full']:.2f}) | {s['cloud_layer_evals_saved_vs_cloud_only']:.1%} "
                         f"| {s['cloud_macs_saved_vs_cloud_only']:.1%} / {s['cloud_macs_saved_vs_naive_split']:.1%} "
                         f"| {s['cloud_requests_per_token']:.2f} | {s['uplink_bytes_per_token']} "
                         f"| {m['cloud_only_ms']:.1f} / {m['naive_split_ms']:.1f} / {m['early_exit_ms']:.1f} |")
        for k, c in r.get("components_ms", {}).items():
            lines.append(f"\nk={k}, one decode step, median ms: " + ", ".join(f"{a} {b:.2f}" for a, b in c.items()))
        lines.append("\n| k | serving | measured end to end: ms/token, injected 20 ms RTT + 50 Mbit/s | "
                     "tokens on edge |\n|---|---|---|---|")
        for x in r["latency"]:
            lines.append(f"| {x['k']} | {x['config']} | {x['ms_per_token']:.1f} | {x['edge_frac']:.0%} |")
        lines.append("\n| k | codec | top-1 vs float32 hidden states | ppl |\n|---|---|---|---|")
        for k, c in r["codec"].items():
            for codec, v in c.items():
                lines.append(f"| {k} | {codec} | {v['top1_vs_float32']:.2%} | {v['ppl']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> str:
    """The trade-off PNG: per model, edge fraction against greedy agreement (top) and against ms/token (bottom:
    modelled lines per k with cloud-only and the naive split dashed, measured end-to-end points), per split k."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG, the table only"
    results = [r for r in results if r.get("sweep")]
    if not results:
        return "no sweep results to plot"
    fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 8), squeeze=False)
    for col, r in enumerate(results):
        top, bottom = axes[0][col], axes[1][col]
        for i, k in enumerate(sorted({s["k"] for s in r["sweep"]})):
            color = f"C{i}"
            rows = [s for s in r["sweep"] if s["k"] == k]
            xs = [100 * s["edge_frac"] for s in rows]
            top.plot(xs, [100 * s["greedy_agreement"] for s in rows], marker="o", color=color, label=f"k={k}")
            for s, x in zip(rows, xs, strict=True):
                if s["threshold"] in (0.3, 0.5, 0.7, 0.9):
                    top.annotate(f"{s['threshold']}", (x, 100 * s["greedy_agreement"]), fontsize=7,
                                 textcoords="offset points", xytext=(3, 3))
            bottom.plot(xs, [s["modelled"]["early_exit_ms"] for s in rows], marker="o", color=color,
                        label=f"k={k} early exit (modelled)")
            m = rows[0]["modelled"]
            bottom.axhline(m["naive_split_ms"], color=color, linestyle="--", linewidth=1,
                           label=f"k={k} naive split (modelled)")
            bottom.axhline(m["cloud_only_ms"], color=color, linestyle=":", linewidth=1,
                           label=f"k={k} cloud-only (modelled)")
            meas = [x for x in r.get("latency", []) if x["k"] == k and x["config"].startswith("exit")]
            bottom.scatter([100 * x["edge_frac"] for x in meas], [x["ms_per_token"] for x in meas], marker="x",
                           color=color, label=f"k={k} early exit (measured)")
        top.axhline(95, color="grey", linewidth=0.8)
        top.axvline(30, color="grey", linewidth=0.8)
        top.set_title(f"{r['model']} ({r['layers']} layers): quality (labels: threshold)")
        top.set_xlabel("tokens answered on the edge (%)")
        top.set_ylabel("greedy agreement with the full model (%)")
        top.legend(fontsize=8)
        bottom.set_title(f"{r['model']}: latency, injected 20 ms RTT + 50 Mbit/s")
        bottom.set_xlabel("tokens answered on the edge (%)")
        bottom.set_ylabel("ms / token")
        bottom.legend(fontsize=6)
    fig.suptitle("Early exit with a cloud tier: held-out text, teacher-forced sweep of thresholds 0.3..0.95 and off",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def load_results(paths: list[str]) -> list[dict]:
    """Saved results: files holding one model's result or a list of them, or directories of early_exit_*.json."""
    out: list[dict] = []
    for name in paths:
        p = Path(name)
        files = sorted(p.glob("early_exit_*.json")) if p.is_dir() else [p]
        files = [f for f in files if f.name != "early_exit_results.json"] if p.is_dir() else files
        if not files:
            raise SystemExit(f"{p}: no early_exit_*.json results here")
        for f in files:
            try:
                doc = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise SystemExit(f"{f}: cannot read the results ({e})") from None
            for r in doc if isinstance(doc, list) else [doc]:
                if not isinstance(r, dict) or "model" not in r:
                    raise SystemExit(f"{f}: not bench_early_exit.py results (no 'model' field)")
                out.append(r)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="demo,smollm2")
    p.add_argument("--out", default=str(Path("/tmp") / "edgefed-bench-early-exit" / "results"))
    p.add_argument("--cache", default=str(Path("/tmp") / "edgefed-bench-early-exit"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--png", default=str(ROOT / "benchmarks" / "early_exit_tradeoff.png"),
                   help="where the trade-off plot goes")
    p.add_argument("--train-tokens", type=int, help="override the models' training tokens")
    p.add_argument("--steps", type=int, help="override the models' KL steps")
    p.add_argument("--train-stride", type=int, help="sample the train split's every N-th file (default 20; 1: all)")
    p.add_argument("--ridge", type=float, help="override the closed-form start's relative ridge (default 0.01)")
    p.add_argument("--weight-decay", type=float, help="AdamW decay of the adapters towards identity (default 0)")
    p.add_argument("--quality-only", action="store_true",
                   help="heads, sweep and calibration only: no latency, components or codec (no table, no PNG)")
    p.add_argument("--plot-from", nargs="+", metavar="JSON",
                   help="draw the table and the PNG from saved results (files or directories); runs nothing")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_from:
        results = load_results(args.plot_from)
    else:
        overrides = {key: v for key, v in (("train", args.train_tokens), ("steps", args.steps), ("ridge", args.ridge),
                                            ("weight_decay", args.weight_decay), ("train_stride", args.train_stride))
                     if v is not None}
        results = [run_model(m, out, Path(args.cache), overrides, args.quality_only) for m in args.models.split(",")]
        (out / "early_exit_results.json").write_text(json.dumps(results, indent=1))
        if args.quality_only:
            print(json.dumps([{key: r.get(key) for key in ("model", "train_tokens", "train_stride", "steps", "ridge",
                                                           "weight_decay", "top1_untrained", "top1_trained",
                                                           "top1_trained_on_train_rows", "calibrated")}
                              for r in results], indent=1))
            return 0
    md = table(results)
    (out / "early_exit.md").write_text(md)
    print(md)
    print(plot(results, Path(args.png)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
