"""Cross-node pod traffic through weft's overlay and direct modes vs plain kernel setups, and the
time a new pod's identity takes to be enforced on another node (issue 6's benchmark).

    python bench/multinode.py [--quick] [--only overlay,direct,identity] [--rounds R] [--seconds S]
                              [--pods N] [--ipv6] [--json FILE]

Traffic (overlay, then direct): a two-node lab (``Lab.up(nodes=2, mode=..., store=--store)``, its
underlay and world as ``weft lab up`` makes them) with a client pod on node-1 and a server pod on
node-2, and next to it a baseline without BPF built here that mirrors the lab: a netns with the
lab's underlay bridge (``weft.lab.world.vnet_batch``), two node netns plugged into it by veths with
the lab nodes' uplink addresses and MTU, forwarding on and the lab nodes' nftables ruleset (copied
with ``nft list ruleset``), and on each node one pod netns on a veth with the weft pod's addresses,
MTU and default routes (a /32, /128 host route to it on the node, its gateway on the host veth).
  overlay baseline, flannel's VXLAN backend: a VXLAN device per node (VNI 1, the lab's VXLAN port
    and outer UDP checksum setting, local address on the uplink, no learning, MTU = the weft
    pod's; otherwise the kernel's defaults, as weft's device has them), the node's pod block's network
    address on it, a route to the other node's block via that node's VXLAN address (onlink), and
    static neighbour and fdb entries for it (VTEP MAC -> the other node's uplink address).
    The pod MTU on both sides is weft's overlay pod MTU (read from the weft pod's eth0).
  direct baseline, plain routing: each node routes the other node's pod blocks via that node's
    uplink address; no encapsulation.
Per round and per metric the two paths run back to back, alternating which goes first: iperf3,
one TCP stream (-t S, first second omitted), and ``rr`` (bench/rr.c: 1-byte TCP ping-pong for S
seconds, client and server pinned to one CPU, as in pod_traffic.py). Medians over rounds; ratios
weft/baseline. Targets: overlay >= 0.9x the VXLAN baseline, direct >= 1.0x plain routing. The weft
datapath's counters must show the traffic was encapsulated (overlay) or routed (direct) by it.

Identity propagation (in the overlay lab, which runs the ``--store`` engine, default etcd): a sink
pod on node-1 (TCP echo on 8080) and a control pod on node-2, then N pods (default 40, --quick 10)
created one by one on node-2, each with labels of its own (app=idp-<i>: a new cluster identity
every time). Per pod: from the start of ``lab.pod_add`` until node-1's datapath ipcache (its
pinned ``weft_ipcache``, read by this process with a lookup per address every 2 ms) maps every one
of the pod's addresses to the pod's identity (as node-2's agent lists it in ``endpoint.list``).
The addresses a pod will get are the node block's next free ones (node-2's IPAM hands them out
in turn), so the watcher polls the next few candidates from before ``pod_add`` starts; a pod whose
address was not among them is polled from when ``pod_add`` returns and counts as "late" (its time
is an upper bound). CNI ADD (the runtime's ADD, the weft-cni plugin's whole run) is timed apart.
For a few pods, a real-packet check: before the pod is made, a CiliumNetworkPolicy lets only
app=idp-<i> into the sink on 8080/TCP (applied with ``weft apply``, the control pod seen refused
first); once its identity is enforced, the new pod must connect to the sink. p50/p99 by nearest
rank (with fewer than 100 pods p99 is the slowest). Target: p99 < 1 s; every checked pod connects.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    PREFIX,
    BenchError,
    Processes,
    Result,
    bench_session,
    build_rr,
    dump_json,
    ensure_bpf,
    in_netns,
    median,
    netns_add,
    netns_del_many,
    paired_ratio,
    print_results,
    run,
    say,
    spread,
    sysctl,
    table,
    tmp_dir,
    wait_for,
    wait_listening,
)
from bench.pod_traffic import (
    IPERF_PORT,
    RR_PORT,
    TrafficPath,
    alternate_rounds,
    check_reachable,
    rr_cpus,
)
from weft.datapath import abi
from weft.datapath.maps import BPF_MAP_TYPE_LPM_TRIE, BpfHashMap
from weft.lab import world as plan
from weft.lab.cluster import Lab, NodeInfo, PodInfo
from weft.lab.probe import probe
from weft.lab.runtime import CniRuntime

TARGET = {"overlay": 0.9, "direct": 1.0}
BASELINE_NAME = {"overlay": "kernel VXLAN", "direct": "plain routing"}
IDENTITY_TARGET_MS = 1000.0
VXLAN_PORT_DEFAULT = 8472  # the agent's defaults; the lab's node.json may say otherwise
TUNNEL_DEVICE_DEFAULT = "weft_vxlan"
BASE_VXLAN = "vxlan0"
BASE_VNI = 1
SINK_PORT = 8080
IPCACHE_POLL_S = 0.002
ENFORCE_DEADLINE_S = 10.0
CANDIDATES = 4  # next free addresses of node-2's block watched before each pod_add


# ---------------------------------------------------------------------------- what the lab looks like
@dataclass(frozen=True)
class NodeShape:
    """One lab node as the baseline copies it: uplink addresses (with prefix), MTU, pod blocks."""

    uplink: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]
    uplink_mtu: int
    blocks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]

    def uplink_of(self, version: int) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
        return next((a for a in self.uplink if a.version == version), None)


@dataclass(frozen=True)
class PodShape:
    addresses: list[str]
    gateways: dict[int, str]  # IP version -> the default route's gateway
    mtu: int


@dataclass(frozen=True)
class LabShape:
    """Everything about a two-node lab the baseline mirrors."""

    mode: str
    nodes: tuple[NodeShape, NodeShape]
    client: PodShape  # on node-1
    server: PodShape  # on node-2
    nft_ruleset: str
    vxlan_port: int
    vxlan_udp_csum: bool  # weft's VXLAN device's outer UDP checksum setting (the kernel's default: on)


def link_json(netns: str, ifname: str) -> dict[str, Any]:
    out: list[dict[str, Any]] = json.loads(run("ip", "-n", netns, "-j", "addr", "show", "dev", ifname))
    if not out:
        raise BenchError(f"no {ifname} in {netns}")
    return out[0]


def global_interfaces(link: dict[str, Any]) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    return [ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}") for a in link.get("addr_info", [])
            if a.get("scope") == "global"]


def pod_shape(netns: str) -> PodShape:
    link = link_json(netns, "eth0")
    gateways: dict[int, str] = {}
    for flag, version in (("-4", 4), ("-6", 6)):
        routes: list[dict[str, Any]] = json.loads(run("ip", "-n", netns, flag, "-j", "route", "show", "default"))
        if routes and routes[0].get("gateway"):
            gateways[version] = str(routes[0]["gateway"])
    return PodShape([str(i.ip) for i in global_interfaces(link)], gateways, int(link["mtu"]))


def node_shape(node: NodeInfo) -> NodeShape:
    link = link_json(node.netns, plan.UPLINK)
    config = json.loads(Path(node.config_path).read_text())
    blocks = [ipaddress.ip_network(config[k]) for k in ("pod_block_v4", "pod_block_v6") if config.get(k)]
    return NodeShape(global_interfaces(link), int(link["mtu"]), blocks)


def lab_shape(lab: Lab, mode: str, client: PodInfo, server: PodInfo) -> LabShape:
    state = lab.load()
    n1, n2 = lab.node(state, "node-1"), lab.node(state, "node-2")
    cluster = json.loads(Path(n1.config_path).read_text()).get("cluster") or {}
    udp_csum = True
    if mode == "overlay":
        tunnel: list[dict[str, Any]] = json.loads(run("ip", "-n", n1.netns, "-d", "-j", "link", "show", "dev",
                                                      str(cluster.get("tunnel_device", TUNNEL_DEVICE_DEFAULT))))
        udp_csum = bool(tunnel[0]["linkinfo"]["info_data"].get("udp_csum", True))
    return LabShape(mode, (node_shape(n1), node_shape(n2)), pod_shape(client.netns), pod_shape(server.netns),
                    run(*in_netns(n1.netns, ["nft", "list", "ruleset"])),
                    int(cluster.get("vxlan_port", VXLAN_PORT_DEFAULT)), udp_csum)


# ---------------------------------------------------------------------------- the baselines
@dataclass(frozen=True)
class Baseline:
    vnet: str
    nodes: tuple[str, str]
    client: str
    server: str

    @property
    def all(self) -> list[str]:
        # Pods first, the underlay last (as the lab tears down).
        return [self.client, self.server, *self.nodes, self.vnet]


def vtep_mac(index: int) -> str:
    return f"02:77:62:00:00:{index:02x}"


def build_baseline(tag: str, shape: LabShape) -> Baseline:
    """The mirror of the lab without BPF: underlay bridge, two routing nodes, one pod each; then
    the mode's way between the nodes (flannel-style VXLAN or plain routes)."""
    base = Baseline(f"{PREFIX}-{tag}-vnet", (f"{PREFIX}-{tag}-n1", f"{PREFIX}-{tag}-n2"),
                    f"{PREFIX}-{tag}-pa", f"{PREFIX}-{tag}-pb")
    try:
        _build_baseline(base, shape)
    except BaseException:
        netns_del_many(base.all)
        raise
    return base


def _build_baseline(base: Baseline, shape: LabShape) -> None:
    netns_add(base.vnet)
    run("ip", "-n", base.vnet, "-batch", "-", input_text=plan.vnet_batch())
    for i, (ns, node) in enumerate(zip(base.nodes, shape.nodes, strict=True), start=1):
        netns_add(ns)
        for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.accept_dad=0"):
            sysctl(ns, *key.split("="))
        port = plan.bridge_port(i)
        run("ip", "-n", ns, "link", "add", plan.UPLINK, "mtu", str(node.uplink_mtu), "type", "veth", "peer", "name",
            port, "mtu", str(node.uplink_mtu), "netns", base.vnet)
        run("ip", "-n", base.vnet, "-batch", "-",
            input_text=f"link set {port} master {plan.BRIDGE}\nlink set {port} up\n")
        lines = [f"link set {plan.UPLINK} up"]
        lines += [f"addr add {a.with_prefixlen} dev {plan.UPLINK}" + (" nodad" if a.version == 6 else "")
                  for a in node.uplink]
        run("ip", "-n", ns, "-batch", "-", input_text="\n".join(lines) + "\n")
        if shape.nft_ruleset.strip():
            run(*in_netns(ns, ["nft", "-f", "-"]), input_text=shape.nft_ruleset)
    for node_ns, pod_ns, pod, host_if in ((base.nodes[0], base.client, shape.client, "hva"),
                                          (base.nodes[1], base.server, shape.server, "hvb")):
        plug_pod(node_ns, pod_ns, pod, host_if)
    if shape.mode == "overlay":
        link_by_vxlan(base, shape)
    else:
        link_by_routes(base, shape)


def plug_pod(node_ns: str, pod_ns: str, pod: PodShape, host_if: str) -> None:
    """A pod on a veth: its addresses (/32, /128), default routes via its gateways (onlink, as
    weft-cni writes them), the gateways on the host side, host routes to it on the node."""
    netns_add(pod_ns)
    sysctl(pod_ns, "net.ipv6.conf.all.accept_dad", "0")
    sysctl(pod_ns, "net.ipv6.conf.default.accept_dad", "0")
    run("ip", "-n", node_ns, "link", "add", host_if, "mtu", str(pod.mtu), "type", "veth", "peer", "name", "eth0",
        "mtu", str(pod.mtu), "netns", pod_ns)
    node_lines = [f"link set {host_if} up"]
    pod_lines = ["link set eth0 up"]
    for addr in pod.addresses:
        six = ipaddress.ip_address(addr).version == 6
        pod_lines.append(f"addr add {addr}/{128 if six else 32} dev eth0" + (" nodad" if six else ""))
        node_lines.append(f"route add {addr}/{128 if six else 32} dev {host_if}")
    for version, gw in sorted(pod.gateways.items()):
        link_local = ipaddress.ip_address(gw).is_link_local
        node_lines.append(f"addr add {gw}/{(64 if link_local else 128) if version == 6 else 32} dev {host_if}"
                          + (" nodad" if version == 6 else ""))
        pod_lines.append(f"route add {'::/0' if version == 6 else '0.0.0.0/0'} via {gw} dev eth0 onlink")
    run("ip", "-n", node_ns, "-batch", "-", input_text="\n".join(node_lines) + "\n")
    run("ip", "-n", pod_ns, "-batch", "-", input_text="\n".join(pod_lines) + "\n")


def link_by_vxlan(base: Baseline, shape: LabShape) -> None:
    """flannel's VXLAN backend: one VXLAN device per node, the other node's pod blocks routed onlink
    via its VTEP address, static neighbour and fdb entries (no learning, no multicast). The
    underlay is IPv4 when the nodes have it (as weft's overlay picks), else IPv6."""
    version = 4 if all(n.uplink_of(4) for n in shape.nodes) else 6
    for i, (ns, node) in enumerate(zip(base.nodes, shape.nodes, strict=True), start=1):
        local = node.uplink_of(version)
        assert local is not None
        lines = [f"link add {BASE_VXLAN} address {vtep_mac(i)} mtu {shape.client.mtu} type vxlan id {BASE_VNI} "
                 f"local {local.ip} dev {plan.UPLINK} dstport {shape.vxlan_port} nolearning "
                 + ("udpcsum" if shape.vxlan_udp_csum else "noudpcsum"),
                 f"link set {BASE_VXLAN} up"]
        lines += [f"addr add {b.network_address}/{b.max_prefixlen} dev {BASE_VXLAN}"
                  + (" nodad" if b.version == 6 else "") for b in node.blocks]
        j = 2 if i == 1 else 1
        other = shape.nodes[j - 1]
        for blk in other.blocks:
            lines.append(f"route add {blk} via {blk.network_address} dev {BASE_VXLAN} onlink")
            lines.append(f"neigh add {blk.network_address} lladdr {vtep_mac(j)} dev {BASE_VXLAN} nud permanent")
        run("ip", "-n", ns, "-batch", "-", input_text="\n".join(lines) + "\n")
        remote = other.uplink_of(version)
        assert remote is not None
        run(*in_netns(ns, ["bridge", "fdb", "append", vtep_mac(j), "dev", BASE_VXLAN, "dst", str(remote.ip),
                           "self", "permanent"]))


def link_by_routes(base: Baseline, shape: LabShape) -> None:
    """Plain routing: each node sends the other node's pod blocks to that node's uplink address."""
    for i, ns in enumerate(base.nodes):
        other = shape.nodes[1 - i]
        lines = []
        for blk in other.blocks:
            via = other.uplink_of(blk.version)
            if via is None:
                raise BenchError(f"no IPv{blk.version} uplink address on the lab's node-{2 - i} to route {blk} to")
            lines.append(f"route add {blk} via {via.ip} dev {plan.UPLINK}")
        run("ip", "-n", ns, "-batch", "-", input_text="\n".join(lines) + "\n")


# ---------------------------------------------------------------------------- traffic
@dataclass
class TrafficFigures:
    mode: str
    weft: TrafficPath
    base: TrafficPath
    pod_mtu: int
    counters: dict[str, dict[str, int]] = field(default_factory=dict)


# What the weft datapath counts for a packet to another node's pod (node-1) and from one (node-2).
SENT = {"overlay": "to_overlay_v{}", "direct": "routed_v{}"}
RECEIVED = {"overlay": "from_overlay_v{}", "direct": "from_netdev_v{}"}


def counters_of(lab: Lab, node: NodeInfo) -> dict[str, int]:
    status = lab.client(node).call("status")
    return {k: int(v["packets"]) for k, v in status.get("counters", {}).items()}


def up_lab(lab: Lab, mode: str, store: str) -> None:
    say(f"lab {lab.name}: up (2 nodes, dual stack, mode {mode}, store {store})")
    t0 = time.monotonic()
    lab.up(nodes=2, ip_family="dual", mode=mode, store=store)
    say(f"lab {lab.name}: up in {time.monotonic() - t0:.1f} s")


def measure_traffic(lab: Lab, mode: str, rounds: int, seconds: float, versions: tuple[int, ...], rr: Path,
                    rr_cpu: str, procs: Processes, tmp: Path) -> TrafficFigures:
    """Client on node-1, server on node-2, in the lab and in its mirror; interleaved rounds."""
    state = lab.load()
    n1, n2 = lab.node(state, "node-1"), lab.node(state, "node-2")
    client = lab.pod_add("bench/client", node_name=n1.name)
    server = lab.pod_add("bench/server", node_name=n2.name)
    shape = lab_shape(lab, mode, client, server)
    say(f"{mode}: weft pod MTU {shape.client.mtu} (server {shape.server.mtu}), underlay MTU "
        f"{shape.nodes[0].uplink_mtu}, node blocks {[str(b) for b in shape.nodes[0].blocks]} / "
        f"{[str(b) for b in shape.nodes[1].blocks]}, VXLAN port {shape.vxlan_port}")
    base = build_baseline(mode[0], shape)
    try:
        by_version: dict[int, str] = {ipaddress.ip_address(a).version: a for a in server.addresses}
        weft = TrafficPath(f"weft {mode}", client.netns, server.netns, by_version)
        plain = TrafficPath(BASELINE_NAME[mode], base.client, base.server, by_version)
        client_pin, server_pin = rr_cpus(rr_cpu)
        for p in (weft, plain):
            for v in versions:
                check_reachable(p, v)
            iperf = procs.start(in_netns(p.server_ns, ["iperf3", "-s", "-p", str(IPERF_PORT)]),
                                log=tmp / f"iperf3-{mode}-{p.name.replace(' ', '_')}.log")
            wait_listening(p.server_ns, IPERF_PORT, iperf)
            procs.start(server_pin + in_netns(p.server_ns, [str(rr), "server", str(RR_PORT)]), ready_line="ready")
        before = {n.name: counters_of(lab, n) for n in (n1, n2)}
        say(f"{mode}: {rounds} rounds, {seconds:g} s per measurement, IPv{'+IPv'.join(map(str, versions))}; "
            f"iperf3 unpinned, rr client/server CPUs: {rr_cpu}")
        alternate_rounds(weft, plain, versions, rounds, seconds, rr, client_pin, f"{mode} ", "base")
        after = {n.name: counters_of(lab, n) for n in (n1, n2)}
    finally:
        procs.stop_all()
        netns_del_many(base.all)
    delta = {node: {k: after[node][k] - before[node].get(k, 0) for k in after[node]
                    if after[node][k] != before[node].get(k, 0)} for node in after}
    # weft must have carried the traffic itself (encapsulated or routed by the datapath), not the kernel.
    for v in versions:
        for node, name in (("node-1", SENT[mode].format(v)), ("node-2", RECEIVED[mode].format(v))):
            if name not in after[node]:
                say(f"warning: {node} reports no counter {name}; cannot confirm the datapath carried IPv{v}")
            elif delta[node].get(name, 0) <= 0:
                raise BenchError(f"{mode}: {node}'s datapath counter {name} did not move: weft's {mode} path "
                                 f"was not used for IPv{v}")
    return TrafficFigures(mode, weft, plain, shape.client.mtu, delta)


def traffic_rows(fig: TrafficFigures, versions: tuple[int, ...], rounds: int, seconds: float
                 ) -> tuple[list[list[str]], list[Result]]:
    rows: list[list[str]] = []
    results: list[Result] = []
    weft, base = fig.weft, fig.base
    for v in versions:
        tw, tb = median(weft.tcp_gbps[v]), median(base.tcp_gbps[v])
        rw, rb = median(weft.rr_rate[v]), median(base.rr_rate[v])
        rows.append([f"{fig.mode} TCP 1 stream IPv{v}", f"{tw:.2f} Gbit/s", spread(weft.tcp_gbps[v]),
                     f"{tb:.2f} Gbit/s", spread(base.tcp_gbps[v]), f"{tw / tb:.3f}",
                     f"{paired_ratio(weft.tcp_gbps[v], base.tcp_gbps[v]):.3f}", f">={TARGET[fig.mode]:g}"])
        rows.append([f"{fig.mode} req/resp 1 B IPv{v}", f"{rw:.0f}/s", spread(weft.rr_rate[v]), f"{rb:.0f}/s",
                     spread(base.rr_rate[v]), f"{rw / rb:.3f}",
                     f"{paired_ratio(weft.rr_rate[v], base.rr_rate[v]):.3f}", f">={TARGET[fig.mode]:g}"])
        rows.append([f"  {fig.mode} rr p50 latency IPv{v}", f"{median(weft.rr_p50[v]):.1f} us",
                     spread(weft.rr_p50[v]), f"{median(base.rr_p50[v]):.1f} us", spread(base.rr_p50[v]), "", "", ""])
        sfx = "" if v == 4 else "6"
        what = f"IPv{v}, pod MTU {fig.pod_mtu}, {rounds} rounds x {seconds:g} s"
        results.append(Result(f"multinode.{fig.mode}_tcp{sfx}", tw / tb, TARGET[fig.mode], True,
                              f"weft {tw:.2f} Gbit/s vs {BASELINE_NAME[fig.mode]} {tb:.2f} Gbit/s, {what}"))
        results.append(Result(f"multinode.{fig.mode}_rr{sfx}", rw / rb, TARGET[fig.mode], True,
                              f"weft {rw:.0f}/s vs {BASELINE_NAME[fig.mode]} {rb:.0f}/s, {what}"))
    return rows, results


# ---------------------------------------------------------------------------- identity propagation
class TimedRuntime(CniRuntime):
    """The lab's CNI runtime, reporting when each ADD started and ended (and what it returned)."""

    on_add: Callable[[float, float, dict[str, Any]], None] | None = None

    def add(self, container_id: str, netns: str, ifname: str = "eth0", args: str = "",
            runtime_config: dict[str, Any] | None = None) -> dict[str, Any]:
        t0 = time.monotonic()
        result = super().add(container_id, netns, ifname, args, runtime_config)
        if self.on_add is not None:
            self.on_add(t0, time.monotonic(), result)
        return result


class TimedLab(Lab):
    """The lab, with its runtime's ADDs timed (``pod_add`` runs one CNI ADD per pod)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.adds: list[tuple[float, float, dict[str, Any]]] = []

    def runtime(self, node: NodeInfo) -> CniRuntime:
        plain = super().runtime(node)
        timed = TimedRuntime(**{f.name: getattr(plain, f.name) for f in dataclasses.fields(plain)})
        timed.on_add = lambda t0, t1, result: self.adds.append((t0, t1, result))
        return timed


class IpcacheWatcher:
    """Looks a few addresses up in a node's pinned ipcache every ``interval`` seconds (a thread of
    this process: one map lookup per address, no namespace to enter) and keeps, per address, when
    the identity it maps to changed."""

    def __init__(self, pin: Path, interval: float = IPCACHE_POLL_S) -> None:
        self.map = BpfHashMap.open_pinned(str(pin), abi.IpcacheKey, abi.IpcacheValue, BPF_MAP_TYPE_LPM_TRIE)
        self.interval = interval
        self._lock = threading.Lock()
        self._keys: dict[str, abi.IpcacheKey] = {}
        self._history: dict[str, list[tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ipcache-watcher", daemon=True)
        self.polls = 0

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.map.close()

    def watch(self, addresses: list[str]) -> None:
        with self._lock:
            for addr in addresses:
                if addr not in self._keys:
                    ip = ipaddress.ip_address(addr)
                    self._keys[addr] = abi.IpcacheKey.of(ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}"))
                    self._history[addr] = []

    def forget_all(self) -> None:
        with self._lock:
            self._keys.clear()
            self._history.clear()

    def first_seen(self, addr: str, identity: int) -> float | None:
        """When ``addr`` was first seen mapping to ``identity`` (None: not yet)."""
        with self._lock:
            return next((t for t, ident in self._history.get(addr, []) if ident == identity), None)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                for addr, key in self._keys.items():
                    value = self.map.get(key)
                    identity = int(value.identity) if value is not None else 0
                    now = time.monotonic()
                    history = self._history[addr]
                    if not history or history[-1][1] != identity:
                        history.append((now, identity))
                self.polls += 1
            self._stop.wait(self.interval)


@dataclass
class IdentitySample:
    pod: str
    identity: int
    addresses: list[str]
    pod_add_ms: float  # lab.pod_add, start to end
    cni_add_ms: float  # the runtime's CNI ADD
    enforced_ms: float  # pod_add start -> node-1's ipcache maps every address to the identity
    after_add_ms: float  # CNI ADD's end -> enforced (negative: enforced before the runtime had the result)
    late: bool  # address not predicted: polled only after pod_add returned (enforced_ms is an upper bound)
    timed_out: bool = False
    policy_checked: bool = False
    policy_connected: bool = False
    policy_connect_ms: float = 0.0  # pod_add start -> first connection through the policy


def next_candidates(last: dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address],
                    blocks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> list[str]:
    """The addresses node-2's IPAM hands out next: it goes on from the last one it gave."""
    out: list[str] = []
    for blk in blocks:
        prev = last.get(blk.version)
        if prev is None:
            continue
        for step in range(1, CANDIDATES + 1):
            cand = prev + step
            if cand in blk:
                out.append(str(cand))
    return out


def sink_policy(name: str, allowed_app: str) -> str:
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: {name}
  namespace: idp
spec:
  endpointSelector:
    matchLabels:
      app: idp-sink
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: {allowed_app}
    toPorts:
    - ports:
      - port: "{SINK_PORT}"
        protocol: TCP
"""


def weft_cli(*args: str) -> None:
    run(str(Path(sys.executable).with_name("weft")), *args, timeout=120)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def measure_identity(lab: TimedLab, pods: int, checks: int, tmp: Path) -> list[IdentitySample]:
    state = lab.load()
    n1, n2 = lab.node(state, "node-1"), lab.node(state, "node-2")
    store = (json.loads(Path(n1.config_path).read_text()).get("cluster") or {}).get("store", "?")
    say(f"identity: {pods} pods on node-2, each with an identity of its own; node-1's ipcache polled every "
        f"{IPCACHE_POLL_S * 1e3:g} ms; store {store}; {checks} checked with real packets through a policy")
    sink = lab.pod_add("idp/sink", node_name=n1.name, labels={"app": "idp-sink"}, serve=[f"tcp:{SINK_PORT}"])
    control = lab.pod_add("idp/control", node_name=n2.name, labels={"app": "idp-control"})
    sink_v4 = next(a for a in sink.addresses if ":" not in a)
    ok = probe(control.netns, "tcp", sink_v4, SINK_PORT, timeout=2.0)
    if not ok.ok:
        raise BenchError(f"control pod cannot reach the sink before any policy: {ok.outcome}")
    blocks = node_shape(n2).blocks
    last: dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address] = {
        ipaddress.ip_address(a).version: ipaddress.ip_address(a) for a in control.addresses}
    pin = Path(json.loads(Path(n1.config_path).read_text())["pin_dir"]) / "weft_ipcache"
    check_at = {round(k * (pods - 1) / max(1, checks - 1)) for k in range(checks)} if checks else set()
    watcher = IpcacheWatcher(pin)
    watcher.start()
    samples: list[IdentitySample] = []
    try:
        for i in range(pods):
            app = f"idp-{i}"
            policy_file = tmp / f"idp-{i}.yaml"
            if i in check_at:
                policy_file.write_text(sink_policy("idp-only", app))
                weft_cli("apply", "--lab", lab.name, "-f", str(policy_file))
                # In force once the control pod (another identity) no longer gets through.
                wait_for("the sink's policy to refuse the control pod",
                         lambda: not probe(control.netns, "tcp", sink_v4, SINK_PORT, timeout=0.3).ok, timeout=20,
                         interval=0.05)
            watcher.forget_all()
            predicted = next_candidates(last, blocks)
            watcher.watch(predicted)
            adds_before = len(lab.adds)
            t0 = time.monotonic()
            pod = lab.pod_add(f"idp/p{i}", node_name=n2.name, labels={"app": app})
            t_end = time.monotonic()
            if len(lab.adds) != adds_before + 1:
                raise BenchError(f"expected one CNI ADD for {pod.key}, saw {len(lab.adds) - adds_before}")
            add_start, add_end, _ = lab.adds[-1]
            late = not set(pod.addresses) <= set(predicted)
            watcher.watch(pod.addresses)
            identity = identity_of(lab, n2, pod.key)
            timed_out = False
            enforced = wait_enforced(watcher, pod.addresses, identity)
            if enforced is None:
                timed_out, enforced = True, time.monotonic()
            sample = IdentitySample(pod.key, identity, list(pod.addresses), (t_end - t0) * 1e3,
                                    (add_end - add_start) * 1e3, (enforced - t0) * 1e3, (enforced - add_end) * 1e3,
                                    late, timed_out)
            if i in check_at:
                sample.policy_checked = True
                sample.policy_connected, sample.policy_connect_ms = connect_through(pod.netns, sink_v4, t0)
                weft_cli("delete", "--lab", lab.name, "-f", str(policy_file))
            samples.append(sample)
            last = {ipaddress.ip_address(a).version: ipaddress.ip_address(a) for a in pod.addresses}
            say(f"  {pod.key}: identity {identity}, enforced on node-1 after {sample.enforced_ms:.1f} ms"
                f"{' (late: upper bound)' if late else ''}{' TIMED OUT' if timed_out else ''}; pod_add "
                f"{sample.pod_add_ms:.0f} ms, CNI ADD {sample.cni_add_ms:.0f} ms"
                + (f"; through the policy: {'connected' if sample.policy_connected else 'REFUSED'} at "
                   f"{sample.policy_connect_ms:.0f} ms" if sample.policy_checked else ""))
    finally:
        watcher.close()
    say(f"identity: the watcher made {watcher.polls} polls")
    return samples


def wait_enforced(watcher: IpcacheWatcher, addresses: list[str], identity: int) -> float | None:
    """When the watcher first saw every address map to ``identity`` (None: not within the deadline)."""
    def seen() -> list[float | None]:
        return [watcher.first_seen(a, identity) for a in addresses]

    try:
        wait_for(f"node-1 to map {addresses} to identity {identity}", lambda: None not in seen(),
                 timeout=ENFORCE_DEADLINE_S, interval=IPCACHE_POLL_S)
    except BenchError:
        return None
    return max(t for t in seen() if t is not None)


def identity_of(lab: Lab, node: NodeInfo, pod_key: str) -> int:
    for ep in lab.client(node).call("endpoint.list"):
        if ep.get("pod") == pod_key:
            return int(ep["identity"])
    raise BenchError(f"{node.name}'s agent lists no endpoint for {pod_key}")


def connect_through(netns: str, sink: str, t0: float) -> tuple[bool, float]:
    """Connect from the new pod until it gets through (deadline); when it did, in ms since t0."""
    deadline = time.monotonic() + ENFORCE_DEADLINE_S
    while time.monotonic() < deadline:
        if probe(netns, "tcp", sink, SINK_PORT, timeout=0.5).ok:
            return True, (time.monotonic() - t0) * 1e3
    return False, (time.monotonic() - t0) * 1e3


def identity_results(samples: list[IdentitySample]) -> tuple[list[list[str]], list[Result]]:
    enforced = [s.enforced_ms for s in samples]
    cni = [s.cni_add_ms for s in samples]
    pod_add = [s.pod_add_ms for s in samples]
    after = [s.after_add_ms for s in samples]
    late = sum(s.late for s in samples)
    timeouts = sum(s.timed_out for s in samples)
    checked = [s for s in samples if s.policy_checked]
    refused = sum(not s.policy_connected for s in checked)

    def row(name: str, values: list[float]) -> list[str]:
        return [name, f"{percentile(values, 50):.1f}", f"{percentile(values, 99):.1f}", f"{min(values):.1f}",
                f"{max(values):.1f}"]

    rows = [row("pod_add start -> enforced on node-1", enforced), row("CNI ADD (runtime's ADD)", cni),
            row("lab.pod_add (whole)", pod_add), row("CNI ADD end -> enforced on node-1", after)]
    if checked:
        rows.append(row("pod_add start -> connected through the policy", [s.policy_connect_ms for s in checked]))
    p99 = percentile(enforced, 99)
    results = [
        Result("multinode.identity_p99_ms", p99 / IDENTITY_TARGET_MS, 1.0, False,
               f"p99 {p99:.1f} ms, p50 {percentile(enforced, 50):.1f} ms (pod_add start -> node-1's ipcache), "
               f"n={len(samples)}, {late} late, {timeouts} timed out; CNI ADD p50 {percentile(cni, 50):.1f} ms, "
               f"p99 {percentile(cni, 99):.1f} ms"),
        Result("multinode.identity_policy", float(refused), 0.0, False,
               f"{len(checked) - refused}/{len(checked)} new pods connected through a policy allowing only their "
               "labels"),
    ]
    return rows, results


# ---------------------------------------------------------------------------- main
PARTS = ("overlay", "direct", "identity")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds of 2 s, 10 pods")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ", ".join(PARTS))
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per mode (default 7)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per measurement (default 5)")
    ap.add_argument("--pods", type=int, default=None, help="pods for identity propagation (default 40)")
    ap.add_argument("--checks", type=int, default=None, help="of them, checked through a policy (default 5)")
    ap.add_argument("--store", choices=("etcd", "sqlite"), default="etcd", help="the labs' cluster store")
    ap.add_argument("--ipv6", action="store_true", help="measure traffic over IPv6 as well")
    ap.add_argument("--rr-cpu", choices=("same", "cross", "none"), default="same",
                    help="pin the rr client and server to the same CPU (default), different CPUs, or not at all")
    ap.add_argument("--json", help="also write the figures to this file")
    opts = ap.parse_args(argv)
    parts = [p.strip() for p in opts.only.split(",") if p.strip()] or list(PARTS)
    if set(parts) - set(PARTS):
        ap.error(f"--only: choose from {', '.join(PARTS)}")
    rounds = opts.rounds or (3 if opts.quick else 7)
    seconds = opts.seconds or (2.0 if opts.quick else 5.0)
    pods = opts.pods or (10 if opts.quick else 40)
    checks = opts.checks if opts.checks is not None else (3 if opts.quick else 5)
    versions = (4, 6) if opts.ipv6 else (4,)

    traffic: dict[str, TrafficFigures] = {}
    samples: list[IdentitySample] = []
    # The machine is shared: how busy it was frames how far the figures can be trusted.
    load = {"start": list(os.getloadavg())}
    say("load average at start (1/5/15 min): " + " ".join(f"{x:.2f}" for x in load["start"]))
    with bench_session():
        procs = Processes()
        tmp = tmp_dir("multinode")
        try:
            rr = build_rr()
            ensure_bpf()
            for mode in ("overlay", "direct"):
                wanted = mode in parts or (mode == "overlay" and "identity" in parts)
                if not wanted:
                    continue
                lab = TimedLab(f"{PREFIX}{mode[0]}")
                try:
                    up_lab(lab, mode, opts.store)
                    if mode in parts:
                        traffic[mode] = measure_traffic(lab, mode, rounds, seconds, versions, rr, opts.rr_cpu,
                                                        procs, tmp)
                    if mode == "overlay" and "identity" in parts:
                        samples = measure_identity(lab, pods, checks, tmp)
                finally:
                    procs.stop_all()
                    lab.down(quiet=True)
        finally:
            procs.stop_all()
            shutil.rmtree(tmp, ignore_errors=True)

    load["end"] = list(os.getloadavg())
    say("")
    say("load average at end (1/5/15 min): " + " ".join(f"{x:.2f}" for x in load["end"]))
    results: list[Result] = []
    if traffic:
        rows: list[list[str]] = []
        for fig in traffic.values():
            r, res = traffic_rows(fig, versions, rounds, seconds)
            rows += r
            results += res
        say(table(["metric", "weft (median)", "range", "baseline (median)", "range", "weft/base", "paired",
                   "target"], rows))
        say("baselines: overlay -> kernel VXLAN (flannel-style), direct -> plain routing; weft/base: ratio of the "
            "medians (the RESULT); paired: median of the per-round ratios (noise check)")
        for fig in traffic.values():
            say(f"weft datapath counters during the {fig.mode} rounds: "
                + "; ".join(f"{node}: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items()))
                            for node, c in fig.counters.items()))
    if samples:
        rows, res = identity_results(samples)
        results += res
        say("")
        say(table(["identity propagation (ms)", "p50", "p99", "min", "max"], rows))
    dump_json(opts.json, {
        "rounds": rounds, "seconds": seconds, "store": opts.store, "load_average": load,
        "traffic": {m: {"pod_mtu": f.pod_mtu, "counters": f.counters,
                        "weft": {"tcp_gbps": f.weft.tcp_gbps, "rr_rate": f.weft.rr_rate, "rr_p50_us": f.weft.rr_p50},
                        "baseline": {"tcp_gbps": f.base.tcp_gbps, "rr_rate": f.base.rr_rate,
                                     "rr_p50_us": f.base.rr_p50}}
                    for m, f in traffic.items()},
        "identity": [dataclasses.asdict(s) for s in samples],
    })
    print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
