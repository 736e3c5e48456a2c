"""SecAgg+ from Flower itself for a synchronous FedAvg round: the server sees only the sum of the clients' masked
updates, never one client's adapter.

Flower 1.41 offers SecAgg+ only in its legacy shape: `flwr.server.workflow.SecAggPlusWorkflow.__call__` refuses
any context but a `LegacyContext` (a legacy `flwr.server.strategy.Strategy` whose `configure_fit` /
`aggregate_fit` speak FitIns / FitRes `Parameters`, plus a `ClientManager`), and the client's `secaggplus_mod`
reads the train reply through `recorddict_to_fitres` (records "fitres.parameters", "fitres.num_examples",
"fitres.metrics"). This module bridges one round of edgefed's loop to it: a LegacyContext over the ServerApp's
Grid and context, a FedAvg that carries edgefed's orders in its fit config and records each client's metrics,
the global adapter in and the unmasked aggregate out (tensor names by position, the legacy format has none).
The client side is federated.client_app (legacy-layout train replies when the orders say so).

What SecAgg+ rules out, by construction: the per-client update checks (wrong keys/shapes/NaN are caught only in
the aggregate, which is then refused whole), FedCompass (the workflow's four stages each wait for every client
with one `send_and_receive` timeout; a late update cannot be held for the next round), HetLoRA (masked vectors
must have one shape) and per-client weighting by staleness. Weights are the clients' example counts, as FedAvg.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

log = logging.getLogger(__name__)
NAMES = "tensor-names"  # in the fit config: the adapter's tensor names, in the order of the legacy Parameters
CLIPPING_RANGE = 8.0  # SecAgg+ quantizes each value in [-8, 8] (LoRA values are far inside)


class _FedAvgRecording(FedAvg):
    """Legacy FedAvg over every connected node, edgefed's orders as its fit config, each client's FitRes kept."""

    def __init__(self, config: dict, clients: int):
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients,
                         min_available_clients=clients, on_fit_config_fn=lambda _rnd: dict(config))
        self.results: list[tuple[int, int, dict]] = []

    def aggregate_fit(self, server_round, results, failures):
        self.results = [(proxy.node_id, res.num_examples, dict(res.metrics)) for proxy, res in results]
        return super().aggregate_fit(server_round, results, failures)


def secagg_round(grid: Grid, context: Context, state: dict[str, torch.Tensor], rnd: int, orders: dict,
                 clients: int, timeout_s: float) -> tuple[dict[str, torch.Tensor] | None, list[tuple[int, int, dict]]]:
    """One SecAgg+ FedAvg round: (the unmasked weighted average, or None when the protocol halted or the aggregate
    is not finite / misshaped; [(node, examples, metrics)] of the clients that took part)."""
    names = list(state)
    strategy = _FedAvgRecording({**orders, NAMES: ",".join(names)}, clients)
    manager = SimpleClientManager()
    for node in grid.get_node_ids():
        manager.register(GridClientProxy(node_id=node, grid=grid, run_id=grid.run.run_id))
    legacy = LegacyContext(context, strategy=strategy, client_manager=manager)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd})
    params = ndarrays_to_parameters([state[n].detach().float().numpy() for n in names])
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, True)
    # every client shares with every other; the sum is recovered only if all of them stay (2 clients: both)
    # each client scales its update by examples / max_weight before quantizing to 2^22 levels over
    # [-8, 8]: max_weight = the examples a full round reports keeps that scale near 1 (Flower's default of 1000
    # against our 24-64 examples costs ~40x the precision, 1.5e-4 on the average)
    max_weight = float(orders["steps"]) * float(orders["batch-size"])
    SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=clients, clipping_range=CLIPPING_RANGE,
                       max_weight=max_weight, timeout=timeout_s)(grid, legacy)
    if not strategy.results:
        log.warning("round %d: SecAgg+ halted (a client failed or timed out); the global adapter is kept", rnd)
        return None, []
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD],
                                                                     True))
    if len(arrays) != len(names) or any(a.shape != tuple(state[n].shape) for a, n in zip(arrays, names, strict=False)):
        log.warning("round %d: the SecAgg+ aggregate has the wrong tensors; refused", rnd)
        return None, strategy.results
    if not all(np.isfinite(a).all() for a in arrays):
        log.warning("round %d: the SecAgg+ aggregate is not finite; refused", rnd)
        return None, strategy.results
    return {n: torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for n, a in zip(names, arrays, strict=True)}, \
        strategy.results
