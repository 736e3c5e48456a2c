"""The standard-library corpus: a deterministic, disjoint split by module file, and client partitions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from emulation import corpus


def test_split_is_disjoint_and_covers_the_corpus():
    train, heldout = corpus.corpus_files("train"), corpus.corpus_files("heldout")
    assert train and heldout
    assert not set(train) & set(heldout)
    share = len(heldout) / (len(train) + len(heldout))
    assert 0.02 < share < 0.15  # about 5% by hash, plus one file per package that had none
    assert all(path.suffix == ".py" and path.is_file() for path in train + heldout)


def test_split_is_the_same_in_a_fresh_interpreter():
    # A new process has a different str-hash salt: the split must not depend on it.
    code = "from emulation import corpus; print('\\n'.join(map(str, corpus.corpus_files('heldout'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(path) for path in corpus.corpus_files("heldout")]


def test_corpus_excludes_tests_site_packages_and_generated_files():
    names = [corpus.relative_name(path) for path in corpus.corpus_files("train") + corpus.corpus_files("heldout")]
    parts = {part for name in names for part in name.split("/")[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages", "pydoc_data"}
    assert not any(name.startswith("encodings/cp1252") for name in names)
    assert "json/decoder.py" in names and "asyncio/events.py" in names


def test_files_are_sorted_and_read_as_text():
    train = corpus.corpus_files("train")
    assert list(train) == sorted(train)
    assert all(corpus.read_source(path).strip() for path in train[:20])


def test_default_partitions_are_non_empty_and_disjoint():
    parts = corpus.partitions()
    assert set(parts) == set(corpus.DEFAULT_PARTITIONS)
    heldout = set(corpus.corpus_files("heldout"))
    seen: set = set()
    for name, part in parts.items():
        assert part.name == name and part.train_files and part.heldout_files
        files = set(part.train_files) | set(part.heldout_files)
        assert not files & seen, f"{name} shares files with another partition"
        seen |= files
        # A partition's held-out files are global held-out files: the demo model never saw them.
        assert set(part.heldout_files) <= heldout
        assert not set(part.train_files) & heldout
        assert all(corpus.relative_name(p).startswith(name + "/") for p in files)


def test_partition_reads_texts_in_file_order():
    part = corpus.partitions(["json"])["json"]
    texts = part.read_texts("heldout")
    assert len(texts) == len(part.heldout_files) and all(texts)
    assert part.files("train") == part.train_files
    assert part.num_bytes("train") > 0


def test_partitions_accept_any_known_package():
    names = corpus.partition_names()
    assert "logging" in names
    assert list(corpus.partitions(["logging", "email"])) == ["logging", "email"]


def test_unknown_partition_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown corpus partition\(s\) 'nope'.*known partitions.*asyncio"):
        corpus.partitions(["json", "nope"])


def test_bad_split_name_is_an_error():
    with pytest.raises(ValueError, match="split must be"):
        corpus.corpus_files("validation")  # type: ignore[arg-type]
