"""Two CPU model processes that split batches (`LEVIT_SPLIT_BATCHES`): the default on 2 and 3 cores.

Why: one model process with a two-thread OpenMP team stalls whenever anything else runs on a core. The
team meets at a barrier after each of a forward's hundreds of parallel regions, so a decoding thread that
preempts one team thread stops both: beside one decoding thread busy 30% of the time, a forward of 16
took 88 ms instead of 52 (docs/benchmarks.md). Two single-thread halves of a batch share no barrier: a
decoder slows the half it preempts and nothing else.

How: the *lead* (instance 0) alone reads the shared task queue. It splits a batch of two or more with the
*follower* (instance 1) when the follower is ready and idle: the follower's half goes through the
follower's own hand-off pipe, already marked taken by the follower (so a follower killed mid-half has
its images failed by the front-ends like any model process's), and each half runs on half the threads.
A lone image, or a batch while the follower is down, runs on all `LEVIT_THREADS` threads; while the
follower is busy the lead takes at most half a batch, on half the threads. While the lead is down the
follower reads the queue itself, so one surviving process keeps serving.

Not decided by whether front-ends are decoding when a batch starts: at 32 clients they rarely are at that
instant (the previous batch's clients are only getting their answers) but are for most of the forward;
splitting only then left 16-image batches unsplit and lost the gain (docs/benchmarks.md). The price is at 8
clients, where a team would have had the cores to itself: 2-5% there.
"""

from __future__ import annotations

import os
import select

from service.batching.ring import READY, TAKEN, TASK, Ring, write_all

Live = tuple[int, int, int, float, float]  # a record being computed: slot, generation, front-end, deadline, enqueued
LEAD, FOLLOWER = 0, 1
LEAD_POLL_S = 0.1  # how often an idle follower checks whether the lead is still up


class Pair:
    """One side of the pair, in its model process."""

    def __init__(self, ring: Ring, index: int, epoch: int, threads: int) -> None:
        assert len(ring.pipes.handoff) == 2 and index in (LEAD, FOLLOWER)
        self.ring, self.index, self.epoch = ring, index, epoch
        self.partner = 1 - index
        self.threads, self.half_threads = threads, max(1, threads // 2)
        self.handoff_r = ring.pipes.handoff[index][0].fileno()
        self.partner_w = ring.pipes.handoff[self.partner][1].fileno()
        ring.instance_busy[index] = 0  # a restarted follower starts idle

    @property
    def follows(self) -> bool:
        return self.index == FOLLOWER

    def _partner_up(self) -> bool:
        return bool(self.ring.instance_state[self.partner] == READY)

    def read_limit(self, max_batch: int) -> int:
        """Records the lead may take now: half a batch while the follower computes the other half."""
        if self._partner_up() and self.ring.instance_busy[self.partner]:
            return max(1, max_batch // 2)
        return max_batch

    def wait_handed(self, task_fd: int, size: int) -> tuple[bytes, bool]:
        """The follower's read: its hand-off pipe; the shared queue too once the lead is down.
        Returns the records and whether they were handed over (already taken for this process)."""
        while True:
            fds = [self.handoff_r] if self._partner_up() else [self.handoff_r, task_fd]
            ready, _, _ = select.select(fds, [], [], LEAD_POLL_S)
            if self.handoff_r in ready:
                return os.read(self.handoff_r, size), True
            if task_fd in ready:
                return os.read(task_fd, size), False

    def share(self, live: list[Live]) -> tuple[list[Live], int]:
        """The lead hands the second half of `live` to an idle follower. Returns what this process computes
        and on how many threads."""
        ring = self.ring
        if not self._partner_up():
            return live, self.threads  # alone, whichever side
        if self.index == FOLLOWER or ring.instance_busy[self.partner]:
            return live, self.half_threads  # the other half is being computed beside this one
        if len(live) < 2:
            return live, self.threads
        keep, give = live[: len(live) // 2], live[len(live) // 2 :]
        epoch = ring.instance_epoch[self.partner]
        for slot, *_ in give:
            ring.owner_epoch[slot] = epoch
            ring.owner[slot] = self.partner
            ring.state[slot] = TAKEN
        ring.instance_busy[self.partner] = 1
        write_all(self.partner_w, b"".join(TASK.pack(slot, gen, frontend, 0, deadline, enqueued)
                                           for slot, gen, frontend, deadline, enqueued in give))  # fmt: skip
        return keep, self.half_threads

    def done(self) -> None:
        """The follower answered its half: the lead may hand it the next."""
        self.ring.instance_busy[self.index] = 0
