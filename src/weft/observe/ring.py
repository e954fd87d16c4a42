"""The node's flow ring: the last N responses (flows and lost-event notices), each numbered.

Readers ask for what came after a sequence number (a cursor). A follower that fell further
behind than the ring holds is told how many it missed (a ``HUBBLE_RING_BUFFER`` lost event),
never silently skipped. One writer (the agent's event reader) and any number of readers:
every method takes the lock. Compact flows (:class:`weft.observe.flow.EventFlow`) are held as
they are and turned into response dicts only when a reader looks at them.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from weft.observe.flow import EventFlow

DEFAULT_CAPACITY = 4095


@dataclass(frozen=True)
class ReadResult:
    items: list[dict[str, Any]]
    cursor: int  # the sequence number to continue after
    missed: int  # items the cursor's holder never saw: overwritten before it asked


class FlowRing:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"flow ring capacity {capacity} must be at least 1")
        self.capacity = capacity
        self._items: deque[tuple[int, Any]] = deque(maxlen=capacity)  # (seq, response dict or EventFlow)
        self._next_seq = 1  # the number the next item gets
        self._lock = threading.Lock()

    def append(self, item: Any) -> int:
        with self._lock:
            seq = self._next_seq
            self._items.append((seq, item))
            self._next_seq += 1
            return seq

    def extend(self, items: list[Any]) -> None:
        with self._lock:
            seq = self._next_seq
            self._items.extend(zip(range(seq, seq + len(items)), items, strict=True))
            self._next_seq = seq + len(items)

    @property
    def total(self) -> int:
        """Items ever appended."""
        return self._next_seq - 1

    def __len__(self) -> int:
        return len(self._items)

    def read(self, after: int | None = None, keep: Callable[[dict[str, Any]], bool] = lambda _i: True,
             first: int | None = None, last: int | None = None) -> ReadResult:
        """Items with a sequence number above ``after`` (None: all held) that ``keep`` accepts;
        ``first``/``last`` limit to the oldest/newest that many of those."""
        with self._lock:
            snapshot = list(self._items)
            cursor = self._next_seq - 1
        oldest = snapshot[0][0] if snapshot else cursor + 1
        missed = 0
        if after is not None:
            if after > cursor:  # a cursor from before an agent restart: start over
                after = 0
            missed = max(0, oldest - after - 1) if after > 0 else 0
            snapshot = [(seq, item) for seq, item in snapshot if seq > after]
        snapshot = [(seq, item.response() if type(item) is EventFlow else item) for seq, item in snapshot]
        chosen = [item for _seq, item in snapshot if keep(item)]
        if first is not None:
            chosen = chosen[:first]
            # Continue after the last item handed out, not after everything looked at.
            if len(chosen) == first and chosen:
                cursor = next(seq for seq, item in snapshot if item is chosen[-1])
        elif last is not None:
            chosen = chosen[-last:] if last else []
        return ReadResult(chosen, cursor, missed)
