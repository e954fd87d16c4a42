"""The datapath forwarding real packets between two pods of one node, with nothing else helping.

Topology (all names start with a unique ``wdp-<hex>-`` prefix)::

    pod netns "pa"                node netns "node"                 pod netns "pb"
    eth0 10.200.0.2/32  <-veth->  lxcA [tc: from/to_container]
         fd00:200::2/128          lxcB [tc: from/to_container]  <-veth->  eth0 10.200.0.3/32
    default via 10.200.0.1                                                   fd00:200::3/128
    default via fe80::1 (v6)      no addresses, no routes,           default via 10.200.0.1
                                  ip_forward=0, v6 forwarding=0      default via fd00:200::1 (v6)

No neighbour entries are configured: the pods resolve their (non-existent) gateways through
the datapath's ARP and NDP answers. The node's netns forwards nothing (forwarding off, and its
IP forwarding counters must not move), so every delivered packet went through
bpf_redirect_peer. Pod A uses a link-local IPv6 gateway and pod B a global one, so NDP is
exercised from both kinds of source address.

Loading and attaching run in a child process inside the node's netns, like an agent would
(``nsenter --net``, not ``ip netns exec``, which would hide bpffs); running it a second time is
an agent restart, done while TCP streams flow.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from weft.datapath.loader import default_object_path, read_counters, unpin_all

from labutil import in_netns, snmp_counter

POD_A = {"v4": "10.200.0.2", "v6": "fd00:200::2", "gw4": "10.200.0.1", "gw6": "fe80::1"}
POD_B = {"v4": "10.200.0.3", "v6": "fd00:200::3", "gw4": "10.200.0.1", "gw6": "fd00:200::1"}
ECHO_PORT = 7777
DEADLINE = 20.0

# Runs inside the node's netns: what an agent does at start (load, attach, write endpoints).
AGENT_SCRIPT = r"""
import ipaddress, json, sys
from pathlib import Path
from weft.datapath.loader import EndpointEntry, NodeDatapath
cfg = json.loads(sys.argv[1])
dp = NodeDatapath(Path(cfg["pin_dir"]), Path(cfg["obj"]))
dp.load()
for ifname in cfg["attach"]:
    dp.attach(ifname)
for e in cfg["endpoints"]:
    dp.upsert_endpoint(EndpointEntry(ipaddress.ip_address(e["ip"]), e["ifindex"], e["ep_id"], e["identity"],
                                     e["pod_mac"], e["host_mac"]))
print(json.dumps({"programs": dp.program_ids(),
                  "attached": {i: dp.attached_program_ids(i) for i in cfg["attach"]},
                  "endpoints": sorted(str(ip) for ip in dp.endpoints())}))
dp.close()
"""

# Runs in a pod: TCP and UDP echo on one dual-stack port; prints "ready" once bound, exits
# when its stdin closes.
ECHO_SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1])
def listener(kind):
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    return s
def serve_conn(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
def serve_tcp(s):
    s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve_conn, args=(c,), daemon=True).start()
def serve_udp(s):
    while True:
        data, peer = s.recvfrom(65536)
        s.sendto(data, peer)
tcp, udp = listener(socket.SOCK_STREAM), listener(socket.SOCK_DGRAM)
threading.Thread(target=serve_tcp, args=(tcp,), daemon=True).start()
threading.Thread(target=serve_udp, args=(udp,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

# Runs in a pod: one echo exchange; prints what came back. UDP is retried within the deadline
# (a datagram may be lost while neighbours resolve), TCP retransmits by itself.
ECHO_CLIENT = r"""
import socket, sys, time
proto, host, port, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
family = socket.AF_INET6 if ":" in host else socket.AF_INET
deadline = time.monotonic() + 10
if proto == "tcp":
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
else:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        while True:
            s.sendto(payload, (host, port))
            try:
                data = s.recv(65536)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
print(data.decode())
"""

# Runs in a pod: request/response rounds over one TCP connection until stdin closes. Prints
# "rounds=N" about every 50 ms, and at the end "done rounds=N max_gap_ms=M" (the longest time
# one round took: a lost packet would show as a retransmission timeout, >= 200 ms).
STREAM_CLIENT = r"""
import os, select, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
chunk = os.urandom(1400)
s = socket.create_connection((host, port), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rounds, max_gap, last_print = 0, 0.0, 0.0
while True:
    start = time.monotonic()
    s.sendall(chunk)
    got = b""
    while len(got) < len(chunk):
        data = s.recv(len(chunk) - len(got))
        if not data:
            raise SystemExit("connection closed by the server")
        got += data
    if got != chunk:
        raise SystemExit("echo mismatch")
    now = time.monotonic()
    rounds += 1
    max_gap = max(max_gap, now - start)
    if now - last_print > 0.05:
        print(f"rounds={rounds}", flush=True)
        last_print = now
    if select.select([sys.stdin], [], [], 0)[0]:
        break
print(f"done rounds={rounds} max_gap_ms={max_gap * 1000:.1f}", flush=True)
"""


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


class Proc:
    """A child process whose stdout lines are read with deadlines (never a bare sleep)."""

    def __init__(self, argv: list[str]) -> None:
        # Lives as long as the process (stderr to a file: a full pipe could block the child).
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        self.buf = b""

    def readline(self, timeout: float = DEADLINE) -> str:
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no output from {self.p.args!r} within {timeout}s")
            ready, _, _ = select.select([self.p.stdout], [], [], remaining)
            if ready:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"{self.p.args!r} exited ({self.p.wait()}): {self.errors()}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-2000:]

    def drain(self) -> list[str]:
        """Every complete line available now, without waiting."""
        assert self.p.stdout is not None
        while select.select([self.p.stdout], [], [], 0)[0]:
            chunk = os.read(self.p.stdout.fileno(), 65536)
            if not chunk:
                break
            self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [ln.decode() for ln in lines]

    def finish(self, timeout: float = DEADLINE) -> list[str]:
        """Close stdin (the scripts' signal to finish), read the rest of stdout, reap."""
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.close()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.p.args!r} did not finish within {timeout}s")
            if select.select([self.p.stdout], [], [], remaining)[0]:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    break
                self.buf += chunk
        self.p.wait(timeout=max(remaining, 1))
        lines, self.buf = self.buf.decode().splitlines(), b""
        return lines

    def stop(self) -> None:
        """Best effort for teardown: close stdin, give the process a moment, then kill it."""
        if self.p.stdin is not None and not self.p.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.p.stdin.close()
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        if self.p.stdout is not None:
            self.p.stdout.close()
        self.stderr.close()


@dataclass
class Topology:
    prefix: str
    pin_dir: Path
    node: str
    pods: dict[str, str]  # pod name ("a"/"b") -> netns name
    endpoints: list[dict[str, object]] = field(default_factory=list)
    programs: dict[str, int] = field(default_factory=dict)  # ids loaded by the last agent_start
    procs: list[Proc] = field(default_factory=list)

    def run_in(self, netns: str, script: str, *args: str, timeout: float = DEADLINE) -> str:
        argv = ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", script, *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{script.strip().splitlines()[0]!r} {args} failed: {done.stderr[-2000:]}"
        return done.stdout

    def start(self, netns: str, script: str, *args: str) -> Proc:
        proc = Proc(["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", script, *args])
        self.procs.append(proc)
        return proc

    def agent_start(self) -> dict[str, object]:
        """Load + attach + write endpoints in the node's netns, in a fresh process."""
        cfg = {"pin_dir": str(self.pin_dir), "obj": str(default_object_path()), "attach": ["lxcA", "lxcB"],
               "endpoints": self.endpoints}
        out: dict[str, object] = json.loads(self.run_in(self.node, AGENT_SCRIPT, json.dumps(cfg)))
        assert isinstance(out["programs"], dict)
        self.programs = dict(out["programs"])
        return out

    def ping(self, pod: str, dst: str) -> str:
        done = in_netns(self.pods[pod], "ping", "-c", "2", "-i", "0.2", "-W", "3", dst, check=False)
        assert done.returncode == 0, f"ping {dst} from pod {pod} failed:\n{done.stdout}{done.stderr}"
        return done.stdout

    def forwarded_by_node(self) -> tuple[int, int]:
        return snmp_counter(self.node, "Ip", "ForwDatagrams"), snmp_counter(self.node, "Ip6", "OutForwDatagrams")


def _link(netns: str, ifname: str) -> dict[str, object]:
    info: dict[str, object] = json.loads(sh("ip", "-n", netns, "-j", "link", "show", ifname))[0]
    return info


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True, check=True)
    prefix = f"wdp-{secrets.token_hex(3)}-"
    t = Topology(prefix=prefix, pin_dir=Path(f"/sys/fs/bpf/{prefix}pins"), node=prefix + "node",
                 pods={"a": prefix + "pa", "b": prefix + "pb"})
    created: list[str] = []
    try:
        for ns in (t.node, *t.pods.values()):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # The node must not route: only the datapath may deliver.
        in_netns(t.node, "sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0",
                 "net.ipv6.conf.default.forwarding=0")
        for name, host_if, cfg, ep_id in (("a", "lxcA", POD_A, 1), ("b", "lxcB", POD_B, 2)):
            pod = t.pods[name]
            # Pod addresses are usable at once (no DAD), including eth0's link-local address.
            in_netns(pod, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
            sh("ip", "-n", t.node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", pod)
            sh("ip", "-n", t.node, "link", "set", host_if, "up")
            sh("ip", "-n", pod, "link", "set", "eth0", "up")
            sh("ip", "-n", pod, "addr", "add", f"{cfg['v4']}/32", "dev", "eth0")
            sh("ip", "-n", pod, "-6", "addr", "add", f"{cfg['v6']}/128", "dev", "eth0", "nodad")
            sh("ip", "-n", pod, "route", "add", cfg["gw4"], "dev", "eth0", "scope", "link")
            sh("ip", "-n", pod, "route", "add", "default", "via", cfg["gw4"], "dev", "eth0")
            if not cfg["gw6"].startswith("fe80:"):
                sh("ip", "-n", pod, "-6", "route", "add", f"{cfg['gw6']}/128", "dev", "eth0")
            sh("ip", "-n", pod, "-6", "route", "add", "default", "via", cfg["gw6"], "dev", "eth0")
            host, peer = _link(t.node, host_if), _link(pod, "eth0")
            for ip in (cfg["v4"], cfg["v6"]):
                t.endpoints.append({"ip": ip, "ifindex": host["ifindex"], "ep_id": ep_id, "identity": 256 + ep_id,
                                    "pod_mac": peer["address"], "host_mac": host["address"]})
        yield t
    finally:
        for proc in t.procs:
            proc.stop()
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        unpin_all(t.pin_dir)


@pytest.fixture(scope="module")
def started(topo: Topology) -> Topology:
    """The datapath loaded and attached by a first "agent" process, echo servers in both pods."""
    # Control: without the datapath nothing answers the pods' ARP, and the node would not route.
    done = in_netns(topo.pods["a"], "ping", "-c", "1", "-W", "1", POD_B["v4"], check=False)
    assert done.returncode != 0, "the topology forwards without the datapath: the tests would prove nothing"
    out = topo.agent_start()
    attached = out["attached"]
    programs = out["programs"]
    assert isinstance(attached, dict) and isinstance(programs, dict)
    for ifname in ("lxcA", "lxcB"):
        assert attached[ifname] == {"ingress": programs["from_container"], "egress": programs["to_container"]}
    assert len(out["endpoints"]) == 4  # type: ignore[arg-type]
    for pod in topo.pods.values():
        server = topo.start(pod, ECHO_SERVER, str(ECHO_PORT))
        assert server.readline() == "ready"
    return topo


def rounds_of(line: str) -> int:
    assert line.startswith("rounds="), line
    return int(line.split("=", 1)[1])


def delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, int]:
    return {k: after[k][0] - before[k][0] for k in after}


def test_ping_both_ways_without_the_node_stack(started: Topology) -> None:
    t = started
    # The pods resolve their gateways in this test: the control ping of the fixture left an
    # ARP resolution running that may finish once the datapath is attached, before `before`.
    for pod in t.pods.values():
        in_netns(pod, "ip", "neigh", "flush", "dev", "eth0")
        in_netns(pod, "ip", "-6", "neigh", "flush", "dev", "eth0")
    before, fwd_before = read_counters(t.pin_dir), t.forwarded_by_node()
    for src, dst in (("a", POD_B), ("b", POD_A)):
        out4 = t.ping(src, dst["v4"])
        assert "ttl=63" in out4, "one routed hop: the datapath decremented the TTL"
        out6 = t.ping(src, dst["v6"])
        assert "ttl=63" in out6, "one routed hop: the datapath decremented the hop limit"
    d = delta(before, read_counters(t.pin_dir))
    assert d["fwd_peer_v4"] >= 8 and d["fwd_peer_v6"] >= 8, d  # 2 requests + 2 replies, each way
    assert d["arp_reply"] >= 2, "each pod resolved its IPv4 gateway through the datapath"
    assert d["ndp_reply"] >= 2, "each pod resolved its IPv6 gateway through the datapath"
    assert d["drop_spoof"] == 0 and d["drop_invalid"] == 0
    assert t.forwarded_by_node() == fwd_before, "the node's IP stack forwarded nothing"


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("family", ["v4", "v6"])
def test_echo_between_pods(started: Topology, proto: str, family: str) -> None:
    t = started
    fwd_before = t.forwarded_by_node()
    for src, dst in (("a", POD_B), ("b", POD_A)):
        payload = f"{proto}-{family}-{secrets.token_hex(8)}"
        out = t.run_in(t.pods[src], ECHO_CLIENT, proto, dst[family], str(ECHO_PORT), payload)
        assert out.strip() == payload
    assert t.forwarded_by_node() == fwd_before


def test_spoofed_source_is_dropped_on_the_wire(started: Topology) -> None:
    t = started
    spoofed = "10.200.0.99"
    in_netns(t.pods["a"], "ip", "addr", "add", f"{spoofed}/32", "dev", "eth0")
    try:
        before = read_counters(t.pin_dir)
        done = in_netns(t.pods["a"], "ping", "-c", "1", "-W", "1", "-I", spoofed, POD_B["v4"], check=False)
        assert done.returncode != 0, "a packet from an address that is not the pod's must not arrive"
        assert delta(before, read_counters(t.pin_dir))["drop_spoof"] >= 1
    finally:
        in_netns(t.pods["a"], "ip", "addr", "del", f"{spoofed}/32", "dev", "eth0", check=False)


def test_reload_while_streams_run(started: Topology) -> None:
    """An agent restart (a new process: load() reusing the pinned maps, attach() replacing the
    filters) swaps the programs under running TCP streams; they keep going."""
    t = started
    fwd_before = t.forwarded_by_node()
    ids_before = {i: json.loads(sh("ip", "-n", t.node, "-j", "link", "show", i))[0]["ifindex"]
                  for i in ("lxcA", "lxcB")}
    streams = [t.start(t.pods["a"], STREAM_CLIENT, POD_B[fam], str(ECHO_PORT)) for fam in ("v4", "v6")]

    def rounds(proc: Proc) -> int:
        return rounds_of(proc.readline())

    for s in streams:
        assert rounds(s) > 0
    retrans_before = snmp_counter(t.pods["a"], "Tcp", "RetransSegs")
    before = read_counters(t.pin_dir)
    old_programs = dict(t.programs)
    out = t.agent_start()
    programs, attached = out["programs"], out["attached"]
    assert programs != old_programs and set(programs) == set(old_programs), "newly loaded programs"
    assert isinstance(programs, dict) and isinstance(attached, dict)
    for ifname in ("lxcA", "lxcB"):
        assert attached[ifname] == {"ingress": programs["from_container"], "egress": programs["to_container"]}, \
            "the new programs replaced the old ones in place"
    assert len(out["endpoints"]) == 4, "endpoint entries survived in the pinned map"  # type: ignore[arg-type]
    # Progress after the swap: lines are printed only after a completed round, so two more
    # lines after everything printed so far prove rounds went through the new programs.
    for s in streams:
        seen = [rounds_of(ln) for ln in s.drain()]
        at_swap = max(seen, default=0)
        first, second = rounds(s), rounds(s)
        assert at_swap < first < second, "the stream stalled after the reload"
    after = read_counters(t.pin_dir)
    for s in streams:
        lines = s.finish()
        assert s.p.returncode == 0, f"stream failed: {s.errors()}"
        done = [ln for ln in lines if ln.startswith("done")]
        assert done, lines[-3:]
        max_gap = float(done[-1].rsplit("max_gap_ms=", 1)[1])
        assert max_gap < 2000, f"a round took {max_gap} ms"
    # A packet lost in the swap would have been retransmitted (a single segment in flight is
    # retransmitted only after 200 ms without an ACK, so scheduling delays do not count).
    assert snmp_counter(t.pods["a"], "Tcp", "RetransSegs") == retrans_before, "packets were lost during the swap"
    d = delta(before, after)
    assert d["fwd_peer_v4"] > 0 and d["fwd_peer_v6"] > 0, "counters kept counting in the reused map"
    assert t.forwarded_by_node() == fwd_before
    assert ids_before == {i: json.loads(sh("ip", "-n", t.node, "-j", "link", "show", i))[0]["ifindex"]
                          for i in ("lxcA", "lxcB")}, "interfaces untouched"
