"""A small synchronous client of the agent API, for the CLI and the lab."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


class AgentUnavailable(Exception):
    pass


class AgentCallError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"[{code}] {msg}" + (f" ({details})" if details else ""))
        self.code = code
        self.msg = msg
        self.details = details


class AgentClient:
    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.socket_path))
                sock.sendall(json.dumps({"method": method, "params": params or {}}).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as exc:
            raise AgentUnavailable(f"agent at {self.socket_path} unreachable: {exc}") from exc
        if not buf:
            raise AgentUnavailable(f"agent at {self.socket_path} closed the connection")
        reply = json.loads(buf)
        if "error" in reply:
            err = reply["error"]
            raise AgentCallError(int(err.get("code", 100)), str(err.get("msg", "")), str(err.get("details", "")))
        return reply["result"]

    def alive(self) -> bool:
        try:
            self.call("ping")
            return True
        except (AgentUnavailable, AgentCallError):
            return False
