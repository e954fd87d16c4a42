"""A test double of the weft agent's unix socket (docs/agent-api.md), for unit tests only.

A small threaded unix-socket server that speaks the JSON-lines protocol. It records every request
(with the number of the connection it came on) and answers from a script. Each method can get a
result, an error, a delay, a hang-up without an answer, or a raw (possibly broken) answer line.
Methods without a script get ``DEFAULT_RESULTS`` (a canonical result for ``cni.add``, ``{}``
otherwise).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

# The canonical (CNI 1.0-shaped, no cniVersion) result, dual-stack, with some 1.1-only fields
# (interface mtu, route mtu) that the 0.x conversion must drop.
CANONICAL_RESULT: dict[str, Any] = {
    "interfaces": [
        {"name": "lxc1a2b3c4d", "mac": "aa:bb:cc:00:00:01"},
        {"name": "eth0", "mac": "aa:bb:cc:00:00:02", "sandbox": "/run/netns/pod1", "mtu": 1450},
    ],
    "ips": [
        {"address": "10.244.1.7/32", "gateway": "10.244.1.1", "interface": 1},
        {"address": "fd00:10:244:1::7/128", "gateway": "fd00:10:244:1::1", "interface": 1},
    ],
    "routes": [
        {"dst": "0.0.0.0/0", "gw": "10.244.1.1"},
        {"dst": "::/0", "gw": "fd00:10:244:1::1", "mtu": 1450},
    ],
    "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]},
}

DEFAULT_RESULTS: dict[str, Any] = {"cni.add": CANONICAL_RESULT}


class Script:
    """How the fake agent answers one method."""

    def __init__(
        self,
        result: Any = None,
        error: dict[str, Any] | None = None,
        delay: float = 0.0,
        hangup: bool = False,
        raw: bytes | None = None,
    ) -> None:
        self.result = result
        self.error = error
        self.delay = delay
        self.hangup = hangup
        self.raw = raw


class FakeAgent:
    """Threaded JSON-lines server on a unix socket. Use it as a context manager."""

    def __init__(self, path: Path, inline_exec: bool = False) -> None:
        self.path = Path(path)
        # Answer cni.exec (the native launcher's request) as the agent does: run the plugin's
        # code here, its requests going to this fake's scripts (recorded with via="cni.exec").
        self.inline_exec = inline_exec
        self.requests: list[dict[str, Any]] = []
        self.connections: list[int] = []  # connection number of each recorded request
        self._scripts: dict[str, Script] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._conn_count = 0

    # --- scripting
    def script(self, method: str, **kwargs: Any) -> None:
        self._scripts[method] = Script(**kwargs)

    def fail(self, method: str, code: int, msg: str, details: str = "") -> None:
        self.script(method, error={"code": code, "msg": msg, "details": details})

    @property
    def methods(self) -> list[str]:
        with self._lock:
            return [r["method"] for r in self.requests]

    def params(self, method: str) -> dict[str, Any]:
        """The params of the only recorded request for ``method``."""
        with self._lock:
            found = [r["params"] for r in self.requests if r.get("method") == method]
        assert len(found) == 1, f"expected one {method} request, got {len(found)}: {self.requests}"
        return found[0]

    # --- lifecycle
    def start(self) -> FakeAgent:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(16)
        listener.settimeout(0.05)
        self._listener = listener
        thread = threading.Thread(target=self._accept_loop, name="fake-agent-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> FakeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- server
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conn_count += 1
            thread = threading.Thread(
                target=self._serve, args=(conn, self._conn_count), name="fake-agent-conn", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(0.05)
        buf = b""
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    if not self._answer(conn, line, number):
                        return

    def _exec(self, params: dict[str, Any], number: int) -> dict[str, Any]:
        from weft.cni import plugin

        class ScriptedError(Exception):
            def __init__(self, error: dict[str, Any]) -> None:
                super().__init__(error.get("msg", ""))
                self.error = error

            def to_json(self) -> dict[str, Any]:
                return self.error

        def dispatch(method: str, inner: dict[str, Any]) -> Any:
            with self._lock:
                self.requests.append({"method": method, "params": inner, "via": "cni.exec"})
                self.connections.append(number)
            script = self._scripts.get(method)
            if script is not None and script.error is not None:
                raise ScriptedError(script.error)
            if script is not None and script.result is not None:
                return copy.deepcopy(script.result)
            return copy.deepcopy(DEFAULT_RESULTS.get(method, {}))

        env = {k: base64.b64decode(v).decode("utf-8", "surrogateescape") for k, v in params["env"].items()}
        status, out = plugin.run_in_agent(env, base64.b64decode(params["stdin"]), tuple(params["netns"]), dispatch)
        return {"exit": status, "stdout": base64.b64encode(out.encode("utf-8", "surrogateescape")).decode()}

    def _answer(self, conn: socket.socket, line: bytes, number: int) -> bool:
        try:
            request = json.loads(line)
        except ValueError:
            request = {"method": None, "params": None, "unparseable": line.decode(errors="replace")}
        if self.inline_exec and isinstance(request, dict) and request.get("method") == "cni.exec":
            return self._send(conn, json.dumps({"result": self._exec(request["params"], number)}).encode() + b"\n")
        with self._lock:
            self.requests.append(request)
            self.connections.append(number)
        method = request.get("method") if isinstance(request, dict) else None
        script = self._scripts.get(str(method))
        if script is not None and script.delay:
            deadline = time.monotonic() + script.delay
            while time.monotonic() < deadline and not self._stop.is_set():
                time.sleep(0.01)
        if script is not None and script.hangup:
            return False
        if script is not None and script.raw is not None:
            out = script.raw
        elif script is not None and script.error is not None:
            out = json.dumps({"error": script.error}).encode() + b"\n"
        else:
            if script is not None and script.result is not None:
                result = script.result
            else:
                result = DEFAULT_RESULTS.get(str(method), {})
            out = json.dumps({"result": copy.deepcopy(result)}).encode() + b"\n"
        return self._send(conn, out)

    @staticmethod
    def _send(conn: socket.socket, out: bytes) -> bool:
        try:
            conn.settimeout(5)
            conn.sendall(out)
            conn.settimeout(0.05)
        except OSError:
            return False
        return True
