"""`edgefed fl start` refuses bad input up front, with a named error and no traceback."""

import pytest

from edgefed.cli import main


@pytest.mark.parametrize("args, message", [
    (["--clients", "2", "--partitions", "json"], "--partitions names 1 package(s) for --clients 2"),
    (["--slowdown", "nobody=4"], "--slowdown names unknown client(s) nobody"),
    (["--slowdown", "json=0.5"], "--slowdown factor must be >= 1"),
    (["--rule", "ffa", "--dp-clip", "1"], "differential privacy needs rule fedavg"),
    (["--secagg", "--schedule", "compass"], "secagg needs rule fedavg and schedule sync"),
    (["--target-ppl", "50"], "target"),
    (["--probe-steps", "2"], "probe-steps (>= 0) is for schedule compass"),
])
def test_bad_flags_are_named_errors(args, message, tmp_path, capsys):
    try:
        code = main(["fl", "start", "--model", "models/edgefed-demo", "--work", str(tmp_path), *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
