"""FedCompass step assignment: clients of different speeds are given work that makes them return together."""

from federated.compass import assign_steps, deadline, expected_seconds


def test_a_4x_straggler_gets_a_quarter_of_the_steps_and_returns_with_the_group():
    speed = {"fast": 0.5, "mid": 1.0, "slow": 2.0}
    steps = assign_steps(speed, 16, list(speed))
    assert steps == {"fast": 16, "mid": 8, "slow": 4}
    finish = {c: speed[c] * n for c, n in steps.items()}
    assert max(finish.values()) == min(finish.values()) == expected_seconds(speed, steps) == 8.0


def test_unmeasured_clients_get_the_base_steps_and_bounds_hold():
    assert assign_steps({}, 10, ["a", "b"]) == {"a": 10, "b": 10}
    steps = assign_steps({"a": 1.0, "b": 1000.0}, 10, ["a", "b", "new"], min_steps=2)
    assert steps == {"a": 10, "b": 2, "new": 10}


def test_deadline_has_slack_overhead_and_a_cap():
    assert deadline({"a": 1.0}, {"a": 10}, fixed_s=5, slack=1.5, cap_s=100) == 20
    assert deadline({"a": 1.0}, {"a": 10}, fixed_s=5, slack=1.5, cap_s=12) == 12
    assert deadline({"a": 1.0, "b": 2.0}, {"a": 10, "b": 5}, 5, 1.5, 100, overhead_s={"a": 20, "b": 2}) == 50
    assert deadline({}, {"a": 10}, fixed_s=5, slack=1.5, cap_s=60) == 60
    assert deadline({"a": 1.0}, {"a": 10, "new": 10}, 5, 1.5, 60) == 60  # someone unmeasured: the cap


def test_a_probe_round_gives_unmeasured_clients_few_steps_and_then_the_schedule_takes_over():
    assert assign_steps({}, 16, ["a", "b"], probe_steps=4) == {"a": 4, "b": 4}
    assert assign_steps({"a": 0.5, "b": 2.0}, 16, ["a", "b", "new"], probe_steps=4) == {"a": 16, "b": 4, "new": 4}
