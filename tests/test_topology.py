"""Defaults from the machine: every `0 = from the machine` setting made concrete, explicit ones kept."""

from __future__ import annotations

import pytest

from service.settings import Settings
from service.topology import plan, resolved, usable_cores


@pytest.mark.parametrize(
    ("cores", "expected"),
    [(1, (1, 1, 1)), (4, (1, 1, 4)), (8, (2, 2, 3)), (16, (4, 4, 3)), (64, (16, 16, 3))],
)
def test_cpu_defaults_keep_teams_small_and_leave_cores_to_decoding(cores: int, expected: tuple) -> None:
    t = plan(Settings(), cores=cores, device="cpu")
    assert (t.workers, t.instances, t.threads) == expected
    assert t.instances * t.threads <= cores
    assert not t.split


@pytest.mark.parametrize("cores", [2, 3])
def test_two_or_three_cores_get_a_pair_that_splits_batches_and_shares_the_threads(cores: int) -> None:
    t = plan(Settings(), cores=cores, device="cpu")
    assert (t.workers, t.instances, t.threads, t.split) == (1, 2, cores, True)
    assert resolved(Settings(), t).split_batches == "on"
    assert t.core_sets(pin=True) == ([None, None], None)  # the pair shares the cores: nothing to pin


def test_split_batches_follows_explicit_settings() -> None:
    assert not plan(Settings(split_batches="off"), cores=2, device="cpu").split
    assert not plan(Settings(instances=1), cores=2, device="cpu").split  # an explicit instance count: no pair
    on = plan(Settings(split_batches="on", threads=8), cores=16, device="cpu")
    assert (on.instances, on.threads, on.split) == (2, 8, True)
    assert resolved(Settings(), plan(Settings(), cores=16, device="cpu")).split_batches == "off"
    assert not plan(Settings(), cores=2, device="cuda").split
    with pytest.raises(ValueError, match="exactly two model instances"):
        plan(Settings(split_batches="on", instances=3), cores=8, device="cpu")


def test_gpu_gets_one_model_process_and_the_cores_go_to_front_ends() -> None:
    t = plan(Settings(), cores=16, device="cuda")
    assert (t.instances, t.threads, t.workers) == (1, 2, 7)


def test_explicit_settings_win_and_thread_kind_is_one_process() -> None:
    t = plan(Settings(workers=3, instances=2, threads=5), cores=16, device="cpu")
    assert (t.workers, t.instances, t.threads) == (3, 2, 5)
    single = plan(Settings(instance_kind="thread"), cores=8, device="cpu")
    assert (single.workers, single.instances, single.threads) == (1, 1, 8)
    with pytest.raises(ValueError, match="instance_kind=thread runs one process"):
        Settings(instance_kind="thread", workers=2)


def test_resolved_settings_have_no_automatic_values_left() -> None:
    s = resolved(Settings(), plan(Settings(), cores=16, device="cpu"))
    assert (s.workers, s.instances, s.threads) == (4, 4, 3)
    assert s.device == "cpu"  # what the plan was made for, not `auto` asked again in each process
    assert 1 <= usable_cores() <= (__import__("os").cpu_count() or 1)


def test_pinned_instances_get_their_own_cores_and_front_ends_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.topology import Topology

    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(16)))
    t = Topology("process", workers=4, instances=4, threads=3, cores=16, device="cpu")
    per, front = t.core_sets(pin=True)
    assert per == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)] and front == (12, 13, 14, 15)
    assert t.core_sets(pin=False) == ([None] * 4, None)
    full = Topology("process", workers=1, instances=2, threads=8, cores=16, device="cpu")
    assert full.core_sets(pin=True) == ([None, None], None)  # nothing left for the front-ends: no pinning
