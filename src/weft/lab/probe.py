"""Connectivity probes run from inside a pod's netns: ping, TCP echo, UDP echo.

Each probe is a short-lived child process entered into the pod's netns with nsenter, so the
caller's threads never change namespace. A lab pod's probe also sees the pod's resolv.conf as
/etc/resolv.conf (kube-dns, see ``weft.lab.world``): a name is resolved as the pod would.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

from weft.lab.cluster import pod_argv

_CLIENT = r"""
import socket, sys
proto, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
family = {"0": socket.AF_UNSPEC, "4": socket.AF_INET, "6": socket.AF_INET6}[sys.argv[5]]
payload = b"weft-probe"
try:
    # A name is resolved inside the pod, with the pod's resolver, as an application would.
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    fam, _, _, _, addr = socket.getaddrinfo(host, port, family, kind)[0]
    if proto in ("tcp", "sctp"):
        s = socket.socket(fam, socket.SOCK_STREAM, socket.IPPROTO_SCTP if proto == "sctp" else 0)
        s.settimeout(timeout)
        s.connect(addr)
        s.sendall(payload); got = s.recv(100)
    else:
        # Connected, so an ICMP port unreachable comes back as "refused".
        s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(timeout); s.connect(addr)
        s.send(payload); got = s.recv(100)
    print("connected" if got == payload else "mismatch")
except ConnectionRefusedError:
    print("refused")
except (TimeoutError, socket.timeout):
    print("timeout")
except socket.gaierror as e:
    print("error:cannot resolve " + host + ": " + str(e))
except OSError as e:
    print("error:" + str(e))
"""


@dataclass(frozen=True)
class ProbeResult:
    outcome: str  # connected | refused | timeout | mismatch | error:...

    @property
    def ok(self) -> bool:
        return self.outcome == "connected"


def probe(netns: str, proto: str, host: str, port: int, timeout: float = 2.0, family: int = 0) -> ProbeResult:
    """Connect from the pod in ``netns`` to ``host`` (an address or a name) and report the outcome.
    ``family`` 4 or 6 picks that family's address of a name (0: the resolver's first choice)."""
    if family not in (0, 4, 6):
        raise ValueError(f"family {family}: 0, 4 or 6")
    out = subprocess.run(
        pod_argv(netns, [sys.executable, "-c", _CLIENT, proto, host, str(port), str(timeout), str(family)]),
        capture_output=True, text=True, timeout=timeout + 10, check=False,
    )
    return ProbeResult(out.stdout.strip() or f"error:{out.stderr.strip()}")


def ping(netns: str, host: str, count: int = 2, timeout: float = 2.0) -> bool:
    out = subprocess.run(
        pod_argv(netns, ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(int(timeout)), host]),
        capture_output=True, text=True, timeout=timeout * count + 10, check=False,
    )
    return out.returncode == 0
