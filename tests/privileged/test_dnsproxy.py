"""The DNS proxy on real packets: a pod's queries redirected by the datapath, decided, forwarded to a
real DNS server (dnsmasq), learned into weft_fqdn before the answer reaches the pod; TTL expiry that
spares a live connection; malformed packets; DNS over TCP and IPv6; and restarts without outage.

Topology (names start with a unique ``wdx-<hex>-``; nothing in the root netns)::

    pod netns "pa"                  node netns "node"                      server netns "srv"
    eth0 10.210.0.2/32  <-veth->    lxcA [tc: from/to_container]
         fd00:210::2/128            vsrv 10.211.0.1/24, fd00:211::1/64 <-veth-> eth0 10.211.0.2/24 ...
    default via 10.210.0.1          routes to the pod via lxcA,               dnsmasq on .53 / ::53
    default via fe80::1 (v6)        forwarding on, the proxy (port 10053)     TCP echo on :8080

The pod's egress policy: UDP and TCP 53 to anyone, handed to the proxy; toFQDNs ``*.example.com``
(selector identity SEL) on TCP 8080. Nothing else: a connection to an address nobody resolved is
dropped. The datapath is loaded in the node netns by a small "agent" script (no agent process).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from weft.cli.main import app
from weft.datapath import abi
from weft.datapath.loader import default_object_path, read_counters, unpin_all
from weft.datapath.maps import BpfHashMap
from weft.dnsproxy.control import ProxyClient
from weft.dnsproxy.dpmaps import slots_of

from labutil import in_netns, wait_until

POD4, POD6 = "10.210.0.2", "fd00:210::2"
DNS4, DNS6 = "10.211.0.53", "fd00:211::53"
APP4, APP6 = "10.211.0.10", "fd00:211::10"
SHORT4 = "10.211.0.11"
DENIED4 = "10.211.0.12"
NEVER4 = "10.211.0.13"  # served, never resolved by anyone
SERVER_ADDRS = [DNS4, APP4, SHORT4, DENIED4, NEVER4]
SERVER_ADDRS6 = [DNS6, APP6]
EP_ID, POD_ID, SEL = 1, 300, 16777300
PROXY_PORT = 10053
APP_PORT = 8080
SHORT_TTL = 2
DEADLINE = 20.0

# The node's "agent": load and attach the datapath, write the pod's endpoint entries and policy.
AGENT_SCRIPT = r"""
import ipaddress, json, sys
from pathlib import Path
from weft.datapath import abi
from weft.datapath.loader import EndpointEntry, NodeDatapath, PolicyMapKey, PolicyMapValue
cfg = json.loads(sys.argv[1])
dp = NodeDatapath(Path(cfg["pin_dir"]), Path(cfg["obj"]))
dp.load()
dp.attach("lxcA")
entries = [EndpointEntry(ipaddress.ip_address(ip), cfg["ifindex"], cfg["ep_id"], cfg["identity"], cfg["pod_mac"],
                         cfg["host_mac"]) for ip in cfg["ips"]]
for e in entries:
    dp.upsert_endpoint(e)
E = abi.DIR_EGRESS
desired = {
    PolicyMapKey(E, 0, 17, 53, 16): PolicyMapValue(False, cookie=1, proxy_port=cfg["proxy_port"]),
    PolicyMapKey(E, 0, 6, 53, 16): PolicyMapValue(False, cookie=1, proxy_port=cfg["proxy_port"]),
    PolicyMapKey(E, cfg["sel"], 6, cfg["app_port"], 16): PolicyMapValue(False, cookie=2),
}
dp.apply_endpoint_policy(entries, abi.EP_F_EGRESS_ENFORCED | abi.EP_F_FQDN, desired)
dp.close()
print("ok")
"""

# The server netns: a TCP echo server on APP_PORT, every address.
ECHO_SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1])
def serve_conn(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
def serve(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve_conn, args=(c,), daemon=True).start()
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", port))
s.listen(256)
threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

# The pod's client: one JSON command a line on stdin, one JSON answer a line on stdout.
POD_CLIENT = r"""
import json, socket, sys, threading, time
import dns.message, dns.query, dns.rcode, dns.rdatatype, dns.exception

held = {}
loop_state = {}

def resolve(server, name, rdtype, tcp, timeout):
    q = dns.message.make_query(name, rdtype)
    if tcp:
        # Connected first, so a failure says which step failed (the handshake or the answer).
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect((server, 53))
            except OSError as e:
                raise RuntimeError(f"TCP connect to {server}:53: {type(e).__name__}: {e}") from e
            r = dns.query.tcp(q, server, timeout=timeout, sock=s)
    else:
        r = dns.query.udp(q, server, timeout=timeout)
    addrs = [rd.address for rrset in r.answer if rrset.rdtype in (1, 28) for rd in rrset]
    return dns.rcode.to_text(r.rcode()), addrs

def connect(host, port, timeout):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((host, port))
    s.sendall(b"ping")
    assert s.recv(4) == b"ping"
    return s

def run_loop(cmd):
    # A lookup fails when no answer comes within dig's default timeout (5 s).
    st = loop_state
    while not st["stop"]:
        i = st["rounds"]
        tcp = i % 4 == 3
        now = time.time()
        started = time.strftime("%H:%M:%S", time.localtime(now)) + f",{int(now * 1000) % 1000:03d}"
        try:
            rcode, addrs = resolve(cmd["server"], cmd["name"], "A", tcp, 5.0)
            if rcode != "NOERROR" or not addrs:
                raise RuntimeError(f"{cmd['name']}: {rcode} {addrs}")
            connect(addrs[0], cmd["port"], 3.0).close()
        except Exception as e:
            st["failures"].append(f"round {i} ({'tcp' if tcp else 'udp'}, started {started}): {type(e).__name__}: {e}")
        try:
            rcode, _ = resolve(cmd["server"], cmd["denied"], "A", False, 5.0)
            if rcode != "REFUSED":
                st["failures"].append(f"round {i}: denied name answered {rcode}")
        except Exception as e:
            st["failures"].append(f"round {i} (denied): {type(e).__name__}: {e}")
        st["rounds"] += 1

for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    out = {}
    try:
        if op == "query":
            start = time.monotonic()
            out["rcode"], out["addresses"] = resolve(cmd["server"], cmd["name"], cmd["type"], cmd.get("tcp", False),
                                                     cmd.get("timeout", 3.0))
            out["elapsed"] = time.monotonic() - start
            if cmd.get("connect") and out["addresses"]:
                # Right after the answer: the first SYN must pass (a retransmission would take 1 s).
                connect(out["addresses"][0], cmd["connect"], 0.5).close()
                out["connected"] = True
        elif op == "connect":
            connect(cmd["host"], cmd["port"], cmd.get("timeout", 1.0)).close()
        elif op == "tcp_hold":
            # A TCP DNS query from a chosen source port; the connection stays open afterwards.
            family = socket.AF_INET6 if ":" in cmd["server"] else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", cmd["sport"]))
            # The handshake is the kernel's alone (the proxy's listener): its own short timeout
            # catches a dropped SYN (retried after 1 s); the query may take longer on a busy machine.
            s.settimeout(cmd.get("connect_timeout", 2.0))
            start = time.monotonic()
            s.connect((cmd["server"], 53))
            r = dns.query.tcp(dns.message.make_query(cmd["name"], "A"), cmd["server"], sock=s, timeout=5.0)
            out["rcode"], out["elapsed"] = dns.rcode.to_text(r.rcode()), time.monotonic() - start
            held[cmd["id"]] = s
        elif op == "open":
            held[cmd["id"]] = connect(cmd["host"], cmd["port"], 2.0)
        elif op == "echo":
            s = held[cmd["id"]]
            s.sendall(b"pong")
            assert s.recv(4) == b"pong"
        elif op == "close":
            held.pop(cmd["id"]).close()
        elif op == "raw":
            family = socket.AF_INET6 if ":" in cmd["server"] else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.sendto(bytes.fromhex(cmd["hex"]), (cmd["server"], 53))
        elif op == "raw_tcp":
            family = socket.AF_INET6 if ":" in cmd["server"] else socket.AF_INET
            with socket.create_connection((cmd["server"], 53), timeout=2) as s:
                s.sendall(bytes.fromhex(cmd["hex"]))
                s.settimeout(2)
                try:
                    out["closed"] = s.recv(10) == b""
                except ConnectionResetError:
                    out["closed"] = True  # the proxy aborts a connection it gives up on (no TIME_WAIT)
        elif op == "loop_start":
            loop_state.update(stop=False, rounds=0, failures=[])
            loop_state["thread"] = threading.Thread(target=run_loop, args=(cmd,), daemon=True)
            loop_state["thread"].start()
        elif op == "loop_rounds":
            out["rounds"] = loop_state["rounds"]
        elif op == "loop_stop":
            loop_state["stop"] = True
            loop_state["thread"].join()
            out["rounds"], out["failures"] = loop_state["rounds"], loop_state["failures"]
        out["ok"] = True
    except Exception as e:
        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out), flush=True)
"""


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


class Child:
    """A long-running child whose stdout lines are read with deadlines."""

    def __init__(self, argv: list[str], log_path: Path | None = None) -> None:
        self.log_path = log_path
        self.stderr = open(log_path, "ab") if log_path else tempfile.TemporaryFile()  # noqa: SIM115
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        self.buf = b""

    def readline(self, timeout: float = DEADLINE) -> str:
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no output from {self.p.args!r} within {timeout}s")
            if select.select([self.p.stdout], [], [], remaining)[0]:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"{self.p.args!r} exited ({self.p.wait()}): {self.errors()}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def errors(self) -> str:
        if self.log_path:
            return self.log_path.read_text(errors="replace")[-3000:]
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                assert self.p.stdin is not None
                self.p.stdin.close()
            try:
                self.p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        for pipe in (self.p.stdin, self.p.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self.stderr.close()


@dataclass
class Env:
    prefix: str
    node: str
    pod: str
    srv: str
    pin_dir: Path
    state_dir: Path
    config_path: Path
    children: list[Child] = field(default_factory=list)
    proxies: list[Child] = field(default_factory=list)
    client: Child | None = None

    def ns_argv(self, netns: str, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{netns}", *argv]

    def start_proxy(self) -> Child:
        proxy = Child(self.ns_argv(self.node, sys.executable, "-m", "weft.dnsproxy.main", "--config",
                                   str(self.config_path)), log_path=self.state_dir / "proxy.log")
        self.proxies.append(proxy)
        return proxy

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "dnsproxy" / "proxy.sock"

    def proxy_client(self) -> ProxyClient:
        return ProxyClient(self.socket_path, timeout=5)

    def status(self) -> dict[str, Any]:
        return self.proxy_client().status()

    def wait_ready(self, pid: int) -> None:
        def ready() -> bool:
            try:
                st = self.status()
            except Exception:
                return False
            return bool(st["pid"] == pid and st["healthy"])
        wait_until(f"proxy pid {pid} ready", ready, timeout=DEADLINE)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.client is not None
        assert self.client.p.stdin is not None
        self.client.p.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.client.p.stdin.flush()
        out: dict[str, Any] = json.loads(self.client.readline(timeout=30))
        return out

    def query(self, name: str, rdtype: str = "A", tcp: bool = False, server: str = DNS4,
              connect: int = 0) -> dict[str, Any]:
        out = self.ask(op="query", name=name, type=rdtype, tcp=tcp, server=server, connect=connect)
        assert out["ok"], out
        return out

    def fqdn_entries(self) -> dict[tuple[int, str], dict[int, int]]:
        m = BpfHashMap.open_pinned(str(self.pin_dir / "weft_fqdn"), abi.FqdnKey, abi.FqdnValue)
        try:
            return {(int(k.ep_id), str(k.ip())): slots_of(v) for k, v in m.items()}
        finally:
            m.close()

    def write_rules(self, **overrides: Any) -> None:
        rules = {
            "version": 1, "revision": 7,
            "cluster_cidrs": ["10.210.0.0/16", "fd00:210::/48"],
            "endpoints": [{
                "ep_id": EP_ID, "pod": "default/client", "identity": POD_ID, "addresses": [POD4, POD6],
                "dns_rules": [{"peers": None, "protocol": 0, "port": 53, "rule": "allow-example",
                               "names": [{"matchPattern": "*.example.com"}, {"matchName": "refused.test"}]},
                              {"peers": [1234], "protocol": 0, "port": 53, "names": []}],
                "fqdn_selectors": [{"identity": SEL, "selector": {"matchPattern": "*.example.com"}}],
            }],
        }
        rules.update(overrides)
        path = self.state_dir / "dnsproxy" / "rules.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rules))


def _link(netns: str, ifname: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(sh("ip", "-n", netns, "-j", "link", "show", ifname))[0]
    return info


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True, check=True)
    prefix = f"wdx-{secrets.token_hex(3)}-"
    state_dir = Path(tempfile.mkdtemp(prefix=prefix))
    e = Env(prefix=prefix, node=prefix + "node", pod=prefix + "pa", srv=prefix + "srv",
            pin_dir=Path(f"/sys/fs/bpf/{prefix}pins"), state_dir=state_dir, config_path=state_dir / "node.json")
    created: list[str] = []
    try:
        for ns in (e.node, e.pod, e.srv):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            in_netns(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        in_netns(e.node, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        # pod <-> node
        sh("ip", "-n", e.node, "link", "add", "lxcA", "type", "veth", "peer", "name", "eth0", "netns", e.pod)
        sh("ip", "-n", e.node, "link", "set", "lxcA", "up")
        sh("ip", "-n", e.pod, "link", "set", "eth0", "up")
        sh("ip", "-n", e.pod, "addr", "add", f"{POD4}/32", "dev", "eth0")
        sh("ip", "-n", e.pod, "-6", "addr", "add", f"{POD6}/128", "dev", "eth0", "nodad")
        sh("ip", "-n", e.pod, "route", "add", "10.210.0.1", "dev", "eth0", "scope", "link")
        sh("ip", "-n", e.pod, "route", "add", "default", "via", "10.210.0.1", "dev", "eth0")
        sh("ip", "-n", e.pod, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
        sh("ip", "-n", e.node, "route", "add", f"{POD4}/32", "dev", "lxcA")
        sh("ip", "-n", e.node, "-6", "route", "add", f"{POD6}/128", "dev", "lxcA")
        # node <-> server
        sh("ip", "-n", e.node, "link", "add", "vsrv", "type", "veth", "peer", "name", "eth0", "netns", e.srv)
        sh("ip", "-n", e.node, "addr", "add", "10.211.0.1/24", "dev", "vsrv")
        sh("ip", "-n", e.node, "-6", "addr", "add", "fd00:211::1/64", "dev", "vsrv", "nodad")
        sh("ip", "-n", e.node, "link", "set", "vsrv", "up")
        sh("ip", "-n", e.srv, "link", "set", "eth0", "up")
        for ip in SERVER_ADDRS:
            sh("ip", "-n", e.srv, "addr", "add", f"{ip}/24", "dev", "eth0")
        for ip in SERVER_ADDRS6:
            sh("ip", "-n", e.srv, "-6", "addr", "add", f"{ip}/64", "dev", "eth0", "nodad")
        sh("ip", "-n", e.srv, "route", "add", "10.210.0.0/16", "via", "10.211.0.1")
        sh("ip", "-n", e.srv, "-6", "route", "add", "fd00:210::/48", "via", "fd00:211::1")
        # the DNS server and the application server
        dnsmasq = Child(e.ns_argv(e.srv, "/usr/sbin/dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                                  "--port=53", "--bind-interfaces", f"--listen-address={DNS4}",
                                  f"--listen-address={DNS6}", "--user=root", "--pid-file=",
                                  # Queries logged with times: a failed lookup's message shows the upstream side.
                                  "--log-queries", "--log-facility=-",
                                  f"--host-record=app.example.com,{APP4},{APP6},60",
                                  "--cname=www.example.com,app.example.com",
                                  f"--host-record=short.example.com,{SHORT4},{SHORT_TTL}",
                                  f"--host-record=denied.test,{DENIED4},60",
                                  f"--host-record=big.example.com,{APP4},60", "--local-ttl=60"),
                        log_path=state_dir / "dnsmasq.log")
        e.children.append(dnsmasq)
        echo = Child(e.ns_argv(e.srv, sys.executable, "-c", ECHO_SERVER, str(APP_PORT)))
        e.children.append(echo)
        assert echo.readline() == "ready"
        # the datapath
        host, peer = _link(e.node, "lxcA"), _link(e.pod, "eth0")
        cfg = {"pin_dir": str(e.pin_dir), "obj": str(default_object_path()), "ifindex": host["ifindex"],
               "ep_id": EP_ID, "identity": POD_ID, "pod_mac": peer["address"], "host_mac": host["address"],
               "ips": [POD4, POD6], "proxy_port": PROXY_PORT, "sel": SEL, "app_port": APP_PORT}
        done = subprocess.run(e.ns_argv(e.node, sys.executable, "-c", AGENT_SCRIPT, json.dumps(cfg)),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        # the proxy
        e.config_path.write_text(json.dumps({
            "node_name": "node-1", "state_dir": str(state_dir), "pin_dir": str(e.pin_dir),
            "socket_path": str(state_dir / "agent.sock"), "something_else": True,
            "dns_proxy": {"port": PROXY_PORT, "min_ttl": 0, "grace_seconds": 1.0, "upstream_timeout_s": 2.0},
        }))
        e.write_rules()
        proxy = e.start_proxy()
        e.wait_ready(proxy.p.pid)
        e.client = Child(e.ns_argv(e.pod, sys.executable, "-c", POD_CLIENT))
        e.children.append(e.client)
        # dnsmasq answers once it has bound its addresses
        wait_until("dnsmasq answering", lambda: e.query("app.example.com")["rcode"] == "NOERROR", timeout=DEADLINE)
        yield e
    finally:
        for child in e.proxies + e.children:
            child.stop()
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        unpin_all(e.pin_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


def counters(env: Env) -> dict[str, int]:
    return dict(env.status()["counters"])


def test_allowed_name_learned_before_the_answer(env: Env) -> None:
    out = env.query("app.example.com", connect=APP_PORT)
    assert out["rcode"] == "NOERROR" and out["addresses"] == [APP4]
    assert out.get("connected"), "the first connection right after the lookup went through"
    entries = env.fqdn_entries()
    assert SEL in entries[(EP_ID, APP4)], entries
    rows = [r for r in env.proxy_client().cache_list() if r["address"] == APP4]
    assert rows and rows[0]["pod"] == "default/client" and rows[0]["name"] == "app.example.com."
    names = {r["name"]: r for r in env.proxy_client().names()}
    assert names["app.example.com."]["last_rcode"] == "NOERROR"
    # The CLI, on this proxy's socket.
    listed = CliRunner().invoke(app, ["fqdn", "cache", "list", "--socket", str(env.socket_path), "-o", "json"])
    assert listed.exit_code == 0, listed.output
    assert any(r["address"] == APP4 and r["name"] == "app.example.com." for r in json.loads(listed.output))
    shown = CliRunner().invoke(app, ["fqdn", "names", "--socket", str(env.socket_path), "-o", "json"])
    assert shown.exit_code == 0, shown.output
    assert any(r["name"] == "app.example.com." and r["allowed"] for r in json.loads(shown.output))
    table_out = CliRunner().invoke(app, ["fqdn", "cache", "list", "--socket", str(env.socket_path)])
    assert table_out.exit_code == 0 and "FQDN cache" in table_out.output, table_out.output


def test_cname_chain_aaaa_and_tcp(env: Env) -> None:
    out = env.query("www.example.com", "AAAA", tcp=True, connect=APP_PORT)
    assert out["rcode"] == "NOERROR" and out["addresses"] == [APP6] and out.get("connected")
    assert SEL in env.fqdn_entries()[(EP_ID, APP6)]
    names = {r["name"] for r in env.proxy_client().cache_list() if r["address"] == APP6}
    assert names == {"www.example.com.", "app.example.com."}, "every name of the CNAME chain is learned"
    # IPv6 transport to the resolver, over UDP.
    out6 = env.query("app.example.com", "AAAA", server=DNS6)
    assert out6["addresses"] == [APP6]


def test_denied_name_refused_and_counted(env: Env) -> None:
    before = counters(env)
    out = env.query("denied.test")
    assert out["rcode"] == "REFUSED" and out["addresses"] == []
    out = env.query("denied.test", tcp=True)
    assert out["rcode"] == "REFUSED"
    after = counters(env)
    assert after["denied"] - before["denied"] == 2
    assert after["forwarded"] == before["forwarded"], "a denied query is never forwarded"
    assert (EP_ID, DENIED4) not in env.fqdn_entries()


def test_unresolved_address_is_dropped(env: Env) -> None:
    before = read_counters(env.pin_dir)["drop_policy_egress"][0]
    out = env.ask(op="connect", host=NEVER4, port=APP_PORT, timeout=1.0)
    assert not out["ok"], "nobody resolved this address: no connection"
    assert read_counters(env.pin_dir)["drop_policy_egress"][0] > before


def test_malformed_packets_counted_and_harmless(env: Env) -> None:
    good = "abcd01000001000000000000" + "03617070076578616d706c6503636f6d00" + "00010001"
    packets = {
        "truncated": "abcd0100000100000000",  # cut inside the header
        "pointer_loop": "abcd01000001000000000000" + "c00c" + "00010001",
        "oversized": good + "00" * 1300,  # over the proxy's 1232-octet UDP limit, under the MTU
        "malformed": "abcd01000001000000000000" + "03617070" + "4100" + "00010001",  # reserved label type
    }
    before = counters(env)
    for hex_data in packets.values():
        assert env.ask(op="raw", server=DNS4, hex=hex_data)["ok"]

    def missing() -> list[str]:
        now = counters(env)
        return [cat for cat in packets if now[f"malformed_{cat}"] <= before[f"malformed_{cat}"]]

    wait_until("every malformed packet counted", lambda: not missing())
    # Over TCP: a frame announcing more than the proxy takes.
    out = env.ask(op="raw_tcp", server=DNS4, hex="1400" + "00" * 16)
    assert out["ok"] and out["closed"], out
    wait_until("the oversized TCP frame counted",
               lambda: counters(env)["malformed_oversized"] >= before["malformed_oversized"] + 2)
    assert env.status()["healthy"]
    out = env.query("app.example.com")
    assert out["rcode"] == "NOERROR" and out["addresses"] == [APP4], "a normal query right after works"


def test_ttl_expiry_spares_the_live_connection(env: Env) -> None:
    out = env.query("short.example.com")
    assert out["addresses"] == [SHORT4]
    assert env.ask(op="open", id="live", host=SHORT4, port=APP_PORT)["ok"]
    # After TTL + grace the proxy's pass sees the entry expired but the connection alive.
    wait_until("the short name expired and became a zombie",
               lambda: any(r["address"] == SHORT4 and r["zombie"] for r in env.proxy_client().cache_list()),
               timeout=SHORT_TTL + 10)
    new = env.ask(op="connect", host=SHORT4, port=APP_PORT, timeout=1.0)
    assert not new["ok"], "a new connection through an expired entry is refused"
    assert env.ask(op="echo", id="live")["ok"], "the connection opened before expiry still works"
    assert (EP_ID, SHORT4) in env.fqdn_entries()
    assert env.ask(op="close", id="live")["ok"]
    wait_until("the entry goes once the connection closed",
               lambda: (EP_ID, SHORT4) not in env.fqdn_entries(), timeout=15)
    assert not any(r["address"] == SHORT4 for r in env.proxy_client().cache_list())


def test_restarts_without_outage(env: Env) -> None:
    """Three back-to-back proxy restarts (hand-over) under a loop of lookups and connections."""
    assert env.ask(op="loop_start", server=DNS4, name="app.example.com", denied="denied.test",
                   port=APP_PORT)["ok"]

    def rounds() -> int:
        return int(env.ask(op="loop_rounds")["rounds"])

    try:
        wait_until("the loop running", lambda: rounds() >= 5)
        for _ in range(3):
            old = env.proxies[-1]
            start_rounds = rounds()
            new = env.start_proxy()
            env.wait_ready(new.p.pid)
            assert old.p.wait(timeout=DEADLINE) == 0, old.errors()
            wait_until("lookups through the new proxy", lambda: rounds() >= start_rounds + 5)  # noqa: B023
    finally:
        out = env.ask(op="loop_stop")
    assert out["ok"], out
    log_tail = (env.state_dir / "proxy.log").read_text(errors="replace")[-4000:]
    assert out["failures"] == [], (f"{out['failures'][:5]}\ncounters: {counters(env)}\n{log_tail}\n"
                                f"dnsmasq: {(env.state_dir / 'dnsmasq.log').read_text(errors='replace')[-3000:]}")
    assert out["rounds"] >= 20
    # Every round also asked for the denied name and failed unless REFUSED: each process refused it.
    assert env.status()["handed_over_from"]
    assert any(r["address"] == APP4 for r in env.proxy_client().cache_list()), "learned state carried over"


def test_a_port_reused_after_a_handover_connects_at_once(env: Env) -> None:
    """The old proxy closes an idle client at hand-over: by abort, so the node keeps no TIME_WAIT
    twin of the pod's 4-tuple that would make the kernel drop the SYNs of a connection reusing the
    source port (the datapath hands SYNs straight to the listener)."""
    sport = 40000 + secrets.randbelow(20000)
    assert env.ask(op="tcp_hold", id="idle", server=DNS4, sport=sport, name="app.example.com")["ok"]
    old = env.proxies[-1]
    new = env.start_proxy()
    env.wait_ready(new.p.pid)
    assert old.p.wait(timeout=DEADLINE) == 0, old.errors()
    assert env.ask(op="close", id="idle")["ok"]
    time_wait = sh("ip", "netns", "exec", env.node, "ss", "-Htan", "state", "time-wait", "sport", "= :53")
    assert f"{POD4}:{sport}" not in time_wait, time_wait
    # The same 4-tuple again: a dropped SYN would only be retried after 1 s.
    out = env.ask(op="tcp_hold", id="again", server=DNS4, sport=sport, name="app.example.com", connect_timeout=0.9)
    assert out["ok"] and out["rcode"] == "NOERROR", out
    assert env.ask(op="close", id="again")["ok"]


def test_sigterm_saves_state_and_restart_restores_it(env: Env) -> None:
    env.query("app.example.com")
    old = env.proxies[-1]
    old.p.terminate()
    assert old.p.wait(timeout=DEADLINE) == 0, old.errors()
    assert not env.socket_path.exists(), "a stopped proxy removes its control socket"
    saved = json.loads((env.state_dir / "dnsproxy" / "cache.json").read_text())
    assert any(row["address"] == APP4 for row in saved["entries"])
    new = env.start_proxy()
    env.wait_ready(new.p.pid)
    assert any(r["address"] == APP4 and r["source"] != "datapath" for r in env.proxy_client().cache_list())
    assert env.query("app.example.com", connect=APP_PORT).get("connected")


def test_vanished_endpoint_loses_its_entries(env: Env) -> None:
    env.query("app.example.com")
    assert (EP_ID, APP4) in env.fqdn_entries()
    env.write_rules(endpoints=[], revision=8)
    try:
        result = env.proxy_client().reload()
        assert result["vanished"] == [EP_ID]
        assert not any(ep == EP_ID for ep, _ in env.fqdn_entries())
        assert env.query("app.example.com")["rcode"] == "REFUSED", "an unknown source is refused"
    finally:
        env.write_rules()
        env.proxy_client().reload()
    assert ipaddress.ip_address(APP4)  # the address survived as text
