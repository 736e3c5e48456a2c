"""`edgefed deploy`: ask a coordinator (its HTTP admin API) to deploy a model across its nodes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

from edgefed.args import non_negative_float, non_negative_int, positive_float, positive_int

WEIGHTS = ("float32", "bfloat16", "int8")  # edge_node.shard.WEIGHTS


def _nodes(text: str) -> int | list[str]:
    if text.isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError(f"--nodes: expected a positive count or node names, got {text!r}")
        return int(text)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"--nodes: expected a positive count or node names, got {text!r}")
    return names


def add_parser(sub) -> None:
    p = sub.add_parser("deploy", help="deploy a model across the coordinator's nodes (admin)")
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT|URL", help="the coordinator's HTTP API")
    p.add_argument("--model", required=True, help="model directory, a path on the coordinator's machine")
    p.add_argument("--nodes", type=_nodes, help="how many nodes, or their names (a,b); default: placement decides")
    p.add_argument("--weights", choices=WEIGHTS, default="float32", help="shard dtype")
    p.add_argument("--admin-key", default=os.environ.get("EDGEFED_ADMIN_KEY", ""),
                   help="admin API key (default $EDGEFED_ADMIN_KEY)")
    p.add_argument("--wait", type=non_negative_int, default=0, metavar="S",
                   help="wait up to S seconds for every rank to run (0: return at once)")
    p.add_argument("--timeout", type=positive_float, default=600.0, help="deadline of the deploy call, seconds")
    p.add_argument("--json", action="store_true")
    g = p.add_argument_group("early exit (the deployment's exit heads and cloud tier; requests pick their mode)")
    g.add_argument("--exit-heads", metavar="PATH", help="exits.json from `edgefed train-exits` on the coordinator's "
                   "machine (auto: the one beside the model); shipped to every rank")
    g.add_argument("--exit-threshold", type=non_negative_float, help="in [0, 1]: the default threshold (0.9)")
    g.add_argument("--exit-mode", choices=["standalone", "collaborative"], help="the default mode (standalone)")
    g.add_argument("--exit-split", type=positive_int, help="k: the cloud tier runs [k, L) (default: the last exit "
                   "layer)")
    g.add_argument("--cloud", metavar="HOST:PORT", help="the cloud tier (`edgefed cloud-serve`), as the ranks reach "
                   "it: collaborative early exit")
    p.set_defaults(run=run)


def _url(coordinator: str, path: str) -> str:
    base = coordinator if "://" in coordinator else f"http://{coordinator}"
    return base.rstrip("/") + path


def _call(args, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> dict:
    req = urllib.request.Request(_url(args.coordinator, path), method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {args.admin_key}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            err = json.loads(e.read()).get("error", {})
            msg = err.get("message") if isinstance(err, dict) else None
        except ValueError:
            msg = None
        raise ValueError(f"the coordinator answered {e.code}: {msg or e.reason}") from None
    except (urllib.error.URLError, TimeoutError) as e:
        raise OSError(f"cannot reach the coordinator at {args.coordinator}: {getattr(e, 'reason', e)}") from None


def run(args: argparse.Namespace) -> int:
    if not args.admin_key:
        raise ValueError("an admin key is needed: --admin-key KEY or $EDGEFED_ADMIN_KEY (`edgefed certs api-key "
                         "--admin`)")
    body = {"model": args.model, "nodes": args.nodes, "weights": args.weights}
    exits = {"exit_heads": args.exit_heads, "exit_threshold": args.exit_threshold, "exit_mode": args.exit_mode,
             "exit_split": args.exit_split, "cloud": args.cloud}
    body.update({k: v for k, v in exits.items() if v is not None})  # the coordinator names what lacks exit_heads
    dep = _call(args, "POST", "/admin/deployments", body, args.timeout)
    deadline = time.monotonic() + args.wait
    while args.wait and dep["state"] not in ("running", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        found = [d for d in _call(args, "GET", "/admin/deployments")["data"] if d["deployment_id"] ==
                 dep["deployment_id"]]
        dep = found[0] if found else dep
    if args.json:
        print(json.dumps(dep))
    else:
        ranks = ", ".join(f"rank {a['rank']} on {a['node_id']} ({a['status']})" for a in dep["assignments"])
        print(f"{dep['deployment_id']}: {dep['state']}; {ranks}", file=sys.stderr)
    if args.wait and dep["state"] != "running":
        print(f"edgefed deploy: error: {dep['deployment_id']} is {dep['state']} after {args.wait} s: "
              f"{dep['detail']}", file=sys.stderr)
        return 2
    return 0
