"""The core's event buffer and the front's log: numbered events, snapshots instead of gaps, bounded memory,
waiting readers woken, events carried with each step's outputs."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time

import pytest
from kvpilot.engine.kv_events import BlockEventBuffer, KVEventLog
from kvpilot.engine.messages import CoreOutputs


def test_first_read_is_a_snapshot_then_events_follow_in_order() -> None:
    log = KVEventLog(capacity=8)
    log.stored(1)
    log.stored(2)
    first = log.read(None, 0, 100)
    assert first.snapshot is not None and sorted(first.snapshot) == [1, 2] and first.seq == 2
    log.evicted(1)
    log.stored(3)
    after = log.read(first.epoch, first.seq, 100)
    assert after.snapshot is None and after.events == [("evicted", 1), ("stored", 3)] and after.seq == 4
    assert log.read(first.epoch, after.seq, 100).events == []


def test_limit_pages_through_without_gaps() -> None:
    log = KVEventLog(capacity=100)
    epoch = log.read(None, 0, 1).epoch
    for h in range(10):
        log.stored(h)
    seq, seen = 0, []
    while seq < log.seq:
        batch = log.read(epoch, seq, 3)
        assert batch.snapshot is None
        seen += [h for _, h in batch.events]
        seq = batch.seq
    assert seen == list(range(10))


@pytest.mark.parametrize("case", ["fell_behind", "other_epoch", "from_the_future"])
def test_resync_from_a_snapshot(case: str) -> None:
    log = KVEventLog(capacity=4)
    epoch = log.read(None, 0, 1).epoch
    for h in range(10):
        log.stored(h)
    log.evicted(0)
    since, asked_epoch = {"fell_behind": (2, epoch), "other_epoch": (9, "old"), "from_the_future": (99, epoch)}[case]
    batch = log.read(asked_epoch, since, 100)
    assert batch.snapshot is not None and sorted(batch.snapshot) == list(range(1, 10)) and batch.seq == 11
    assert log.read(epoch, batch.seq, 100).events == []


def test_a_reader_just_at_the_buffer_edge_gets_events() -> None:
    log = KVEventLog(capacity=4)
    epoch = log.read(None, 0, 1).epoch
    for h in range(6):
        log.stored(h)
    assert log.read(epoch, 2, 100).events == [("stored", h) for h in range(2, 6)]
    assert log.read(epoch, 1, 100).snapshot is not None


async def test_waiting_reader_is_woken_by_a_store_from_another_thread() -> None:
    log = KVEventLog()
    epoch = log.read(None, 0, 1).epoch
    started = time.monotonic()
    threading.Timer(0.05, log.stored, args=(7,)).start()
    await log.wait(epoch, 0, timeout_s=10.0)
    assert time.monotonic() - started < 5.0
    assert log.read(epoch, 0, 10).events == [("stored", 7)]


async def test_wait_times_out_and_returns_at_once_when_behind() -> None:
    log = KVEventLog()
    epoch = log.read(None, 0, 1).epoch
    started = time.monotonic()
    await log.wait(epoch, 0, timeout_s=0.05)
    assert time.monotonic() - started >= 0.05
    log.stored(1)
    await asyncio.wait_for(log.wait(epoch, 0, timeout_s=60.0), 5.0)
    await asyncio.wait_for(log.wait("another", 1, timeout_s=60.0), 5.0)


def test_the_core_buffer_drains_in_order_and_the_log_numbers_a_whole_step() -> None:
    buffer = BlockEventBuffer()
    buffer.stored(1)
    buffer.evicted(1)
    buffer.stored(2)
    step = buffer.drain()
    assert step == [("stored", 1), ("evicted", 1), ("stored", 2)] and buffer.drain() == []
    log = KVEventLog()
    epoch = log.read(None, 0, 1).epoch
    log.extend(step)
    log.extend([])
    assert log.seq == 3 and log.read(epoch, 0, 10).events == step
    assert log.read("other", 0, 10).snapshot == [2]


def test_block_events_cross_the_wire_with_the_step() -> None:
    batch = CoreOutputs(block_events=[("stored", 2**64 - 1), ("evicted", 5)])
    assert CoreOutputs.from_wire(pickle.loads(pickle.dumps(batch.to_wire()))).block_events == batch.block_events
