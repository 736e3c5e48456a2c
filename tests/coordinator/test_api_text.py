"""Incremental detokenization and stop strings: pure, token by token, as the API streams them."""

from __future__ import annotations

import pytest

from coordinator.api_text import IncrementalDetokenizer, StopMatcher
from edge_node.model.tokenizer import Tokenizer
from tests.coordinator.conftest import DEMO


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(DEMO)


@pytest.mark.parametrize("text", ["def f(x):\n    return x  # ok", "naïve café — 東京 🙂 ünïcödé", "🙂🙂 a🙂b"])
def test_pieces_join_to_the_plain_decode_and_never_hold_half_a_character(tok, text):
    prompt = tok.encode("print(")
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok.decode, prompt)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_an_unfinished_character_at_the_end_comes_out_as_the_plain_decode_does(tok):
    ids = tok.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1, "the demo tokenizer should split an emoji into byte tokens"
    detok = IncrementalDetokenizer(tok.decode)
    assert [detok.add(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.flush() == tok.decode(ids[:-1])


def feed_all(stops, pieces):
    m = StopMatcher(stops)
    out, stopped = [], False
    for p in pieces:
        text, stopped = m.feed(p)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return "".join(out), stopped, out


@pytest.mark.parametrize("stops, pieces, want, stopped", [
    (["\n\n"], ["a", "b\n", "\nc"], "ab", True),  # split across pieces
    (["END"], ["xE", "N", "Dy"], "x", True),
    (["END"], ["xE", "N", "o"], "xENo", False),  # a partial match is released when it fails
    (["ab", "b"], ["xab"], "x", True),  # the earliest stop wins
    (["zz"], ["a", "b"], "ab", False),
    ([], ["a", "b"], "ab", False),
    (["stop"], ["stop"], "", True),
])
def test_stop_strings_cut_the_text_and_are_not_returned(stops, pieces, want, stopped):
    got, did_stop, _ = feed_all(stops, pieces)
    assert (got, did_stop) == (want, stopped)


def test_text_that_may_start_a_stop_string_is_held_back_until_it_cannot():
    _, _, out = feed_all(["END"], ["ab E", "Nx"])
    assert out[0] == "ab " and out[1] == "ENx"
