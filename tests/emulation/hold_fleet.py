"""Test helper: bring up a scenario's fleet (namespaces, links, cgroups) with a sleeping process per node,
print {"prefix", "pids"} as one JSON line, then wait to be signalled, or (with --fail) fail mid-way."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from emulation.cleanup import Cleanup, Interrupted, run_prefix
from emulation.fleet import Fleet
from emulation.scenario import load_scenario


def main() -> int:
    sc = load_scenario(sys.argv[1])
    prefix = run_prefix()
    try:
        with Cleanup(prefix) as cleanup:
            fleet = Fleet(sc, prefix, cleanup, Path(sys.argv[2])).build()
            procs = [fleet.start(n.name, "sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
                     for n in sc.nodes]
            print(json.dumps({"prefix": prefix, "mode": fleet.mode, "pids": [p.proc.pid for p in procs]}), flush=True)
            if "--fail" in sys.argv:
                raise RuntimeError("forced failure in the middle of a run")
            time.sleep(600)
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
