"""A thin gRPC servicer over the cloud context manager (proto/cloud.proto), and how to run it.

Each handler parses the message into plain dataclasses, calls `CloudContextManager`, and maps a `CloudError`
to a status code. Idle sessions are expired by a background timer as well as on every call.
"""

from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path

import grpc
import torch

from coordinator.cloud import CloudContextManager, CloudError, CloudLimits
from edge_node.cloud_link import SessionSpec, Upload
from edge_node.model.formats import weights_digest
from edge_node.model.load import load_model
from edge_node.rpc import cloud_pb2, cloud_pb2_grpc
from quant.codec import Encoded

STATUS = {"unknown_session": grpc.StatusCode.NOT_FOUND, "memory": grpc.StatusCode.RESOURCE_EXHAUSTED,
          "mismatch": grpc.StatusCode.FAILED_PRECONDITION, "position": grpc.StatusCode.OUT_OF_RANGE,
          "bad_payload": grpc.StatusCode.INVALID_ARGUMENT, "exists": grpc.StatusCode.ALREADY_EXISTS,
          "non_finite": grpc.StatusCode.INTERNAL}


class CloudServicer(cloud_pb2_grpc.CloudServicer):
    def __init__(self, manager: CloudContextManager):
        self.manager = manager

    def _run(self, context, fn, *args):
        try:
            return fn(*args)
        except CloudError as e:
            context.abort(STATUS.get(e.code, grpc.StatusCode.INTERNAL), str(e))

    def Open(self, request, context):
        spec = SessionSpec(request.session, request.model_digest, request.split, request.codec,
                           request.repetition_penalty or 1.0)
        self._run(context, self.manager.open, spec)
        return cloud_pb2.OpenReply()

    def Append(self, request, context):
        self._run(context, self.manager.append, upload(request))
        return cloud_pb2.AppendReply()

    def Infer(self, request, context):
        answer = self._run(context, self.manager.infer, upload(request))
        return cloud_pb2.InferReply(token=answer.token, cloud_ms=answer.cloud_ms, layer_evals=answer.layer_evals)

    def Close(self, request, context):
        self.manager.close(request.session)
        return cloud_pb2.CloseReply()

    def Stats(self, request, context):
        return cloud_pb2.StatsReply(values={k: float(v) for k, v in self.manager.metrics().items()})


def upload(msg: cloud_pb2.HiddenStates) -> Upload:
    return Upload(msg.session, msg.pos0, Encoded(msg.codec, msg.rows, msg.cols, msg.data, msg.scales),
                  tuple(msg.tokens))


def cloud_manager(model_dir: str | Path, split: int, limits: CloudLimits = CloudLimits(),
                  dtype: torch.dtype = torch.float32) -> CloudContextManager:
    """Load layers [split, L) + head of a checkpoint into a context manager."""
    model = load_model(model_dir, dtype, start=split, pack=True)
    return CloudContextManager(model, weights_digest(model_dir), limits)


class CloudServer:
    """A running gRPC server over a manager; `port` is the bound port (0 asks the OS for one)."""

    def __init__(self, manager: CloudContextManager, host: str = "127.0.0.1", port: int = 0, workers: int = 4,
                 expire_every_s: float = 5.0):
        self.manager = manager
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                                  options=[("grpc.max_receive_message_length", 64 << 20),
                                           ("grpc.max_send_message_length", 64 << 20)])
        cloud_pb2_grpc.add_CloudServicer_to_server(CloudServicer(manager), self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind the cloud tier to {host}:{port}")
        self.stopped = threading.Event()
        self.expire_every_s = expire_every_s
        self.reaper = threading.Thread(target=self._reap, daemon=True)

    def start(self) -> CloudServer:
        self.server.start()
        self.reaper.start()
        return self

    def _reap(self) -> None:
        while not self.stopped.wait(self.expire_every_s):
            self.manager.expire()

    def stop(self, grace_s: float = 1.0) -> None:
        self.stopped.set()
        self.server.stop(grace_s).wait(grace_s + 1.0)

    def wait(self) -> None:
        self.server.wait_for_termination()
