"""An emulated link as a TCP relay: what crosses it waits its one-way latency (+- jitter) and, given a bandwidth,
its serialization time, in each direction, in order. The testbed puts one in front of the cloud tier
(`edgefed cloud-serve`) where the kernel has no netem: the edge's gRPC calls to the cloud then pay the [cloud]
link's latency, labelled "injected" in the report.

    python -m emulation.link_relay LISTEN_HOST:PORT TO_HOST:PORT [delay_ms=10] [jitter_ms=0] [mbit=50]

Each connection gets two pump threads (one per direction): a reader stamps each chunk with the time it may
leave (after the link has serialised the chunks before it, plus the delay), a writer sends it then. Chunk
order is kept (jitter never reorders a TCP stream). An end of stream or an error on either side closes both.
"""

from __future__ import annotations

import contextlib
import queue
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

CHUNK = 64 * 1024
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Link:
    delay_ms: float = 0.0  # one-way
    jitter_ms: float = 0.0  # uniform +-
    mbit: float = 0.0  # 0: no bandwidth cap here (tbf caps the veth instead)


class Schedule:
    """When each chunk of one direction may leave (pure, apart from the jitter's random draw)."""

    def __init__(self, link: Link, rng: random.Random | None = None):
        self.link, self.rng = link, rng or random.Random()
        self._wire_free = 0.0  # when the link has sent everything queued so far
        self._last_due = 0.0

    def due(self, now: float, nbytes: int) -> float:
        lk = self.link
        start = max(now, self._wire_free)
        self._wire_free = start + (nbytes * 8 / (lk.mbit * 1e6) if lk.mbit > 0 else 0.0)
        delay = lk.delay_ms + (self.rng.uniform(-lk.jitter_ms, lk.jitter_ms) if lk.jitter_ms else 0.0)
        self._last_due = max(self._last_due, self._wire_free + max(0.0, delay) / 1e3)  # in order
        return self._last_due


def _pump(src: socket.socket, dst: socket.socket, link: Link, done: threading.Event) -> None:
    """src -> dst through the link; at the end of src's stream, dst's write side is shut."""
    q: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
    sched = Schedule(link)

    def write() -> None:
        try:
            while (item := q.get()) is not None:
                due, data = item
                time.sleep(max(0.0, due - time.monotonic()))
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            done.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        while not done.is_set() and (data := src.recv(CHUNK)):
            q.put((sched.due(time.monotonic(), len(data)), data))
    except OSError:
        done.set()
    q.put(None)
    writer.join()


def _serve_one(client: socket.socket, upstream: tuple[str, int], link: Link) -> None:
    try:
        server = socket.create_connection(upstream, timeout=CONNECT_TIMEOUT_S)
    except OSError:
        client.close()
        return
    server.settimeout(None)
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    done = threading.Event()
    ways = [threading.Thread(target=_pump, args=(a, b, link, done), daemon=True) for a, b in
            ((client, server), (server, client))]
    for t in ways:
        t.start()
    for t in ways:
        t.join()
    for s in (client, server):
        with contextlib.suppress(OSError):
            s.close()


class Relay:
    """Listens on `listen`, relays each connection to `upstream` through `link`; a daemon thread per connection."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], link: Link):
        self.upstream, self.link = upstream, link
        self.sock = socket.create_server(listen, reuse_port=False)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()

    def serve(self) -> None:
        self.sock.settimeout(0.5)  # to see stop()
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            client.settimeout(None)
            threading.Thread(target=_serve_one, args=(client, self.upstream, self.link), daemon=True).start()

    def start(self) -> Relay:
        threading.Thread(target=self.serve, name="link-relay", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def parse_argv(argv: list[str]) -> tuple[tuple[str, int], tuple[str, int], Link]:
    """LISTEN TO [delay_ms=X] [jitter_ms=X] [mbit=X] (an internal process of the testbed: no argparse here)."""
    if len(argv) < 2:
        raise ValueError("usage: python -m emulation.link_relay LISTEN_HOST:PORT TO_HOST:PORT [delay_ms=X] "
                         "[jitter_ms=X] [mbit=X]")
    opts = {}
    for arg in argv[2:]:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("delay_ms", "jitter_ms", "mbit"):
            raise ValueError(f"unknown option {arg!r} (delay_ms=, jitter_ms=, mbit=)")
        try:
            opts[key] = float(value)
        except ValueError:
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if opts[key] < 0:
            raise ValueError(f"{key}: must not be negative, got {value}")
    return _host_port(argv[0]), _host_port(argv[1]), Link(**opts)


def main(argv: list[str]) -> int:
    try:
        listen, to, link = parse_argv(argv)
    except ValueError as e:
        print(f"link relay: {e}", file=sys.stderr)
        return 2
    relay = Relay(listen, to, link)
    signal.signal(signal.SIGTERM, lambda *_: relay.stop())
    print(f"link relay on {listen[0]}:{relay.port} -> {to[0]}:{to[1]} ({link.delay_ms:g} ms one-way, "
          f"+-{link.jitter_ms:g} ms, {f'{link.mbit:g} Mbit/s' if link.mbit else 'no bandwidth cap'})", flush=True)
    try:
        relay.serve()
    except KeyboardInterrupt:
        relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
