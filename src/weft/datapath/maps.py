"""Typed views of BPF maps.

:class:`BpfHashMap` behaves like a mutable mapping of ctypes keys to ctypes values, backed by the
kernel (every access is a syscall, nothing is cached). :class:`PerCpuArray` reads per-CPU array
slots summed over all possible CPUs. Both can be opened from a pinned path for read-only tools
(the CLI), and then check that the pinned map's key and value sizes match the Python types
before reading anything into them.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator, MutableMapping
from typing import Generic, TypeVar

from weft.datapath import libbpf

K = TypeVar("K", bound=ctypes.Structure | ctypes.c_uint32)
V = TypeVar("V", bound=ctypes.Structure)

# BPF map types we open by path (linux/bpf.h enum bpf_map_type).
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LPM_TRIE = 11


def _check_layout(fd: int, path: str, map_type: int, key_size: int, value_size: int) -> int:
    """Refuse a pinned map whose shape differs from what we are about to read into: a lookup
    writes value_size bytes (per CPU) into our buffer, so a mismatch would corrupt memory.
    Returns max_entries."""
    info = libbpf.map_get_info(fd)
    if (info.type, info.key_size, info.value_size) != (map_type, key_size, value_size):
        raise libbpf.BpfError(
            "bpf_obj_get", errno.EINVAL,
            f"{path}: map type/key/value size {info.type}/{info.key_size}/{info.value_size}, "
            f"expected {map_type}/{key_size}/{value_size} (datapath ABI mismatch?)",
        )
    return int(info.max_entries)


class BpfHashMap(MutableMapping[K, V], Generic[K, V]):
    """A BPF hash map of ctypes keys and values.

    ctypes structures compare and hash by identity, so this mapping is keyed by value only in
    the kernel: ``m[key]`` looks the key's bytes up, and iteration yields fresh key objects.
    Iteration tolerates entries deleted (by us or a concurrent writer) during the walk: when the
    key we stand on vanishes, the kernel restarts from the first key, and keys already yielded
    are skipped. Entries added during a walk may or may not be seen.
    """

    def __init__(self, fd: int, key_type: type[K], value_type: type[V], owns_fd: bool = False) -> None:
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self._owns_fd = owns_fd

    @classmethod
    def open_pinned(cls, path: str, key_type: type[K], value_type: type[V],
                    map_type: int = BPF_MAP_TYPE_HASH) -> BpfHashMap[K, V]:
        """``map_type``: what the pin must be (hash, LRU hash or LPM trie: all key/value maps)."""
        fd = libbpf.obj_get(path)
        try:
            _check_layout(fd, path, map_type, ctypes.sizeof(key_type), ctypes.sizeof(value_type))
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, key_type, value_type, owns_fd=True)

    # -- mapping protocol
    def __getitem__(self, key: K) -> V:
        value = self.value_type()
        if not libbpf.map_lookup(self.fd, key, value):
            raise KeyError(bytes(key))
        return value

    def __setitem__(self, key: K, value: V) -> None:
        libbpf.map_update(self.fd, key, value)

    def __delitem__(self, key: K) -> None:
        if not libbpf.map_delete(self.fd, key):
            raise KeyError(bytes(key))

    def __iter__(self) -> Iterator[K]:
        seen: set[bytes] = set()
        prev: K | None = None
        while True:
            nxt = self.key_type()
            if not libbpf.map_next_key(self.fd, prev, nxt):
                return
            prev = nxt
            raw = bytes(nxt)
            if raw in seen:
                # Our previous key was deleted and the kernel restarted the walk: skip ahead.
                continue
            seen.add(raw)
            yield nxt

    def __len__(self) -> int:
        # The kernel keeps no count we can read for a hash map: walk it.
        return sum(1 for _ in self)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, self.key_type) and self.get(key) is not None

    # -- faster or more tolerant variants of the mixin methods
    def get(self, key: K, default: V | None = None) -> V | None:  # type: ignore[override]
        value = self.value_type()
        return value if libbpf.map_lookup(self.fd, key, value) else default

    def delete(self, key: K) -> bool:
        """Delete ``key``; False (no error) if it was absent."""
        return libbpf.map_delete(self.fd, key)

    def items(self) -> Iterator[tuple[K, V]]:  # type: ignore[override]
        """(key, value) pairs; an entry deleted between its key and value reads is skipped
        (the mixin version would raise KeyError)."""
        for key in self:
            value = self.get(key)
            if value is not None:
                yield key, value

    def close(self) -> None:
        if self._owns_fd:
            os.close(self.fd)
            self._owns_fd = False


class PerCpuArray(Generic[V]):
    """A per-CPU array whose value is a structure of integer counters; reads return each field
    summed over all possible CPUs."""

    def __init__(self, fd: int, value_type: type[V], max_entries: int, owns_fd: bool = False) -> None:
        self.fd = fd
        self.value_type = value_type
        self.max_entries = max_entries
        self.ncpus = libbpf.num_possible_cpus()
        # The kernel lays per-CPU values out at 8-byte strides.
        self._stride = (ctypes.sizeof(value_type) + 7) & ~7
        self._owns_fd = owns_fd

    @classmethod
    def open_pinned(cls, path: str, value_type: type[V]) -> PerCpuArray[V]:
        fd = libbpf.obj_get(path)
        try:
            max_entries = _check_layout(fd, path, BPF_MAP_TYPE_PERCPU_ARRAY, 4, ctypes.sizeof(value_type))
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, value_type, max_entries, owns_fd=True)

    def per_cpu(self, index: int) -> list[V]:
        """The slot ``index`` of every possible CPU."""
        if not 0 <= index < self.max_entries:
            raise IndexError(index)
        buf = (ctypes.c_uint8 * (self._stride * self.ncpus))()
        if not libbpf.map_lookup(self.fd, ctypes.c_uint32(index), buf):
            raise IndexError(index)  # cannot happen for an in-range array index
        raw = bytes(buf)
        return [self.value_type.from_buffer_copy(raw, i * self._stride) for i in range(self.ncpus)]

    def sum(self, index: int) -> dict[str, int]:
        """Field name -> sum over CPUs, for slot ``index``."""
        slots = self.per_cpu(index)
        return {name: sum(int(getattr(v, name)) for v in slots) for name, *_ in self.value_type._fields_}

    def __len__(self) -> int:
        return self.max_entries

    def close(self) -> None:
        if self._owns_fd:
            os.close(self.fd)
            self._owns_fd = False
