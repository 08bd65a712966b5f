"""The shared-memory ring's bookkeeping, in one process: slots, generations, the global queue, atomic records."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from service.batching.ring import (
    ALLOCATED,
    FREE,
    PIPE_BUF,
    TASK,
    Ring,
    RingSpec,
    make_pipes,
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
