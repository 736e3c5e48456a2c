"""Wire protocol: every message survives a round trip; every malformed frame is a named ProtocolError."""

from __future__ import annotations

import json
import struct

import pytest

from edge_node.model.errors import EdgefedError
from edge_node.protocol import (
    FRAME_BYTES,
    MESSAGE_TYPES,
    VERSION,
    KVTransfer,
    Ping,
    ProtocolError,
    RankStats,
    Reset,
    Step,
    Stop,
    decode,
    encode,
    to_frame,
)

SAMPLES = [
    Step(tokens=7, pos0=12, layers=(3, 9), all_logits=True, exited=True, adapter="médical-lora"),
    KVTransfer(length=513, layers=(0, 16)),
    Stop(reason="rank 2 lost"),
    RankStats(rank=3, peak_rss_mb=812.5, bytes_read=10**12, bytes_per_pass=4096, window=2,
              disk_read_bytes=77, config_sha256="ab" * 32),
    Reset(request="req-7", exit_end=20),
    Ping(),
]


def frame(kind: int, payload: bytes, version: int = VERSION, length: int | None = None) -> bytes:
    """A hand-made frame, to send what encode() would never produce."""
    return struct.pack("<BBI", version, kind, len(payload) if length is None else length) + payload


def step_body(**changes) -> bytes:
    """A valid Step payload with some fields changed, added (a value) or removed (None)."""
    body = {"tokens": 1, "pos0": 0, "layers": [0, 2], "all_logits": False, "exited": False, "adapter": None}
    for key, value in changes.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    return json.dumps(body).encode()


def test_samples_cover_every_message_type():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_encode_and_decode(msg):
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_fixed_frame_from_any_buffer(msg):
    buf = to_frame(msg)
    assert len(buf) == FRAME_BYTES
    assert decode(buf) == decode(bytearray(buf)) == decode(memoryview(buf)) == msg


def test_header_layout_is_version_kind_and_little_endian_length():
    buf = encode(Stop())
    assert buf[0] == VERSION and buf[1] == 3
    assert struct.unpack_from("<I", buf, 2)[0] == len(buf) - 6
    assert json.loads(buf[6:]) == {"reason": "done"}
    assert [encode(m)[1] for m in SAMPLES] == [1, 2, 3, 4, 5, 6]


def test_decoded_values_have_canonical_types():
    msg = decode(frame(4, json.dumps({**json.loads(encode(SAMPLES[3])[6:]), "peak_rss_mb": 512}).encode()))
    assert isinstance(msg.peak_rss_mb, float)
    assert Step(layers=[1, 2]).layers == (1, 2)  # hashable, and equal to the decoded form
    assert decode(encode(Step(adapter=None))).adapter is None


def test_protocol_error_is_an_edgefed_error():
    assert issubclass(ProtocolError, EdgefedError)


@pytest.mark.parametrize("buf", [b"", b"\x01\x01\x00", frame(1, step_body(), length=500)],
                         ids=["empty", "3 bytes", "payload shorter than declared"])
def test_truncated_frame_is_refused(buf):
    with pytest.raises(ProtocolError, match="truncated"):
        decode(buf)


def test_message_too_big_for_a_frame_is_refused_when_encoding():
    with pytest.raises(ProtocolError, match=r"Step encodes to \d+ bytes, more than the 4096-byte frame"):
        encode(Step(adapter="x" * 5000))


def test_header_declaring_an_oversized_payload_is_refused():
    with pytest.raises(ProtocolError, match="oversized"):
        decode(frame(1, b"", length=1_000_000))


def test_wrong_version_names_both_versions():
    with pytest.raises(ProtocolError, match=f"received version 7, this node speaks {VERSION}"):
        decode(frame(1, step_body(), version=7))


def test_unknown_kind_is_refused():
    with pytest.raises(ProtocolError, match="unknown message kind 200"):
        decode(frame(200, b"{}"))


@pytest.mark.parametrize("payload, match", [
    (b"\xff\xfe", "not UTF-8 JSON"),
    (b"{not json", "not UTF-8 JSON"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b"[" * 4000, "not UTF-8 JSON"),
])
def test_payload_that_is_not_a_json_object_is_refused(payload, match):
    with pytest.raises(ProtocolError, match=match):
        decode(frame(1, payload))


@pytest.mark.parametrize("changes, match", [
    ({"pos0": "3"}, r"Step\.pos0: expected int, got str '3'"),
    ({"tokens": True}, r"Step\.tokens: expected int, got bool"),
    ({"all_logits": 1}, r"Step\.all_logits: expected bool, got int"),
    ({"layers": [0]}, r"Step\.layers: expected tuple\[int, int\]"),
    ({"layers": [0, 2.5]}, r"Step\.layers\[1\]: expected int, got float"),
    ({"adapter": 5}, r"Step\.adapter: expected str \| None"),
])
def test_wrong_field_type_names_the_field(changes, match):
    with pytest.raises(ProtocolError, match=match):
        decode(frame(1, step_body(**changes)))


def test_bool_is_not_a_float_either():
    body = {**json.loads(encode(SAMPLES[3])[6:]), "peak_rss_mb": True}
    with pytest.raises(ProtocolError, match=r"RankStats\.peak_rss_mb: expected float, got bool"):
        decode(frame(4, json.dumps(body).encode()))


def test_missing_and_unexpected_fields_are_named():
    with pytest.raises(ProtocolError, match="Step: missing fields: pos0; unexpected fields: colour"):
        decode(frame(1, step_body(pos0=None, colour="red")))


@pytest.mark.parametrize("make, match", [
    (lambda: Step(pos0=-1), r"Step\.pos0: must be >= 0"),
    (lambda: Step(tokens=-2), r"Step\.tokens: must be >= 0"),
    (lambda: Step(layers=(3, 1)), r"Step\.layers: need 0 <= a <= b"),
    (lambda: KVTransfer(length=-1), r"KVTransfer\.length: must be >= 0"),
    (lambda: KVTransfer(layers=(-1, 2)), r"KVTransfer\.layers"),
    (lambda: RankStats(rank=-1), r"RankStats\.rank: must be >= 0"),
    (lambda: Reset(exit_end=-1), r"Reset\.exit_end: must be >= 0"),
    (lambda: Step(pos0=1.0), r"Step\.pos0: expected int, got float"),
])
def test_invalid_message_cannot_be_built(make, match):
    with pytest.raises(ProtocolError, match=match):
        make()


def test_invalid_values_on_the_wire_are_refused():
    with pytest.raises(ProtocolError, match=r"Step\.pos0: must be >= 0"):
        decode(frame(1, step_body(pos0=-5)))
    with pytest.raises(ProtocolError, match=r"Step\.layers: need 0 <= a <= b"):
        decode(frame(1, step_body(layers=[3, 1])))


def test_non_finite_float_cannot_be_encoded():
    with pytest.raises(ProtocolError, match="cannot encode RankStats"):
        encode(RankStats(peak_rss_mb=float("nan")))
