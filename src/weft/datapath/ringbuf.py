"""A BPF ring buffer (BPF_MAP_TYPE_RINGBUF) read straight from its memory mapping, in batches.

libbpf's ``ring_buffer__poll`` calls back once per record; from Python that is a ctypes callback
(a few microseconds each) per record, which made the flow reader's ring its bottleneck. This
reader maps the ring as libbpf does and hands over every committed record at once: a few
hundred nanoseconds per record, one copy of the whole extent.

The kernel's layout (kernel/bpf/ringbuf.c, as libbpf's ringbuf.c consumes it):

- page 0 (read-write for the consumer): ``unsigned long consumer_pos`` at offset 0;
- page 1 (read-only): ``unsigned long producer_pos`` at offset 0;
- from page 2: the data area, ``max_entries`` bytes mapped twice in a row, so a record that
  wraps around the end is contiguous in the mapping.

Each record starts with an 8-byte header: ``__u32 len`` (bit 31: still being written (busy),
bit 30: discarded) and ``__u32 pg_off``; the record takes ``len + 8`` bytes rounded up to 8.
Positions only grow; a position's offset in the data area is ``pos & (max_entries - 1)``.

Ordering: the producer writes a record, then clears its busy bit (a release store); x86-64 and
arm64 loads here happen in program order relative to one another for the purposes that matter:
each header is read before the bytes of its record are copied, and the consumer position is
stored (one aligned 8-byte store) only after the copy, so the kernel never reuses bytes not yet
copied.
"""

from __future__ import annotations

import ctypes
import mmap
import select
import struct
from dataclasses import dataclass

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class Batch:
    """Records copied out of the ring: ``data`` holds them, record ``i`` is
    ``data[offsets[i]:offsets[i] + lengths[i]]`` (headers excluded, discarded records skipped)."""

    data: bytes
    offsets: list[int]
    lengths: list[int]

    def __len__(self) -> int:
        return len(self.offsets)

    def records(self) -> list[bytes]:
        data = self.data
        return [data[o:o + n] for o, n in zip(self.offsets, self.lengths, strict=True)]


class MappedRing:
    """The consumer side of one BPF ring buffer map: ``wait`` for records, ``drain`` them.
    One thread uses it."""

    def __init__(self, map_fd: int, size: int) -> None:
        """``size``: the map's max_entries (bytes of the data area, a power of two of pages)."""
        if size <= 0 or size & (size - 1) or size % mmap.PAGESIZE:
            raise ValueError(f"ring size {size} is not a power-of-two multiple of the page size")
        page = mmap.PAGESIZE
        self.size = size
        self._mask = size - 1
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            self._producer = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            self._consumer.close()
            raise
        # A ctypes view stores the position in one 8-byte write (a torn write would let the
        # kernel see a wrong amount of free space).
        self._consumer_pos: ctypes.c_uint64 | None = ctypes.c_uint64.from_buffer(self._consumer)
        self._data = memoryview(self._producer)[page:]
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def _positions(self) -> tuple[int, int]:
        assert self._consumer_pos is not None, "ring is closed"
        return self._consumer_pos.value, _U64.unpack_from(self._producer, 0)[0]

    def pending(self) -> int:
        """Bytes the producer has reserved past the consumer (committed or not)."""
        consumer, producer = self._positions()
        return producer - consumer

    def wait(self, timeout_s: float) -> bool:
        """Wait until the ring holds something (or the timeout passes): True if it does."""
        if self.pending():
            return True
        try:
            return bool(self._epoll.poll(timeout_s))
        except InterruptedError:
            return False

    def drain(self, max_records: int = 4096) -> Batch:
        """Copy out up to ``max_records`` committed records and release their space to the
        kernel. Stops at the first record still being written."""
        consumer, producer = self._positions()
        if consumer == producer:
            return Batch(b"", [], [])
        data, mask = self._data, self._mask
        start = consumer & mask
        pos = consumer
        offsets: list[int] = []
        lengths: list[int] = []
        unpack = _U32.unpack_from
        while pos < producer and len(offsets) < max_records:
            header = unpack(data, pos & mask)[0]
            if header & BUSY_BIT:
                break
            length = header & ~(BUSY_BIT | DISCARD_BIT)
            if not header & DISCARD_BIT:
                offsets.append(pos - consumer + HEADER_SIZE)
                lengths.append(length)
            pos += (length + HEADER_SIZE + 7) & ~7
        if pos == consumer:
            return Batch(b"", [], [])
        # The data area is mapped twice in a row: [start, start + extent) is contiguous.
        copied = bytes(data[start:start + (pos - consumer)])
        assert self._consumer_pos is not None
        self._consumer_pos.value = pos
        return Batch(copied, offsets, lengths)

    def close(self) -> None:
        if self._consumer_pos is None:
            return
        self._epoll.close()
        self._data.release()
        self._consumer_pos = None  # the ctypes view holds an export of the mapping: drop it first
        self._producer.close()
        self._consumer.close()
