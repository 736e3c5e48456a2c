"""A testbed scenario: nodes with their caps and links, the model and how it is deployed, the workload, an
optional federated session and a fault timeline, read from one TOML file into frozen dataclasses.

Validation is strict: an unknown field, a value of the wrong type or out of range, or a fault naming a node
that does not exist is a `ScenarioError` naming the file, the table and the field.
"""

from __future__ import annotations

import re
import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from edge_node.model.errors import UsageError

_NODE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")
FAULT_KINDS = ("kill_node", "cut_link", "restart_coordinator")
ALLREDUCE = ("star", "gloo")
WEIGHTS = ("float32", "bfloat16", "int8")
STRATEGIES = ("fedavg", "ffa-lora", "hetlora", "fedcompass")
EXIT_MODES = ("standalone", "collaborative")
CLOUD_HOSTS = ("coordinator", "cloud")


class ScenarioError(UsageError):
    """A scenario file is unreadable or holds a field that is unknown, mistyped or out of range."""


@dataclass(frozen=True)
class Node:
    name: str
    memory_mb: int = 1024  # memory cap (swap off)
    cpu_quota: float = 1.0  # CPUs' worth of time (0.5 = half a core)
    bandwidth_mbit: float = 100.0  # each direction of the node's link
    latency_ms: float = 0.0  # one-way delay of the node's link
    jitter_ms: float = 0.0
    loss_pct: float = 0.0


@dataclass(frozen=True)
class Model:
    path: str = "models/edgefed-demo"  # a relative path is taken from the current directory


@dataclass(frozen=True)
class Deployment:
    tensor_parallel: int = 2  # ranks
    allreduce: str = "star"
    window: int | None = None  # layer blocks resident per rank
    memory_budget_mb: float | None = None  # ... or the budget the window is derived from
    weights: str = "float32"
    onnx_prefill: bool = False
    # early exit: on when exit_heads names an exits.json (`edgefed train-exits`; relative: to the current directory)
    exit_heads: str | None = None
    exit_threshold: float = 0.9  # a token leaves when its head's max probability is strictly above this
    exit_mode: str = "standalone"  # | "collaborative": unconfident tokens go on to the [cloud] tier


@dataclass(frozen=True)
class Cloud:
    """The cloud tier (`edgefed cloud-serve`, layers [k, L) with k the heads' last exit layer) and its link."""

    host: str = "cloud"  # "cloud": a host of its own (namespace, link, caps); "coordinator": in the coordinator's
    memory_mb: int = 2048  # its own host's caps
    cpu_quota: float = 1.0
    bandwidth_mbit: float = 50.0  # its link, each direction
    latency_ms: float = 10.0  # one-way
    jitter_ms: float = 0.0
    max_mb: float = 256.0  # bound on KV + queued hidden states over all sessions
    session_ttl_s: float = 120.0  # an idle session expires after this


@dataclass(frozen=True)
class Workload:
    prompts: tuple[str, ...] = ("def fibonacci(n):",)
    prompt_file: str | None = None  # one prompt per line, used instead of `prompts`
    max_tokens: int = 16
    concurrency: int = 1
    requests: int = 4
    rate_per_s: float = 0.0  # 0: as fast as `concurrency` allows
    timeout_s: float = 120.0  # each request


@dataclass(frozen=True)
class Federated:
    rounds: int = 1
    strategy: str = "fedavg"
    clients: tuple[str, ...] = ()  # node names; empty: every node
    steps: int = 4  # local steps per round (the fastest client's)


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str
    node: str | None = None  # kill_node, cut_link: this node ("cloud": the cloud tier's own host)
    rank: int | None = None  # or the node that holds this rank of the served deployment when the fault fires
    duration_s: float = 0.0  # cut_link: how long the link stays down


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: tuple[Node, ...]
    description: str = ""
    model: Model = field(default_factory=Model)
    deployment: Deployment = field(default_factory=Deployment)
    workload: Workload = field(default_factory=Workload)
    federated: Federated | None = None
    cloud: Cloud | None = None
    faults: tuple[Fault, ...] = ()
    source: str = ""  # the file it was read from

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such scenario file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{path}: not valid TOML: {e}") from None
    return parse_scenario(raw, str(path))


def parse_scenario(raw: dict, source: str = "<scenario>") -> Scenario:
    top = {k: v for k, v in raw.items() if k not in _TABLES}
    _reject_unknown(top, Scenario, source, "top level", exclude=set(_TABLES) | {"source"})
    if "name" not in top:
        raise ScenarioError(f"{source}: top level: missing field 'name'")
    nodes_raw = raw.get("nodes")
    if not isinstance(nodes_raw, list) or not nodes_raw:
        raise ScenarioError(f"{source}: [[nodes]]: expected at least one [[nodes]] table")
    nodes = tuple(_build(Node, n, source, f"nodes[{i}]") for i, n in enumerate(nodes_raw))
    faults_raw = raw.get("faults", [])
    if not isinstance(faults_raw, list):
        raise ScenarioError(f"{source}: faults: expected [[faults]] tables")
    fed, cloud = raw.get("federated"), raw.get("cloud")
    sc = Scenario(
        name=_typed(top["name"], str, source, "top level", "name"),
        description=_typed(top.get("description", ""), str, source, "top level", "description"),
        nodes=nodes,
        model=_build(Model, raw.get("model", {}), source, "model"),
        deployment=_build(Deployment, raw.get("deployment", {}), source, "deployment"),
        workload=_build(Workload, raw.get("workload", {}), source, "workload"),
        federated=None if fed is None else _build(Federated, fed, source, "federated"),
        cloud=None if cloud is None else _build(Cloud, cloud, source, "cloud"),
        faults=tuple(_build(Fault, f, source, f"faults[{i}]") for i, f in enumerate(faults_raw)),
        source=source,
    )
    _check(sc, source)
    return sc


_TABLES = ("nodes", "model", "deployment", "workload", "federated", "cloud", "faults")


def _reject_unknown(raw: dict, cls: type, source: str, table: str, exclude: set[str] = frozenset()) -> None:
    known = {f.name for f in fields(cls)} - exclude
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ScenarioError(f"{source}: [{table}]: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")


def _build(cls: type, raw, source: str, table: str):
    if not isinstance(raw, dict):
        raise ScenarioError(f"{source}: [{table}]: expected a table, got {type(raw).__name__}")
    _reject_unknown(raw, cls, source, table)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name in raw:
            kwargs[f.name] = _typed(raw[f.name], hints[f.name], source, table, f.name)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ScenarioError(f"{source}: [{table}]: missing field {f.name!r}")
    return cls(**kwargs)


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _typed(value, hint, source: str, table: str, name: str):
    """`value` checked against the field's type hint (int, float, str, bool, X | None, tuple[str, ...])."""
    where = f"{source}: [{table}] {name}"
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)][0]
        return _typed(value, inner, source, table, name)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, args[0]) for v in value):
            what = _NAMES[args[0]].split(" ", 1)[1]  # "a string" -> "string"
            raise ScenarioError(f"{where}: expected a list of {what}s, got {value!r}")
        return tuple(value)
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str), bool: isinstance(value, bool)}[hint]
    if not ok:
        raise ScenarioError(f"{where}: expected {_NAMES[hint]}, got {value!r}")
    return float(value) if hint is float else value


def _check(sc: Scenario, source: str) -> None:
    """Ranges and cross-references."""
    def bad(table: str, name: str, why: str) -> ScenarioError:
        return ScenarioError(f"{source}: [{table}] {name}: {why}")

    names = [n.name for n in sc.nodes]
    for i, n in enumerate(sc.nodes):
        t = f"nodes[{i}]"
        if not _NODE_NAME.fullmatch(n.name):  # the agent's own rule for a node's name
            raise bad(t, "name", f"expected lowercase letters, digits and '-' (at most 40), got {n.name!r}")
        if n.name in names[:i]:
            raise bad(t, "name", f"node {n.name!r} is named twice")
        for f, low in (("memory_mb", 16), ("cpu_quota", 0.01), ("bandwidth_mbit", 0.01)):
            if getattr(n, f) < low:
                raise bad(t, f, f"must be at least {low}, got {getattr(n, f)}")
        for f in ("latency_ms", "jitter_ms"):
            if getattr(n, f) < 0:
                raise bad(t, f, f"must not be negative, got {getattr(n, f)}")
        if not 0 <= n.loss_pct < 100:
            raise bad(t, "loss_pct", f"must be in [0, 100), got {n.loss_pct}")
    d = sc.deployment
    if not 1 <= d.tensor_parallel <= len(sc.nodes):
        raise bad("deployment", "tensor_parallel", f"must be between 1 and the {len(sc.nodes)} nodes, "
                  f"got {d.tensor_parallel}")
    for name, value, allowed in (("allreduce", d.allreduce, ALLREDUCE), ("weights", d.weights, WEIGHTS)):
        if value not in allowed:
            raise bad("deployment", name, f"must be one of {', '.join(allowed)}, got {value!r}")
    if d.window is not None and d.memory_budget_mb is not None:
        raise bad("deployment", "window", "give a window or memory_budget_mb, not both")
    _check_exits(sc, bad)
    w = sc.workload
    for name in ("max_tokens", "concurrency", "requests"):
        if getattr(w, name) < 1:
            raise bad("workload", name, f"must be at least 1, got {getattr(w, name)}")
    if not w.prompts and w.prompt_file is None:
        raise bad("workload", "prompts", "give at least one prompt, or a prompt_file")
    if sc.federated is not None:
        if sc.federated.strategy not in STRATEGIES:
            raise bad("federated", "strategy", f"must be one of {', '.join(STRATEGIES)}, "
                      f"got {sc.federated.strategy!r}")
        for name in ("rounds", "steps"):
            if getattr(sc.federated, name) < 1:
                raise bad("federated", name, f"must be at least 1, got {getattr(sc.federated, name)}")
        if len(sc.federated.clients or sc.nodes) < 2:
            raise bad("federated", "clients", "a federated session needs at least 2 clients")
        for c in sc.federated.clients:
            if c not in names:
                raise bad("federated", "clients", f"no node named {c!r} (nodes: {', '.join(names)})")
    for i, f in enumerate(sc.faults):
        t = f"faults[{i}]"
        if f.kind not in FAULT_KINDS:
            raise bad(t, "kind", f"must be one of {', '.join(FAULT_KINDS)}, got {f.kind!r}")
        if f.at_s < 0 or f.duration_s < 0:
            raise bad(t, "at_s" if f.at_s < 0 else "duration_s", "must not be negative")
        if f.kind == "restart_coordinator":
            if f.node is not None or f.rank is not None:
                raise bad(t, "node" if f.node is not None else "rank", "restart_coordinator takes no node")
            continue
        if (f.node is None) == (f.rank is None):
            raise bad(t, "node", f"{f.kind} needs either a node or a rank (the node holding it), not "
                      + ("both" if f.node is not None else "neither"))
        if f.rank is not None:
            if not 0 <= f.rank < sc.deployment.tensor_parallel:
                raise bad(t, "rank", f"must be in 0..{sc.deployment.tensor_parallel - 1} "
                          f"([deployment] tensor_parallel = {sc.deployment.tensor_parallel}), got {f.rank}")
        elif f.node not in names and not (f.node == "cloud" and sc.cloud is not None and sc.cloud.host == "cloud"):
            hint = "; 'cloud' needs [cloud] host = \"cloud\"" if f.node == "cloud" else ""
            raise bad(t, "node", f"no node named {f.node!r} (nodes: {', '.join(names)}{hint})")
        if f.kind == "cut_link" and f.duration_s <= 0:
            raise bad(t, "duration_s", "cut_link needs a duration_s above 0")


def _check_exits(sc: Scenario, bad) -> None:
    d, c = sc.deployment, sc.cloud
    if d.exit_mode not in EXIT_MODES:
        raise bad("deployment", "exit_mode", f"must be one of {', '.join(EXIT_MODES)}, got {d.exit_mode!r}")
    if not 0 <= d.exit_threshold <= 1:
        raise bad("deployment", "exit_threshold", f"must be in [0, 1], got {d.exit_threshold}")
    if d.exit_heads is None and (d.exit_mode != "standalone" or c is not None):
        raise bad("deployment", "exit_heads", "early exit needs exit heads (an exits.json from `edgefed train-exits`)"
                  + (" for exit_mode collaborative" if d.exit_mode != "standalone" else " to use the [cloud] tier"))
    if d.exit_heads is not None and (d.onnx_prefill or d.window is not None or d.memory_budget_mb is not None):
        raise bad("deployment", "exit_heads", "early exit runs with every layer resident and torch prefill: drop "
                  "onnx_prefill, window and memory_budget_mb")
    if (d.exit_mode == "collaborative") != (c is not None):
        raise bad("deployment" if c is None else "cloud", "exit_mode" if c is None else "host",
                  "exit_mode collaborative needs a [cloud] table" if c is None else
                  f"a [cloud] tier serves exit_mode collaborative only, got exit_mode {d.exit_mode!r}")
    if c is None:
        return
    if c.host not in CLOUD_HOSTS:
        raise bad("cloud", "host", f"must be one of {', '.join(CLOUD_HOSTS)}, got {c.host!r}")
    if c.host == "cloud" and any(n.name == "cloud" for n in sc.nodes):
        raise bad("cloud", "host", "a node is named 'cloud': rename it or put the tier on the coordinator")
    for f, low in (("memory_mb", 64), ("cpu_quota", 0.01), ("bandwidth_mbit", 0.01), ("max_mb", 1),
                   ("session_ttl_s", 1)):
        if getattr(c, f) < low:
            raise bad("cloud", f, f"must be at least {low}, got {getattr(c, f)}")
    for f in ("latency_ms", "jitter_ms"):
        if getattr(c, f) < 0:
            raise bad("cloud", f, f"must not be negative, got {getattr(c, f)}")


def exit_heads_path(sc: Scenario) -> Path | None:
    """The deployment's exits.json (a directory: its exits.json), relative to the current directory."""
    if sc.deployment.exit_heads is None:
        return None
    path = Path(sc.deployment.exit_heads)
    return path / "exits.json" if path.is_dir() else path


def prompts_of(sc: Scenario) -> list[str]:
    """The workload's prompts (from prompt_file, relative to the scenario's directory, when given)."""
    w = sc.workload
    if w.prompt_file is None:
        return list(w.prompts)
    path = Path(w.prompt_file)
    if not path.is_absolute() and sc.source:
        path = Path(sc.source).parent / path
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise ScenarioError(f"{sc.source}: [workload] prompt_file: cannot read {path}: {e.strerror}") from None
    if not lines:
        raise ScenarioError(f"{sc.source}: [workload] prompt_file: {path} holds no prompt")
    return lines
