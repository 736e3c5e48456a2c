"""`edgefed testbed`: run a scenario (TOML) on an emulated fleet on this machine and write its report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("testbed", help="emulate a fleet of edge nodes (namespaces, links, caps) and run a scenario")
    p.add_argument("--scenario", help="scenario TOML file (see scenarios/)")
    p.add_argument("--out", help="report directory (default: testbed-out/<scenario>-<time>)")
    p.add_argument("--loopback", action="store_true",
                   help="plain loopback processes even as root (no namespaces or cgroups; links injected)")
    p.add_argument("--no-progress", action="store_true", help="no live progress line on stderr")
    p.add_argument("--sweep", metavar="PREFIX",
                   help="remove what a killed run with this prefix left (namespaces, links, cgroups) and exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from emulation.cleanup import Interrupted, sweep
    from emulation.scenario import load_scenario
    from emulation.testbed import TestbedOptions, run_testbed

    if args.sweep:
        left = sweep(args.sweep)
        print("nothing left" if not any(left.values()) else f"still there: {left}", file=sys.stderr)
        return 0 if not any(left.values()) else 2
    if not args.scenario:
        raise ValueError("--scenario FILE.toml is required (or --sweep PREFIX)")
    sc = load_scenario(args.scenario)
    out = Path(args.out or f"testbed-out/{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        report = run_testbed(sc, TestbedOptions(out=out, isolate=False if args.loopback else None,
                                                progress=not args.no_progress))
    except Interrupted as e:
        print(f"edgefed testbed: {e}; everything the run made is removed", file=sys.stderr)
        return 128 + e.signum
    s = report.get("summary") or {}
    return 0 if not report["run"].get("error") and s.get("errors", 0) == 0 else 1
