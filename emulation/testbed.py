"""A testbed run: scenario -> namespaces, links, caps -> a coordinator and N node agents as real processes ->
deploy -> workload through the OpenAI API while faults fire on their timeline -> report.

Everything goes through the platform's own commands (`edgefed coordinator`, `edgefed node`, `edgefed certs`,
`edgefed deploy`) and its HTTP API; the testbed only places processes, shapes their links, applies faults and
measures. Whatever happens (an error, SIGINT, SIGTERM), the run's processes, namespaces and cgroups are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx

from edge_node.model.errors import EdgefedError
from emulation.cleanup import Cleanup, run_prefix
from emulation.cloud_tier import CloudTier, exit_split
from emulation.federated_phase import run_federated
from emulation.fleet import Fleet, NodeProc
from emulation.report import console_table, write_report
from emulation.scenario import Fault, Scenario, exit_heads_path, prompts_of
from emulation.workload import plan_requests, run_workload

COORD_PORT, HTTP_PORT = 7070, 8080  # inside the coordinator's fresh namespace nothing else listens
STEP_S = 0.2


class TestbedError(EdgefedError):
    """A testbed run could not go on (a process died at start, a deploy failed)."""


@dataclass(frozen=True)
class TestbedOptions:
    out: Path
    isolate: bool | None = None  # None: namespaces and cgroups when root allows, else loopback
    heartbeat_s: float = 1.0
    lost_after_s: float = 4.0
    start_timeout_s: float = 120.0  # coordinator up, every node registered
    deploy_timeout_s: float = 300.0
    settle_s: float = 3.0  # after the last fault, before the service is asked again
    progress: bool = True


def _edgefed(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgefed", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One run's processes, addresses and records (the state the phases share)."""

    def __init__(self, sc: Scenario, opts: TestbedOptions, fleet: Fleet):
        self.sc, self.opts, self.fleet = sc, opts, fleet
        self.work = opts.out / "work"
        self.state = self.work / "state"
        self.work.mkdir(parents=True, exist_ok=True)
        loop = fleet.mode == "loopback"
        ip = fleet.ip("coordinator")
        self.node_addr = f"{ip}:{_free_port() if loop else COORD_PORT}"
        self.http_addr = f"{ip}:{_free_port() if loop else HTTP_PORT}"
        self.coordinator: NodeProc | None = None
        self.agents: dict[str, NodeProc] = {}
        self.admin_key = ""
        self.requests: list[dict] = []
        self.faults: list[dict] = []
        self.notes: list[str] = []
        self.t0 = time.monotonic()
        self.deployment: dict = {}
        self.probe_result: dict | None = None
        self.rounds: list[dict] = []
        self.final_deployments: list[dict] = []
        self.cloud: CloudTier | None = None
        self.early_exit: dict | None = None  # what each request sends, once the deploy applied the exit heads

    # --- processes -----------------------------------------------------------------------------------------
    def start_coordinator(self) -> None:
        argv = _edgefed("coordinator", "--listen", self.node_addr, "--http", self.http_addr, "--state",
                        str(self.state), "--insecure", "--heartbeat", f"{self.opts.heartbeat_s:g}", "--lost-after",
                        f"{self.opts.lost_after_s:g}")
        self.coordinator = self.fleet.start("coordinator", "coordinator", argv)
        self._wait(lambda: f"http {self.http_addr}" in self.coordinator.log.read_text(errors="replace"),
                   "the coordinator's HTTP API", [self.coordinator])

    def mint(self, *what: str) -> str:
        r = subprocess.run(_edgefed("certs", *what, "--state", str(self.state), "--json"), capture_output=True,
                           text=True, timeout=60)
        if r.returncode != 0:
            raise TestbedError(f"edgefed certs {' '.join(what)}: {r.stderr.strip()}")
        return json.loads(r.stdout)["secret"]

    def start_agents(self, token: str) -> None:
        for n in self.sc.nodes:
            argv = _edgefed("node", "--coordinator", self.node_addr, "--data-dir", str(self.work / n.name), "--token",
                            token, "--insecure", "--name", n.name, "--advertise", self.fleet.ip(n.name),
                            "--heartbeat", f"{self.opts.heartbeat_s:g}", "--backoff-max", "1", "--rpc-timeout", "5")
            self.agents[n.name] = self.fleet.start(n.name, "agent", argv)
        names = {n.name for n in self.sc.nodes}
        self._wait(lambda: names <= {n["node_id"] for n in self.admin("GET", "/admin/nodes")["data"]
                                     if n["state"] == "alive"}, "every node to register",
                   [self.coordinator, *self.agents.values()])

    def _wait(self, pred, what: str, watch: list[NodeProc]) -> None:
        deadline = time.monotonic() + self.opts.start_timeout_s
        while time.monotonic() < deadline:
            for p in watch:
                how = self.fleet.ended(p)
                if how is not None:
                    tail = p.log.read_text(errors="replace").strip().splitlines()[-3:]
                    raise TestbedError(f"{p.role} {p.name} ended ({how}) while waiting for {what}: "
                                       + " | ".join(tail))
            try:
                if pred():
                    return
            except (httpx.HTTPError, OSError, ValueError, KeyError):
                pass  # not up yet
            time.sleep(STEP_S)
        raise TestbedError(f"timed out after {self.opts.start_timeout_s:g} s waiting for {what}")

    # --- the API -------------------------------------------------------------------------------------------
    def admin(self, method: str, path: str, timeout: float = 10.0) -> dict:
        r = httpx.request(method, f"http://{self.http_addr}{path}", timeout=timeout,
                          headers={"Authorization": f"Bearer {self.admin_key}"})
        r.raise_for_status()
        return r.json()

    def start_cloud(self) -> None:
        """The cloud tier before the deploy: the edge's rank 0 is told its address."""
        self.cloud = CloudTier(self.sc, self.fleet, exit_split(self.sc), _free_port).start(
            str(Path(self.sc.model.path).resolve()))
        self.notes.append(self.cloud.link.label + f"; edge layers [0, {self.cloud.split}), cloud the rest")

    def exit_argv(self) -> list[str]:
        """`edgefed deploy`'s early-exit flags ([]: early exit off); requests then send the `early_exit` field."""
        d = self.sc.deployment
        if d.exit_heads is None:
            return []
        argv = ["--exit-heads", str(exit_heads_path(self.sc).resolve()), "--exit-threshold", f"{d.exit_threshold:g}",
                "--exit-mode", d.exit_mode]
        self.early_exit = {"mode": d.exit_mode, "threshold": d.exit_threshold}
        return argv + (["--cloud", self.cloud.address] if self.cloud is not None else [])

    def deploy(self) -> str:
        d = self.sc.deployment
        model = str(Path(self.sc.model.path).resolve())
        argv = _edgefed("deploy", "--coordinator", f"http://{self.http_addr}", "--model", model, "--nodes",
                        str(d.tensor_parallel), "--weights", d.weights, "--admin-key", self.admin_key, "--wait",
                        str(int(self.opts.deploy_timeout_s)), *self.exit_argv(), "--json")
        r = subprocess.run(argv, capture_output=True, text=True, timeout=self.opts.deploy_timeout_s + 60)
        if r.returncode != 0:
            raise TestbedError(f"edgefed deploy failed: {r.stderr.strip()[-800:]}")
        self.deployment = json.loads(r.stdout)
        for flag, on in (("onnx_prefill", d.onnx_prefill), ("window", d.window is not None),
                         ("memory_budget_mb", d.memory_budget_mb is not None)):
            if on:
                self.notes.append(f"deployment.{flag} not applied: `edgefed deploy` has no option for it yet")
        models = self.admin("GET", "/v1/models")["data"]
        return models[0]["id"]

    # --- a direct tensor-parallel probe -------------------------------------------------------------------
    def probe(self, prompt: str) -> dict | None:
        """Tensor-parallel decode run straight on the first `tensor_parallel` nodes (in their namespaces, under
        their caps and links) before the deploy: the per-token compute / comm / io-wait breakdown, which the
        API does not expose. A failed probe is a note, not the end of the run."""
        d, w = self.sc.deployment, self.sc.workload
        shards = self.work / "probe-shards"
        r = subprocess.run(_edgefed("shard", "--model", str(Path(self.sc.model.path).resolve()), "--nodes",
                                    str(d.tensor_parallel), "--weights", d.weights, "--out", str(shards), "--force"),
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            self.notes.append(f"probe not run: edgefed shard failed: {r.stderr.strip()[-300:]}")
            return None
        names = [n.name for n in self.sc.nodes[: d.tensor_parallel]]
        port = _free_port() if self.fleet.mode == "loopback" else 29600
        master = f"{self.fleet.ip(names[0])}:{port}"
        procs = [self.fleet.start(name, f"probe-rank{rank}", _edgefed(
            "tp-generate", "--shards", str(shards), "--rank", str(rank), "--master-addr", master, "--prompt", prompt,
            "--max-new-tokens", str(w.max_tokens), "--greedy", "--allreduce", d.allreduce, "--timeout", "60",
            "--json")) for rank, name in enumerate(names)]
        deadline = time.monotonic() + 300
        while any(p.proc.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(STEP_S)
        ends = [self.fleet.ended(p) or "still running after 300 s" for p in procs]
        lines = [ln for ln in procs[0].log.read_text(errors="replace").splitlines() if ln.startswith("{")]
        if any(e != "exit status 0" for e in ends) or not lines:
            self.notes.append("probe failed: " + "; ".join(f"rank {i} on {n}: {e}" for i, (n, e) in
                                                          enumerate(zip(names, ends, strict=True))))
            return None
        out = json.loads(lines[-1])
        self.notes.append(f"per-token breakdown from a direct tensor-parallel probe on {', '.join(names)} "
                          f"before the deploy ({out['tpot_ms']:.1f} ms/token, {d.allreduce} allreduce)")
        return {k: out.get(k) for k in ("ttft_ms", "tpot_ms", "per_token", "per_token_mean", "nodes", "allreduce",
                                        "per_rank_peak_rss_mb")} | {"on": names}

    # --- the workload, with the faults on their timeline ---------------------------------------------------
    def serve(self, model: str, prompts: list[str], stop: threading.Event) -> None:
        """The workload through the OpenAI API while the faults fire; then, if there were faults, as many
        requests again as run at once, to see the service answer after the last one."""
        from openai import OpenAI

        w = self.sc.workload
        client = OpenAI(base_url=f"http://{self.http_addr}/v1", api_key=self.admin_key, timeout=w.timeout_s,
                        max_retries=0)
        reqs = plan_requests(prompts, w.requests, w.max_tokens)
        faults_done = threading.Event()
        self.t0 = time.monotonic()
        total = w.requests + w.concurrency * bool(self.sc.faults)
        threads = [threading.Thread(target=self.timeline, args=(faults_done,), daemon=True, name="faults")]
        if self.opts.progress:
            threads.append(threading.Thread(target=self.progress, args=(stop, total), daemon=True, name="progress"))
        for t in threads:
            t.start()
        run_workload(client, model, reqs, w.concurrency, w.rate_per_s, self.t0, self.requests,
                     early_exit=self.early_exit)
        if self.sc.faults:
            while not faults_done.wait(STEP_S):
                pass
            time.sleep(self.opts.settle_s)
            after = plan_requests(prompts, w.concurrency, w.max_tokens, "after faults", first=len(reqs))
            run_workload(client, model, after, w.concurrency, 0.0, self.t0, self.requests,
                         early_exit=self.early_exit)

    # --- faults --------------------------------------------------------------------------------------------
    def holder(self, rank: int) -> str:
        """The node that holds `rank` of the newest running deployment (a fault given by rank, not by node)."""
        running = [d for d in self.admin("GET", "/admin/deployments")["data"] if d["state"] == "running"]
        for a in (running[-1]["assignments"] if running else []):
            if a["rank"] == rank:
                return a["node_id"]
        raise TestbedError(f"no running deployment has a rank {rank}")

    def deployments(self) -> list[dict]:
        """Every deployment the coordinator made (the deploy's and the re-plans'), with its ranks' nodes."""
        try:
            data = self.admin("GET", "/admin/deployments")["data"]
        except (httpx.HTTPError, OSError, ValueError, KeyError) as e:
            self.notes.append(f"deployments not read at the end: {e}")
            return []
        return [{"deployment_id": d["deployment_id"], "state": d["state"], "detail": d.get("detail", ""),
                 "nodes": [a["node_id"] for a in sorted(d.get("assignments", []), key=lambda a: a["rank"])]}
                for d in data]

    def apply(self, f: Fault) -> str:
        if f.kind == "kill_node":
            cg = self.fleet.cgroups.get(f.node)
            pids = cg.pids() if cg else []
            for pid in pids:  # the node's agent and its rank: every process in the node's cgroup
                _kill(pid)
            pids += self.fleet.kill(f.node)
            return f"killed {len(set(pids))} process(es) of {f.node} (SIGKILL)"
        if f.kind == "cut_link":
            if self.fleet.net is not None:
                self.fleet.net.cut(f.node)
                time.sleep(f.duration_s)
                self.fleet.net.restore(f.node)
                return f"link down for {f.duration_s:g} s, then up"
            procs = [p.proc for p in self.fleet.procs if p.name == f.node and p.proc.poll() is None]
            for p in procs:
                p.send_signal(19)  # SIGSTOP: loopback has no link to cut; a paused node is silent the same way
            time.sleep(f.duration_s)
            for p in procs:
                p.send_signal(18)  # SIGCONT
            return f"node paused for {f.duration_s:g} s (loopback: no link to cut)"
        # restart_coordinator
        self.coordinator.proc.terminate()
        self.coordinator.proc.wait(timeout=30)
        self.start_coordinator()
        return "coordinator stopped (SIGTERM) and started again"

    def timeline(self, done: threading.Event) -> None:
        for f in sorted(self.sc.faults, key=lambda f: f.at_s):
            while time.monotonic() - self.t0 < f.at_s:
                time.sleep(STEP_S)
            rec = {**asdict(f), "applied_s": round(time.monotonic() - self.t0, 3)}
            try:
                if f.rank is not None:  # resolved when it fires: a re-plan may have moved the rank
                    f = replace(f, node=self.holder(f.rank))
                    rec["node"] = f.node
                rec["result"] = self.apply(f)
            except Exception as e:  # noqa: BLE001 - a fault that cannot be applied is recorded, the run goes on
                rec["result"] = f"not applied: {e}"
            self.faults.append(rec)
        done.set()

    # --- progress ------------------------------------------------------------------------------------------
    def progress(self, stop: threading.Event, total: int) -> None:
        tty = sys.stderr.isatty()
        every = 1.0 if tty else 10.0
        while not stop.wait(every):
            mem = " ".join(f"{n.name} {self.fleet.memory_mb(n.name):.0f}/{n.memory_mb}MB" for n in self.sc.nodes)
            errs = sum(1 for r in self.requests if r.get("error"))
            split = [r["exits"] for r in self.requests if r.get("exits")]
            exits = (f" | tokens edge {sum(x['edge'] + x['fallback'] for x in split)} / cloud "
                     f"{sum(x['cloud'] for x in split)}") if self.early_exit else ""
            line = (f"[testbed {time.monotonic() - self.t0:5.1f}s] requests {len(self.requests)}/{total} "
                    f"({errs} errors){exits} | faults {len(self.faults)}/{len(self.sc.faults)} | {mem}")
            sys.stderr.write(("\r" + line + "\x1b[K") if tty else line + "\n")
            sys.stderr.flush()
        if tty:
            sys.stderr.write("\n")

    # --- the report ----------------------------------------------------------------------------------------
    def report(self, started: float, error: str | None) -> dict:
        """Every time in the report counts from the workload's start (set-up shows as negative times)."""
        shift = self.t0 - self.fleet.samples.t0
        nodes = {}
        for n in self.sc.nodes:
            agent = self.agents.get(n.name)
            cg = self.fleet.cgroups.get(n.name)
            ended = self.fleet.ended(agent) if agent else None
            ooms = cg.oom_kills() if cg else 0
            if ooms and (ended is None or "OOM" not in ended):
                ended = (ended + "; " if ended else "") + f"{ooms} process(es) killed by the kernel OOM killer " \
                                                          f"(memory cap {n.memory_mb} MB, swap off)"
            samples = self.fleet.samples.memory.get(n.name, [])
            link = self.fleet.link_bytes(n.name) or {"tx_bytes": None, "rx_bytes": None}
            nodes[n.name] = {"caps": {k: v for k, v in asdict(n).items() if k != "name"},
                             "peak_memory_mb": round(self.fleet.peak_mb(n.name), 1),
                             "memory_mb": [(round(t - shift, 3), mb) for t, mb in samples],
                             "oom_kills": ooms, "ended": ended, **link}
        run = {"scenario": self.sc.name, "source": self.sc.source, "mode": self.fleet.mode,
               "why_loopback": self.fleet.why_loopback, "latency_mode": self.fleet.latency_mode,
               "prefix": self.fleet.prefix, "wall_s": round(time.monotonic() - started, 2),
               "deployment": {k: self.deployment.get(k) for k in ("deployment_id", "state", "world")},
               "deployments": self.final_deployments,
               "error": error, "notes": self.notes}
        d = self.sc.deployment
        if d.exit_heads is not None:
            run["early_exit"] = {"heads": d.exit_heads, "threshold": d.exit_threshold, "mode": d.exit_mode,
                                 "applied": self.early_exit is not None}
        probe = self.probe_result or {}
        return {"run": run, "requests": sorted(self.requests, key=lambda r: r["index"]), "nodes": nodes,
                "faults": self.faults, "per_token": probe.get("per_token") or [], "probe": probe or None,
                "rounds": self.rounds, "cloud": self.cloud_report(shift)}

    def cloud_report(self, shift: float) -> dict | None:
        if self.cloud is None:
            return None
        samples = self.fleet.samples.memory.get("cloud", [])
        link = self.fleet.link_bytes("cloud") if self.sc.cloud.host == "cloud" else None
        return {**self.cloud.stats(), "peak_memory_mb": round(self.fleet.peak_mb("cloud"), 1),
                "memory_mb": [(round(t - shift, 3), mb) for t, mb in samples],
                **(link or {"tx_bytes": None, "rx_bytes": None})}


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _notes(sc: Scenario, fleet: Fleet) -> list[str]:
    notes = []
    if fleet.mode == "loopback":
        notes.append(f"loopback nodes ({fleet.why_loopback}): no namespaces or cgroups; memory is RSS, links are "
                     "injected (latency, jitter, bandwidth) in the ranks' transport")
    if fleet.latency_mode == "injected":
        notes.append("latency/jitter injected in the ranks' sends (edge_node.collectives; the kernel has no netem): "
                     "it applies to rank-to-rank traffic, not to the API or the node service; loss costs a lost "
                     "message a 200 ms retransmission timeout")
    return notes


def check_model(sc: Scenario) -> None:
    """The model exists and has enough key-value heads for the tensor-parallel ranks, and the exit heads say
    where the edge ends (before anything starts)."""
    cfg = Path(sc.model.path) / "config.json"
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise TestbedError(f"{sc.source}: [model] path: cannot read {cfg}: {e}") from None
    heads = raw.get("num_key_value_heads") or raw.get("num_attention_heads")
    if isinstance(heads, int) and sc.deployment.tensor_parallel > heads:
        raise TestbedError(f"{sc.source}: [deployment] tensor_parallel: {sc.deployment.tensor_parallel} ranks, but "
                           f"{sc.model.path} has {heads} key-value heads (at most {heads} ranks)")
    if sc.deployment.exit_heads is not None:
        k, layers = exit_split(sc), raw.get("num_hidden_layers")
        if isinstance(layers, int) and not 0 < k < layers:
            raise TestbedError(f"{sc.source}: [deployment] exit_heads: exit layer {k} is not inside the "
                               f"{layers}-layer model {sc.model.path}")


def run_testbed(sc: Scenario, opts: TestbedOptions) -> dict:
    """Run a scenario end to end; writes the report under opts.out and returns it."""
    check_model(sc)
    opts = replace(opts, out=opts.out.resolve())  # agents and their ranks run elsewhere: every path absolute
    prefix = run_prefix()
    started = time.monotonic()
    prompts = prompts_of(sc)
    with Cleanup(prefix) as cleanup:
        fleet = Fleet(sc, prefix, cleanup, opts.out / "logs", isolate=opts.isolate).build()
        if fleet.net is not None:
            fleet.net.open_host_access()
        run = Run(sc, opts, fleet)
        run.notes += _notes(sc, fleet)
        print(f"testbed {sc.name}: run {prefix}, {fleet.mode} nodes, report in {opts.out}", file=sys.stderr,
              flush=True)
        error = None
        stop = threading.Event()
        try:
            run.start_coordinator()
            run.admin_key = run.mint("api-key", "--admin")
            run.start_agents(run.mint("token"))
            run.probe_result = run.probe(prompts[0])
            if sc.cloud is not None:
                run.start_cloud()
            run.serve(run.deploy(), prompts, stop)
            stop.set()
            run.final_deployments = run.deployments()
            if sc.federated is not None:  # after the workload, so the two do not share the CPUs
                print(f"testbed {sc.name}: federated session ({sc.federated.rounds} round(s))", file=sys.stderr,
                      flush=True)
                run.rounds, note = run_federated(sc, run.work / "fl", cleanup)
                run.notes.append(note)
        except Exception as e:
            error = str(e)
            raise
        finally:
            stop.set()
            report = run.report(started, error)
            paths = write_report(report, opts.out)
            report = json.loads(paths["json"].read_text())
            print(console_table(report), file=sys.stderr)
            print(f"report: {paths['html']} ({paths['json'].name} and {len(paths) - 2} plots beside it)",
                  file=sys.stderr)
    return report
