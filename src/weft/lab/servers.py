"""Small servers run inside lab pods (and the lab's world) for probes and tests: TCP echo, UDP
echo, HTTP.

Run as ``python -m weft.lab.servers tcp:80 udp:80 http:8080[/name] ...`` inside the pod's netns.
Each listens on every address of both families (a dual-stack socket where IPv6 is on). An HTTP
server answers requests that start with an HTTP method and echoes any other stream, so a probe
(which expects its bytes back) and a web client both work on the same port.

``WEFT_SERVER_ADDRESSES`` (comma-separated) binds to those addresses only, one socket each.
With ``WEFT_SERVER_PEER_LOG`` set, every TCP connection and the first datagram of every UDP peer
add a JSON line (protocol, port, local and peer address) to that file: the lab's world uses it to
show which source address arrived (a masqueraded pod shows as its node).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

# What asyncio.start_server calls for each connection.
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

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


def _bind(kind: int, port: int, proto: int = 0, address: str = "") -> socket.socket:
    if address:
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.setblocking(False)
        return sock
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


_HTTP_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE")


def _plain(address: str) -> str:
    """An IPv4 peer of a dual-stack socket shows as ::ffff:a.b.c.d: give the IPv4 address."""
    return address.removeprefix("::ffff:") if address.startswith("::ffff:") and "." in address else address


class _PeerLog:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self.udp_seen: set[tuple[int, str, str, int]] = set()

    def write(self, proto: str, port: int, local: str, peer: tuple[str, int]) -> None:
        if not self.path:
            return
        line = json.dumps({"proto": proto, "port": port, "local": _plain(local), "peer": _plain(peer[0]),
                           "peer_port": peer[1]})
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def tcp(self, port: int, writer: asyncio.StreamWriter) -> None:
        if self.path:
            self.write("tcp", port, writer.get_extra_info("sockname")[0], writer.get_extra_info("peername")[:2])

    def udp(self, port: int, local: str, addr: tuple[str, int]) -> None:
        # Once per peer: a UDP stream must not turn into a line per datagram.
        key = (port, local, addr[0], addr[1])
        if self.path and key not in self.udp_seen:
            self.udp_seen.add(key)
            self.write("udp", port, local, addr)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes = b"") -> None:
    with contextlib.suppress(ConnectionError):
        data = first
        while data or (data := await reader.read(65536)):
            writer.write(data)
            await writer.drain()
            data = b""
    writer.close()


def _tcp_echo(port: int, peers: _PeerLog) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.tcp(port, writer)
        await _echo(reader, writer)
    return handle


def _looks_like_http(data: bytes) -> bool | None:
    """True for a request line's start, False for anything else, None while it could still be one."""
    word, space, _ = data.partition(b" ")
    if space:
        return word in _HTTP_METHODS
    return None if any(m.startswith(word) for m in _HTTP_METHODS) and len(word) < 8 else False


def _http_handler(identity: str, port: int, peers: _PeerLog) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.tcp(port, writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = b""
            while (verdict := _looks_like_http(head)) is None:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                head += chunk
            if not verdict:
                await _echo(reader, writer, head)
                return
            if b"\r\n\r\n" not in head:
                head += await reader.readuntil(b"\r\n\r\n")
            body = f"{identity}\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        writer.close()
    return handle


class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, port: int, peers: _PeerLog) -> None:
        self.port = port
        self.peers = peers

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        local = str(transport.get_extra_info("sockname")[0])
        # A wildcard socket does not know which of its addresses a datagram was sent to.
        self.local = "" if local in ("::", "0.0.0.0") else local

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.peers.udp(self.port, self.local, addr)
        self.transport.sendto(data, addr)


async def serve(specs: list[ServeSpec], identity: str, addresses: list[str] | None = None) -> None:
    """Serve ``specs`` on every address (one dual-stack socket each), or on each of ``addresses``
    (a socket per address: a UDP reply then leaves from the address the request was sent to,
    which a wildcard socket does not guarantee on a host with many addresses)."""
    loop = asyncio.get_running_loop()
    peers = _PeerLog(os.environ.get("WEFT_SERVER_PEER_LOG"))
    for spec in specs:
        port = spec.port
        for address in addresses or [""]:
            if spec.protocol == "udp":
                await loop.create_datagram_endpoint(functools.partial(_UdpEcho, port, peers),
                                                    sock=_bind(socket.SOCK_DGRAM, port, address=address))
            elif spec.protocol == "sctp":
                try:
                    sctp = _bind(socket.SOCK_STREAM, port, socket.IPPROTO_SCTP, address)
                except OSError as exc:
                    raise SystemExit(f"sctp:{port}: this kernel does not support SCTP ({exc.strerror})") from exc
                await asyncio.start_server(_tcp_echo(port, peers), sock=sctp)
            else:
                handler = _tcp_echo(port, peers) if spec.protocol == "tcp" else _http_handler(identity, port, peers)
                await asyncio.start_server(handler, sock=_bind(socket.SOCK_STREAM, port, address=address))
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
    addresses = [a for a in os.environ.get("WEFT_SERVER_ADDRESSES", "").split(",") if a]
    asyncio.run(serve(specs, identity, addresses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
