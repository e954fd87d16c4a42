"""The lab's world beyond the nodes: an underlay network, "the internet" with its DNS, kube-dns.

This module is the plan (addresses, names, records, the command lines of the daemons); the
``Lab`` in ``cluster.py`` carries it out and tears it down. It imports nothing from the lab, so
both the lab and its probes can use it.

Layout for a lab named ``L``:

- ``L-vnet``: the underlay, a netns holding the bridge ``br0`` (the VNet of a cloud). Every node
  plugs into it with a veth whose bridge-side port is named ``node-<i>``; the world's port is
  named ``world``. A later multi-node underlay uses the same bridge.
- node ``i`` (``L-node-<i>``): ``eth0``, its uplink, with ``172.30.1.<i>/16`` and
  ``fd00:172:30::1:<i>/64`` (``<i>`` written in decimal digits in both), default routes (IPv4 and
  IPv6) through the world router, forwarding on, and an nftables masquerade of pod traffic that
  leaves through ``eth0`` for anything outside the pod CIDRs: pods reach the world as the node's
  uplink address, as with Azure CNI overlay. Pod-to-pod traffic keeps its addresses.
- ``L-world``: "the internet". Its ``eth0`` is the router of the underlay (``172.30.0.1/16``,
  ``fd00:172:30::1/64``); its ``lo`` holds the address of every name in ``WORLD_RECORDS`` and the
  world's DNS server (``198.51.100.53``, ``2001:db8::53``). It needs no route to the pod CIDRs:
  everything from pods arrives masqueraded. Servers listen on each server address: an HTTP server
  that also echoes non-HTTP TCP streams on ports 80 and 443 (no TLS), UDP echo on 80 and 443, and
  on the DNS address an authoritative dnsmasq serving ``WORLD_RECORDS`` and NXDOMAIN for every
  other name (no upstream of its own).
- kube-dns: pod ``kube-system/kube-dns`` (label ``k8s-app=kube-dns``) on node-1, a real weft
  endpoint, runs dnsmasq on its pod addresses (port 53, UDP and TCP), forwarding every query to
  the world's DNS server, without a cache, so TTLs reach pods unchanged. Its addresses are the
  cluster's resolver (``LabState.dns_servers``).
- The pods' resolver: each lab pod has a ``resolv.conf`` under ``/run/weft/labs/L/pods/<netns>/``
  naming kube-dns (kube-dns's own names the world's DNS server, as ``dnsPolicy: Default`` gives
  the node's resolver). Whatever the lab runs inside a pod sees it as ``/etc/resolv.conf``: it
  runs in a mount namespace of its own where that file is bind-mounted (see ``in_pod_argv``), so
  glibc's resolver talks to kube-dns exactly as in a real pod. Nothing is written to the
  machine's ``/etc``.

Ranges: the underlay is ``172.30.0.0/16`` and ``fd00:172:30::/64``; world servers are in the
documentation ranges ``198.51.100.0/24`` (TEST-NET-2), ``203.0.113.0/24`` (TEST-NET-3) and
``2001:db8::/32``, which no real network routes; none overlaps the default pod CIDRs
``10.244.0.0/16`` and ``fd12:3456:789a::/64``. Nothing of this is in the root namespace.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DNSMASQ = "/usr/sbin/dnsmasq"

UNDERLAY_V4 = ipaddress.ip_network("172.30.0.0/16")
UNDERLAY_V6 = ipaddress.ip_network("fd00:172:30::/64")
ROUTER_V4 = "172.30.0.1"
ROUTER_V6 = "fd00:172:30::1"
BRIDGE = "br0"
UPLINK = "eth0"
WORLD_PORT = "world"  # the world's port on the bridge

WORLD_DNS_V4 = "198.51.100.53"
WORLD_DNS_V6 = "2001:db8::53"
# Ranges the world's addresses come from: checked against the lab's pod CIDRs at ``lab up``.
WORLD_RANGES = tuple(ipaddress.ip_network(n) for n in ("198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"))

# What the world's servers listen on (weft.lab.servers specs), on every world address.
WORLD_SERVE = ("http:80", "http:443", "udp:80", "udp:443")

DEFAULT_TTL = 300


@dataclass(frozen=True)
class WorldRecord:
    """One name of the world's DNS: addresses (A and AAAA) or a CNAME to another record."""

    name: str
    addresses: tuple[str, ...] = ()
    cname: str = ""
    ttl: int = DEFAULT_TTL

    @property
    def kind(self) -> str:
        return "CNAME" if self.cname else "A/AAAA"


# The one table of the world's names. Tests refer to names, and ask ``world_addresses`` for
# addresses, so a change here is a change everywhere.
WORLD_RECORDS: tuple[WorldRecord, ...] = (
    WorldRecord("app1.myblobstorage.com", ("198.51.100.10", "2001:db8:100::10")),
    WorldRecord("app2.myblobstorage.com", ("198.51.100.11", "2001:db8:100::11")),
    WorldRecord("www.myblobstorage.com", cname="app1.myblobstorage.com"),
    # TTL 2 s: for tests of what happens when a DNS answer expires.
    WorldRecord("short.myblobstorage.com", ("198.51.100.20", "2001:db8:100::20"), ttl=2),
    # Several addresses per family: a policy learnt from DNS must allow each of them.
    WorldRecord("multi.myblobstorage.com",
                ("198.51.100.30", "198.51.100.31", "2001:db8:100::30", "2001:db8:100::31")),
    WorldRecord("other.example", ("203.0.113.10", "2001:db8:113::10")),
)


class UnknownName(KeyError):
    pass


def record(name: str) -> WorldRecord:
    wanted = name.rstrip(".").lower()
    for rec in WORLD_RECORDS:
        if rec.name == wanted:
            return rec
    raise UnknownName(f"{name!r} is not a name of the lab's world (see `weft lab world`)")


def world_addresses(name: str) -> list[str]:
    """The addresses ``name`` resolves to, IPv4 first, following CNAMEs."""
    rec = record(name)
    seen = {rec.name}
    while rec.cname:
        rec = record(rec.cname)
        if rec.name in seen:
            raise UnknownName(f"{name!r}: CNAME loop")
        seen.add(rec.name)
    return sorted(rec.addresses, key=lambda a: ipaddress.ip_address(a).version)


def world_server_addresses() -> list[str]:
    """The addresses of every name: the world's servers listen on each."""
    out: list[str] = []
    for rec in WORLD_RECORDS:
        out.extend(a for a in rec.addresses if a not in out)
    return out


def world_lo_addresses() -> list[str]:
    """Every address the world holds on its loopback: the servers' and the DNS server's."""
    return [*world_server_addresses(), WORLD_DNS_V4, WORLD_DNS_V6]


def node_uplink_addresses(index: int) -> list[str]:
    """Node ``index``'s uplink addresses (IPv4, IPv6), without prefix length."""
    if not 1 <= index <= 250:
        raise ValueError(f"node index {index}: 1 to 250")
    return [f"172.30.1.{index}", f"fd00:172:30::1:{index}"]


# The cluster store's machine on the underlay (``--store etcd``): the etcd server in a netns of
# its own, reached by every node's agent over the underlay, as a control plane on the VNet.
STORE_V4 = "172.30.0.2"
STORE_V6 = "fd00:172:30::2"
ETCD_CLIENT_PORT = 2379
STORE_PORT = "store"  # its port on the bridge
# Direct mode: pods take addresses from the underlay itself (Azure CNI's "VNet" addressing),
# a block per node out of these (node i: block i), routed by the nodes.
DIRECT_POD_CIDR_V4, DIRECT_NODE_MASK_V4 = "172.30.128.0/17", 24
DIRECT_POD_CIDR_V6, DIRECT_NODE_MASK_V6 = "fd00:172:30:0:8000::/65", 80
VXLAN_OVERHEAD = {4: 50, 6: 70}  # outer IP + UDP + VXLAN + inner Ethernet


def store_netns(lab: str) -> str:
    return f"{lab}-store"


def etcd_argv(name: str, data_dir: Path, log: Path) -> list[str]:
    """The lab's etcd: clients on the underlay address, its (single) peer URL on loopback."""
    client = f"http://{STORE_V4}:{ETCD_CLIENT_PORT}"
    peer = "http://127.0.0.1:2380"
    return ["/usr/bin/etcd", "--name", name, "--data-dir", str(data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{name}={peer}", "--initial-cluster-state", "new",
            "--log-outputs", str(log), "--logger", "zap"]


def pod_mtu(mode: str, families: Sequence[int], uplink_mtu: int = 1500) -> int:
    """Overlay: what fits in the underlay's MTU once encapsulated (tunnels use the IPv4
    underlay when the cluster runs IPv4, as Cilium's default); direct: the underlay's own."""
    if mode != "overlay":
        return uplink_mtu
    return uplink_mtu - VXLAN_OVERHEAD[4 if 4 in families else 6]


def with_prefix(address: str) -> str:
    net = UNDERLAY_V4 if ipaddress.ip_address(address).version == 4 else UNDERLAY_V6
    return f"{address}/{net.prefixlen}"


def overlaps_world(cidr: str) -> bool:
    """True when a pod CIDR collides with the underlay or the world's ranges."""
    net = ipaddress.ip_network(cidr)
    return any(net.version == other.version and net.overlaps(other)
               for other in (UNDERLAY_V4, UNDERLAY_V6, *WORLD_RANGES))


def vnet_netns(lab: str) -> str:
    return f"{lab}-vnet"


def world_netns(lab: str) -> str:
    return f"{lab}-world"


def bridge_port(node_index: int) -> str:
    return f"node-{node_index}"


# ---------------------------------------------------------------------- command plans
def vnet_batch() -> str:
    """``ip -batch`` for the underlay netns. STP off and forward delay 0: ports forward at once;
    no multicast snooping: with no querier on the segment it would only get in the way of NDP."""
    return (f"link set lo up\n"
            f"link add {BRIDGE} type bridge stp_state 0 forward_delay 0 mcast_snooping 0\n"
            f"link set {BRIDGE} up\n")


def uplink_batch(addresses: Sequence[str], gateways: Sequence[str], extra_lo: Sequence[str] = ()) -> str:
    """``ip -batch`` configuring ``eth0`` (already created and plugged) in a node or the world.
    The link goes up first, so the IPv6 prefix route exists when the default route is added;
    ``nodad`` makes the IPv6 addresses usable at once (nothing else on the segment claims them)."""
    lines = [f"link set {UPLINK} up"]
    for addr in addresses:
        six = ipaddress.ip_address(addr).version == 6
        lines.append(f"addr add {with_prefix(addr)} dev {UPLINK}" + (" nodad" if six else ""))
    for gw in gateways:
        lines.append(f"route add default via {gw} dev {UPLINK}")
    for addr in extra_lo:
        six = ipaddress.ip_address(addr).version == 6
        lines.append(f"addr add {addr}/{128 if six else 32} dev lo" + (" nodad" if six else ""))
    return "\n".join(lines) + "\n"


def masquerade_ruleset(pod_cidrs: list[str]) -> str:
    """nftables for a node: pod traffic leaving through the uplink for anything outside the pod
    CIDRs takes the node's address (Azure CNI overlay SNATs to the node IP the same way);
    pod-to-pod traffic, also across nodes later, keeps its addresses."""
    rules = []
    for cidr in pod_cidrs:
        fam = "ip" if ipaddress.ip_network(cidr).version == 4 else "ip6"
        rules.append(f'    oifname "{UPLINK}" {fam} saddr {cidr} {fam} daddr != {cidr} masquerade')
    body = "\n".join(rules)
    return ("table inet weft_lab {\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f"{body}\n"
            "  }\n"
            "}\n")


def no_dad_sysctls() -> list[str]:
    """Interfaces made later in the netns (eth0, pods' host veths) skip IPv6 duplicate address
    detection: while its link-local address is tentative (1-2 s) an interface sends no neighbour
    solicitation, so the first IPv6 replies to a new node or pod would be lost. Nothing else on
    these links can hold the same address."""
    return ["net.ipv6.conf.default.accept_dad=0"]


def node_sysctls() -> list[str]:
    """Forwarding, only inside the node netns: pods' traffic to the world is routed by the node.
    Pod-to-pod traffic still never reaches the node's stack (bpf_redirect_peer)."""
    return ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", *no_dad_sysctls()]


def world_dns_argv(log: Path) -> list[str]:
    """The world's authoritative DNS server. ``--local=/#/``: every name not in the table is
    answered NXDOMAIN here, never forwarded (there is nowhere to forward to)."""
    argv = [DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
            f"--listen-address={WORLD_DNS_V4}", f"--listen-address={WORLD_DNS_V6}", "--pid-file=",
            f"--log-facility={log}", "--log-queries", f"--local-ttl={DEFAULT_TTL}", "--local=/#/"]
    for rec in WORLD_RECORDS:
        if rec.cname:
            argv.append(f"--cname={rec.name},{rec.cname},{rec.ttl}")
        else:
            # One host-record per address: dnsmasq answers with all records of a name.
            argv.extend(f"--host-record={rec.name},{addr},{rec.ttl}" for addr in rec.addresses)
    return argv


def kube_dns_argv(listen: list[str], log: Path) -> list[str]:
    """kube-dns: a forwarder on the pod's own addresses to the world's DNS server, reached over
    the pod's own families. No cache and no negative cache: every query goes upstream and every
    TTL passes through as the authority set it. Strict order: IPv4 upstream first, when there."""
    families = {ipaddress.ip_address(a).version for a in listen}
    upstream = [WORLD_DNS_V4] if 4 in families else []
    upstream += [WORLD_DNS_V6] if 6 in families else []
    return [DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
            *(f"--listen-address={a}" for a in listen), "--pid-file=", "--cache-size=0", "--no-negcache",
            "--strict-order", *(f"--server={s}" for s in upstream), f"--log-facility={log}", "--log-queries"]


def world_dns_servers() -> list[str]:
    return [WORLD_DNS_V4, WORLD_DNS_V6]


def resolv_conf(nameservers: list[str], comment: str) -> str:
    """A pod's resolv.conf. timeout 1 s, 3 attempts: a lost query costs a second, not five."""
    lines = [f"# {comment}"]
    lines += [f"nameserver {ns}" for ns in nameservers]
    lines.append("options timeout:1 attempts:3")
    return "\n".join(lines) + "\n"


# Runs the command with the pod's resolv.conf as /etc/resolv.conf: a mount namespace of the
# command's own (gone when it exits), where the bind mount is invisible to the rest of the
# machine. "slave" propagation keeps netns mounts made or removed later in sync with the host.
_BIND_RESOLV = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'


def in_pod_argv(netns_path: str, resolv: Path | None, argv: list[str]) -> list[str]:
    """The argv that runs ``argv`` inside a pod: its network namespace (nsenter, so bpffs stays
    visible, unlike ``ip netns exec``) and, when it has one, its resolver."""
    enter = ["nsenter", f"--net={netns_path}"]
    if resolv is None:
        return [*enter, *argv]
    return [*enter, "unshare", "--mount", "--propagation", "slave", "sh", "-c", _BIND_RESOLV, str(resolv), *argv]
