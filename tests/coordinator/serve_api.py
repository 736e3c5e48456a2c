"""`python -m tests.coordinator.serve_api MODEL_DIR NAME`: the user API over one in-process model, on uvicorn.

Listens on a free loopback port and prints `PORT <n>` as its first line; the API key is $EDGEFED_TEST_API_KEY
(the admin key $EDGEFED_TEST_ADMIN_KEY). What the end-to-end test runs as a real server process.
"""

from __future__ import annotations

import os
import socket
import sys

import uvicorn

from coordinator.api import create_app, local_deployment
from coordinator.security import hash_secret, verify_secret


def main() -> None:
    model_dir, name = sys.argv[1], sys.argv[2]
    user, admin = hash_secret(os.environ["EDGEFED_TEST_API_KEY"]), hash_secret(os.environ["EDGEFED_TEST_ADMIN_KEY"])
    dep = local_deployment(model_dir, name)
    app = create_app({name: dep}, lambda key: verify_secret(key, user), lambda key: verify_secret(key, admin))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections wait in the backlog until uvicorn accepts them
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])
    finally:
        dep.backend.close()


if __name__ == "__main__":
    main()
