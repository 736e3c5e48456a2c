"""The Flower ServerApp (Message API): the run config becomes a SessionConfig, federated.strategy runs it."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .strategy import SessionConfig, run_session

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    run_session(grid, SessionConfig.from_run_config(dict(context.run_config)), context)
