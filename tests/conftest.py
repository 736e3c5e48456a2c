"""Shared fixtures: tiny checkpoints made on the fly."""

import pytest

from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_checkpoint(path)
    return path
