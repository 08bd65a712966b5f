"""A model process (one "instance", as Triton calls them): load, warm, then run batches from the ring.

The loop is deliberately dumb: a blocking `read()` on the shared task pipe returns every record that is
waiting, up to `max_batch_size` (an idle instance starts on the first image at once, unless front-ends are
still decoding more: then it gathers them first; a busy system hands a freed instance a full batch).
Expired and cancelled images are answered without compute.
All model work happens in this process's main thread: one OpenMP team of `threads` workers
(see `service.batching.batcher.model_thread` for why one thread matters).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import time

import numpy as np
import torch

from model.transforms import batch_input, normalize
from service import metrics
from service.batching.launch import InstanceSpec, die_with_parent
from service.batching.pair import Live, Pair
from service.batching.ring import (
    DONE,
    DROPPED_CANCELLED,
    DROPPED_DEADLINE,
    FAILED,
    LOADING,
    OK,
    QUEUED,
    READY,
    RESULT,
    TAKEN,
    TASK,
    Ring,
    nonblocking_reader,
    write_all,
)
from service.settings import Settings
from service.threads import name_os_thread

log = logging.getLogger(__name__)
LINEARS_WAIT_S = 600.0  # how long a model process waits for the first one's pick of linears (a cold build)
GATHER_POLL_S = 0.002  # how often a gathering model process looks at the front-ends' decoding counts


class Instance:
    def __init__(self, spec: InstanceSpec) -> None:
        from service.runtime import ModelRuntime

        self.spec = spec
        self.index = spec.index
        self.epoch = spec.epoch
        self.ring = Ring(spec.ring, spec.pipes)
        self.ring.instance_state[self.index] = LOADING
        self.runtime = ModelRuntime.warm(self._same_linears(spec.settings))
        self.engine = self.runtime.engine
        self.max_batch = spec.settings.max_batch_size
        self.gather_s = spec.settings.max_batch_delay_ms / 1000
        self.task_fd = spec.pipes.task_r.fileno()
        self.gather_fd = nonblocking_reader(self.task_fd)
        self.result_fds = [reader_writer[1].fileno() for reader_writer in spec.pipes.results]
        split = spec.settings.split_batches == "on"
        self.pair = Pair(self.ring, self.index, self.epoch, spec.settings.threads) if split else None
        if self.ring.info() is None:
            self.ring.publish_info(self.runtime.describe())
        self.ring.instance_state[self.index] = READY

    def _same_linears(self, settings: Settings) -> Settings:
        """With `LEVIT_LINEARS=auto`, every model process runs the linear layers the first one to start picked.

        Why: processes that time the candidates at once disturb each other's timings (a pair on 2 cores picked
        MKL where one process alone picked oneDNN), and processes running different kernels give answers that
        differ in the last digits depending on which one computed an image. Instance 0 times them; the others
        wait for its published description (at most LINEARS_WAIT_S, then time them themselves); a restarted
        process finds the description already there.
        """
        if settings.linears != "auto":
            return settings
        deadline = time.monotonic() + LINEARS_WAIT_S
        while (info := self.ring.info()) is None and self.index > 0 and time.monotonic() < deadline:
            if self.ring.instance_error(0):
                break  # the first process failed to start: the supervisor is stopping the server
            time.sleep(0.1)
        picked = (info or {}).get("linears")
        return settings.model_copy(update={"linears": picked}) if picked in ("onednn", "mkl") else settings

    def serve(self) -> None:
        record = TASK.size
        pair = self.pair
        while True:
            limit, handed = self.max_batch, False
            if pair and pair.follows:
                data, handed = pair.wait_handed(self.task_fd, limit * record)
            else:
                limit = pair.read_limit(limit) if pair else limit
                data = os.read(self.task_fd, limit * record)
            if not data:
                return  # every writer is gone: the server is shutting down
            if not handed and len(data) < limit * record and self.gather_s > 0 and self.ring.decoding_total():
                data += self.gather(len(data) // record, limit)
            live, answers = self._take(data, handed)
            if pair:
                live, threads = pair.share(live)
                if threads != torch.get_num_threads():
                    torch.set_num_threads(threads)
            if live:
                status = self._forward([slot for slot, *_ in live])
                for slot, gen, frontend, *_ in live:
                    self.ring.state[slot] = DONE
                    answers.setdefault(frontend, []).append(RESULT.pack(slot, gen, status, self.index))
            for frontend, records in answers.items():
                _write_results(self.result_fds[frontend], b"".join(records))
            if handed:
                pair.done()

    def _take(self, data: bytes, handed: bool) -> tuple[list[Live], dict[int, list[bytes]]]:
        """Claim the records' images for this process; answer the expired and cancelled ones at once.

        Handed-over records (`service.batching.pair`) were claimed for this process by the lead already.
        """
        ring, now = self.ring, time.monotonic()
        live, answers = [], {}
        for slot, gen, frontend, _, deadline, enqueued in TASK.iter_unpack(data):
            if ring.gen[slot] != gen:
                continue  # recycled by a front-end
            if handed:
                if ring.state[slot] != TAKEN or ring.owner[slot] != self.index or ring.owner_epoch[slot] != self.epoch:
                    continue  # handed to this process's previous life: the front-ends failed it
            elif ring.state[slot] != QUEUED:
                continue  # abandoned by a front-end that died
            ring.owner_epoch[slot] = self.epoch
            ring.owner[slot] = self.index
            ring.state[slot] = TAKEN
            if deadline <= now:  # first: a front-end also cancels the images whose deadline it saw pass
                status = DROPPED_DEADLINE
            elif ring.cancelled[slot]:
                status = DROPPED_CANCELLED
            else:
                live.append((slot, gen, frontend, deadline, enqueued))
                metrics.QUEUE_WAIT.observe(now - enqueued)
                continue
            metrics.IMAGES_DROPPED.labels("cancelled" if status == DROPPED_CANCELLED else "deadline").inc()
            answers.setdefault(frontend, []).append(RESULT.pack(slot, gen, status, self.index))
        return live, answers

    def gather(self, have: int, limit: int | None = None) -> bytes:
        """More records for a batch of `have`, while front-ends are still decoding images (at most the batch
        delay): they are milliseconds from the queue, and a batch started without them would hold the cores
        (and slow their decoding) until it ends, then run again for a handful: at 8 clients on 2 cores, batches
        of 4 instead of 8. A lone request finds nothing being decoded and never waits here.
        """
        record, extra, limit = TASK.size, b"", limit or self.max_batch
        deadline = time.monotonic() + self.gather_s
        decoding = True
        while have < limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # the last decode's record is written just after its count drops: one short look once it is zero
            ready, _, _ = select.select([self.gather_fd], [], [], min(remaining, GATHER_POLL_S if decoding else 0.0005))
            chunk = self._read_more((limit - have) * record) if ready else None
            if chunk == b"":
                break  # every writer is gone
            if chunk:
                extra += chunk
                have += len(chunk) // record
            elif not decoding:
                break
            decoding = self.ring.decoding_total() > 0
        return extra

    def _read_more(self, size: int) -> bytes | None:
        """Up to `size` bytes of whole records without blocking; None if another model process took them first."""
        try:
            return os.read(self.gather_fd, size)
        except BlockingIOError:
            return None

    def _forward(self, slots: list[int]) -> int:
        ring = self.ring
        try:
            start = time.perf_counter()
            if all(s < ring.spec.u8_slots for s in slots):  # the usual case: one gather, one normalisation pass
                batch = normalize(torch.from_numpy(ring.u8[np.asarray(slots)]))
            else:
                batch = batch_input([torch.from_numpy(ring.pixels(s).copy()) for s in slots])
            probs = self.engine(batch).softmax(dim=-1)
            ring.probs[np.asarray(slots)] = probs.cpu().numpy()  # off a GPU here, not in the front-end
            metrics.MODEL_FORWARD.observe(time.perf_counter() - start)
            metrics.BATCH_SIZE.observe(len(slots))
            metrics.IMAGES_CLASSIFIED.inc(len(slots))
            return OK
        except Exception:
            log.exception("model failed on a batch of %d images", len(slots))
            return FAILED


def _write_results(fd: int, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError):  # cannot happen: the supervisor keeps every read end open
        write_all(fd, data)


def main(spec: InstanceSpec) -> None:
    """Entry point of a spawned model process."""
    from service import logs

    die_with_parent()
    if spec.cores:
        os.sched_setaffinity(0, spec.cores)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the supervisor, which orders the stop
    settings = spec.settings
    logs.configure(settings.log_level, settings.log_format)
    name_os_thread(f"levit-model-{spec.index}")
    torch.set_num_threads(settings.threads)
    from service.server import STARTUP_ERRORS

    try:
        instance = Instance(spec)
    except STARTUP_ERRORS as error:  # the supervisor logs it once (every instance fails alike) and stops
        Ring(spec.ring, spec.pipes).set_instance_error(spec.index, str(error))
        sys.exit(1)
    except BaseException as error:
        Ring(spec.ring, spec.pipes).set_instance_error(spec.index, repr(error))
        raise
    log.info("model instance %d ready (pid %d, %d threads)", spec.index, os.getpid(), settings.threads)
    instance.serve()
