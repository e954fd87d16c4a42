"""The proxy's control socket: JSON lines over a root-only unix socket, like the agent's API.

A request is ``{"method": ..., "params": {...}}`` on one line; the answer is ``{"result": ...}`` or
``{"error": {"code": ..., "msg": ...}}`` on one line. The socket is created 0600 and every peer's
uid is checked (SO_PEERCRED) to be root. Methods: ``ping``, ``status``, ``cache_list``, ``names``,
``reload``, ``l7.get`` (the L7 DNS records after a cursor, see :mod:`weft.dnsproxy.l7ring`), and
``handover`` (a new proxy process taking the listening sockets over, see
:mod:`weft.dnsproxy.server`). :class:`ProxyClient` is the synchronous client for the CLI and the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("weft.dnsproxy.control")

MAX_REQUEST_BYTES = 1 << 20
BAD_REQUEST, INTERNAL, NOT_ROOT = 102, 100, 105
Handler = Callable[[dict[str, Any]], Awaitable[Any]]
# handover is special: it answers with file descriptors and keeps the connection for "done".
HandoverHandler = Callable[[socket.socket, dict[str, Any]], Awaitable[None]]


class ControlError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg

    def to_json(self) -> dict[str, object]:
        return {"code": self.code, "msg": self.msg}


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


class ControlServer:
    """Serves the control socket on the running event loop. The socket is bound under a temporary
    name and renamed over ``path``: a proxy that takes over from another replaces its socket
    atomically, so a client never finds no socket at all."""

    def __init__(self, path: Path, handlers: dict[str, Handler], handover: HandoverHandler) -> None:
        self.path = path
        self.handlers = handlers
        self.handover = handover
        self._sock: socket.socket | None = None
        self._inode = 0
        self._accept_task: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # created 0600: only root may connect
        try:
            sock.bind(str(tmp))
        finally:
            os.umask(old_umask)
        os.chmod(tmp, 0o600)
        sock.listen(64)
        sock.setblocking(False)
        os.replace(tmp, self.path)
        self._inode = os.stat(self.path).st_ino
        self._sock = sock
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def close(self, unlink: bool = True) -> None:
        """Stop serving. The path is removed only if it is still ours (a successor renamed its
        own socket over it otherwise)."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == self._inode:
                    self.path.unlink()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            task = loop.create_task(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        keep_open = False
        try:
            if peer_uid(conn) != 0:
                await loop.sock_sendall(conn, encode({"error": ControlError(NOT_ROOT, "only root may use the DNS "
                                                                                      "proxy's control socket")
                                                      .to_json()}))
                return
            buf = b""
            while True:
                while b"\n" not in buf:
                    chunk = await loop.sock_recv(conn, 65536)
                    if not chunk:
                        return
                    buf += chunk
                    if len(buf) > MAX_REQUEST_BYTES:
                        await loop.sock_sendall(conn, encode({"error": ControlError(
                            BAD_REQUEST, f"request larger than {MAX_REQUEST_BYTES} bytes").to_json()}))
                        return
                line, buf = buf.split(b"\n", 1)
                try:
                    request = json.loads(line)
                    method = request["method"]
                    params = request.get("params") or {}
                    if not isinstance(params, dict) or not isinstance(method, str):
                        raise TypeError("method must be a string and params an object")
                except (ValueError, KeyError, TypeError) as exc:
                    await loop.sock_sendall(conn, encode({"error": ControlError(
                        BAD_REQUEST, f"malformed request: {exc}").to_json()}))
                    continue
                if method == "handover":
                    keep_open = True  # the handover handler owns the connection from here
                    await self.handover(conn, params)
                    return
                await loop.sock_sendall(conn, encode(await self._dispatch(method, params)))
        except (ConnectionError, OSError):
            return
        finally:
            if not keep_open:
                conn.close()

    async def _dispatch(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        handler = self.handlers.get(method)
        if handler is None:
            return {"error": ControlError(BAD_REQUEST, f"unknown method {method!r}").to_json()}
        try:
            return {"result": await handler(params)}
        except ControlError as exc:
            return {"error": exc.to_json()}
        except Exception as exc:
            log.exception("%s failed", method)
            return {"error": ControlError(INTERNAL, f"{method} failed: {type(exc).__name__}: {exc}").to_json()}


def send_with_fds(conn: socket.socket, body: dict[str, Any], fds: list[int]) -> None:
    """One JSON line and ``fds`` (SCM_RIGHTS) in a single message; blocking, it is small."""
    conn.setblocking(True)
    try:
        socket.send_fds(conn, [encode(body)], fds)
    finally:
        conn.setblocking(False)


def recv_line_with_fds(conn: socket.socket, max_fds: int = 16) -> tuple[dict[str, Any], list[int]]:
    """Read one JSON line (blocking socket) and the descriptors that came with it."""
    buf = b""
    fds: list[int] = []
    while b"\n" not in buf:
        data, got, _flags, _addr = socket.recv_fds(conn, 65536, max_fds)
        fds.extend(got)
        if not data:
            break
        buf += data
    line = buf.split(b"\n", 1)[0]
    if not line:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("the old proxy closed the control connection without an answer")
    return json.loads(line), fds


class ProxyUnavailable(Exception):
    pass


class ProxyCallError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(f"[{code}] {msg}")
        self.code = code
        self.msg = msg


class ProxyClient:
    """Synchronous client of one proxy's control socket."""

    def __init__(self, socket_path: Path, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.socket_path))
                sock.sendall(encode({"method": method, "params": params or {}}))
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as exc:
            raise ProxyUnavailable(f"DNS proxy at {self.socket_path} unreachable: {exc}") from exc
        if not buf:
            raise ProxyUnavailable(f"DNS proxy at {self.socket_path} closed the connection")
        reply = json.loads(buf)
        if "error" in reply:
            err = reply["error"]
            raise ProxyCallError(int(err.get("code", INTERNAL)), str(err.get("msg", "")))
        return reply["result"]

    def alive(self) -> bool:
        try:
            self.call("ping")
            return True
        except (ProxyUnavailable, ProxyCallError):
            return False

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("status")
        return result

    def reload(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("reload")
        return result

    def cache_list(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("cache_list")
        return result

    def names(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("names")
        return result

    def l7_get(self, cursor: int, max_items: int = 1024) -> dict[str, Any]:
        """``{"records": [...], "next": cursor to ask for next, "missed": records overwritten
        before they were read, "first": oldest seq kept}``; cursor 0 starts at the oldest."""
        result: dict[str, Any] = self.call("l7.get", {"cursor": cursor, "max": max_items})
        return result


__all__ = ["ControlServer", "ProxyCallError", "ProxyClient", "ProxyUnavailable"]
