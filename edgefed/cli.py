"""The `edgefed` command. Each module in edgefed.commands adds one subcommand through add_parser(subparsers)."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. Edge devices and the testbed run several
# processes per core set; spinning workers then steal the core from the one thread with work
# and every parallel region costs a scheduler tick (measured: 56 -> 3.7 ms/token on a busy
# 2-core machine). Must be set before torch loads libgomp; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib  # noqa: E402
import sys  # noqa: E402

from edge_node.model import EdgefedError  # noqa: E402
from edgefed.commands import COMMANDS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"edgefed.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _return_freed_memory()
    try:
        return int(args.run(args) or 0)
    except (EdgefedError, ValueError, OSError) as e:  # deliberate errors and named files: no traceback
        print(f"edgefed {args.command}: error: {e}", file=sys.stderr)
        return 2


def _return_freed_memory() -> None:
    """Weights freed while loading go back to the OS (edge_node.malloc.return_freed_memory): without it a
    load peaks at ~1.25x the weights' bytes instead of ~1.04x. The module is torch-free to import, so the agent
    daemon does not pay torch's import (about 4 s and 200 MiB)."""
    from edge_node.malloc import return_freed_memory

    return_freed_memory()


if __name__ == "__main__":
    sys.exit(main())
