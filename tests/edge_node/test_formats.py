"""edgefed's one safetensors reader/writer and checksum: what it writes, it reads back; what is corrupt,
it names, whether read from disk or parsed in a buffer."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from edge_node.model.errors import CheckpointError
from edge_node.model.formats import (
    ChecksumError,
    parse_buffer,
    read_header,
    sha256_file,
    verify_sha256,
    write_streaming,
    write_tensors,
)


def _buffer(path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def test_written_tensors_read_back_from_disk_and_from_a_buffer(tmp_path):
    tensors = {"w": torch.randn(5, 3), "q": torch.randint(-127, 127, (4, 64), dtype=torch.int8),
               "b": torch.randn(7).to(torch.bfloat16)}
    path = tmp_path / "t.safetensors"
    write_tensors(path, tensors)
    infos = read_header(path)
    assert {n: (i.dtype, i.shape) for n, i in infos.items()} == {"w": ("F32", (5, 3)), "q": ("I8", (4, 64)),
                                                                 "b": ("BF16", (7,))}
    buf = _buffer(path)
    got = parse_buffer(buf, path)
    assert all(torch.equal(got[n], tensors[n]) for n in tensors)
    assert (got["q"].data_ptr() - buf.data_ptr()) % 64 == 0  # int8 data first, 64-byte aligned in the file


def test_a_streamed_tensor_is_the_concatenation_of_its_parts(tmp_path):
    parts = [torch.randn(3, 4), torch.randn(2, 4)]
    write_streaming(tmp_path / "s.safetensors", [("e", "F32", (5, 4), lambda: parts)])
    assert torch.equal(parse_buffer(_buffer(tmp_path / "s.safetensors"))["e"], torch.cat(parts))


def test_a_streamed_tensor_with_missing_rows_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="wrote 48 bytes for 'e', expected 80"):
        write_streaming(tmp_path / "s.safetensors", [("e", "F32", (5, 4), lambda: [torch.randn(3, 4)])])


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: raw[:-8], "truncated: tensor 'w' ends at byte"),
    (lambda raw: raw[:5], "truncated safetensors file"),
    (lambda raw: struct.pack("<Q", 1 << 40) + raw[8:], "corrupt or truncated safetensors header"),
])
def test_corrupt_files_are_named_on_disk_and_in_a_buffer(tmp_path, mutate, message):
    good = tmp_path / "good.safetensors"
    write_tensors(good, {"w": torch.randn(4, 4)})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mutate(good.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        read_header(bad)
    with pytest.raises(CheckpointError, match=f"bad.safetensors: {message}"):
        parse_buffer(_buffer(bad), bad)


def test_a_header_whose_offsets_disagree_with_the_shape_is_named(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CheckpointError, match="tensor 'w' offsets disagree with its shape"):
        read_header(path)


def test_a_changed_byte_fails_the_checksum_naming_the_file(tmp_path):
    path = tmp_path / "f.safetensors"
    write_tensors(path, {"w": torch.zeros(8)})
    digest = sha256_file(path)
    verify_sha256(path, digest)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=r"f.safetensors: sha256 .* does not match the manifest's"):
        verify_sha256(path, digest)
