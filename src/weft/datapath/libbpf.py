"""The only FFI module in weft: a thin, typed binding of libbpf (Debian's libbpf1, 1.1.x).

Every foreign function's argument and return types are declared once, below; functions that
return pointers are declared ``c_void_p`` so 64-bit pointers are not truncated to a C int.
libbpf 1.x returns ``-errno`` from its low-level calls and NULL (with ``errno`` set) from the
object API; both become :class:`BpfError`, which names the function and the errno.

Nothing here knows about weft's maps or programs: that is :mod:`weft.datapath.maps` and
:mod:`weft.datapath.loader`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_uint, c_uint32, c_uint64, c_void_p
from typing import Any, TypeAlias

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)

# Anything ctypes can pass by reference as a key or value buffer.
CData: TypeAlias = "ctypes.Structure | ctypes.Array[Any] | ctypes._SimpleCData[Any]"


class BpfError(OSError):
    """A libbpf call failed: ``errno`` is set, ``func`` names the call."""

    def __init__(self, func: str, err: int, detail: str = "") -> None:
        err = abs(err) or errno.EIO
        msg = f"{func}: {os.strerror(err)}" + (f" ({detail})" if detail else "")
        super().__init__(err, msg)
        self.func = func


def _decl(name: str, restype: Any, *argtypes: Any) -> Any:
    fn = getattr(_lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


class BpfTestRunOpts(ctypes.Structure):
    """``struct bpf_test_run_opts`` of libbpf 1.1 (bpf/bpf.h)::

        size_t sz; const void *data_in; void *data_out; __u32 data_size_in; __u32 data_size_out;
        const void *ctx_in; void *ctx_out; __u32 ctx_size_in; __u32 ctx_size_out;
        __u32 retval; int repeat; __u32 duration; __u32 flags; __u32 cpu; __u32 batch_size;
    """

    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint),
        ("data_size_out", c_uint),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint),
        ("ctx_size_out", c_uint),
        ("retval", c_uint),
        ("repeat", c_int),
        ("duration", c_uint),
        ("flags", c_uint),
        ("cpu", c_uint),
        ("batch_size", c_uint),
    ]


class BpfProgInfo(ctypes.Structure):
    """The leading part of ``struct bpf_prog_info`` (linux/bpf.h) up to ``name``::

        __u32 type; __u32 id; __u8 tag[8]; __u32 jited_prog_len; __u32 xlated_prog_len;
        __aligned_u64 jited_prog_insns; __aligned_u64 xlated_prog_insns; __u64 load_time;
        __u32 created_by_uid; __u32 nr_map_ids; __aligned_u64 map_ids; char name[16];

    The kernel fills at most the size we pass, so a prefix is enough (and all pointer fields
    stay zero, so it writes no arrays for us).
    """

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64),
        ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64),
        ("name", ctypes.c_char * 16),
    ]


class BpfMapInfo(ctypes.Structure):
    """The leading part of ``struct bpf_map_info`` (linux/bpf.h)::

        __u32 type; __u32 id; __u32 key_size; __u32 value_size; __u32 max_entries;
        __u32 map_flags; char name[16];
    """

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", ctypes.c_char * 16),
    ]


# Object API (pointers are opaque c_void_p handles).
class BpfTcHook(ctypes.Structure):
    """Mirrors ``struct bpf_tc_hook`` of libbpf 1.1 (libbpf.h): sz, ifindex, attach_point, parent."""

    _fields_ = [("sz", c_size_t), ("ifindex", c_int), ("attach_point", c_int), ("parent", c_uint32)]


class BpfTcOpts(ctypes.Structure):
    """Mirrors ``struct bpf_tc_opts`` of libbpf 1.1: sz, prog_fd, flags, prog_id, handle, priority."""

    _fields_ = [("sz", c_size_t), ("prog_fd", c_int), ("flags", c_uint32), ("prog_id", c_uint32),
                ("handle", c_uint32), ("priority", c_uint32)]


BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_TC_F_REPLACE = 1

_open_file = _decl("bpf_object__open_file", c_void_p, c_char_p, c_void_p)
_load = _decl("bpf_object__load", c_int, c_void_p)
_close = _decl("bpf_object__close", None, c_void_p)
_find_prog = _decl("bpf_object__find_program_by_name", c_void_p, c_void_p, c_char_p)
_next_prog = _decl("bpf_object__next_program", c_void_p, c_void_p, c_void_p)
_prog_name = _decl("bpf_program__name", c_char_p, c_void_p)
_prog_fd = _decl("bpf_program__fd", c_int, c_void_p)
_find_map = _decl("bpf_object__find_map_by_name", c_void_p, c_void_p, c_char_p)
_next_map = _decl("bpf_object__next_map", c_void_p, c_void_p, c_void_p)
_map_name = _decl("bpf_map__name", c_char_p, c_void_p)
_map_set_pin_path = _decl("bpf_map__set_pin_path", c_int, c_void_p, c_char_p)
_map_fd = _decl("bpf_map__fd", c_int, c_void_p)
_map_max_entries = _decl("bpf_map__max_entries", c_uint32, c_void_p)
_map_set_max_entries = _decl("bpf_map__set_max_entries", c_int, c_void_p, c_uint32)
# Ring buffer consumer: the callback runs inside ring_buffer__poll/consume, on the caller's thread.
RingBufferSampleFn = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)
_rb_new = _decl("ring_buffer__new", c_void_p, c_int, RingBufferSampleFn, c_void_p, c_void_p)
_rb_poll = _decl("ring_buffer__poll", c_int, c_void_p, c_int)
_rb_consume = _decl("ring_buffer__consume", c_int, c_void_p)
_rb_free = _decl("ring_buffer__free", None, c_void_p)
# Low-level API (file descriptors).
_update = _decl("bpf_map_update_elem", c_int, c_int, c_void_p, c_void_p, c_uint64)
_lookup = _decl("bpf_map_lookup_elem", c_int, c_int, c_void_p, c_void_p)
_delete = _decl("bpf_map_delete_elem", c_int, c_int, c_void_p)
_next_key = _decl("bpf_map_get_next_key", c_int, c_int, c_void_p, c_void_p)
_obj_pin = _decl("bpf_obj_pin", c_int, c_int, c_char_p)
_obj_get = _decl("bpf_obj_get", c_int, c_char_p)
# bpf_prog_get_info_by_fd/bpf_map_get_info_by_fd only exist from libbpf 1.2; this is the
# generic call they wrap.
_info_by_fd = _decl("bpf_obj_get_info_by_fd", c_int, c_int, c_void_p, POINTER(c_uint32))
_test_run = _decl("bpf_prog_test_run_opts", c_int, c_int, POINTER(BpfTestRunOpts))
_num_cpus = _decl("libbpf_num_possible_cpus", c_int)
_tc_hook_create = _decl("bpf_tc_hook_create", c_int, POINTER(BpfTcHook))
_tc_attach = _decl("bpf_tc_attach", c_int, POINTER(BpfTcHook), POINTER(BpfTcOpts))
_tc_query = _decl("bpf_tc_query", c_int, POINTER(BpfTcHook), POINTER(BpfTcOpts))


def tc_query(ifindex: int, egress: bool, handle: int, priority: int) -> int:
    """The id of the program in the cls_bpf filter of that handle and priority, or 0 if there is
    none (or no clsact qdisc, or no such link)."""
    hook = BpfTcHook(sz=ctypes.sizeof(BpfTcHook), ifindex=ifindex,
                     attach_point=BPF_TC_EGRESS if egress else BPF_TC_INGRESS)
    opts = BpfTcOpts(sz=ctypes.sizeof(BpfTcOpts), handle=handle, priority=priority)
    ret = _tc_query(byref(hook), byref(opts))
    if ret < 0:
        if -ret in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            return 0
        raise BpfError("bpf_tc_query", -ret, f"ifindex {ifindex}")
    return int(opts.prog_id)


def tc_hook_create(ifindex: int) -> None:
    """Create the clsact qdisc on ``ifindex`` (one covers both directions); fine if it exists."""
    hook = BpfTcHook(sz=ctypes.sizeof(BpfTcHook), ifindex=ifindex, attach_point=BPF_TC_INGRESS)
    ret = _tc_hook_create(byref(hook))
    if ret < 0 and -ret != errno.EEXIST:
        raise BpfError("bpf_tc_hook_create", -ret, f"ifindex {ifindex}")


def tc_attach(ifindex: int, prog_fd: int, egress: bool, handle: int, priority: int) -> int:
    """Attach a direct-action cls_bpf filter to the clsact hook of ``ifindex`` (in the calling
    thread's netns; see tc_hook_create), replacing a filter of the same handle and priority
    atomically. Returns the program id. libbpf speaks rtnetlink itself, in C: a fraction of the
    cost of building the same messages in Python, per pod."""
    hook = BpfTcHook(sz=ctypes.sizeof(BpfTcHook), ifindex=ifindex,
                     attach_point=BPF_TC_EGRESS if egress else BPF_TC_INGRESS)
    opts = BpfTcOpts(sz=ctypes.sizeof(BpfTcOpts), prog_fd=prog_fd, flags=BPF_TC_F_REPLACE, handle=handle,
                     priority=priority)
    _check("bpf_tc_attach", _tc_attach(byref(hook), byref(opts)), f"ifindex {ifindex}")
    return int(opts.prog_id)

# BPF_ANY / BPF_NOEXIST / BPF_EXIST for map_update.
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


def _check(func: str, ret: int, detail: str = "") -> int:
    if ret < 0:
        raise BpfError(func, -ret, detail)
    return ret


def _errno_or(default: int) -> int:
    return ctypes.get_errno() or default


class BpfObject:
    """An opened (and, after :meth:`load`, loaded) ELF object. Closing it closes every program
    and map fd it holds; pinned objects and attached programs stay in the kernel."""

    def __init__(self, path: str) -> None:
        ptr = _open_file(path.encode(), None)
        if not ptr:
            raise BpfError("bpf_object__open_file", _errno_or(errno.ENOENT), path)
        self._ptr: int | None = int(ptr)
        self.path = path

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise BpfError("bpf_object", errno.EBADF, "object is closed")
        return self._ptr

    def map_names(self) -> list[str]:
        """Names of the object's maps (including .rodata/.bss if it had any), in ELF order."""
        names: list[str] = []
        m = _next_map(self.ptr, None)
        while m:
            names.append(_map_name(m).decode())
            m = _next_map(self.ptr, m)
        return names

    def program_names(self) -> list[str]:
        names: list[str] = []
        p = _next_prog(self.ptr, None)
        while p:
            names.append(_prog_name(p).decode())
            p = _next_prog(self.ptr, p)
        return names

    def _map(self, name: str) -> int:
        m = _find_map(self.ptr, name.encode())
        if not m:
            raise BpfError("bpf_object__find_map_by_name", errno.ENOENT, name)
        return int(m)

    def _prog(self, name: str) -> int:
        p = _find_prog(self.ptr, name.encode())
        if not p:
            raise BpfError("bpf_object__find_program_by_name", errno.ENOENT, name)
        return int(p)

    def set_pin_path(self, map_name: str, path: str) -> None:
        """Before load: pin the map at ``path``, or reuse the map already pinned there."""
        _check("bpf_map__set_pin_path", _map_set_pin_path(self._map(map_name), path.encode()), path)

    def load(self) -> None:
        """Create (or reuse) the maps and load every program through the verifier. On failure
        libbpf prints the verifier log to stderr."""
        _check("bpf_object__load", _load(self.ptr), self.path)

    def map_fd(self, name: str) -> int:
        return _check("bpf_map__fd", _map_fd(self._map(name)), name)

    def map_max_entries(self, name: str) -> int:
        return int(_map_max_entries(self._map(name)))

    def set_map_max_entries(self, name: str, max_entries: int) -> None:
        """Before load: size a map otherwise than the object says (a ring buffer: bytes, a power
        of two multiple of the page size)."""
        _check("bpf_map__set_max_entries", _map_set_max_entries(self._map(name), max_entries), name)

    def prog_fd(self, name: str) -> int:
        return _check("bpf_program__fd", _prog_fd(self._prog(name)), name)

    def close(self) -> None:
        if self._ptr is not None:
            _close(self._ptr)
            self._ptr = None


def map_update(fd: int, key: CData, value: CData, flags: int = BPF_ANY) -> None:
    _check("bpf_map_update_elem", _update(fd, byref(key), byref(value), flags))


def map_lookup(fd: int, key: CData, value: CData) -> bool:
    """Fill ``value``; False if the key is absent. ``value`` must hold the map's whole value
    (for per-CPU maps: value size x possible CPUs, each slot rounded up to 8 bytes)."""
    ret = _lookup(fd, byref(key), byref(value))
    if ret < 0:
        if -ret == errno.ENOENT:
            return False
        raise BpfError("bpf_map_lookup_elem", -ret)
    return True


def map_delete(fd: int, key: CData) -> bool:
    """False if the key was absent."""
    ret = _delete(fd, byref(key))
    if ret < 0:
        if -ret == errno.ENOENT:
            return False
        raise BpfError("bpf_map_delete_elem", -ret)
    return True


def map_next_key(fd: int, key: CData | None, next_key: CData) -> bool:
    """Store the key after ``key`` (the first key if ``key`` is None or no longer in a hash map)
    in ``next_key``; False at the end."""
    ret = _next_key(fd, byref(key) if key is not None else None, byref(next_key))
    if ret < 0:
        if -ret == errno.ENOENT:
            return False
        raise BpfError("bpf_map_get_next_key", -ret)
    return True


def obj_pin(fd: int, path: str) -> None:
    _check("bpf_obj_pin", _obj_pin(fd, path.encode()), path)


def obj_get(path: str) -> int:
    """A new fd for the object pinned at ``path`` (the caller closes it)."""
    fd = _obj_get(path.encode())
    if fd < 0:
        raise BpfError("bpf_obj_get", -fd, path)
    return int(fd)


def prog_get_info(fd: int) -> BpfProgInfo:
    info = BpfProgInfo()
    size = c_uint32(ctypes.sizeof(info))
    _check("bpf_obj_get_info_by_fd", _info_by_fd(fd, byref(info), byref(size)))
    return info


def map_get_info(fd: int) -> BpfMapInfo:
    info = BpfMapInfo()
    size = c_uint32(ctypes.sizeof(info))
    _check("bpf_obj_get_info_by_fd", _info_by_fd(fd, byref(info), byref(size)))
    return info


def prog_info(fd: int) -> tuple[int, str]:
    """(id, name) of a loaded program. The kernel keeps only the first 15 bytes of a name."""
    info = prog_get_info(fd)
    return int(info.id), info.name.decode()


def map_info(fd: int) -> tuple[int, int, int, int, str]:
    """(id, key_size, value_size, max_entries, name) of a map."""
    info = map_get_info(fd)
    return int(info.id), int(info.key_size), int(info.value_size), int(info.max_entries), info.name.decode()


def skb_ctx(ifindex: int = 1, mark: int = 0) -> bytes:
    """A ``struct __sk_buff`` prefix for :func:`prog_test_run`'s ``ctx``: the kernel accepts only
    a few fields (mark, priority, ifindex, cb, tstamp, ...) and wants the rest zero. ifindex
    must name a device in the caller's netns; 1 (loopback) is the kernel's default anyway.
    Layout: __u32 len, pkt_type, mark, queue_mapping, protocol, vlan_present, vlan_tci,
    vlan_proto, priority, ingress_ifindex, ifindex (offset 40)."""
    return struct.pack("<11I", 0, 0, mark, 0, 0, 0, 0, 0, 0, 0, ifindex)


def prog_test_run(prog_fd: int, data: bytes, ctx: bytes | None = None, out_size: int = 2048) -> tuple[int, bytes]:
    """Run a program once on one packet with BPF_PROG_TEST_RUN: (return value, packet out).
    ``out_size`` must cover the packet as the program leaves it (it may grow it)."""
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(out_size)
    opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts))
    opts.data_in = ctypes.cast(data_in, c_void_p)
    opts.data_size_in = len(data)
    opts.data_out = ctypes.cast(data_out, c_void_p)
    opts.data_size_out = out_size
    # Keep the ctx buffer referenced until the call returns.
    ctx_buf = ctypes.create_string_buffer(ctx, len(ctx)) if ctx is not None else None
    if ctx_buf is not None:
        opts.ctx_in = ctypes.cast(ctx_buf, c_void_p)
        opts.ctx_size_in = len(ctx_buf)
    opts.repeat = 1
    _check("bpf_prog_test_run_opts", _test_run(prog_fd, byref(opts)))
    return int(opts.retval), data_out.raw[: opts.data_size_out]


def num_possible_cpus() -> int:
    """The number of per-CPU slots in a per-CPU map value (possible, not online, CPUs)."""
    return _check("libbpf_num_possible_cpus", _num_cpus())


class RingBuffer:
    """A consumer of one BPF ring buffer map. ``on_record`` gets each record's bytes (a copy);
    it runs inside :meth:`poll` on the calling thread and must not raise (an exception would be
    lost inside the C callback: catch and count it in the handler)."""

    def __init__(self, map_fd: int, on_record: Callable[[bytes], None]) -> None:
        def sample(_ctx: int | None, data: int | None, size: int) -> int:
            on_record(ctypes.string_at(data, size) if data else b"")
            return 0

        # Keep the C callback referenced for the ring's lifetime: libbpf calls it later.
        self._callback = RingBufferSampleFn(sample)
        ptr = _rb_new(map_fd, self._callback, None, None)
        if not ptr:
            raise BpfError("ring_buffer__new", _errno_or(errno.EINVAL), f"map fd {map_fd}")
        self._ptr: int | None = int(ptr)

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for records and consume what is there: the number consumed.
        An interrupted wait (EINTR) counts as none."""
        if self._ptr is None:
            raise BpfError("ring_buffer__poll", errno.EBADF, "ring buffer is closed")
        ret = int(_rb_poll(self._ptr, timeout_ms))
        if ret == -errno.EINTR:
            return 0
        return _check("ring_buffer__poll", ret)

    def consume(self) -> int:
        """Consume what is there without waiting."""
        if self._ptr is None:
            raise BpfError("ring_buffer__consume", errno.EBADF, "ring buffer is closed")
        return _check("ring_buffer__consume", int(_rb_consume(self._ptr)))

    def close(self) -> None:
        if self._ptr is not None:
            _rb_free(self._ptr)
            self._ptr = None
