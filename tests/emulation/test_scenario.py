"""Scenario TOML -> frozen dataclasses; every mistake is an error naming the file, the table and the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from emulation.scenario import ScenarioError, load_scenario, prompts_of

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"

GOOD = """
name = "t"
[deployment]
tensor_parallel = 2
[[nodes]]
name = "a"
memory_mb = 512
latency_ms = 5
[[nodes]]
name = "b"
cpu_quota = 1
[[faults]]
at_s = 3
kind = "kill_node"
node = "b"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["default", "home-wifi-4-laptops", "wired-8-boards", "heterogeneous-3"])
def test_shipped_scenarios_load(name):
    sc = load_scenario(SCENARIOS / f"{name}.toml")
    assert sc.name == name
    assert 1 <= sc.deployment.tensor_parallel <= len(sc.nodes)
    for f in sc.faults:
        assert f.node is None or f.node in [n.name for n in sc.nodes]


def test_good_scenario_is_frozen_and_typed(tmp_path):
    sc = load_scenario(write(tmp_path, GOOD))
    assert [n.name for n in sc.nodes] == ["a", "b"]
    assert sc.node("a").memory_mb == 512 and sc.node("a").latency_ms == 5.0
    assert isinstance(sc.node("b").cpu_quota, float)  # an integer where a number is wanted is fine
    assert sc.faults[0].kind == "kill_node" and sc.faults[0].at_s == 3.0
    assert sc.federated is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        sc.nodes[0].memory_mb = 1  # type: ignore[misc]


def test_unknown_field_names_file_table_and_field(tmp_path):
    p = write(tmp_path, GOOD.replace("memory_mb = 512", "memory_mib = 512"))
    with pytest.raises(ScenarioError, match=r"s\.toml: \[nodes\[0\]\]: unknown field 'memory_mib'"):
        load_scenario(p)
    with pytest.raises(ScenarioError, match=r"\[deployment\]: unknown field 'tp'"):
        load_scenario(write(tmp_path, GOOD.replace("tensor_parallel = 2", "tp = 2")))
    with pytest.raises(ScenarioError, match=r"\[top level\]: unknown field 'nmae'"):
        load_scenario(write(tmp_path, "nmae = 'x'\n" + GOOD))


def test_wrong_type_names_the_field_and_the_value(tmp_path):
    with pytest.raises(ScenarioError, match=r"s\.toml: \[nodes\[0\]\] memory_mb: expected an integer, got '512'"):
        load_scenario(write(tmp_path, GOOD.replace("memory_mb = 512", "memory_mb = \"512\"")))
    with pytest.raises(ScenarioError, match=r"\[nodes\[1\]\] cpu_quota: expected a number, got True"):
        load_scenario(write(tmp_path, GOOD.replace("cpu_quota = 1", "cpu_quota = true")))
    bad = GOOD + "[workload]\nprompts = \"one prompt\"\n"
    with pytest.raises(ScenarioError, match=r"\[workload\] prompts: expected a list of strings"):
        load_scenario(write(tmp_path, bad))


def test_fault_naming_an_unknown_node(tmp_path):
    with pytest.raises(ScenarioError, match=r"\[faults\[0\]\] node: no node named 'c' \(nodes: a, b\)"):
        load_scenario(write(tmp_path, GOOD.replace('node = "b"', 'node = "c"')))
    with pytest.raises(ScenarioError, match=r"\[faults\[0\]\] kind: must be one of"):
        load_scenario(write(tmp_path, GOOD.replace('kind = "kill_node"', 'kind = "explode"')))
    cut = GOOD.replace('kind = "kill_node"', 'kind = "cut_link"')
    with pytest.raises(ScenarioError, match=r"\[faults\[0\]\] duration_s: cut_link needs"):
        load_scenario(write(tmp_path, cut))


def test_fault_by_rank(tmp_path):
    sc = load_scenario(write(tmp_path, GOOD.replace('node = "b"', "rank = 1")))
    assert sc.faults[0].rank == 1 and sc.faults[0].node is None
    with pytest.raises(ScenarioError, match=r"\[faults\[0\]\] rank: must be in 0\.\.1 .*got 2"):
        load_scenario(write(tmp_path, GOOD.replace('node = "b"', "rank = 2")))
    with pytest.raises(ScenarioError, match=r"\[faults\[0\]\] node: kill_node needs either a node or a rank .* both"):
        load_scenario(write(tmp_path, GOOD.replace('node = "b"', 'node = "b"\nrank = 0')))
    with pytest.raises(ScenarioError, match=r"\[faults\[0\]\] node: kill_node needs .* neither"):
        load_scenario(write(tmp_path, GOOD.replace('node = "b"', "")))


def test_ranges_and_references(tmp_path):
    with pytest.raises(ScenarioError, match=r"\[deployment\] tensor_parallel: must be between 1 and the 2 nodes"):
        load_scenario(write(tmp_path, GOOD.replace("tensor_parallel = 2", "tensor_parallel = 3")))
    with pytest.raises(ScenarioError, match=r"\[nodes\[1\]\] name: node 'a' is named twice"):
        load_scenario(write(tmp_path, GOOD.replace('name = "b"', 'name = "a"')))
    with pytest.raises(ScenarioError, match=r"\[nodes\[0\]\] loss_pct: must be in \[0, 100\)"):
        load_scenario(write(tmp_path, GOOD.replace("latency_ms = 5", "loss_pct = 100")))
    fed = GOOD + "[federated]\nclients = [\"a\", \"zz\"]\n"
    with pytest.raises(ScenarioError, match=r"\[federated\] clients: no node named 'zz'"):
        load_scenario(write(tmp_path, fed))
    with pytest.raises(ScenarioError, match=r"\[federated\] clients: a federated session needs at least 2"):
        load_scenario(write(tmp_path, GOOD + "[federated]\nclients = [\"a\"]\n"))
    with pytest.raises(ScenarioError, match=r"\[nodes\[0\]\] name: expected lowercase letters"):
        load_scenario(write(tmp_path, GOOD.replace('name = "a"', 'name = "Node_A"')))


def test_missing_file_bad_toml_and_missing_nodes(tmp_path):
    with pytest.raises(ScenarioError, match=r"nope\.toml: no such scenario file"):
        load_scenario(tmp_path / "nope.toml")
    with pytest.raises(ScenarioError, match=r"s\.toml: not valid TOML"):
        load_scenario(write(tmp_path, "name = \n"))
    with pytest.raises(ScenarioError, match=r"\[\[nodes\]\]: expected at least one"):
        load_scenario(write(tmp_path, "name = 'x'\n"))
    with pytest.raises(ScenarioError, match=r"\[nodes\[0\]\]: missing field 'name'"):
        load_scenario(write(tmp_path, "name = 'x'\n[[nodes]]\nmemory_mb = 64\n"))


def test_prompt_file_is_read_relative_to_the_scenario(tmp_path):
    (tmp_path / "prompts.txt").write_text("first\n\nsecond\n")
    sc = load_scenario(write(tmp_path, GOOD + "[workload]\nprompt_file = \"prompts.txt\"\n"))
    assert prompts_of(sc) == ["first", "second"]


EXITS = GOOD.replace("tensor_parallel = 2", 'tensor_parallel = 2\nexit_heads = "h.json"\nexit_threshold = 0.5\n'
                     'exit_mode = "collaborative"') + "[cloud]\nhost = \"cloud\"\nlatency_ms = 20\n"


def test_early_exit_and_the_cloud_tier(tmp_path):
    sc = load_scenario(write(tmp_path, EXITS))
    d, c = sc.deployment, sc.cloud
    assert (d.exit_heads, d.exit_threshold, d.exit_mode) == ("h.json", 0.5, "collaborative")
    assert c.host == "cloud" and c.latency_ms == 20.0 and c.bandwidth_mbit == 50.0 and c.max_mb == 256.0
    standalone = load_scenario(write(tmp_path, EXITS.split("[cloud]")[0].replace("collaborative", "standalone")))
    assert standalone.cloud is None and standalone.deployment.exit_mode == "standalone"
    assert load_scenario(write(tmp_path, GOOD)).deployment.exit_heads is None  # early exit off by default
    shipped = load_scenario(SCENARIOS / "default.toml")
    assert shipped.deployment.exit_mode == "collaborative" and shipped.cloud is not None
    assert (SCENARIOS.parent / shipped.deployment.exit_heads).is_file()


@pytest.mark.parametrize("old, new, words", [
    ("latency_ms = 20\n", "latency = 20\n", r"\[cloud\]: unknown field 'latency' \(known: bandwidth_mbit, "),
    ('host = "cloud"', 'host = "moon"', r"\[cloud\] host: must be one of coordinator, cloud, got 'moon'"),
    ("latency_ms = 20", "latency_ms = -1", r"\[cloud\] latency_ms: must not be negative, got -1.0"),
    ("latency_ms = 20", "max_mb = 0", r"\[cloud\] max_mb: must be at least 1, got 0.0"),
    ("latency_ms = 20", "session_ttl_s = '1m'", r"\[cloud\] session_ttl_s: expected a number, got '1m'"),
    ('exit_mode = "collaborative"', 'exit_mode = "cloudy"', r"\[deployment\] exit_mode: must be one of standalone, "
                                                            r"collaborative, got 'cloudy'"),
    ('exit_mode = "collaborative"', 'exit_mode = "standalone"', r"\[cloud\] host: a \[cloud\] tier serves exit_mode "
                                                                r"collaborative only"),
    ("exit_threshold = 0.5", "exit_threshold = 1.5", r"\[deployment\] exit_threshold: must be in \[0, 1\], got 1.5"),
    ('exit_heads = "h.json"', "exit_heads = 3", r"\[deployment\] exit_heads: expected a string, got 3"),
    ('exit_heads = "h.json"', "", r"\[deployment\] exit_heads: early exit needs exit heads .* for exit_mode "
                                  r"collaborative"),
    ('exit_heads = "h.json"', 'exit_heads = "h.json"\nonnx_prefill = true', r"\[deployment\] exit_heads: early exit "
                                                                            r"runs with every layer resident"),
])
def test_a_wrong_early_exit_or_cloud_field_is_named(tmp_path, old, new, words):
    assert old in EXITS
    with pytest.raises(ScenarioError, match=r"s\.toml: " + words):
        load_scenario(write(tmp_path, EXITS.replace(old, new)))


def test_collaborative_needs_a_cloud_table_and_the_cloud_host_name_is_free(tmp_path):
    with pytest.raises(ScenarioError, match=r"\[deployment\] exit_mode: exit_mode collaborative needs a \[cloud\]"):
        load_scenario(write(tmp_path, EXITS.split("[cloud]")[0]))
    clash = EXITS.replace('name = "b"', 'name = "cloud"').replace('node = "b"', 'node = "cloud"')
    with pytest.raises(ScenarioError, match=r"\[cloud\] host: a node is named 'cloud'"):
        load_scenario(write(tmp_path, clash))
    assert load_scenario(write(tmp_path, clash.replace('host = "cloud"', 'host = "coordinator"'))).cloud.host == \
        "coordinator"


def test_a_fault_may_hit_the_cloud_tier_on_its_own_host(tmp_path):
    cut = EXITS.replace('kind = "kill_node"\nnode = "b"', 'kind = "cut_link"\nnode = "cloud"\nduration_s = 5')
    assert load_scenario(write(tmp_path, cut)).faults[0].node == "cloud"
    with pytest.raises(ScenarioError, match=r"\[faults\[0\]\] node: no node named 'cloud' \(nodes: a, b; 'cloud' "
                                            r"needs \[cloud\] host = \"cloud\"\)"):
        load_scenario(write(tmp_path, cut.replace('host = "cloud"', 'host = "coordinator"')))
