"""Typed views of BPF maps: hash maps behave like mappings; per-CPU arrays are summed."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from typing import Generic, TypeVar

from weft.datapath import libbpf

K = TypeVar("K", bound=ctypes.Structure | ctypes.c_uint32)
V = TypeVar("V", bound=ctypes.Structure)


class BpfHashMap(Generic[K, V]):
    """A hash map of ctypes keys and values. Iteration tolerates entries deleted mid-walk (the
    next-key call restarts from the beginning when the current key vanished, and keys already
    seen are skipped)."""

    def __init__(self, fd: int, key_type: type[K], value_type: type[V], owns_fd: bool = False) -> None:
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self._owns_fd = owns_fd

    @classmethod
    def open_pinned(cls, path: str, key_type: type[K], value_type: type[V]) -> BpfHashMap[K, V]:
        return cls(libbpf.obj_get(path), key_type, value_type, owns_fd=True)

    def get(self, key: K) -> V | None:
        value = self.value_type()
        return value if libbpf.map_lookup(self.fd, key, value) else None

    def __setitem__(self, key: K, value: V) -> None:
        libbpf.map_update(self.fd, key, value)

    def delete(self, key: K) -> bool:
        return libbpf.map_delete(self.fd, key)

    def keys(self) -> Iterator[K]:
        seen: set[bytes] = set()
        prev: K | None = None
        while True:
            nxt = self.key_type()
            if not libbpf.map_next_key(self.fd, prev, nxt):
                return
            raw = bytes(nxt)  # type: ignore[call-overload]
            if raw in seen:
                # The kernel restarted the walk (our previous key was deleted): skip what we saw.
                prev = nxt
                continue
            seen.add(raw)
            yield nxt
            prev = nxt

    def items(self) -> Iterator[tuple[K, V]]:
        for key in self.keys():
            value = self.get(key)
            if value is not None:  # deleted since the walk saw its key
                yield key, value

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def close(self) -> None:
        if self._owns_fd:
            os.close(self.fd)
            self._owns_fd = False


class PerCpuArray(Generic[V]):
    """A per-CPU array; reads return the value summed over all possible CPUs, field by field."""

    def __init__(self, fd: int, value_type: type[V], max_entries: int, owns_fd: bool = False) -> None:
        self.fd = fd
        self.value_type = value_type
        self.max_entries = max_entries
        self.ncpus = libbpf.num_possible_cpus()
        self._owns_fd = owns_fd

    def sum(self, index: int) -> dict[str, int]:
        per_cpu = (self.value_type * self.ncpus)()
        key = ctypes.c_uint32(index)
        if not libbpf.map_lookup(self.fd, key, per_cpu):
            return {}
        names = [f[0] for f in self.value_type._fields_]
        return {n: sum(int(getattr(v, n)) for v in per_cpu) for n in names}

    def close(self) -> None:
        if self._owns_fd:
            os.close(self.fd)
            self._owns_fd = False
