"""The only FFI module in weft: a thin, typed binding of libbpf (Debian's libbpf1, 1.1.x).

Every foreign function's argument and return types are declared here; functions returning
pointers are declared ``c_void_p`` so they are not truncated to int. Failures raise
:class:`BpfError` naming the function and the errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_uint, c_void_p

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)


class BpfError(OSError):
    def __init__(self, func: str, err: int, detail: str = "") -> None:
        err = abs(err)
        msg = f"{func}: {os.strerror(err)}" + (f" ({detail})" if detail else "")
        super().__init__(err, msg)
        self.func = func


def _decl(name: str, restype: object, *argtypes: object) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    fn = getattr(_lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn  # type: ignore[no-any-return]


class BpfTestRunOpts(ctypes.Structure):
    """Mirrors ``struct bpf_test_run_opts`` of libbpf 1.1 (bpf.h)."""

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


_open_file = _decl("bpf_object__open_file", c_void_p, c_char_p, c_void_p)
_load = _decl("bpf_object__load", c_int, c_void_p)
_close = _decl("bpf_object__close", None, c_void_p)
_find_prog = _decl("bpf_object__find_program_by_name", c_void_p, c_void_p, c_char_p)
_prog_fd = _decl("bpf_program__fd", c_int, c_void_p)
_find_map = _decl("bpf_object__find_map_by_name", c_void_p, c_void_p, c_char_p)
_next_map = _decl("bpf_object__next_map", c_void_p, c_void_p, c_void_p)
_map_name = _decl("bpf_map__name", c_char_p, c_void_p)
_map_set_pin_path = _decl("bpf_map__set_pin_path", c_int, c_void_p, c_char_p)
_map_fd = _decl("bpf_map__fd", c_int, c_void_p)
_map_max_entries = _decl("bpf_map__max_entries", c_uint, c_void_p)
_update = _decl("bpf_map_update_elem", c_int, c_int, c_void_p, c_void_p, ctypes.c_uint64)
_lookup = _decl("bpf_map_lookup_elem", c_int, c_int, c_void_p, c_void_p)
_delete = _decl("bpf_map_delete_elem", c_int, c_int, c_void_p)
_next_key = _decl("bpf_map_get_next_key", c_int, c_int, c_void_p, c_void_p)
_obj_pin = _decl("bpf_obj_pin", c_int, c_int, c_char_p)
_obj_get = _decl("bpf_obj_get", c_int, c_char_p)
_info_by_fd = _decl("bpf_obj_get_info_by_fd", c_int, c_int, c_void_p, POINTER(ctypes.c_uint32))
_test_run = _decl("bpf_prog_test_run_opts", c_int, c_int, POINTER(BpfTestRunOpts))
_num_cpus = _decl("libbpf_num_possible_cpus", c_int)


def _check(func: str, ret: int, detail: str = "") -> int:
    if ret < 0:
        # libbpf 1.x returns -errno (and sets errno too).
        raise BpfError(func, -ret, detail)
    return ret


class BpfObject:
    """An opened (and after :meth:`load`, loaded) ELF object."""

    def __init__(self, path: str) -> None:
        ptr = _open_file(path.encode(), None)
        if not ptr:
            raise BpfError("bpf_object__open_file", ctypes.get_errno() or errno.ENOENT, path)
        self._ptr: int | None = ptr
        self.path = path

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise BpfError("bpf_object", errno.EBADF, "object is closed")
        return self._ptr

    def map_names(self) -> list[str]:
        names, m = [], _next_map(self.ptr, None)
        while m:
            names.append(_map_name(m).decode())
            m = _next_map(self.ptr, m)
        return names

    def _map(self, name: str) -> int:
        m = _find_map(self.ptr, name.encode())
        if not m:
            raise BpfError("bpf_object__find_map_by_name", errno.ENOENT, name)
        return int(m)

    def set_pin_path(self, map_name: str, path: str) -> None:
        _check("bpf_map__set_pin_path", _map_set_pin_path(self._map(map_name), path.encode()), path)

    def load(self) -> None:
        _check("bpf_object__load", _load(self.ptr), self.path)

    def map_fd(self, name: str) -> int:
        return _check("bpf_map__fd", _map_fd(self._map(name)), name)

    def map_max_entries(self, name: str) -> int:
        return int(_map_max_entries(self._map(name)))

    def prog_fd(self, name: str) -> int:
        p = _find_prog(self.ptr, name.encode())
        if not p:
            raise BpfError("bpf_object__find_program_by_name", errno.ENOENT, name)
        return _check("bpf_program__fd", _prog_fd(p), name)

    def close(self) -> None:
        if self._ptr is not None:
            _close(self._ptr)
            self._ptr = None


def map_update(fd: int, key: ctypes.Structure | ctypes._SimpleCData, value: ctypes.Structure | ctypes.Array,  # type: ignore[type-arg]
               flags: int = 0) -> None:
    _check("bpf_map_update_elem", _update(fd, byref(key), byref(value), flags))


def map_lookup(fd: int, key: object, value: object) -> bool:
    ret = _lookup(fd, byref(key), byref(value))  # type: ignore[arg-type]
    if ret < 0:
        if -ret == errno.ENOENT:
            return False
        raise BpfError("bpf_map_lookup_elem", -ret)
    return True


def map_delete(fd: int, key: object) -> bool:
    ret = _delete(fd, byref(key))  # type: ignore[arg-type]
    if ret < 0:
        if -ret == errno.ENOENT:
            return False
        raise BpfError("bpf_map_delete_elem", -ret)
    return True


def map_next_key(fd: int, key: object | None, next_key: object) -> bool:
    ret = _next_key(fd, byref(key) if key is not None else None, byref(next_key))  # type: ignore[arg-type]
    if ret < 0:
        if -ret == errno.ENOENT:
            return False
        raise BpfError("bpf_map_get_next_key", -ret)
    return True


def obj_pin(fd: int, path: str) -> None:
    _check("bpf_obj_pin", _obj_pin(fd, path.encode()), path)


def obj_get(path: str) -> int:
    fd = _obj_get(path.encode())
    if fd < 0:
        raise BpfError("bpf_obj_get", -fd, path)
    return int(fd)


def prog_info(fd: int) -> tuple[int, str]:
    """(id, name) of a program, from ``struct bpf_prog_info`` (id at offset 4, name at 64)."""
    buf = (ctypes.c_uint8 * 256)()
    size = ctypes.c_uint32(256)
    _check("bpf_obj_get_info_by_fd", _info_by_fd(fd, buf, byref(size)))
    raw = bytes(buf)
    prog_id = int.from_bytes(raw[4:8], "little")
    name = raw[64:80].split(b"\0", 1)[0].decode()
    return prog_id, name


def map_info(fd: int) -> tuple[int, int, int, int, str]:
    """(id, key_size, value_size, max_entries, name) from ``struct bpf_map_info``."""
    buf = (ctypes.c_uint8 * 128)()
    size = ctypes.c_uint32(128)
    _check("bpf_obj_get_info_by_fd", _info_by_fd(fd, buf, byref(size)))
    raw = bytes(buf)
    words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 24, 4)]
    return words[1], words[2], words[3], words[4], raw[24:40].split(b"\0", 1)[0].decode()


def prog_test_run(prog_fd: int, data: bytes, ctx: bytes | None = None, out_size: int = 2048) -> tuple[int, bytes]:
    """Run a program on one packet with BPF_PROG_TEST_RUN: (return value, packet out)."""
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(out_size)
    opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts))
    opts.data_in = ctypes.cast(data_in, c_void_p)
    opts.data_size_in = len(data)
    opts.data_out = ctypes.cast(data_out, c_void_p)
    opts.data_size_out = out_size
    ctx_buf = None
    if ctx is not None:
        ctx_buf = ctypes.create_string_buffer(ctx, len(ctx))
        opts.ctx_in = ctypes.cast(ctx_buf, c_void_p)
        opts.ctx_size_in = len(ctx)
    opts.repeat = 1
    _check("bpf_prog_test_run_opts", _test_run(prog_fd, byref(opts)))
    return int(opts.retval), data_out.raw[: opts.data_size_out]


def num_possible_cpus() -> int:
    return _check("libbpf_num_possible_cpus", _num_cpus())
