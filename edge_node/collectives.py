"""Collectives for tensor-parallel ranks on torch.distributed (gloo): star or gloo allreduce, with timeouts.

The star allreduce is TPI-LLM's choice for the edge, where link latency rather than bandwidth dominates:
every rank sends its partial sum to rank 0, rank 0 adds them in rank order and sends the total back, so
each allreduce costs two link traversals whatever the number of ranks. gloo's own allreduce is the
alternative (`--allreduce gloo`). Every wait has a timeout; a rank that never joins, or dies, becomes a
`CommError` naming what was waited for, not a hang.

An emulated link (the testbed, where the kernel has no netem) delays this rank's sends: EDGEFED_LINK_DELAY_MS
(one-way latency per message), EDGEFED_LINK_JITTER_MS (uniform +-), EDGEFED_LINK_MBIT (serialization time
of the message's bytes) and EDGEFED_LINK_LOSS_PCT (per-packet loss, paid as TCP pays it: a retransmission
timeout) in the environment. See `LinkEmulation` for where each delay is taken.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

from edge_node.model.errors import EdgefedError, UsageError
from edge_node.protocol import FRAME_BYTES, Message, decode, to_frame

ALLREDUCE = ("star", "gloo")


class CommError(EdgefedError):
    """A rank did not join, or a collective did not finish, within the timeout."""


LINK_ENV = ("EDGEFED_LINK_DELAY_MS", "EDGEFED_LINK_JITTER_MS", "EDGEFED_LINK_MBIT", "EDGEFED_LINK_LOSS_PCT")
_MSS = 1448  # TCP payload bytes per packet on a 1500-byte MTU
_RTO_S = 0.2  # Linux's minimum retransmission timeout: what a lost segment costs the message


def allreduce_hops(mode: str, world: int) -> int:
    """Link traversals on an allreduce's critical path: star is up to rank 0 and back down (2, whatever the
    world); gloo's allreduce is a ring (reduce-scatter then allgather: 2 (world - 1) steps)."""
    if world < 2:
        return 0
    return 2 if mode == "star" else 2 * (world - 1)


@dataclass(frozen=True)
class LinkEmulation:
    """Software-injected link latency, jitter and bandwidth on this rank's sends ("injected" in reports).

    Each message this rank sends waits delay +- jitter, plus its bytes at `mbit`, before it goes: the star
    allreduce's partial (ranks > 0) and its sum (rank 0, once: its sends to the ranks leave in parallel),
    broadcasts from rank 0, point-to-point sends, a gather's contributions. gloo's own allreduce runs inside
    gloo's C++ transport, where no per-hop delay can be put, so every rank waits allreduce_hops("gloo", world)
    hops' worth before it: the same critical path as a ring whose every hop is delayed.
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    mbit: float | None = None
    loss_pct: float = 0.0

    @classmethod
    def from_env(cls, env=None) -> LinkEmulation | None:
        env = os.environ if env is None else env
        values: dict[str, float] = {}
        for name, key in zip(LINK_ENV, ("delay_ms", "jitter_ms", "mbit", "loss_pct"), strict=True):
            raw = env.get(name, "").strip()
            if not raw:
                continue
            try:
                values[key] = float(raw)
            except ValueError:
                raise UsageError(f"{name}={raw!r}: expected a number") from None
            if values[key] < 0 or (key == "mbit" and values[key] == 0) or (key == "loss_pct" and values[key] >= 100):
                raise UsageError(f"{name}={raw!r}: must be {'above' if key == 'mbit' else 'at least'} 0"
                                 + (" and below 100" if key == "loss_pct" else ""))
        link = cls(**values)
        return link if (link.delay_ms or link.jitter_ms or link.mbit or link.loss_pct) else None

    def hop_s(self, nbytes: int, rng: random.Random) -> float:
        """Seconds one message of `nbytes` spends on the link."""
        ms = self.delay_ms + (rng.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0)
        wire = nbytes * 8 / (self.mbit * 1e6) if self.mbit else 0.0
        lost = 0.0
        if self.loss_pct:
            packets = max(1, -(-nbytes // _MSS))
            if rng.random() < 1 - (1 - self.loss_pct / 100) ** packets:
                lost = _RTO_S  # one of its packets was lost: the message waits for the retransmission
        return max(0.0, ms / 1e3) + wire + lost


def _first_line(e: Exception, limit: int = 160) -> str:
    line = (str(e).splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit] + "..."


def route_interface(host: str) -> str:
    """The name of the local interface the kernel would use to reach `host` (a name or an IPv4 address).

    A UDP socket's connect() sends nothing: it only asks the kernel for a route, after which getsockname()
    is the source address that route uses; that address is then looked up among the local interfaces.
    """
    try:
        addr = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
    except (OSError, UnicodeError, IndexError) as e:
        raise CommError(f"cannot resolve {host!r} to an IPv4 address: {_first_line(e)}") from None
    if ipaddress.IPv4Address(addr).is_loopback:
        return "lo"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))  # any port: nothing is sent
            local = s.getsockname()[0]
    except OSError as e:
        raise CommError(f"no route to {host!r} ({addr}): {_first_line(e)}") from None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return name
    raise CommError(f"the route to {host!r} ({addr}) leaves from {local}, which no local interface holds")


class Comm:
    """One rank's view of the group: allreduce, broadcast, gather, each timed (comm_s) and bounded.

    For more than one rank, gloo talks over `iface` if given, else over the interface that routes to the
    master's host (unless GLOO_SOCKET_IFNAME is already set), instead of the one the hostname resolves to.
    """

    def __init__(self, rank: int, world: int, master: str, timeout_s: float = 60.0, allreduce: str = "star",
                 iface: str | None = None):
        if allreduce not in ALLREDUCE:
            raise UsageError(f"--allreduce must be one of {', '.join(ALLREDUCE)}, got {allreduce!r}")
        self.rank, self.world, self.mode = rank, world, allreduce
        self.timeout = timedelta(seconds=timeout_s)
        self.comm_s = 0.0
        self.iface: str | None = None
        self.link = LinkEmulation.from_env() if world > 1 else None
        self._rng = random.Random(rank)
        if world == 1:
            return
        names = sorted(psutil.net_if_addrs())
        if iface is not None and iface not in names:
            raise CommError(f"--iface {iface!r}: no such network interface here (there are: {', '.join(names)})")
        user_env = os.environ.get("GLOO_SOCKET_IFNAME")
        if iface is None and user_env:
            self.iface = user_env  # the user's own choice stands
        else:
            host = master.rpartition(":")[0].strip("[]") if ":" in master else master
            self.iface = iface or route_interface(host or "127.0.0.1")
            # torch's init_process_group("gloo") ignores pg_options: the gloo group it builds takes its device
            # from GLOO_SOCKET_IFNAME (else from the hostname's resolution), so the environment variable is the
            # one supported way in. Set in this process only, and left set so that any later gloo group
            # (new_group, monitored_barrier) uses the same interface. Only an explicit --iface replaces a value
            # the user set; the routed default never does.
            os.environ["GLOO_SOCKET_IFNAME"] = self.iface
        try:
            dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank, world_size=world,
                                    timeout=self.timeout)
        except (RuntimeError, dist.DistError) as e:
            raise CommError(f"rank {rank}: the group of {world} ranks at {master} did not form within "
                            f"{timeout_s:g} s over interface {self.iface} (is every rank started, with the same "
                            f"--master-addr? is --iface right?): "
                            f"{_first_line(e)}") from None

    def _hop(self, x: torch.Tensor, hops: int = 1) -> None:
        """The emulated link's delay for a message of x (nothing without one)."""
        if self.link is not None:
            time.sleep(sum(self.link.hop_s(x.numel() * x.element_size(), self._rng) for _ in range(hops)))

    def _wait(self, work, what: str) -> None:
        try:
            if not work.wait(self.timeout):
                raise RuntimeError("timed out")
        except RuntimeError as e:
            raise CommError(f"rank {self.rank}: {what} did not finish within {self.timeout.total_seconds():g} s "
                            f"(a rank is gone or stalled): {_first_line(e)}") from None

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over all ranks (every rank gets the same tensor back)."""
        if self.world == 1:
            return x
        t0 = time.perf_counter()
        wire = x.float().contiguous()  # gloo sums float32; also keeps bf16 partials exact in the sum
        if self.mode == "gloo":
            self._hop(wire, allreduce_hops("gloo", self.world))
            self._wait(dist.all_reduce(wire, async_op=True), "allreduce")
        else:
            self._star(wire)
        self.comm_s += time.perf_counter() - t0
        return wire.to(x.dtype)

    def _star(self, x: torch.Tensor) -> None:
        if self.rank == 0:
            parts = [torch.empty_like(x) for _ in range(self.world - 1)]
            works = [dist.irecv(p, src=r) for r, p in enumerate(parts, start=1)]
            for r, (w, p) in enumerate(zip(works, parts, strict=True), start=1):
                self._wait(w, f"star allreduce: partial from rank {r}")
                x += p  # in rank order, so the sum is the same every run
            self._hop(x)
            sends = [dist.isend(x, dst=r) for r in range(1, self.world)]
            for r, w in enumerate(sends, start=1):
                self._wait(w, f"star allreduce: send to rank {r}")
        else:
            self._hop(x)
            self._wait(dist.isend(x, dst=0), "star allreduce: send to rank 0")
            self._wait(dist.irecv(x, src=0), "star allreduce: sum from rank 0")

    def broadcast(self, x: torch.Tensor, what: str = "broadcast") -> torch.Tensor:
        """Rank 0's x, in place on every rank."""
        if self.world > 1:
            t0 = time.perf_counter()
            if self.rank == 0:
                self._hop(x)
            self._wait(dist.broadcast(x, src=0, async_op=True), what)
            self.comm_s += time.perf_counter() - t0
        return x

    def send(self, x: torch.Tensor, dst: int, what: str) -> None:
        t0 = time.perf_counter()
        self._hop(x)
        self._wait(dist.isend(x.contiguous(), dst=dst), what)
        self.comm_s += time.perf_counter() - t0

    def recv(self, x: torch.Tensor, src: int, what: str) -> torch.Tensor:
        """Fill x from rank `src`."""
        t0 = time.perf_counter()
        self._wait(dist.irecv(x, src=src), what)
        self.comm_s += time.perf_counter() - t0
        return x

    def gather(self, x: torch.Tensor, what: str = "gather") -> list[torch.Tensor] | None:
        """Every rank's x at rank 0 (None elsewhere)."""
        if self.world == 1:
            return [x]
        out = [torch.empty_like(x) for _ in range(self.world)] if self.rank == 0 else None
        if self.rank != 0:
            self._hop(x)
        self._wait(dist.gather(x, out, dst=0, async_op=True), what)
        return out

    def broadcast_message(self, msg: Message | None, what: str) -> Message:
        """Rank 0's control message (as one fixed-size frame), on every rank; the others pass None."""
        frame = to_frame(msg) if self.rank == 0 else bytes(FRAME_BYTES)
        buf = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
        return decode(self.broadcast(buf, what).numpy().tobytes())

    def gather_message(self, msg: Message, what: str) -> list[Message] | None:
        """Every rank's message at rank 0, in rank order (None elsewhere)."""
        if self.world == 1:
            return [msg]
        frames = self.gather(torch.frombuffer(bytearray(to_frame(msg)), dtype=torch.uint8), what)
        return None if frames is None else [decode(f.numpy().tobytes()) for f in frames]

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
