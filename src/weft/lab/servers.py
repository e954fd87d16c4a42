"""Small servers run inside lab pods for probes and tests: TCP echo, UDP echo, HTTP.

Run as ``python -m weft.lab.servers tcp:80 udp:80 http:8080[/name] ...`` inside the pod's netns.
Each listens on every address of both families (a dual-stack socket where IPv6 is on).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from dataclasses import dataclass
from typing import cast

PROTOCOLS = ("tcp", "udp", "sctp", "http")


@dataclass(frozen=True)
class ServeSpec:
    protocol: str
    port: int
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> ServeSpec:
        proto, sep, rest = text.partition(":")
        port_text, _, name = rest.partition("/")
        if not sep or proto.lower() not in PROTOCOLS or not port_text.isdigit():
            raise ValueError(f"serve spec {text!r} is not PROTO:PORT[/NAME] with PROTO in {PROTOCOLS}")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(f"serve spec {text!r}: port {port} is out of range 1-65535")
        return cls(proto.lower(), port, name)

    def __str__(self) -> str:
        return f"{self.protocol}:{self.port}" + (f"/{self.name}" if self.name else "")


def _bind(kind: int, port: int, proto: int = 0) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_INET6, kind, proto)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
    except OSError:
        sock = socket.socket(socket.AF_INET, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    return sock


async def _tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


def _http_handler(identity: str) -> object:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            body = f"{identity}\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        writer.close()
    return handle


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def serve(specs: list[ServeSpec], identity: str) -> None:
    loop = asyncio.get_running_loop()
    for spec in specs:
        if spec.protocol == "udp":
            await loop.create_datagram_endpoint(_UdpEcho, sock=_bind(socket.SOCK_DGRAM, spec.port))
        elif spec.protocol == "sctp":
            try:
                sctp = _bind(socket.SOCK_STREAM, spec.port, socket.IPPROTO_SCTP)
            except OSError as exc:
                raise SystemExit(f"sctp:{spec.port}: this kernel does not support SCTP ({exc.strerror})") from exc
            await asyncio.start_server(_tcp_echo, sock=sctp)
        else:
            handler = _tcp_echo if spec.protocol == "tcp" else _http_handler(identity)
            await asyncio.start_server(handler, sock=_bind(socket.SOCK_STREAM, spec.port))  # type: ignore[arg-type]
    # Tell the parent we listen: it polls for this file instead of sleeping.
    ready = os.environ.get("WEFT_SERVER_READY_FILE")
    if ready:
        with open(ready, "w") as f:
            f.write(str(os.getpid()))
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    specs = [ServeSpec.parse(a) for a in args]
    identity = os.environ.get("WEFT_POD", "weft-pod")
    asyncio.run(serve(specs, identity))
    return 0


if __name__ == "__main__":
    sys.exit(main())
