"""A stand-in for `edgefed serve` under the node agent (tests): checks what the agent hands a rank, then runs
until SIGTERM (writing --ready-file), or crashes with a message on stderr (--mode crash-rank1)."""

import argparse
import json
import signal
import socket
import sys
import time
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--mode", default="ok")
p.add_argument("--run-config", required=True)
p.add_argument("--rank", type=int, required=True)
p.add_argument("--master", required=True)
p.add_argument("--ready-file", required=True)
p.add_argument("--listen")
p.add_argument("--insecure", action="store_true")
p.add_argument("--tls-dir")
args = p.parse_args()
run = json.loads(Path(args.run_config).read_text())
assert run["shards"] == "shards", run["shards"]  # relative to the working directory: the same on every node
manifest = json.loads((Path(run["shards"]) / "manifest.json").read_text())
mine = [f for f in manifest["files"] if f["rank"] == args.rank]
assert mine and all((Path(run["shards"]) / f["path"]).is_file() for f in mine), "missing shard files"
host, _, port = args.master.rpartition(":")
assert host and int(port) > 0, f"--master {args.master}"
if args.mode == f"crash-rank{args.rank}":
    print(f"rank {args.rank}: loading shards", file=sys.stderr)
    print(f"boom: rank {args.rank} cannot go on", file=sys.stderr)
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
address = None
if args.rank == 0:  # as `edgefed serve`: port 0 binds a free one, and the ready file says which
    server = socket.socket()
    host, _, port = args.listen.rpartition(":")
    server.bind((host, int(port)))
    server.listen(1)
    address = f"{host}:{server.getsockname()[1]}"
Path(args.ready_file).write_text(json.dumps({"rank": args.rank, "address": address}))
while True:
    time.sleep(0.2)
