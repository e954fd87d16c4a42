"""Pods on one node: dual-stack addresses, ping/TCP/UDP over IPv4 and IPv6, the BPF path proven,
endpoint listing and status through the CLI."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from weft.lab.cluster import Lab, PodInfo
from weft.lab.probe import ping, probe

from labutil import counters, in_netns, pod_name, snmp_counter


@pytest.fixture(scope="module")
def pods(lab: Lab) -> Iterator[tuple[PodInfo, PodInfo]]:
    a = lab.pod_add(f"default/{pod_name('a')}", labels={"app": "a"}, serve=["tcp:80", "udp:53", "http:8080"])
    b = lab.pod_add(f"team/{pod_name('b')}", labels={"app": "b"}, serve=["tcp:80", "udp:53"])
    yield a, b
    lab.pod_del(a.key)
    lab.pod_del(b.key)


def _family(pod: PodInfo, version: int) -> str:
    return next(a for a in pod.addresses if ipaddress.ip_address(a).version == version)


def test_pods_get_one_address_per_family_from_the_node_block(lab: Lab, pods: tuple[PodInfo, PodInfo]) -> None:
    for pod in pods:
        v4 = ipaddress.ip_address(_family(pod, 4))
        v6 = ipaddress.ip_address(_family(pod, 6))
        assert v4 in ipaddress.ip_network("10.244.1.0/24")
        assert v6 in ipaddress.ip_network("fd12:3456:789a:0:1::/80")
        addrs = json.loads(in_netns(pod.netns, "ip", "-j", "addr", "show", "eth0").stdout)[0]["addr_info"]
        assert {a["local"] for a in addrs} >= {str(v4), str(v6)}


@pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
def test_ping_tcp_udp_between_pods(lab: Lab, pods: tuple[PodInfo, PodInfo], version: int) -> None:
    a, b = pods
    for src, dst in ((a, b), (b, a)):
        addr = _family(dst, version)
        assert ping(src.netns, addr), f"ping {src.key} -> {addr}"
        assert probe(src.netns, "tcp", addr, 80).outcome == "connected"
        assert probe(src.netns, "udp", addr, 53).outcome == "connected"
    # a closed port is refused by the pod (the datapath delivered the SYN; the pod answered RST)
    assert probe(a.netns, "tcp", _family(b, version), 81).outcome == "refused"


def test_forwarding_takes_the_bpf_path_not_the_node_stack(lab: Lab, pods: tuple[PodInfo, PodInfo]) -> None:
    a, b = pods
    node = lab.load().nodes[0]
    # The node forwards nothing itself: with forwarding off, only the datapath can deliver.
    assert in_netns(node.netns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
    client = lab.client(node)
    before = counters(client.call("status"))
    fwd4 = snmp_counter(node.netns, "Ip", "ForwDatagrams")
    fwd6 = snmp_counter(node.netns, "Ip6", "OutForwDatagrams")
    assert probe(a.netns, "tcp", _family(b, 4), 80).ok
    assert probe(a.netns, "tcp", _family(b, 6), 80).ok
    after = counters(client.call("status"))
    assert after["fwd_peer_v4"] - before["fwd_peer_v4"] >= 4, "TCP handshake + data both ways, IPv4"
    assert after["fwd_peer_v6"] - before["fwd_peer_v6"] >= 4, "same for IPv6"
    assert snmp_counter(node.netns, "Ip", "ForwDatagrams") == fwd4
    assert snmp_counter(node.netns, "Ip6", "OutForwDatagrams") == fwd6


def test_gateway_answers_arp_and_neighbour_discovery(lab: Lab, pods: tuple[PodInfo, PodInfo]) -> None:
    a, b = pods
    node = lab.load().nodes[0]
    client = lab.client(node)
    before = counters(client.call("status"))
    in_netns(a.netns, "ip", "neigh", "flush", "dev", "eth0")
    in_netns(a.netns, "ip", "-6", "neigh", "flush", "dev", "eth0")
    # Traffic to another pod makes the pod resolve its gateways again.
    assert probe(a.netns, "tcp", _family(b, 4), 80).ok
    assert probe(a.netns, "tcp", _family(b, 6), 80).ok
    host_mac = next(e["hostMAC"] for e in client.call("endpoint.list") if e["pod"] == a.key)
    entries = {e["dst"]: e for e in json.loads(in_netns(a.netns, "ip", "-j", "neigh", "show", "dev", "eth0").stdout)}
    for gw in ("10.244.1.1", "fd12:3456:789a:0:1::1"):
        assert entries.get(gw, {}).get("lladdr") == host_mac, f"{gw} resolved to the host veth MAC: {entries}"
    after = counters(client.call("status"))
    assert after["arp_reply"] > before["arp_reply"]
    assert after["ndp_reply"] > before["ndp_reply"]


def test_cli_endpoint_list_and_status_json(lab: Lab, pods: tuple[PodInfo, PodInfo]) -> None:
    a, b = pods
    out = subprocess.run([sys.executable, "-m", "weft.cli.main", "endpoint", "list", "--lab", lab.name, "-o", "json"],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    by_pod = {r["pod"]: r for r in rows}
    assert by_pod[a.key]["addresses"] == a.addresses
    assert "k8s:app=a" in by_pod[a.key]["labels"]
    assert f"k8s:io.kubernetes.pod.namespace={b.namespace}" in by_pod[b.key]["labels"]
    assert by_pod[a.key]["identity"] >= 256 and by_pod[a.key]["identity"] != by_pod[b.key]["identity"]
    assert all(r["state"] == "ready" for r in rows)
    st = json.loads(subprocess.run([sys.executable, "-m", "weft.cli.main", "status", "--lab", lab.name, "-o", "json"],
                                   capture_output=True, text=True, check=True).stdout)[0]
    assert st["healthy"] and st["endpoints_attached"] == st["endpoints"] >= 2
    assert {p["name"] for p in st["programs"]} >= {"from_container", "to_container"}
    assert st["maps"]["weft_endpoints"]["entries"] >= 4


def test_node_reaches_a_new_pod_over_ipv6_at_once(lab: Lab) -> None:
    """The host side of a new pod's veth skips duplicate address detection: its link-local address
    is usable at once, so the node's first IPv6 packet to the pod is not held for 1-2 s."""
    pod = lab.pod_add(f"default/{pod_name('dad')}", labels={"app": "dad"})
    try:
        node = lab.load().nodes[0]
        host_if = next(e["hostInterface"] for e in lab.client(node).call("endpoint.list") if e["pod"] == pod.key)
        tentative = in_netns(node.netns, "ip", "-6", "addr", "show", "dev", host_if, "tentative").stdout
        assert tentative.strip() == "", f"{host_if} has tentative addresses: {tentative}"
        # One echo request, answered within 0.5 s (a tentative link-local would delay it past 1 s).
        in_netns(node.netns, "ping", "-6", "-c", "1", "-W", "0.5", _family(pod, 6))
    finally:
        lab.pod_del(pod.key)
