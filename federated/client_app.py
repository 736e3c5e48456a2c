"""The Flower ClientApp (Message API): thin handlers over federated.task.

A train message carries the global adapter ("arrays", one flat array: federated.wire) and the round's orders
with the adapter's layout ("config"); the reply carries only the adapter tensors trained ("arrays"), metrics
("metrics") and the client's name with the reply's layout ("info").
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from . import wire
from .task import ClientSettings, Orders, client_evaluate, client_train


def dp_clipping(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side fixed clipping (central DP with the server adding the noise), switched on per
    session: it acts only when the server's orders carry a clipping norm."""
    config = msg.content.config_records.get("config")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def secure_aggregation(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's secaggplus_mod, for the messages of a SecAgg+ round (federated.secagg) only."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[secure_aggregation, dp_clipping])


def _inputs(msg: Message, context: Context):
    settings = ClientSettings.from_config(dict(context.node_config))
    config = msg.content["config"]
    return settings, Orders.from_config(dict(config)), wire.unpack(msg.content["arrays"], config)


def _train_legacy(msg: Message, context: Context) -> Message:
    """A SecAgg+ round's train message (legacy FitIns layout, federated.secagg): the reply is a FitRes, whose
    parameters secaggplus_mod masks before they leave the device."""
    from .secagg import NAMES

    config = dict(msg.content["fitins.config"])
    names = str(config[NAMES]).split(",")
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(msg.content["fitins.parameters"], True))
    state = {n: torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for n, a in zip(names, arrays, strict=True)}
    settings = ClientSettings.from_config(dict(context.node_config))
    tensors, metrics = client_train(settings, Orders.from_config(config), state)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([tensors[n].numpy() for n in names]),
                    int(metrics["num-examples"]), {**metrics, "name": settings.name})
    return Message(compat.fitres_to_recorddict(fitres, False), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if "fitins.parameters" in msg.content.array_records:
        return _train_legacy(msg, context)
    settings, orders, state = _inputs(msg, context)
    tensors, metrics = client_train(settings, orders, state)
    arrays, layout = wire.pack({n: tensors[n] for n in state if n in tensors})  # in the order sent (DP clipping
    # subtracts the sent adapter from the reply's)
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                          "info": ConfigRecord({"name": settings.name, **layout})})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    settings, orders, state = _inputs(msg, context)
    content = RecordDict({"metrics": MetricRecord(client_evaluate(settings, orders, state)),
                          "info": ConfigRecord({"name": settings.name})})
    return Message(content, reply_to=msg)
