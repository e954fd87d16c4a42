"""The lab's world: pods resolve names through kube-dns (a real endpoint running dnsmasq) and
reach the world's servers through their node, masqueraded to the node's uplink address; the
root namespace gets nothing, and ``down`` removes the world with the rest."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from weft.lab import world as plan
from weft.lab.cluster import LABS_DIR, NETNS_DIR, Lab, LabError, PodInfo
from weft.lab.probe import probe

from conftest import unique_lab_name
from labutil import counters, in_netns, pod_name, snmp_counter, wait_until

WEFT = [sys.executable, "-m", "weft.cli.main"]
KUBE_DNS = "kube-system/kube-dns"


def in_pod(lab: Lab, pod: PodInfo, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lab.exec_argv(pod.key, list(argv)), capture_output=True, text=True, check=check,
                          timeout=30)


def dig(lab: Lab, pod: PodInfo, name: str, rtype: str) -> tuple[str, list[tuple[str, int, str, str]]]:
    """Query through the pod's resolv.conf; (status, [(name, ttl, type, value)])."""
    out = in_pod(lab, pod, "dig", "+noall", "+comments", "+answer", name, rtype).stdout
    status = next(line.split("status: ")[1].split(",")[0] for line in out.splitlines() if "status: " in line)
    answers = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 5 and fields[2] == "IN":
            answers.append((fields[0].rstrip("."), int(fields[1]), fields[3], fields[4].rstrip(".")))
    return status, answers


def version(address: str) -> int:
    return ipaddress.ip_address(address).version


def root_netns_snapshot() -> dict[str, Any]:
    """Addresses and routes (every table) of the root namespace, without volatile fields."""
    addrs = sorted((link["ifname"], a["local"], a["prefixlen"])
                   for link in json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True,
                                                         check=True).stdout)
                   for a in link.get("addr_info", []))
    routes = {}
    for fam in ("-4", "-6"):
        raw = json.loads(subprocess.run(["ip", "-j", fam, "route", "show", "table", "all"], capture_output=True,
                                        text=True, check=True).stdout)
        routes[fam] = sorted(json.dumps({k: r.get(k) for k in ("dst", "gateway", "dev", "table", "type")},
                                        sort_keys=True) for r in raw)
    return {"addrs": addrs, "routes": routes}


def lab_processes(name: str, exe: str = "") -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"WEFT_LAB={name}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if exe and not (entry / "cmdline").read_bytes().startswith(exe.encode()):
                continue
        except OSError:
            continue
        found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def world_lab() -> Iterator[Lab]:
    lab = Lab(unique_lab_name("w"))
    try:
        lab.up(nodes=1, ip_family="dual", world=True)
        yield lab
    finally:
        lab.down(quiet=True)


@pytest.fixture(scope="module")
def client(world_lab: Lab) -> PodInfo:
    return world_lab.pod_add(f"default/{pod_name('c')}", labels={"app": "client"})


@pytest.fixture(scope="module")
def server(world_lab: Lab) -> PodInfo:
    return world_lab.pod_add(f"default/{pod_name('s')}", labels={"app": "server"}, serve=["tcp:80", "udp:80"])


def test_kube_dns_is_a_real_endpoint_and_the_cluster_resolver(world_lab: Lab, client: PodInfo) -> None:
    state = world_lab.load()
    dns = state.pods[KUBE_DNS]
    assert dns.labels == {"k8s-app": "kube-dns"} and dns.node == "node-1"
    assert state.namespaces["kube-system"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert world_lab.dns_servers() == state.dns_servers == dns.addresses
    assert sorted(version(a) for a in dns.addresses) == [4, 6]
    ep = next(e for e in world_lab.client(state.nodes[0]).call("endpoint.list") if e["pod"] == KUBE_DNS)
    assert "k8s:k8s-app=kube-dns" in ep["labels"] and ep["identity"] >= 256
    assert {"name": "dns", "protocol": "UDP", "port": 53} in ep["namedPorts"]
    assert {"name": "dns-tcp", "protocol": "TCP", "port": 53} in ep["namedPorts"]
    # What every pod sees as /etc/resolv.conf; the machine's own file is untouched.
    host_resolv = Path("/etc/resolv.conf").read_text()
    seen = in_pod(world_lab, client, "cat", "/etc/resolv.conf").stdout
    assert [ln.split()[1] for ln in seen.splitlines() if ln.startswith("nameserver")] == dns.addresses
    assert "options timeout:1 attempts:3" in seen
    assert Path("/etc/resolv.conf").read_text() == host_resolv
    assert "/etc/resolv.conf" not in Path("/proc/self/mountinfo").read_text()


def test_glibc_in_a_pod_resolves_a_and_aaaa_through_kube_dns(world_lab: Lab, client: PodInfo) -> None:
    name = "app1.myblobstorage.com"
    code = ("import socket, sys\n"
            "print(sorted({a[4][0] for a in socket.getaddrinfo(sys.argv[1], 80, type=socket.SOCK_STREAM)}))")
    got = in_pod(world_lab, client, sys.executable, "-c", code, name).stdout.strip()
    assert got == str(sorted(world_lab.world_address(name)))
    # The queries came from the pod's own addresses to kube-dns, which forwarded them.
    log = world_lab.kube_dns_log.read_text()
    v4 = next(a for a in client.addresses if version(a) == 4)
    assert f"query[A] {name} from {v4}" in log and f"query[AAAA] {name} from {v4}" in log
    assert f"forwarded {name} to {plan.WORLD_DNS_V4}" in log


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_pod_connects_by_name_masqueraded_to_the_node(world_lab: Lab, client: PodInfo, family: int) -> None:
    name = "app1.myblobstorage.com"
    target = next(a for a in world_lab.world_address(name) if version(a) == family)
    uplink = next(a for a in world_lab.node_uplink_address(client.node) if version(a) == family)
    seen_before = len(world_lab.world_peers())
    for proto, port in (("tcp", 80), ("tcp", 443), ("udp", 80), ("udp", 443)):
        assert probe(client.netns, proto, name, port, family=family).outcome == "connected", (proto, port)
    peers = world_lab.world_peers()[seen_before:]
    assert {(p["proto"], p["port"], p["local"]) for p in peers} == \
        {("tcp", 80, target), ("tcp", 443, target), ("udp", 80, target), ("udp", 443, target)}
    # The world saw the node's uplink address, never the pod's (masquerade, as Azure overlay does).
    assert {p["peer"] for p in peers} == {uplink}


def test_http_by_name_from_a_pod(world_lab: Lab, client: PodInfo) -> None:
    code = ("import sys, urllib.request\n"
            "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())")
    out = in_pod(world_lab, client, sys.executable, "-c", code, "http://app2.myblobstorage.com/").stdout
    assert out.strip() == "world"


def test_other_names_cname_short_ttl_and_nxdomain(world_lab: Lab, client: PodInfo) -> None:
    for rtype, fam in (("A", 4), ("AAAA", 6)):
        status, answers = dig(world_lab, client, "other.example", rtype)
        assert status == "NOERROR"
        assert [a[3] for a in answers] == [a for a in world_lab.world_address("other.example") if version(a) == fam]
    status, answers = dig(world_lab, client, "www.myblobstorage.com", "A")
    assert status == "NOERROR"
    assert answers[0][2:] == ("CNAME", "app1.myblobstorage.com")
    assert answers[1][0] == "app1.myblobstorage.com" and answers[1][3] == "198.51.100.10"
    assert probe(client.netns, "tcp", "www.myblobstorage.com", 80).ok
    # kube-dns keeps no cache: the authority's TTL of 2 s reaches the pod unchanged.
    status, answers = dig(world_lab, client, "short.myblobstorage.com", "A")
    assert status == "NOERROR" and answers[0][1] == 2
    status, answers = dig(world_lab, client, "multi.myblobstorage.com", "AAAA")
    assert sorted(a[3] for a in answers) == ["2001:db8:100::30", "2001:db8:100::31"]
    status, answers = dig(world_lab, client, "does-not-exist.myblobstorage.com", "A")
    assert status == "NXDOMAIN" and answers == []
    assert probe(client.netns, "tcp", "nowhere.example", 80).outcome.startswith("error:cannot resolve")


def test_pod_to_pod_bypasses_the_node_stack_which_forwards_world_traffic(world_lab: Lab, client: PodInfo,
                                                                         server: PodInfo) -> None:
    node = world_lab.load().nodes[0]
    assert in_netns(node.netns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    assert in_netns(node.netns, "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"
    agent = world_lab.client(node)
    before = counters(agent.call("status"))
    fwd4, fwd6 = snmp_counter(node.netns, "Ip", "ForwDatagrams"), snmp_counter(node.netns, "Ip6", "OutForwDatagrams")
    for address in server.addresses:
        assert probe(client.netns, "tcp", address, 80).ok and probe(client.netns, "udp", address, 80).ok
    after = counters(agent.call("status"))
    assert after["fwd_peer_v4"] - before["fwd_peer_v4"] >= 4 and after["fwd_peer_v6"] - before["fwd_peer_v6"] >= 4
    # Forwarding is on, yet pod-to-pod packets never reached the node's stack...
    assert snmp_counter(node.netns, "Ip", "ForwDatagrams") == fwd4
    assert snmp_counter(node.netns, "Ip6", "OutForwDatagrams") == fwd6
    # ...while traffic to the world is routed (and masqueraded) by it.
    assert probe(client.netns, "tcp", "app2.myblobstorage.com", 443, family=4).ok
    assert probe(client.netns, "tcp", "app2.myblobstorage.com", 443, family=6).ok
    assert snmp_counter(node.netns, "Ip", "ForwDatagrams") > fwd4
    assert snmp_counter(node.netns, "Ip6", "OutForwDatagrams") > fwd6


def test_world_and_probe_cli(world_lab: Lab, client: PodInfo) -> None:
    out = subprocess.run([*WEFT, "lab", "world", "--lab", world_lab.name, "-o", "json"], capture_output=True,
                         text=True, check=True).stdout
    report = json.loads(out)
    records = {r["name"]: r for r in report["records"]}
    assert records["www.myblobstorage.com"]["type"] == "CNAME"
    assert records["www.myblobstorage.com"]["addresses"] == world_lab.world_address("app1.myblobstorage.com")
    assert records["short.myblobstorage.com"]["ttl"] == 2
    assert report["kube_dns"] == world_lab.dns_servers()
    assert report["uplinks"] == {"node-1": world_lab.node_uplink_address("node-1")}
    table = subprocess.run([*WEFT, "lab", "world", "--lab", world_lab.name], capture_output=True, text=True,
                           check=True).stdout
    assert "app1.myblobstorage.com" in table and "NXDOMAIN" in table
    proc = subprocess.run([*WEFT, "probe", "--from", client.key, "--to", "app1.myblobstorage.com", "--port", "80",
                           "--lab", world_lab.name, "-o", "json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["result"] == "connected", proc.stdout + proc.stderr
    with pytest.raises(LabError, match="not a name of the lab's world"):
        world_lab.world_address("nowhere.example")


def test_no_world_lab_has_no_resolver_and_no_forwarding() -> None:
    lab = Lab(unique_lab_name("n"))
    try:
        state = lab.up(nodes=1, world=False)
        assert not state.world and state.dns_servers == [] and KUBE_DNS not in state.pods
        assert not (NETNS_DIR / plan.vnet_netns(lab.name)).exists()
        assert not (NETNS_DIR / plan.world_netns(lab.name)).exists()
        node = state.nodes[0]
        assert in_netns(node.netns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
        with pytest.raises(LabError, match="no-world"):
            lab.node_uplink_address(node.name)
        pod = lab.pod_add(f"default/{pod_name('p')}")
        # Still never the machine's resolver: no nameserver at all, so names fail at once.
        resolv = in_pod(lab, pod, "cat", "/etc/resolv.conf").stdout
        assert "nameserver" not in resolv and "no kube-dns" in resolv
        assert probe(pod.netns, "tcp", "app1.myblobstorage.com", 80).outcome.startswith("error:cannot resolve")
    finally:
        lab.down()


def test_down_removes_the_world_and_root_netns_is_untouched() -> None:
    before = root_netns_snapshot()
    lab = Lab(unique_lab_name("d"))
    try:
        lab.up(nodes=2, world=True)
        pod = lab.pod_add(f"default/{pod_name('p')}", node_name="node-1", serve=["tcp:80"])
        assert probe(pod.netns, "tcp", "other.example", 443).ok
        assert len(lab_processes(lab.name, plan.DNSMASQ)) == 2, "the world's DNS and kube-dns"
        for netns in (plan.vnet_netns(lab.name), plan.world_netns(lab.name)):
            assert (NETNS_DIR / netns).exists()
        # Both nodes are on the underlay, each with its own address.
        assert lab.node_uplink_address("node-2") == plan.node_uplink_addresses(2)
        assert in_netns(f"{lab.name}-node-2", "ping", "-c1", "-W2", plan.ROUTER_V6).returncode == 0
        assert root_netns_snapshot() == before, "the lab added addresses or routes to the root netns"
    finally:
        lab.down()
    wait_until("lab processes to go", lambda: lab_processes(lab.name) == [])
    assert not [p.name for p in NETNS_DIR.iterdir() if p.name.startswith(f"{lab.name}-")]
    assert not (LABS_DIR / lab.name).exists()
    assert root_netns_snapshot() == before
