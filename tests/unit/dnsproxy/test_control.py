"""The control socket: JSON lines, errors, the root check, and descriptors passed in a hand-over."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from weft.dnsproxy import control
from weft.dnsproxy.control import ControlServer, ProxyCallError, ProxyClient, ProxyUnavailable


def serve(path: Path, handlers: dict[str, control.Handler], handover: control.HandoverHandler,
          body: Any) -> Any:
    async def main() -> Any:
        server = ControlServer(path, handlers, handover)
        await server.start()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, body)
        finally:
            await server.close()

    return asyncio.run(main())


async def echo(params: dict[str, Any]) -> Any:
    return {"echo": params}


async def broken(params: dict[str, Any]) -> Any:
    raise ValueError("boom")


async def no_handover(conn: socket.socket, params: dict[str, Any]) -> None:
    conn.close()


def test_calls_errors_and_socket_mode(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sock"
    client = ProxyClient(path, timeout=5)

    def body() -> None:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        if os.geteuid() != 0:
            with pytest.raises(ProxyCallError, match="only root"):
                client.call("echo")
            return
        assert client.call("echo", {"a": 1}) == {"echo": {"a": 1}}
        with pytest.raises(ProxyCallError, match="unknown method"):
            client.call("nope")
        with pytest.raises(ProxyCallError, match="boom"):
            client.call("broken")

    serve(path, {"echo": echo, "broken": broken}, no_handover, body)
    assert not path.exists(), "a closing server removes its own socket"
    with pytest.raises(ProxyUnavailable):
        client.call("echo")


@pytest.mark.skipif(os.geteuid() != 0, reason="the control socket only serves root")
def test_descriptors_pass_with_the_answer(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sock"
    r, w = os.pipe()

    async def handover(conn: socket.socket, params: dict[str, Any]) -> None:
        control.send_with_fds(conn, {"result": {"sockets": ["pipe"], "pid": params["pid"]}}, [w])
        conn.close()

    def body() -> tuple[dict[str, Any], list[int]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(str(path))
            conn.sendall(control.encode({"method": "handover", "params": {"pid": 42}}))
            return control.recv_line_with_fds(conn)

    reply, fds = serve(path, {}, handover, body)
    assert reply == {"result": {"sockets": ["pipe"], "pid": 42}} and len(fds) == 1
    os.write(fds[0], b"x")  # the received descriptor is the same pipe
    assert os.read(r, 1) == b"x"
    for fd in (r, w, *fds):
        os.close(fd)


def test_a_successor_socket_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sock"

    async def main() -> None:
        first = ControlServer(path, {}, no_handover)
        await first.start()
        second = ControlServer(path, {}, no_handover)
        await second.start()  # renamed over the first one's
        await first.close(unlink=True)
        assert path.exists(), "the first server leaves its successor's socket alone"
        await second.close(unlink=True)
        assert not path.exists()

    asyncio.run(main())
