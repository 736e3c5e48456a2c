"""Shared fixtures: tiny checkpoints made on the fly."""

import os

# As in edgefed/cli.py: idle OpenMP workers sleep, so multi-process tests on 2 cores do not stall.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from tests.checkpoints import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_checkpoint(path)
    return path
