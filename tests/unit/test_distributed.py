"""The pieces of ``illusion_probe.distributed`` that hold in one process (``tests/integration/test_torchrun.py``
runs two): shards that partition the work, collectives that are the identity alone, and the reservoir
invariant that makes the gathered sample equal one process's."""

from __future__ import annotations

import pytest
import torch

import illusion_probe as ip
from illusion_probe.distributed import World, agree, all_gather, all_reduce, broadcast, gather_interleaved, timeout_s
from illusion_probe.errors import IllusionProbeError
from illusion_probe.simplify.reservoir import Reservoir


@pytest.mark.parametrize("n", [0, 1, 5, 64, 1001])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_blocks_and_interleaved_shares_partition_the_items(n, size):
    items = list(range(n))
    blocks = [items[World(rank, size).block(n)] for rank in range(size)]
    assert sum(blocks, []) == items  # contiguous, in order, disjoint, covering
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    shares = [items[World(rank, size).interleaved(n)] for rank in range(size)]
    assert sorted(sum(shares, [])) == items
    assert all(share == items[rank::size] for rank, share in enumerate(shares))


def test_alone_every_collective_is_the_identity():
    here = ip.distributed.world()
    assert here == World() and here.is_main and not here.is_distributed
    tensor = torch.arange(4.0)
    assert all_reduce(tensor) is tensor and torch.equal(tensor, torch.arange(4.0))
    assert broadcast(tensor) is tensor
    [(tensors, meta)] = all_gather({"x": tensor}, {"a": [1]})
    assert torch.equal(tensors["x"], tensor) and meta == {"a": [1]}
    assert gather_interleaved({"x": tensor}, 4)["x"] is tensor
    agree(None)
    with pytest.raises(IllusionProbeError, match="the problem"):
        agree(IllusionProbeError("the problem"))


def test_a_bad_timeout_is_one_line(monkeypatch):
    monkeypatch.setenv("ILLUSION_PROBE_TIMEOUT_S", "soon")
    with pytest.raises(IllusionProbeError, match="ILLUSION_PROBE_TIMEOUT_S='soon'"):
        timeout_s()
    monkeypatch.setenv("ILLUSION_PROBE_TIMEOUT_S", "12.5")
    assert timeout_s() == 12.5


def test_reservoirs_of_consecutive_blocks_keep_the_sample_of_the_whole_stream():
    """A process's reservoir skips the keys of the rows before its block; the smallest keys of all blocks, in
    block order, are then the very sample one reservoir keeps over the whole stream (what combine() does)."""
    rows = torch.randn(5000, 3, generator=torch.Generator().manual_seed(0))
    whole = Reservoir(700, seed=4)
    for batch in rows.split(333):
        whole.add(batch)
    blocks = [Reservoir(700, seed=4, offset=start) for start in (0, 1800)]
    for reservoir, block in zip(blocks, (rows[:1800], rows[1800:]), strict=True):
        for batch in block.split(250):
            reservoir.add(batch)
    merged = Reservoir(700, seed=4)
    for reservoir in blocks:
        reservoir._shrink()
        merged._rows.append(reservoir._rows[0])
        merged._keys.append(reservoir._keys[0])
    assert torch.equal(merged.samples(), whole.samples())
