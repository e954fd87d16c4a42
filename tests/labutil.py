"""Helpers for privileged tests: names, node-namespace inspection, polling with deadlines."""

from __future__ import annotations

import json
import secrets
import struct
import subprocess
import time
from collections.abc import Callable
from typing import Any


def pod_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def in_netns(netns: str, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net=/run/netns/{netns}", *argv], capture_output=True, text=True,
                          check=check, timeout=timeout)


def links(netns: str) -> list[str]:
    out = in_netns(netns, "ip", "-j", "link", "show").stdout
    return [link["ifname"] for link in json.loads(out)]


def snmp_counter(netns: str, proto: str, field: str) -> int:
    """A counter of /proc/net/snmp (or snmp6) as seen inside ``netns``."""
    path = "/proc/net/snmp6" if proto == "Ip6" else "/proc/net/snmp"
    text = in_netns(netns, "cat", path).stdout
    if proto == "Ip6":
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == f"Ip6{field}":
                return int(value.strip())
        raise KeyError(field)
    lines = [ln for ln in text.splitlines() if ln.startswith(proto + ":")]
    header, values = lines[0].split()[1:], lines[1].split()[1:]
    return int(dict(zip(header, values, strict=True))[field])


def counters(status: dict[str, Any]) -> dict[str, int]:
    return {k: int(v["packets"]) for k, v in status["counters"].items()}


# A TCP client that echoes 1 KiB chunks through a server forever and prints a count every 50:
# a connection that is reset or stalls shows as a missing line.
STREAM_CLIENT = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
chunk = b"x" * 1024
sent = 0
while True:
    s.sendall(chunk)
    got = 0
    while got < len(chunk):
        got += len(s.recv(len(chunk) - got))
    sent += 1
    if sent % 50 == 0:
        print(sent, flush=True)
    time.sleep(0.002)
"""


def stream_progress(proc: subprocess.Popen[str]) -> int:
    """The next progress count of a STREAM_CLIENT; fails if the stream died."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"stream stopped (exit {proc.poll()})")
    return int(line)


def csum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``; 0 when data includes a valid checksum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
