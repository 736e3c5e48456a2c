"""A SuperNode whose ClientApp stays loaded between messages.

Flower 1.41 runs a ClientApp as one `flwr-clientapp` process per message: with `--isolation subprocess` (the
default) the SuperNode's own SuperExec spawns it, and it imports torch, transformers and peft and loads the base
model again for every round (30-60 s on a shared 2-core machine, against seconds of training). With
`--isolation process` the SuperNode leaves its tasks to an executor started beside it; this module is that
executor, and it serves every task in one long-lived process, the way `flwr-clientapp` serves one: acquire the
task from the SuperNode's Runtime API, pull its message, context and FAB, install the FAB, load its ClientApp
(a module imported once stays imported), run it, push the reply and the task's status and context. What stays
warm between tasks is the ClientApp's modules and federated.task's kept peft model and token blocks.

`run_supernode` is the process the device agent supervises (federated.runner.supernode_spec): it starts
`flower-supernode --isolation process` as its child, in its own process group (one SIGTERM to the group stops
both), serves tasks one at a time (a SuperNode handles one message at a time anyway), and exits with the
SuperNode's status when the SuperNode ends.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often an idle executor asks the SuperNode for a task (Flower's SuperExec: 1 s)
HTTP_GIVE_UP_S = 30.0  # a Runtime API call retried on transport errors for at most this long
PULL_GIVE_UP_S = 900.0  # a message's tensors not all at the SuperNode after this long: the task fails


def _retry_invoker():
    """Retries on transport errors for HTTP_GIVE_UP_S, gives up at once on an HTTP error status. (Flower's
    make_simple_http_retry_invoker retries forever and SIGINTs its own process on a 401: right for a one-task
    process, wrong for one serving many.)"""
    import httpx
    from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential

    transport = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError,
                 httpx.ConnectTimeout, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)
    return RetryInvoker(wait_gen_factory=lambda: exponential(max_delay=5), recoverable_exceptions=transport,
                        max_tries=None, max_time=HTTP_GIVE_UP_S)


def _client(address: str, token: str | None = None):
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors, retry_invoker=_retry_invoker())


def pull_task_input(client):
    """flwr.supernode.runtime.run_clientapp.pull_task_input with a short retry backoff. The SuperNode hands out
    a task as soon as a message's header arrives and fetches its tensors from the SuperLink after; Flower's pull
    retries an object not there yet after 1, 2, 4, 8, 10 ... s, which a fresh ClientApp process (seconds to
    start) rarely meets, but a warm one asking at once waits 15 s of backoff per round for a transfer of
    about one."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message came with the task from the SuperNode's Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, max_time=PULL_GIVE_UP_S, initial_backoff=0.05, backoff_cap=0.5)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's: the deflated message lacks its id
    return message, context, run, fab


def run_task(address: str, token: str) -> tuple[str, dict[str, float]]:
    """Serve one ClientApp task (what `flwr-clientapp --token` does, without exiting); returns its sub-status
    and the seconds its phases took (pull: message in; run: the ClientApp; push: reply and status out)."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    client = _client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    times, t0 = {}, time.monotonic()
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        times["pull"] = time.monotonic() - t0
        install_from_fab(fab.content, skip_prompt=True)  # unpacked once per FAB hash; later calls check and return
        app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
            run.fab_id, run.fab_version, fab.hash_str)
        t1 = time.monotonic()
        reply = app(message=message, context=context)
        times["run"] = time.monotonic() - t1
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # the reply carries the error, as flwr-clientapp's does; the process serves on
        log.exception("ClientApp raised an exception")
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) else \
            ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        t2 = time.monotonic()
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception:
            log.exception("failed to push the reply message")
            status, details = SubStatus.FAILED, "failed to push the reply message"
        finally:
            push_task_output(client=client, context=context, sub_status=status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            times["push"] = time.monotonic() - t2
    return status, times


def serve(address: str, stop: threading.Event, poll_s: float = POLL_S) -> None:
    """Acquire and serve the SuperNode's ClientApp tasks one at a time until `stop` is set."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    client = _client(address)
    try:
        while not stop.is_set():
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as e:  # the SuperNode is gone or restarting: its supervisor sees that; keep asking
                log.warning("acquiring a task failed: %s", e)
                stop.wait(1.0)
                continue
            if res.HasField("task") and res.token:
                t0 = time.monotonic()
                status, times = run_task(address, res.token)
                log.info("task %d (run %d): %s in %.1f s (%s)", res.task.task_id, res.task.run_id, status,
                         time.monotonic() - t0, ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
            else:
                stop.wait(poll_s)
    finally:
        client.close()


def warm_up() -> None:
    """Import what a round needs (flwr's ClientApp runtime, torch, transformers, peft, bitsandbytes) before the
    first message comes, so round 1 does not pay for it either."""
    import federated.client_app  # noqa: F401
    from federated import models

    models.lora_config(1)  # imports peft (after bitsandbytes, quietly)
    import transformers  # noqa: F401


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def run_supernode(supernode_argv: Sequence[str], runtime_api: str, start_timeout_s: float = 120.0) -> int:
    """Run `flower-supernode ... --isolation process` (`supernode_argv`, its Runtime API on `runtime_api`) as a
    child and serve its ClientApp tasks in this process; returns the SuperNode's exit status (0 when stopped by
    SIGTERM / SIGINT, which also stops the child)."""
    from edge_node.supervisor import dies_with_parent

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API request otherwise
    stop = threading.Event()
    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        stopping.set()
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    child = subprocess.Popen(dies_with_parent(supernode_argv), stdin=subprocess.DEVNULL)
    worker = None
    try:
        t0 = time.monotonic()
        while not _listening(runtime_api):
            if child.poll() is not None or stopping.is_set():
                return 0 if stopping.is_set() else child.returncode
            if time.monotonic() - t0 > start_timeout_s:
                log.error("the SuperNode's Runtime API is not listening on %s after %.0f s", runtime_api,
                          start_timeout_s)
                return 1
            time.sleep(0.2)

        def work() -> None:
            warm_up()
            serve(runtime_api, stop)

        worker = threading.Thread(target=work, name="clientapp", daemon=True)
        worker.start()
        while child.poll() is None and not stopping.is_set():
            if not worker.is_alive():
                log.error("the ClientApp executor ended; stopping the SuperNode")
                return 1
            time.sleep(0.2)
        return 0 if stopping.is_set() else child.returncode
    finally:
        stop.set()
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
        if worker is not None:
            worker.join(2.0)  # a task mid-way is abandoned (its reply never comes; the server's deadline holds)
