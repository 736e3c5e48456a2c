"""`edgefed tp-generate`: tensor-parallel generation over shards, N local ranks or one rank of a group.

Without --rank it launches every rank as a local process on loopback (each its own interpreter, so each
has its own peak RSS and could sit in its own cgroup) and prints rank 0's result. With --rank R and
--master-addr HOST:PORT it runs just that rank, for groups that span hosts.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path


def add_parser(sub) -> None:
    from edge_node.cli import add_model_args, add_prefill_args

    p = sub.add_parser("tp-generate", help="tensor-parallel generation across ranks, streaming layer blocks")
    p.add_argument("--shards", required=True, help="directory written by `edgefed shard`")
    p.add_argument("--nodes", type=int, help="ranks (default and only allowed value: the manifest's)")
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--window", type=int, help="layer blocks resident per rank (default: all)")
    mem.add_argument("--memory-mb", type=float, help="per-rank memory budget; the window is derived from it")
    p.add_argument("--allreduce", choices=["star", "gloo"], default="star")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds any rank waits on the others")
    p.add_argument("--drop-page-cache", action="store_true",
                   help="evict shard pages after each read, so every pass reads from disk")
    p.add_argument("--rank", type=int, help="run only this rank (needs --master-addr)")
    p.add_argument("--master-addr", help="HOST:PORT of rank 0's rendezvous")
    add_model_args(p, model_required=False)
    add_prefill_args(p)  # rank 0 prefills on ONNX Runtime from graphs exported ahead (--graph-dir)
    p.set_defaults(run=run)


def _ort_prefill(args: argparse.Namespace):
    """Rank 0's ONNX Runtime prefill options, or None (torch prefill across the ranks)."""
    if getattr(args, "prefill", "torch") != "ort":
        return None
    from npu_backends.build import options_from_args

    if not args.graph_dir:
        raise ValueError("tp-generate --prefill ort needs --graph-dir: graphs exported ahead with "
                         "`edgefed prefill --model DIR --graph-dir G ...` (the ranks hold no whole model to export)")
    return options_from_args(args, args.chunk)  # chunk and context are the exported graphs' own


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> int:
    from edge_node.shard import Manifest, ShardError

    manifest = Manifest.load(args.shards)
    if args.nodes is not None and args.nodes != manifest.nodes:
        raise ShardError(f"{args.shards} is sharded for {manifest.nodes} nodes, not --nodes {args.nodes}")
    if args.rank is None:
        return _launch(args, manifest.nodes)
    if not args.master_addr:
        raise ValueError("--rank needs --master-addr HOST:PORT")
    return _run_rank(args)


def _run_rank(args: argparse.Namespace) -> int:
    from edge_node.cli import emit
    from edge_node.engine import TPOptions, run_rank
    from edge_node.generate_cmd import eos_ids, prompt_from_args, sampling_from_args
    from edge_node.model.config import ModelConfig

    shards = Path(args.shards)
    opts = TPOptions(shards, args.rank, args.master_addr, args.window, args.memory_mb, args.allreduce,
                     args.timeout, args.drop_page_cache, args.threads,
                     _ort_prefill(args) if args.rank == 0 else None)
    prompt, tok = prompt_from_args(args, shards) if args.rank == 0 else ([0], None)
    eos = eos_ids(shards, ModelConfig.from_dir(shards))
    result = run_rank(opts, prompt, args.max_new_tokens, sampling_from_args(args, shards), eos)
    if result is not None:
        result["text"] = tok.decode(result["token_ids"]) if tok else ""
        if args.json:
            emit(result, True)
        else:
            _print_text(args, result)
    return 0


def _print_text(args: argparse.Namespace, r: dict) -> None:
    """Prompt and continuation on stdout (ids when there is no tokenizer), timings on stderr."""
    print((args.prompt or "") + r["text"] if r["text"] or args.prompt else ",".join(map(str, r["token_ids"])))
    mean = r.get("per_token_mean", {})
    print(f"\n[{len(r['token_ids'])} tokens, stop: {r['stop_reason']}, {r['nodes']} ranks] "
          f"time to first token {r['ttft_ms']:.1f} ms, {r['tpot_ms']:.2f} ms/token "
          f"(compute {mean.get('compute_ms', 0):.1f} / comm {mean.get('comm_ms', 0):.1f} / "
          f"io wait {mean.get('io_wait_ms', 0):.1f} ms), peak RSS per rank {r['per_rank_peak_rss_mb']} MB",
          file=sys.stderr)


def _child_argv(args: argparse.Namespace, rank: int, master: str) -> list[str]:
    argv = [sys.executable, "-m", "edge_node.cli", "tp-generate", "--shards", str(args.shards),
            "--rank", str(rank), "--master-addr", master, "--allreduce", args.allreduce,
            "--timeout", str(args.timeout), "--max-new-tokens", str(args.max_new_tokens),
            "--top-k", str(args.top_k), "--top-p", str(args.top_p)]
    if args.prompt is not None:
        argv += ["--prompt", args.prompt]
    else:
        argv += ["--prompt-ids", ",".join(map(str, args.prompt_ids))]
    for flag, value in (("--window", args.window), ("--memory-mb", args.memory_mb), ("--seed", args.seed),
                        ("--temperature", args.temperature), ("--threads", args.threads),
                        ("--repetition-penalty", args.repetition_penalty)):
        if value is not None:
            argv += [flag, str(value)]
    if getattr(args, "prefill", "torch") == "ort":
        argv += ["--prefill", "ort", "--provider", args.provider]
        argv += ["--graph-dir", args.graph_dir] if args.graph_dir else []
    for flag, on in (("--greedy", args.greedy), ("--chat", args.chat), ("--json", args.json),
                     ("--drop-page-cache", args.drop_page_cache), ("--strict", getattr(args, "strict", False)),
                     ("--int8", getattr(args, "int8", False)), ("--shadow", getattr(args, "shadow", False))):
        if on:
            argv.append(flag)
    return argv


def _launch(args: argparse.Namespace, nodes: int) -> int:
    """Start every rank locally; rank 0's stdout is ours. The first rank to fail ends the others."""
    master = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(_child_argv(args, r, master), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(nodes)]
    failed = None
    while failed is None and any(p.poll() is None for p in procs):
        failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        time.sleep(0.05)
    failed = failed if failed is not None else next((r for r, p in enumerate(procs) if p.returncode), None)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outs = [p.communicate() for p in procs]
    if failed is not None:
        # The first rank to exit may only have seen a peer vanish: name every rank's own error.
        for r, (_, err) in enumerate(outs):
            lines = [ln for ln in err.strip().splitlines() if "error" in ln.lower()] or err.strip().splitlines()
            if procs[r].returncode not in (0, None) and lines:
                print(f"edgefed tp-generate: rank {r}: {lines[-1]}", file=sys.stderr)
        return procs[failed].returncode or 2
    sys.stdout.write(outs[0][0])
    sys.stderr.write(outs[0][1])
    return 0
