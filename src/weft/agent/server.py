"""The agent's local API: JSON lines over a root-only unix socket (see docs/agent-api.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from weft.agent.errors import BAD_REQUEST, INTERNAL, AgentError

log = logging.getLogger("weft.agent.server")
MAX_REQUEST_BYTES = 64 * 1024 * 1024
Handler = Callable[[dict[str, Any]], Any]


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ApiServer:
    """Serves requests one line at a time; handlers run on ``worker`` (one thread: the single
    writer of the node's datapath state), so requests are applied in arrival order."""

    def __init__(self, socket_path: Path, handlers: dict[str, Handler], worker: ThreadPoolExecutor) -> None:
        self.socket_path = socket_path
        self.handlers = handlers
        self.worker = worker
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        old_umask = os.umask(0o177)  # the socket is created 0600: only root may connect
        try:
            # A request is one line; asyncio's default line limit (64 KiB) is far below a large
            # policy file sent by `weft apply -f`.
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path),
                                                           limit=MAX_REQUEST_BYTES)
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            if sock is not None and peer_uid(sock) != 0:
                denied = AgentError(BAD_REQUEST, "only root may use the agent API")
                await self._reply(writer, {"error": denied.to_json()})
                return
            while True:
                line = await reader.readline()
                if not line:
                    return
                await self._reply(writer, await self._dispatch(line))
        except ValueError:  # a line over MAX_REQUEST_BYTES: say so instead of dropping the connection
            too_big = AgentError(BAD_REQUEST, f"request larger than {MAX_REQUEST_BYTES} bytes")
            with contextlib.suppress(ConnectionError):
                await self._reply(writer, {"error": too_big.to_json()})
            return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _reply(self, writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
        writer.write(json.dumps(body).encode() + b"\n")
        await writer.drain()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            method = request["method"]
            params = request.get("params") or {}
            if not isinstance(params, dict):
                raise TypeError("params must be an object")
        except (ValueError, KeyError, TypeError) as exc:
            return {"error": AgentError(BAD_REQUEST, f"malformed request: {exc}").to_json()}
        handler = self.handlers.get(method)
        if handler is None:
            return {"error": AgentError(BAD_REQUEST, f"unknown method {method!r}").to_json()}
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self.worker, handler, params)
            return {"result": result}
        except AgentError as exc:
            return {"error": exc.to_json()}
        except Exception as exc:
            log.exception("%s failed", method)
            return {"error": AgentError(INTERNAL, f"{method} failed: {type(exc).__name__}: {exc}").to_json()}
