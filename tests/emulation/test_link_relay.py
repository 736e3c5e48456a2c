"""The emulated link in front of the cloud tier: a TCP relay that delays each direction by its latency and
serialization time, in order, and passes every byte and the end of the stream."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from emulation.link_relay import Link, Relay, Schedule, parse_argv


def test_schedule_adds_latency_and_serialization_in_order():
    s = Schedule(Link(delay_ms=10, mbit=8))  # 8 Mbit/s: 1 MB/s, 1000 bytes = 1 ms on the wire
    assert s.due(100.0, 1000) == pytest.approx(100.011)
    assert s.due(100.0, 1000) == pytest.approx(100.012)  # queued behind the first
    assert s.due(105.0, 0) == pytest.approx(105.010)  # the wire was idle again
    jittery = Schedule(Link(delay_ms=5, jitter_ms=5), random.Random(0))
    dues = [jittery.due(100.0 + i * 1e-4, 10) for i in range(200)]
    assert dues == sorted(dues) and all(100.0 <= d <= 100.0 + 0.02 + 0.011 for d in dues)


def test_bad_relay_arguments_are_named():
    assert parse_argv(["127.0.0.1:1", "h:2", "delay_ms=3"])[2] == Link(delay_ms=3.0)
    for argv, words in ((["127.0.0.1:1"], "usage"), (["a:1", "b:x"], "expected HOST:PORT, got 'b:x'"),
                        (["a:1", "b:2", "delay=3"], "unknown option 'delay=3'"),
                        (["a:1", "b:2", "mbit=-1"], "mbit: must not be negative")):
        with pytest.raises(ValueError, match=words):
            parse_argv(argv)


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def _recv(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "stream ended early"
        out += chunk
    return bytes(out)


def test_a_round_trip_through_the_relay_pays_the_latency_both_ways_and_keeps_every_byte():
    srv, t = _echo_server()
    relay = Relay(("127.0.0.1", 0), srv.getsockname(), Link(delay_ms=40)).start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.monotonic()
            c.sendall(b"ping")
            assert _recv(c, 4) == b"ping"
            rtt = time.monotonic() - t0
            payload = random.Random(1).randbytes(1 << 20)
            c.sendall(payload)
            assert _recv(c, len(payload)) == payload
            c.shutdown(socket.SHUT_WR)  # the end of the stream crosses too: the echo server ends, so does the relay
            assert c.recv(1) == b""
        assert 0.080 <= rtt < 0.080 + 0.5, rtt
    finally:
        relay.stop()
        srv.close()
    t.join(timeout=10)
    assert not t.is_alive()
