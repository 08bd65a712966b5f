"""The shared-memory ring's bookkeeping, in one process: slots, generations, the global queue, atomic records."""

from __future__ import annotations

import os
import threading
import time
import types
from collections.abc import Iterator

import numpy as np
import pytest

from service.batching import instance as instance_module
from service.batching.instance import Instance
from service.batching.ring import (
    ALLOCATED,
    FREE,
    PIPE_BUF,
    TASK,
    Ring,
    RingSpec,
    make_pipes,
    nonblocking_reader,
    write_all,
)


@pytest.fixture
def ring() -> Iterator[Ring]:
    spec = RingSpec(u8_slots=6, f32_slots=2, frontends=2, instances=1)
    ring = Ring.create(spec, make_pipes(spec.frontends))
    yield ring
    ring.close()


def test_alloc_takes_all_or_nothing_and_bumps_generations(ring: Ring) -> None:
    first = ring.alloc(4, floats=False, holder=1)
    assert first is not None and len(set(first)) == 4 and all(s < 6 for s in first)
    assert all(ring.state[s] == ALLOCATED and ring.holder[s] == 1 and ring.gen[s] == 1 for s in first)
    assert ring.alloc(3, floats=False, holder=0) is None  # only 2 left: nothing taken
    rest = ring.alloc(2, floats=False, holder=0)
    assert rest is not None and set(rest).isdisjoint(first)
    ring.release(first)
    assert all(ring.state[s] == FREE and ring.holder[s] == -1 for s in first)
    again = ring.alloc(4, floats=False, holder=0)
    assert again is not None and sorted(again) == sorted(first)
    assert all(ring.gen[s] == 2 for s in again)  # a late record about the first use is recognisably stale


def test_float_slots_are_their_own_pool(ring: Ring) -> None:
    slots = ring.alloc(2, floats=True, holder=0)
    assert slots is not None and sorted(slots) == [6, 7]
    assert ring.pixels(slots[0]).dtype == np.float32 and ring.pixels(slots[0]).shape == (3, 224, 224)
    assert ring.alloc(1, floats=True, holder=0) is None
    assert ring.alloc(1, floats=False, holder=0) is not None


def test_queue_depth_is_the_unread_records(ring: Ring) -> None:
    assert ring.queued() == 0
    write_all(ring.pipes.task_w.fileno(), b"".join(TASK.pack(i, 1, 0, 0, 1.0, 0.0) for i in range(5)))
    assert ring.queued() == 5
    data = os.read(ring.pipes.task_r.fileno(), 2 * TASK.size)
    assert [t[0] for t in TASK.iter_unpack(data)] == [0, 1]
    assert ring.queued() == 3


def test_large_writes_split_on_record_boundaries(ring: Ring) -> None:
    count = 3 * PIPE_BUF // TASK.size  # more than one atomic chunk
    write_all(ring.pipes.task_w.fileno(), b"".join(TASK.pack(i, 0, 0, 0, 0.0, 0.0) for i in range(count)))
    seen = []
    while len(seen) < count:
        data = os.read(ring.pipes.task_r.fileno(), 7 * TASK.size)
        assert len(data) % TASK.size == 0
        seen += [t[0] for t in TASK.iter_unpack(data)]
    assert seen == list(range(count))


def test_instance_errors_and_model_description_round_trip(ring: Ring) -> None:
    assert ring.info() is None
    ring.publish_info({"name": "LeViT_128S", "engine": "eager"})
    assert ring.info() == {"name": "LeViT_128S", "engine": "eager"}
    ring.set_instance_error(0, "checkpoint x.pth is not a readable checkpoint")
    assert ring.instance_error(0) == "checkpoint x.pth is not a readable checkpoint"


def _gatherer(ring: Ring, max_batch: int, delay_s: float) -> Instance:
    """The model process's gathering step alone (no model): its ring, its task pipe, its batch limits."""
    instance = Instance.__new__(Instance)
    instance.ring, instance.task_fd = ring, ring.pipes.task_r.fileno()
    instance.gather_fd = nonblocking_reader(instance.task_fd)
    instance.max_batch, instance.gather_s = max_batch, delay_s
    return instance


def test_a_batch_waits_for_images_still_being_decoded(ring: Ring) -> None:
    """Two images of front-end 1 are being decoded: the model process takes them into its batch."""
    gatherer = _gatherer(ring, max_batch=8, delay_s=30.0)
    ring.decoding[1] = 2

    def decoded() -> None:
        time.sleep(0.05)
        write_all(ring.pipes.task_w.fileno(), b"".join(TASK.pack(i, 1, 1, 0, 1e9, 0.0) for i in (3, 4)))
        ring.decoding[1] -= 2

    thread = threading.Thread(target=decoded)
    thread.start()
    extra = gatherer.gather(have=1)
    thread.join()
    assert [t[0] for t in TASK.iter_unpack(extra)] == [3, 4]
    assert ring.queued() == 0


def test_nothing_being_decoded_means_no_wait(ring: Ring) -> None:
    """The count is zero (a lone request): gather looks once, briefly, and returns what is there."""
    gatherer = _gatherer(ring, max_batch=8, delay_s=30.0)
    write_all(ring.pipes.task_w.fileno(), TASK.pack(5, 1, 0, 0, 1e9, 0.0))
    assert [t[0] for t in TASK.iter_unpack(gatherer.gather(have=1))] == [5]
    assert gatherer.gather(have=2) == b""  # returns although the 30 s delay is far from over


def test_gathering_never_blocks_on_records_another_instance_took(ring: Ring, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two model processes gather from one pipe: the record one was told is ready is gone when it reads. Its
    batch still leaves on time: a blocking read there held its images until the next request arrived, which in
    a closed loop whose requests it held was never (4 requests ended as 504 after 10 s at 8 clients)."""
    first, second = _gatherer(ring, max_batch=8, delay_s=0.2), _gatherer(ring, max_batch=8, delay_s=0.2)
    ring.decoding[0] = 1  # still decoding: the first keeps looking until its delay is over
    write_all(ring.pipes.task_w.fileno(), TASK.pack(7, 1, 0, 0, 1e9, 0.0))
    taken = os.read(second.gather_fd, 8 * TASK.size)  # the second empties the pipe...
    always_ready = types.SimpleNamespace(select=lambda r, w, x, timeout: (r, w, x))
    monkeypatch.setattr(instance_module, "select", always_ready)  # ...after the first's select said "ready"
    result: list[bytes] = []
    worker = threading.Thread(target=lambda: result.append(first.gather(have=1)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "gather blocked on an empty pipe"
    assert result == [b""] and [t[0] for t in TASK.iter_unpack(taken)] == [7]


def test_gathering_stops_at_a_full_batch_and_leaves_the_rest_queued(ring: Ring) -> None:
    gatherer = _gatherer(ring, max_batch=3, delay_s=30.0)
    ring.decoding[0] = 4  # still decoding: only the batch limit ends the wait
    write_all(ring.pipes.task_w.fileno(), b"".join(TASK.pack(i, 1, 0, 0, 1e9, 0.0) for i in range(4)))
    assert [t[0] for t in TASK.iter_unpack(gatherer.gather(have=1))] == [0, 1]
    assert ring.queued() == 2


def test_a_pair_splits_with_an_idle_follower_and_takes_half_while_it_is_busy() -> None:
    """service.batching.pair, both sides in one process over a real segment and real pipes."""
    from service.batching.pair import Pair
    from service.batching.ring import DOWN, QUEUED, READY, TAKEN

    spec = RingSpec(u8_slots=8, f32_slots=0, frontends=1, instances=2)
    ring = Ring.create(spec, make_pipes(spec.frontends, spec.instances))
    try:
        ring.instance_state[:] = READY
        ring.instance_epoch[:] = (3, 5)
        lead, follower = Pair(ring, 0, 3, threads=2), Pair(ring, 1, 5, threads=2)
        live = [(slot, 1, 0, 1e9, 0.0) for slot in range(6)]
        ring.state[:6] = TAKEN
        assert lead.read_limit(16) == 16
        keep, threads = lead.share(live)
        assert [s for s, *_ in keep] == [0, 1, 2] and threads == 1
        assert ring.instance_busy[1] == 1 and lead.read_limit(16) == 8  # the follower computes: half a batch
        assert lead.share(live[:2]) == (live[:2], 1)  # nothing more handed to a busy follower
        data, handed = follower.wait_handed(ring.pipes.task_r.fileno(), 16 * TASK.size)
        assert handed and [t[0] for t in TASK.iter_unpack(data)] == [3, 4, 5]
        assert all(ring.owner[s] == 1 and ring.owner_epoch[s] == 5 and ring.state[s] == TAKEN for s in (3, 4, 5))
        assert follower.share(live[3:]) == (live[3:], 1)
        follower.done()
        assert lead.read_limit(16) == 16 and lead.share(live[:1]) == (live[:1], 2)  # a lone image: all threads
        ring.instance_state[1] = DOWN
        ring.instance_busy[1] = 1  # a follower killed mid-half leaves its flag set
        assert lead.read_limit(16) == 16 and lead.share(live) == (live, 2)  # alone: whole batches, all threads
        ring.instance_state[:] = (DOWN, READY)  # the lead is down: the follower reads the queue itself
        ring.state[7] = QUEUED
        write_all(ring.pipes.task_w.fileno(), TASK.pack(7, 1, 0, 0, 1e9, 0.0))
        data, handed = follower.wait_handed(ring.pipes.task_r.fileno(), 16 * TASK.size)
        assert not handed and [t[0] for t in TASK.iter_unpack(data)] == [7]
        assert follower.share(live) == (live, 2)
    finally:
        ring.close()
