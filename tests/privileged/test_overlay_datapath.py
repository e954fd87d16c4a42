"""The datapath between two nodes, in both modes. Overlay: VXLAN encapsulation by the sending
node's datapath (a collect-metadata device, the tunnel key from weft_tunnel), the sender's identity
carried as the VNI, and the receiving node's ingress policy judging by that identity. Direct
routing: pods addressed from the underlay's range, routed by the datapath (FIB lookup,
bpf_redirect_neigh) and delivered by from_netdev, the nodes' forwarding path untouched.

Two node netns joined by an underlay veth (IPv4 and IPv6), a VXLAN device in each, pods on veths
with the real datapath attached; the map entries an agent would write are written here (the
agent's multi-node wiring is not part of this test). Every claim is shown with real packets:
TCP and UDP over IPv4 and IPv6, a full-size transfer at the pods' overlay MTU, a peer the policy
does not allow, and an address reused by another identity that must not inherit the old rights.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from weft.datapath.loader import default_object_path, read_counters, unpin_all

from labutil import in_netns, snmp_counter

VXLAN = "wvx"
VXLAN_PORT = 8472  # Cilium's
POD_MTU = 1400  # fits VXLAN over the IPv6 underlay (70 octets of headers) with room to spare
APP_PORT = 8080
ID_A, ID_C, ID_B = 1001, 1002, 1003


@dataclass(frozen=True)
class Pod:
    name: str
    node: str
    host_if: str
    v4: str
    v6: str
    identity: int
    ep_id: int


@dataclass(frozen=True)
class Topology:
    """Addresses of one mode: the nodes' underlay addresses, each node's pod prefixes, the pods."""

    mode: str
    underlay: dict[str, tuple[str, str]]
    pod_prefix: dict[str, tuple[str, str]]
    pods: dict[str, Pod]


TOPOLOGIES = {
    # Overlay: pod CIDRs of their own, apart from the underlay's.
    "overlay": Topology(
        "overlay",
        {"n1": ("192.168.77.1", "fd77::1"), "n2": ("192.168.77.2", "fd77::2")},
        {"n1": ("10.1.1.0/24", "fd01:1::/64"), "n2": ("10.1.2.0/24", "fd01:2::/64")},
        {"a": Pod("a", "n1", "lxca", "10.1.1.2", "fd01:1::2", ID_A, 1),
         "c": Pod("c", "n1", "lxcc", "10.1.1.3", "fd01:1::3", ID_C, 2),
         "b": Pod("b", "n2", "lxcb", "10.1.2.2", "fd01:2::2", ID_B, 3)}),
    # Direct: pods addressed from the underlay's own range, a slice per node that the underlay
    # (here: a route on each node, as a VNet's route table would be) sends to that node.
    "direct": Topology(
        "direct",
        {"n1": ("192.168.88.1", "fd88::1"), "n2": ("192.168.88.2", "fd88::2")},
        {"n1": ("192.168.88.64/27", "fd88::1:0/112"), "n2": ("192.168.88.96/27", "fd88::2:0/112")},
        {"a": Pod("a", "n1", "lxca", "192.168.88.66", "fd88::1:2", ID_A, 1),
         "c": Pod("c", "n1", "lxcc", "192.168.88.67", "fd88::1:3", ID_C, 2),
         "b": Pod("b", "n2", "lxcb", "192.168.88.98", "fd88::2:2", ID_B, 3)}),
}
# Counters of each mode: sent towards another node, received from one.
SENT = {"overlay": "to_overlay_v{}", "direct": "routed_v{}"}
RECEIVED = {"overlay": "from_overlay_v{}", "direct": "from_netdev_v{}"}

# Runs in a node's netns: load the datapath, attach it, write endpoints, tunnels, ipcache, policy.
NODE_SCRIPT = r"""
import ipaddress, json, sys
from pathlib import Path
from weft.datapath import abi
from weft.datapath.loader import EndpointEntry, NodeDatapath, NodeRoute, PolicyMapKey, PolicyMapValue
from weft.datapath.netlink import node_ipr
cfg = json.loads(sys.argv[1])
dp = NodeDatapath(Path(cfg["pin_dir"]), Path(cfg["obj"]))
dp.load()
ipr = node_ipr()
mode = abi.ROUTE_DIRECT if cfg["mode"] == "direct" else abi.ROUTE_VXLAN
if cfg.get("attach"):
    if mode == abi.ROUTE_VXLAN:
        dp.attach_overlay(cfg["vxlan"])
    else:
        dp.attach_netdev("ul0")
vx = ipr.link_lookup(ifname=cfg["vxlan"] if mode == abi.ROUTE_VXLAN else "ul0")[0]
for pod in cfg["pods"]:
    host = ipr.get_links(ipr.link_lookup(ifname=pod["host_if"])[0])[0]
    if cfg.get("attach"):
        dp.attach(pod["host_if"])
    entries = [EndpointEntry(ipaddress.ip_address(ip), host["index"], pod["ep_id"], pod["identity"], pod["mac"],
                             host.get_attr("IFLA_ADDRESS")) for ip in (pod["v4"], pod["v6"])]
    for e in entries:
        dp.upsert_endpoint(e)
    desired = {PolicyMapKey(abi.DIR_INGRESS, i, proto, cfg["app_port"], 16): PolicyMapValue(False, cookie=1)
               for i in pod["allow_from"] for proto in (6, 17)}
    flags = abi.EP_F_INGRESS_ENFORCED if pod["allow_from"] else 0
    dp.apply_endpoint_policy(entries, flags, desired)
dp.sync_tunnels({ipaddress.ip_network(net): NodeRoute(vx, ipaddress.ip_address(addr), mode)
                 for net, addr in cfg["tunnels"]})
dp.update_ipcache({ipaddress.ip_network(net): ident for net, ident in cfg["ipcache"]})
dp.close()
print("ok")
"""

# A pod's client: connect (TCP) or send (UDP), expect the echo.
CLIENT = r"""
import socket, sys
proto, host, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
payload = bytes(range(256)) * (size // 256 + 1)
payload = payload[:size]
if proto == "tcp":
    with socket.create_connection((host, port), timeout=2) as s:
        s.sendall(payload)
        got = b""
        while len(got) < size:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
else:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(payload, (host, port))
        got, _ = s.recvfrom(65536)
assert got == payload, f"echo of {len(got)} octets, sent {size}"
print("ok")
"""

ECHO = r"""
import socket, sys, threading
port = int(sys.argv[1])
def tcp_conn(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
def tcp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=tcp_conn, args=(c,), daemon=True).start()
def udp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    while True:
        data, peer = s.recvfrom(65536)
        s.sendto(data, peer)
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


@dataclass
class Overlay:
    prefix: str
    pin_dirs: dict[str, Path]
    topo: Topology

    @property
    def pods(self) -> dict[str, Pod]:
        return self.topo.pods

    def ns(self, name: str) -> str:
        return self.prefix + name

    def node_script(self, node: str, pods: list[Pod], allow_from: dict[str, list[int]], attach: bool,
                    ipcache: list[tuple[str, int]]) -> None:
        other = "n2" if node == "n1" else "n1"
        cfg = {
            "pin_dir": str(self.pin_dirs[node]), "obj": str(default_object_path()), "vxlan": VXLAN,
            "app_port": APP_PORT, "attach": attach, "mode": self.topo.mode,
            "pods": [{"host_if": p.host_if, "v4": p.v4, "v6": p.v6, "identity": p.identity, "ep_id": p.ep_id,
                      "mac": pod_mac(self.ns("p" + p.name)), "allow_from": allow_from.get(p.name, [])}
                     for p in pods],
            # The IPv4 pod prefix over the IPv4 underlay, the IPv6 one over IPv6: both kinds of tunnel key.
            "tunnels": [(self.topo.pod_prefix[other][i], self.topo.underlay[other][i]) for i in (0, 1)],
            "ipcache": ipcache,
        }
        out = subprocess.run(["nsenter", f"--net=/run/netns/{self.ns(node)}", sys.executable, "-c", NODE_SCRIPT,
                              json.dumps(cfg)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr

    def talk(self, pod: str, proto: str, host: str, size: int = 64) -> bool:
        done = subprocess.run(["ip", "netns", "exec", self.ns("p" + pod), sys.executable, "-c", CLIENT, proto, host,
                               str(APP_PORT), str(size)], capture_output=True, text=True, timeout=30)
        return done.returncode == 0

    def counters(self, node: str) -> dict[str, int]:
        return {k: v[0] for k, v in read_counters(self.pin_dirs[node]).items()}


def pod_mac(netns: str) -> str:
    info: list[dict[str, Any]] = json.loads(sh("ip", "-n", netns, "-j", "link", "show", "eth0"))
    return str(info[0]["address"])


@pytest.fixture(scope="module", params=["overlay", "direct"])
def overlay(request: pytest.FixtureRequest) -> Iterator[Overlay]:
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True, check=True)
    topo = TOPOLOGIES[request.param]
    prefix = f"wov-{secrets.token_hex(3)}-"
    ov = Overlay(prefix, {n: Path(f"/sys/fs/bpf/{prefix}{n}") for n in ("n1", "n2")}, topo)
    created: list[str] = []
    children: list[subprocess.Popen[str]] = []
    try:
        for ns in ("n1", "n2", "pa", "pb", "pc"):
            sh("ip", "netns", "add", ov.ns(ns))
            created.append(ov.ns(ns))
            sh("ip", "-n", ov.ns(ns), "link", "set", "lo", "up")
            in_netns(ov.ns(ns), "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                     "net.ipv6.conf.default.accept_dad=0")
        # The underlay: one veth between the nodes. Pod traffic never takes the nodes' forwarding
        # path (their counters are checked); direct mode turns forwarding on only because the
        # datapath's FIB lookup, like any router's, answers only where forwarding is on.
        sh("ip", "-n", ov.ns("n1"), "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", ov.ns("n2"))
        for node in ("n1", "n2"):
            v4, v6 = topo.underlay[node]
            sh("ip", "-n", ov.ns(node), "addr", "add", f"{v4}/24", "dev", "ul0")
            sh("ip", "-n", ov.ns(node), "addr", "add", f"{v6}/64", "dev", "ul0", "nodad")
            sh("ip", "-n", ov.ns(node), "link", "set", "ul0", "up")
            if topo.mode == "overlay":
                sh("ip", "-n", ov.ns(node), "link", "add", VXLAN, "type", "vxlan", "external", "dstport",
                   str(VXLAN_PORT))
                sh("ip", "-n", ov.ns(node), "link", "set", VXLAN, "up")
            else:
                other = "n2" if node == "n1" else "n1"
                in_netns(ov.ns(node), "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
                for i, ip in ((0, "-4"), (1, "-6")):
                    sh("ip", "-n", ov.ns(node), ip, "route", "add", topo.pod_prefix[other][i], "via",
                       topo.underlay[other][i], "dev", "ul0")
        for pod in topo.pods.values():
            pns, node = ov.ns("p" + pod.name), ov.ns(pod.node)
            sh("ip", "-n", node, "link", "add", pod.host_if, "mtu", str(POD_MTU), "type", "veth", "peer", "name",
               "eth0", "mtu", str(POD_MTU), "netns", pns)
            sh("ip", "-n", node, "link", "set", pod.host_if, "up")
            sh("ip", "-n", pns, "link", "set", "eth0", "up")
            sh("ip", "-n", pns, "addr", "add", f"{pod.v4}/32", "dev", "eth0")
            sh("ip", "-n", pns, "-6", "addr", "add", f"{pod.v6}/128", "dev", "eth0", "nodad")
            gw4 = str(ipaddress.ip_network(topo.pod_prefix[pod.node][0])[1])
            sh("ip", "-n", pns, "route", "add", gw4, "dev", "eth0", "scope", "link")
            sh("ip", "-n", pns, "route", "add", "default", "via", gw4, "dev", "eth0")
            sh("ip", "-n", pns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
        echo = subprocess.Popen(["ip", "netns", "exec", ov.ns("pb"), sys.executable, "-c", ECHO, str(APP_PORT)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        children.append(echo)
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        a, b, c = topo.pods["a"], topo.pods["b"], topo.pods["c"]
        # n1's ipcache knows b; n2's knows a and c (their identities, as the cluster store would say).
        ov.node_script("n1", [a, c], {}, True, [(f"{b.v4}/32", ID_B), (f"{b.v6}/128", ID_B)])
        ov.node_script("n2", [b], {"b": [ID_A]}, True,
                       [(f"{a.v4}/32", ID_A), (f"{a.v6}/128", ID_A), (f"{c.v4}/32", ID_C), (f"{c.v6}/128", ID_C)])
        yield ov
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.communicate()  # reaps it and closes its pipes
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        for pin_dir in ov.pin_dirs.values():
            unpin_all(pin_dir)


def forwarded(overlay: Overlay) -> dict[str, int]:
    """The nodes' own IP forwarding counters (IPv4 and IPv6)."""
    return {f"{node}/{proto}": snmp_counter(overlay.ns(node), proto, field)
            for node in ("n1", "n2") for proto, field in (("Ip", "ForwDatagrams"), ("Ip6", "OutForwDatagrams"))}


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("family", [4, 6])
def test_cross_node(overlay: Overlay, proto: str, family: int) -> None:
    b = overlay.pods["b"]
    sent, received = SENT[overlay.topo.mode].format(family), RECEIVED[overlay.topo.mode].format(family)
    before1, before2, fwd_before = overlay.counters("n1"), overlay.counters("n2"), forwarded(overlay)
    assert overlay.talk("a", proto, b.v4 if family == 4 else b.v6), f"a -> b {proto} IPv{family}"
    after1, after2 = overlay.counters("n1"), overlay.counters("n2")
    assert after1[sent] > before1[sent], f"n1: {sent}"
    assert after2[received] > before2[received], f"n2: {received}"
    # The replies went back the same way.
    assert after2[sent] > before2[sent]
    assert after1[received] > before1[received]
    assert forwarded(overlay) == fwd_before, "the nodes' IP stacks forwarded nothing"


def test_full_size_segments_fit_the_pod_mtu(overlay: Overlay) -> None:
    assert overlay.talk("a", "tcp", overlay.pods["b"].v4, size=1 << 20), "1 MiB echoed over IPv4"
    assert overlay.talk("a", "tcp", overlay.pods["b"].v6, size=1 << 20), "1 MiB echoed over IPv6"


def test_ingress_policy_holds_across_nodes(overlay: Overlay) -> None:
    b = overlay.pods["b"]
    before = overlay.counters("n2")
    assert not overlay.talk("c", "tcp", b.v4), "c's identity is not allowed into b"
    assert not overlay.talk("c", "udp", b.v6)
    assert overlay.counters("n2")["drop_policy_ingress"] > before["drop_policy_ingress"]


@pytest.mark.parametrize("overlay", ["overlay"], indirect=True)
def test_a_reused_address_does_not_inherit_the_old_identity(overlay: Overlay) -> None:
    """a's addresses now belong to an endpoint of c's identity on n1; n2's ipcache still says
    they are a's (as it would until the update arrives). The packet carries the sender's real
    identity, so n2 refuses it. (Overlay only: direct routing carries no identity, as in Cilium.)"""
    a, b = overlay.pods["a"], overlay.pods["b"]
    reused = Pod("a", "n1", "lxca", a.v4, a.v6, ID_C, a.ep_id)
    overlay.node_script("n1", [reused], {}, False, [])
    try:
        before = overlay.counters("n2")
        assert not overlay.talk("a", "tcp", b.v4)
        assert overlay.counters("n2")["drop_policy_ingress"] > before["drop_policy_ingress"]
    finally:
        overlay.node_script("n1", [a], {}, False, [])
    assert overlay.talk("a", "tcp", b.v4), "a's own identity is allowed again"


@pytest.mark.parametrize("overlay", ["overlay"], indirect=True)
def test_a_node_that_left_loses_its_tunnels(overlay: Overlay) -> None:
    """Without n2's prefixes in n1's weft_tunnel, nothing is encapsulated towards it."""
    script = r"""
import sys
from pathlib import Path
from weft.datapath.loader import NodeDatapath, default_object_path
dp = NodeDatapath(Path(sys.argv[1]), default_object_path())
dp.load()
saved = dp.tunnels()
assert len(saved) == 2, saved
print(dp.sync_tunnels({}))
assert dp.tunnels() == {}
dp.close()
"""
    ns = ["nsenter", f"--net=/run/netns/{overlay.ns('n1')}", sys.executable, "-c"]
    out = subprocess.run([*ns, script, str(overlay.pin_dirs["n1"])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    try:
        before = overlay.counters("n1")
        assert not overlay.talk("a", "udp", overlay.pods["b"].v4)
        assert overlay.counters("n1")["to_overlay_v4"] == before["to_overlay_v4"]
    finally:
        overlay.node_script("n1", [overlay.pods["a"], overlay.pods["c"]], {}, False, [])
    assert overlay.talk("a", "udp", overlay.pods["b"].v4)
