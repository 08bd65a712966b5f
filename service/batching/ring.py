"""The shared-memory hand-off between front-end processes and model processes.

Pixels never go through a pipe: a front-end copies each decoded crop into a *slot* of one shared
memory segment and writes a 32-byte record naming the slot to the one task pipe that every model
process reads. A model process reads up to `max_batch_size` records in one `read()` (whatever is
waiting: batches form across all clients and front-ends), computes, writes the probabilities back
into the same slots and a 16-byte record to the owning front-end's result pipe.

Why pipes and not locks: a write of at most PIPE_BUF bytes to a pipe is atomic, and a read of a
multiple of the record size returns whole records, so any number of writers and readers share a
pipe without a lock that a `kill -9` could leave held. The same trick hands out free slots: a pipe
holds the free slot numbers, `alloc` reads them (non-blocking), `free` writes them back. `FIONREAD`
on the task pipe is the global queue depth, exact and free to read from any process.

Slots carry a generation number (bumped at every allocation) so that a late record about a slot
that has since been recycled is recognised and ignored; the owner instance and its epoch, so that
a front-end can fail exactly the images a dead model process had taken. Two pools share the slot
numbering: uint8 `[224,224,3]` crops (what the decoders produce) and a few float32 `[3,224,224]`
slots for v2's already-normalised `pixels` input.

A GPU model process consumes the same records: the uint8 crops are what it uploads (pinned copy,
normalisation on the device), and only probabilities come back.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import struct
import termios
from dataclasses import dataclass, field
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from model.configs import IMAGE_SIZE

NUM_CLASSES = 1000
TASK = struct.Struct("<IIIIdd")  # slot, generation, front-end id, padding, deadline, enqueued (monotonic s)
RESULT = struct.Struct("<IIii")  # slot, generation, status, instance
SLOT_ID = struct.Struct("<I")
PIPE_BUF = 4096  # POSIX minimum; Linux's value: writes up to this size are atomic
PIPE_SIZE = 1 << 20  # ask for 1 MiB pipes (Linux's default maximum for unprivileged users)
INFO_BYTES = 64 * 1024  # the model description (JSON) published by the first ready instance
ERROR_BYTES = 1024  # why an instance could not start, for the supervisor's one log line

# Slot states: who holds it and whether a record about it is still to come.
FREE, ALLOCATED, QUEUED, TAKEN, DONE = range(5)
# Result statuses.
OK, DROPPED_DEADLINE, DROPPED_CANCELLED, FAILED = range(4)
# Instance states.
DOWN, LOADING, READY = range(3)

U8_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
F32_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)


class Memory:
    """The shared segment: an anonymous memory file (memfd) that travels to spawned children as a descriptor.

    Not `/dev/shm` (multiprocessing.shared_memory): containers get a 64 MiB `/dev/shm` by default, less
    than the ring needs, and a named segment outlives a supervisor killed with -9. A memfd has no name,
    is not limited by `/dev/shm`'s size, and is freed when the last process holding it exits.
    """

    def __init__(self, size: int, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("levit-ring", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd, self.size = fd, size
        self.map = mmap.mmap(fd, size)

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_memory, (reduction.DupFd(self.fd), self.size)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def _rebuild_memory(dup: Any, size: int) -> Memory:
    return Memory(size, dup.detach())


@dataclass(frozen=True)
class RingSpec:
    """Sizes that fix the segment's layout; picklable."""

    u8_slots: int
    f32_slots: int
    frontends: int
    instances: int

    @property
    def slots(self) -> int:
        return self.u8_slots + self.f32_slots


def _layout(spec: RingSpec) -> tuple[dict[str, tuple[int, np.dtype, tuple[int, ...]]], int]:
    """Offsets of every array in the segment, each aligned to 64 bytes."""
    n = spec.slots
    fields: list[tuple[str, Any, tuple[int, ...]]] = [
        ("info_len", np.uint32, (1,)),
        ("info", np.uint8, (INFO_BYTES,)),
        ("instance_state", np.uint8, (spec.instances,)),
        ("instance_epoch", np.uint32, (spec.instances,)),
        ("instance_busy", np.uint8, (spec.instances,)),
        ("instance_error", np.uint8, (spec.instances, ERROR_BYTES)),
        ("decoding", np.int32, (spec.frontends,)),  # images each front-end is decoding now (one writer each)
        ("uploading", np.int32, (spec.frontends,)),  # admitted requests each front-end is still reading (same)
        ("gen", np.uint32, (n,)),
        ("state", np.uint8, (n,)),
        ("holder", np.int32, (n,)),
        ("owner", np.int32, (n,)),
        ("owner_epoch", np.uint32, (n,)),
        ("cancelled", np.uint8, (n,)),
        ("probs", np.float32, (n, NUM_CLASSES)),
        ("u8", np.uint8, (spec.u8_slots, *U8_SHAPE)),
        ("f32", np.float32, (spec.f32_slots, *F32_SHAPE)),
    ]
    offsets: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
    offset = 0
    for name, dtype, shape in fields:
        dtype = np.dtype(dtype)
        offsets[name] = (offset, dtype, shape)
        offset += int(np.prod(shape)) * dtype.itemsize
        offset = (offset + 63) // 64 * 64
    return offsets, offset


def segment_bytes(spec: RingSpec) -> int:
    return _layout(spec)[1]


@dataclass
class Pipes:
    """The pipes every process of one server shares (Connection objects travel to spawned children)."""

    task_r: Connection
    task_w: Connection
    free_u8_r: Connection
    free_u8_w: Connection
    free_f32_r: Connection
    free_f32_w: Connection
    results: list[tuple[Connection, Connection]]  # per front-end: (reader, writer)
    memory: Memory | None = None  # the segment itself, set by `Ring.create`
    handoff: list[tuple[Connection, Connection]] = field(default_factory=list)  # per instance: a pair's hand-offs


def make_pipes(frontends: int, instances: int = 0) -> Pipes:
    import multiprocessing as mp

    def pipe() -> tuple[Connection, Connection]:
        reader, writer = mp.Pipe(duplex=False)
        for conn in (reader, writer):
            try:
                fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
                break  # one end sets the size of the pipe
            except OSError:
                continue
        return reader, writer

    task_r, task_w = pipe()
    free_u8_r, free_u8_w = pipe()
    free_f32_r, free_f32_w = pipe()
    for conn in (free_u8_r, free_f32_r):
        os.set_blocking(conn.fileno(), False)  # an empty free list means "queue full", not "wait"
    results, handoff = [pipe() for _ in range(frontends)], [pipe() for _ in range(instances)]
    return Pipes(task_r, task_w, free_u8_r, free_u8_w, free_f32_r, free_f32_w, results, handoff=handoff)


def pipe_capacity(conn: Connection) -> int:
    return fcntl.fcntl(conn.fileno(), fcntl.F_GETPIPE_SZ)


def write_all(fd: int, data: bytes) -> None:
    """Whole records in chunks of at most PIPE_BUF bytes, so that every chunk is atomic."""
    view = memoryview(data)
    step = PIPE_BUF - PIPE_BUF % TASK.size
    while view:
        chunk = view[:step]
        written = os.write(fd, chunk)
        if written != len(chunk):  # cannot happen for a blocking pipe write <= PIPE_BUF
            raise OSError(errno.EIO, f"short pipe write ({written} of {len(chunk)} bytes)")
        view = view[step:]


def nonblocking_reader(fd: int) -> int:
    """A second, non-blocking open file description of the pipe that `fd` reads (Linux: /proc/self/fd).

    For a process that both blocks on the task pipe and takes more from it without blocking. O_NONBLOCK
    belongs to the description, which every process that inherited `fd` shares: set on `fd`, it would make
    the other model processes' blocking reads fail; and a select() then read() on a blocking `fd` blocks
    whenever another model process empties the pipe in between.
    """
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)


def unread_bytes(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


class Ring:
    """One attached view of the segment: numpy arrays over shared memory, plus the slot allocator."""

    def __init__(self, spec: RingSpec, pipes: Pipes, create: bool = False) -> None:
        self.spec = spec
        self.pipes = pipes
        if create:
            pipes.memory = Memory(segment_bytes(spec))
        assert pipes.memory is not None, "no shared segment: Ring.create makes it"
        self.memory = pipes.memory
        offsets, _ = _layout(spec)
        self.arrays: dict[str, np.ndarray] = {
            name: np.ndarray(shape, dtype, self.memory.map, offset) for name, (offset, dtype, shape) in offsets.items()
        }
        a = self.arrays
        self.gen, self.state, self.holder, self.cancelled = a["gen"], a["state"], a["holder"], a["cancelled"]
        self.owner, self.owner_epoch, self.probs = a["owner"], a["owner_epoch"], a["probs"]
        self.u8, self.f32 = a["u8"], a["f32"]
        self.instance_state, self.instance_epoch = a["instance_state"], a["instance_epoch"]
        self.instance_busy = a["instance_busy"]
        self.decoding, self.uploading = a["decoding"], a["uploading"]
        if create:
            self.holder[:] = -1
            self.owner[:] = -1
            self._fill_free_lists()

    @classmethod
    def create(cls, spec: RingSpec, pipes: Pipes) -> Ring:
        for conn, count in ((pipes.free_u8_w, spec.u8_slots), (pipes.free_f32_w, spec.f32_slots)):
            if count * SLOT_ID.size > pipe_capacity(conn):
                raise ValueError(f"{count} slots do not fit the free list pipe ({pipe_capacity(conn)} bytes)")
        return cls(spec, pipes, create=True)

    def _fill_free_lists(self) -> None:
        ids = np.arange(self.spec.slots, dtype="<u4")
        write_all(self.pipes.free_u8_w.fileno(), ids[: self.spec.u8_slots].tobytes())
        write_all(self.pipes.free_f32_w.fileno(), ids[self.spec.u8_slots :].tobytes())

    # --- header ---------------------------------------------------------------------------------------------

    def publish_info(self, info: dict[str, Any]) -> None:
        data = json.dumps(info).encode()
        if len(data) > INFO_BYTES:
            raise ValueError(f"model description is {len(data)} bytes, over {INFO_BYTES}")
        self.arrays["info"][: len(data)] = np.frombuffer(data, np.uint8)
        self.arrays["info_len"][0] = len(data)

    def info(self) -> dict[str, Any] | None:
        length = int(self.arrays["info_len"][0])
        return json.loads(bytes(self.arrays["info"][:length])) if length else None

    def set_instance_error(self, index: int, message: str) -> None:
        data = message.encode()[: ERROR_BYTES - 1]
        row = self.arrays["instance_error"][index]
        row[:] = 0
        row[: len(data)] = np.frombuffer(data, np.uint8)

    def instance_error(self, index: int) -> str:
        return bytes(self.arrays["instance_error"][index]).rstrip(b"\0").decode(errors="replace")

    def any_instance_ready(self) -> bool:
        return bool((self.instance_state == READY).any())

    # --- slots ----------------------------------------------------------------------------------------------

    def alloc(self, count: int, floats: bool, holder: int) -> list[int] | None:
        """`count` free slots of one pool, or None (nothing taken) when fewer are free."""
        reader = (self.pipes.free_f32_r if floats else self.pipes.free_u8_r).fileno()
        try:
            data = os.read(reader, count * SLOT_ID.size)
        except BlockingIOError:
            return None
        slots = [s for (s,) in SLOT_ID.iter_unpack(data)]
        if len(slots) < count:
            self.release(slots)
            return None
        for slot in slots:
            self.gen[slot] += 1
            self.holder[slot] = holder
            self.cancelled[slot] = 0
            self.owner[slot] = -1
            self.state[slot] = ALLOCATED
        return slots

    def release(self, slots: list[int]) -> None:
        """Back to their free lists."""
        u8 = [s for s in slots if s < self.spec.u8_slots]
        f32 = [s for s in slots if s >= self.spec.u8_slots]
        for slot in slots:
            self.state[slot] = FREE
            self.holder[slot] = -1
        for ids, conn in ((u8, self.pipes.free_u8_w), (f32, self.pipes.free_f32_w)):
            if ids:
                write_all(conn.fileno(), b"".join(SLOT_ID.pack(s) for s in ids))

    def pixels(self, slot: int) -> np.ndarray:
        return self.u8[slot] if slot < self.spec.u8_slots else self.f32[slot - self.spec.u8_slots]

    def decoding_total(self) -> int:
        """Images admitted by the front-ends and being decoded: they will be queued within milliseconds."""
        return int(self.decoding.sum())

    def uploading_total(self) -> int:
        """Requests the front-ends admitted and are still reading or parsing: one image each, until decoding."""
        return int(self.uploading.sum())

    def queued(self) -> int:
        """Images waiting for a model process, across every front-end."""
        return unread_bytes(self.pipes.task_r.fileno()) // TASK.size

    def close(self) -> None:
        """Drop every view of the segment (an exported buffer cannot be unmapped), then the segment."""
        self.arrays.clear()
        for name, value in list(vars(self).items()):
            if isinstance(value, np.ndarray):
                setattr(self, name, None)
        self.memory.close()
