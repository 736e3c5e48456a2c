"""`edgefed tp-generate`: tensor-parallel generation over shards, N local ranks or one rank of a group.

Without --rank it builds the run configuration once, launches every rank as a local process on loopback
(each its own interpreter, so each has its own peak RSS and could sit in its own cgroup), hands each the
configuration whole (JSON on stdin) and prints rank 0's result. With --rank R and --master-addr HOST:PORT
it runs just that rank, for groups that span hosts, from its own flags or `--run-config FILE|-`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from edge_node.ports import free_port
from edge_node.supervisor import dies_with_parent
from edgefed.args import (
    add_generation_args,
    add_prefill_args,
    emit,
    non_negative_int,
    positive_float,
    positive_int,
    prefill_from_args,
    prompt_from_args,
    run_config,
)
from edgefed.commands.generate import add_early_exit_args

_POLL_S = 0.05
_SYMPTOMS = ("a rank is gone or stalled", "Connection reset by peer", "Connection closed by peer")
_STOP_S = 5.0  # a rank gets this long to end after SIGTERM before SIGKILL


def add_parser(sub) -> None:
    p = sub.add_parser("tp-generate", help="tensor-parallel generation across ranks, streaming layer blocks")
    p.add_argument("--shards", required=True, help="directory written by `edgefed shard`")
    p.add_argument("--nodes", type=positive_int, help="ranks (default and only allowed value: the manifest's)")
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--window", type=positive_int, help="layer blocks resident per rank (default: all)")
    mem.add_argument("--memory-mb", type=positive_float, help="per-rank memory budget; the window is derived from it")
    p.add_argument("--allreduce", choices=["star", "gloo"], default="star")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="seconds any rank waits on the others")
    p.add_argument("--drop-page-cache", action="store_true",
                   help="evict shard pages after each read, so every pass reads from disk")
    p.add_argument("--rank", type=non_negative_int, help="run only this rank (needs --master-addr)")
    p.add_argument("--master-addr", help="HOST:PORT of rank 0's rendezvous")
    p.add_argument("--iface", help="network interface the ranks talk over (default: the one that routes to "
                   "--master-addr)")
    p.add_argument("--run-config", help="with --rank: the run configuration as JSON in a file, or - for stdin "
                   "(what the local launcher passes; the generation flags are then ignored)")
    add_generation_args(p, model_required=False, prompt_required=False)  # a prompt or --run-config
    add_prefill_args(p)  # rank 0 prefills on ONNX Runtime from graphs exported ahead (--graph-dir)
    add_early_exit_args(p)  # as `generate`'s; "auto" heads: the exits.json in the shard directory
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace):
    """The run configuration from the command line: prompt tokenized once, defaults read from the shards."""
    if getattr(args, "prefill", "torch") == "ort" and not args.graph_dir:
        raise ValueError("tp-generate --prefill ort needs --graph-dir: graphs exported ahead with "
                         "`edgefed prefill --model DIR --graph-dir G ...` (the ranks hold no whole model to export)")
    prompt, _ = prompt_from_args(args, args.shards)
    # chunk and context are the exported graphs' own: rank 0 reads them from the graph directory
    cfg = run_config(args, prompt, prefill_from_args(args, args.chunk), shards=str(args.shards))
    exits = exit_options(args)
    return cfg if exits is None else dataclasses.replace(cfg, exits=exits)


def exit_options(args: argparse.Namespace):
    """The early-exit options of the flags (as `generate --exits`), None when exits are off."""
    from edge_node.run_config import EarlyExitOptions

    if args.exits is None and args.exit_mode != "collaborative":
        return None
    opts = EarlyExitOptions(args.exits, args.threshold, args.exit_criterion, args.exit_mode, args.cloud,
                            args.split, args.codec, args.cloud_timeout)
    if args.exits is not None:  # checked here, before any rank starts, so a bad file is one clear error
        from edge_node.early_exit import load_exit_heads
        from edge_node.model.config import ModelConfig

        load_exit_heads(args.shards if args.exits == "auto" else args.exits, ModelConfig.from_dir(args.shards))
    return opts


def run(args: argparse.Namespace) -> int:
    from edge_node.shard import Manifest, ShardError

    manifest = Manifest.load(args.shards)
    if args.nodes is not None and args.nodes != manifest.nodes:
        raise ShardError(f"{args.shards} is sharded for {manifest.nodes} nodes, not --nodes {args.nodes}")
    if args.rank is None:
        return _launch(args, config_from_args(args), manifest.nodes)
    if not args.master_addr:
        raise ValueError("--rank needs --master-addr HOST:PORT")
    return _run_rank(args)


def _run_rank(args: argparse.Namespace) -> int:
    from edge_node.collectives import CommError
    from edge_node.engine import run_rank
    from edge_node.run_config import RunConfig

    if args.run_config:
        text = sys.stdin.read() if args.run_config == "-" else Path(args.run_config).read_text()
        cfg = RunConfig.from_json(text)
    else:
        cfg = config_from_args(args)
    try:
        result = run_rank(cfg, args.rank, args.master_addr, iface=args.iface)
    except CommError as e:
        # A peer is gone: the group cannot be torn down cleanly (gloo's destructors abort the process), so
        # report and leave now with the usual exit status.
        print(f"edgefed tp-generate: error: {e}", file=sys.stderr, flush=True)
        os._exit(2)
    if result is not None:
        _output(args, result)
    return 0


def _output(args: argparse.Namespace, result: dict) -> None:
    from edge_node.model import Tokenizer

    tok = Tokenizer.from_dir(args.shards) if (Path(args.shards) / "tokenizer.json").is_file() else None
    result["text"] = tok.decode(result["token_ids"]) if tok else ""
    if args.json:
        emit(result, True)
    else:
        _print_text(args, result)


def _print_text(args: argparse.Namespace, r: dict) -> None:
    """Prompt and continuation on stdout (ids when there is no tokenizer), timings on stderr."""
    print((args.prompt or "") + r["text"] if r["text"] or args.prompt else ",".join(map(str, r["token_ids"])))
    if "exit_mode" in r:  # early exit: where the tokens were answered instead of the per-step split
        print(f"\n[{len(r['token_ids'])} tokens, stop: {r['stop_reason']}, {r['nodes']} ranks, {r['exit_mode']}: "
              f"{r['usage']}, cloud: {r['cloud']}] {r['tpot_ms']:.2f} ms/token, peak RSS per rank "
              f"{r['per_rank_peak_rss_mb']} MB" + (f"\n[the cloud tier was {r['cloud']}: {r['cloud_error']}; the "
                                                    f"edge answered alone]" if r["cloud_error"] else ""),
              file=sys.stderr)
        return
    mean = r.get("per_token_mean", {})
    print(f"\n[{len(r['token_ids'])} tokens, stop: {r['stop_reason']}, {r['nodes']} ranks] "
          f"time to first token {r['ttft_ms']:.1f} ms, {r['tpot_ms']:.2f} ms/token "
          f"(compute {mean.get('compute_ms', 0):.1f} / comm {mean.get('comm_ms', 0):.1f} / "
          f"io wait {mean.get('io_wait_ms', 0):.1f} ms), peak RSS per rank {r['per_rank_peak_rss_mb']} MB",
          file=sys.stderr)


def _child_argv(args: argparse.Namespace, rank: int, master: str) -> list[str]:
    return [sys.executable, "-m", "edgefed", "tp-generate", "--shards", str(args.shards), "--rank", str(rank),
            "--master-addr", master, "--run-config", "-", "--json"]


def _launch(args: argparse.Namespace, cfg, nodes: int) -> int:
    """Start every rank locally, each handed the one configuration; drain their output while they run
    (a rank blocked on a full pipe would hang the group). The first rank to fail ends the others; SIGTERM
    or SIGINT to the launcher ends every rank within _STOP_S."""
    master = f"127.0.0.1:{free_port()}"
    text = cfg.to_json()
    procs = [subprocess.Popen(dies_with_parent(_child_argv(args, r, master)), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(nodes)]
    outs: list[tuple[str, str]] = [("", "")] * nodes

    def drain(r: int) -> None:
        outs[r] = procs[r].communicate(text)

    threads = [threading.Thread(target=drain, args=(r,), daemon=True) for r in range(nodes)]
    for t in threads:
        t.start()
    with _stop_ranks_on_signal(procs):
        order = _wait_first_failure(procs)
    _stop(procs)
    for t in threads:
        t.join()
    if order:
        # ranks the launcher stopped may hold the real cause (still tearing down when a peer exited first)
        order += [r for r, p in enumerate(procs) if r not in order and p.returncode and "error" in outs[r][1].lower()]
        for r in _causes_first(order, outs):  # the first cause first
            print(f"edgefed tp-generate: {_cause(r, procs[r].returncode, outs[r][1])}", file=sys.stderr)
        return 2
    _output(args, json.loads(outs[0][0]))
    sys.stderr.write(outs[0][1])
    return 0


def _wait_first_failure(procs: list[subprocess.Popen]) -> list[int]:
    """Wait until every rank exits or one fails; the failed ranks in the order they were seen failing."""
    order: list[int] = []
    while any(p.poll() is None for p in procs):
        order += [r for r, p in enumerate(procs) if p.poll() not in (None, 0) and r not in order]
        if order:
            break
        time.sleep(_POLL_S)
    return order + [r for r, p in enumerate(procs) if p.poll() not in (None, 0) and r not in order]


def _causes_first(order: list[int], outs: list[tuple[str, str]]) -> list[int]:
    """Ranks that failed on their own before ranks that only saw a peer vanish (both can end within one
    poll): the first cause leads the report."""
    return sorted(order, key=lambda r: any(s in outs[r][1] for s in _SYMPTOMS))


def _cause(rank: int, code: int | None, err: str) -> str:
    """One line naming the rank, how it ended and its own last error line."""
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
    lines = [ln for ln in err.strip().splitlines() if "error" in ln.lower()] or err.strip().splitlines()
    return f"rank {rank} ({how})" + (f": {lines[-1]}" if lines else "")


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every rank still running, SIGKILL what is left after _STOP_S."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + _STOP_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextlib.contextmanager
def _stop_ranks_on_signal(procs: list[subprocess.Popen]):
    """SIGTERM / SIGINT to the launcher stop every rank, then the launcher exits 128 + the signal."""
    def handler(signum, _frame):
        _stop(procs)
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
