"""The sliding-window scheduler: order, at most W resident, prefetch overlap, release, budget -> window."""

from __future__ import annotations

import hashlib
import time

import psutil
import pytest
import torch
from safetensors.torch import save_file

from edge_node.memory import MemoryBudgetError, ShardReader, SlidingWindow, window_for_budget
from edge_node.model.formats import parse_buffer as parse_safetensors
from edge_node.shard import ShardChecksumError, ShardFile


def make_files(tmp_path, n: int, numel: int = 1000) -> list[ShardFile]:
    files = []
    for i in range(n):
        path = tmp_path / f"layer{i}.safetensors"
        save_file({"w": torch.full((numel,), float(i)), "i8": torch.ones(3, dtype=torch.int8)}, str(path))
        data = path.read_bytes()
        files.append(ShardFile(path, 0, "layer", len(data), hashlib.sha256(data).hexdigest(), layer=i))
    return files


def build(f: ShardFile, t: dict) -> torch.nn.Module:
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(t["w"], requires_grad=False)
    m.index = f.layer
    return m


def test_reader_parses_views_of_one_buffer(tmp_path):
    f = make_files(tmp_path, 1)[0]
    t = ShardReader().read(f)
    assert t["w"].dtype == torch.float32 and t["w"].shape == (1000,) and t["i8"].dtype == torch.int8
    buf = torch.frombuffer(bytearray(f.path.read_bytes()), dtype=torch.uint8)
    assert torch.equal(parse_safetensors(buf)["w"], t["w"])


@pytest.mark.parametrize("window", [1, 2, 3, 5, None])
def test_blocks_come_in_order_across_tokens_with_at_most_w_resident(tmp_path, window):
    files = make_files(tmp_path, 5)
    sw = SlidingWindow(files, build, window)
    seen = []
    for _ in range(3):  # three "tokens"
        for block in sw.stream(5):
            seen.append(block.index)
            assert block.w[0].item() == block.index
            time.sleep(0.002)  # let the prefetcher run ahead as far as it may
            assert sw.resident <= (window or 5)
    sw.close()
    assert seen == [0, 1, 2, 3, 4] * 3
    assert sw.peak_resident <= (window or 5)
    if window and window < 5:
        assert sw.peak_resident == window  # it did prefetch up to the window
        assert sw.pinned == (window - 2 if window >= 3 else 0)
        streamed = 5 - sw.pinned
        assert sw.reader.bytes_read >= (sw.pinned + 3 * streamed) * files[0].bytes
        assert sw.streamed_bytes_per_pass == streamed * files[0].bytes
    else:
        assert sw.reader.bytes_read == 5 * files[0].bytes  # read once, kept


def test_released_blocks_are_emptied_even_if_the_consumer_keeps_them(tmp_path):
    sw = SlidingWindow(make_files(tmp_path, 4), build, 2)
    kept = list(sw.stream(4))
    sw.close()
    assert all(b.w.numel() == 0 for b in kept)


def test_io_wait_counts_time_the_consumer_waited_on_slow_reads(tmp_path):
    def slow(f, t):
        time.sleep(0.05)
        return build(f, t)

    sw = SlidingWindow(make_files(tmp_path, 3), slow, 1)
    list(sw.stream(3))
    sw.close()
    assert sw.io_wait_s > 0.1


def test_a_corrupt_file_raises_in_the_consumer_naming_it(tmp_path):
    files = make_files(tmp_path, 3)
    data = bytearray(files[1].path.read_bytes())
    data[-5] ^= 1
    files[1].path.write_bytes(bytes(data))
    sw = SlidingWindow(files, build, 1)
    with pytest.raises(ShardChecksumError, match="layer1.safetensors"):
        list(sw.stream(3))
    sw.close()


def test_rss_is_bounded_by_the_window_not_the_depth(tmp_path):
    mb16 = 4 << 20  # 16 MiB of float32 per block
    files = make_files(tmp_path, 12, mb16)
    proc = psutil.Process()
    base = proc.memory_info().rss
    sw = SlidingWindow(files, build, 2)
    peak = 0
    for _ in range(2):
        for _block in sw.stream(12):
            peak = max(peak, proc.memory_info().rss - base)
    sw.close()
    assert peak < 4 * 16 * 2**20, f"{peak / 2**20:.0f} MiB resident with a 2-block window of 16 MiB blocks"


def test_window_for_budget():
    mib = 2**20
    assert window_for_budget(1000 * mib, 100 * mib, 300 * mib, 16) == 7
    assert window_for_budget(10_000 * mib, 100 * mib, 300 * mib, 16) == 16
    with pytest.raises(MemoryBudgetError, match="not enough for one 100 MiB block"):
        window_for_budget(350 * mib, 100 * mib, 300 * mib, 16)
