"""from_container and to_container on crafted packets with BPF_PROG_TEST_RUN: the real programs,
verified and run by the kernel, with no namespaces or interfaces involved.

Needs root (loading programs, bpffs) and fails, not skips, without it. Every test run passes a
``struct __sk_buff`` context with ifindex 1 (loopback): with a context the kernel accepts only
the ifindex of a device in the caller's netns, and the sending pod's endpoint entries name
ifindex 1 so the anti-spoofing check sees the packet come from "its" interface.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weft.datapath import abi, libbpf
from weft.datapath.loader import EndpointEntry, NodeDatapath, default_object_path, unpin_all
from weft.datapath.veth import run_in_netns

from labutil import csum

ROOT = Path(__file__).resolve().parents[2]
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
LO = 1
POD_MAC, HOST_MAC = "02:00:00:00:0a:02", "02:00:00:00:0b:02"
PEER_POD_MAC, PEER_HOST_MAC = "02:00:00:00:0a:03", "02:00:00:00:0b:03"
POD4, PEER4, GW4 = "10.0.0.2", "10.0.0.3", "10.0.0.1"
POD6, PEER6, GW6 = "fd00::2", "fd00::3", "fd00::1"
POD_LL = "fe80::2"
PEER_IFINDEX = 1000  # a redirect is not carried out in a test run, so it need not exist

ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 6, 17, 58


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dp() -> Iterator[NodeDatapath]:
    if os.geteuid() != 0:
        pytest.fail("BPF_PROG_TEST_RUN tests load eBPF programs and need root")
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True, check=True)
    subprocess.run(["make", "-s", "bpf"], cwd=ROOT, check=True)
    pin = Path(f"/sys/fs/bpf/weft-test-{secrets.token_hex(4)}")
    datapath = NodeDatapath(pin, default_object_path())
    try:
        datapath.load()
        for ip in (POD4, POD6):
            datapath.upsert_endpoint(EndpointEntry(ipaddress.ip_address(ip), LO, 1, 256, POD_MAC, HOST_MAC))
        for ip in (PEER4, PEER6):
            datapath.upsert_endpoint(
                EndpointEntry(ipaddress.ip_address(ip), PEER_IFINDEX, 2, 257, PEER_POD_MAC, PEER_HOST_MAC))
        yield datapath
    finally:
        datapath.close()
        unpin_all(pin)


def run(dp: NodeDatapath, frame: bytes, prog: str = "from_container", ifindex: int = LO) -> tuple[int, bytes]:
    return libbpf.prog_test_run(dp.program_fd(prog), frame, ctx=libbpf.skb_ctx(ifindex=ifindex))


class Delta:
    """Counter changes across a block: ``with Delta(dp) as d: ...; d["arp_reply"] == (1, 60)``."""

    def __init__(self, dp: NodeDatapath) -> None:
        self.dp = dp
        self.before: dict[str, tuple[int, int]] = {}
        self.after: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> Delta:
        self.before = self.dp.counters()
        return self

    def __exit__(self, *exc: object) -> None:
        self.after = self.dp.counters()

    def __getitem__(self, name: str) -> tuple[int, int]:
        (p0, b0), (p1, b1) = self.before[name], self.after[name]
        return p1 - p0, b1 - b0

    def changed(self) -> set[str]:
        """Counters that moved, apart from connection tracking's (tests of forwarding do not
        care whether a flow was new; test_datapath_policy.py does)."""
        return {k for k in self.after if self.after[k] != self.before[k] and not k.startswith("ct_")}


# ---------------------------------------------------------------------------- packet builders
def mac(text: str) -> bytes:
    return abi.mac_bytes(text)


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def eth(dst: str, src: str, proto: int) -> bytes:
    return mac(dst) + mac(src) + struct.pack("!H", proto)


def tcp_syn() -> bytes:
    return struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x02, 65535, 0, 0)


def ipv4(src: str, dst: str, payload: bytes, ttl: int = 64, proto: int = IPPROTO_TCP) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, ttl, proto, 0, ip(src), ip(dst))
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload


def ipv6(src: str, dst: str, payload: bytes, hops: int = 64, nh: int = IPPROTO_TCP) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), nh, hops, ip(src), ip(dst)) + payload


def arp(op: int, sha: str, sip: str, tha: str, tip: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, mac(sha), ip(sip), mac(tha), ip(tip))


def icmp6(src: str, dst: str, body: bytes) -> bytes:
    """An ICMPv6 message with its checksum filled in (``body`` has a zero checksum field)."""
    pseudo = ip(src) + ip(dst) + struct.pack("!I3xB", len(body), IPPROTO_ICMPV6)
    return body[:2] + struct.pack("!H", csum(pseudo + body)) + body[4:]


def neighbour_solicitation(src: str, target: str, options: bytes = b"", hops: int = 255) -> bytes:
    """Ethernet + IPv6 + NS to the target's solicited-node multicast group."""
    t = ipaddress.IPv6Address(target).packed
    dst = "ff02::1:ff" + f"{t[13]:02x}:{t[14]:02x}{t[15]:02x}"
    body = icmp6(src, dst, struct.pack("!BBHI16s", 135, 0, 0, 0, t) + options)
    group_mac = "33:33:" + ":".join(f"{b:02x}" for b in ipaddress.IPv6Address(dst).packed[12:])
    return eth(group_mac, POD_MAC, ETH_P_IPV6) + ipv6(src, dst, body, hops=hops, nh=IPPROTO_ICMPV6)


SLLAO = struct.pack("!BB6s", 1, 1, mac(POD_MAC))  # source link-layer address option


# ---------------------------------------------------------------------------- ARP
def test_arp_request_is_answered_with_the_host_mac(dp: NodeDatapath) -> None:
    frame = eth("ff:ff:ff:ff:ff:ff", POD_MAC, ETH_P_ARP) + arp(1, POD_MAC, POD4, "00:00:00:00:00:00", GW4)
    with Delta(dp) as d:
        verdict, out = run(dp, frame)
    assert verdict == TC_ACT_REDIRECT, "sent back out of the interface it came in on"
    assert len(out) == len(frame)
    assert out[0:6] == mac(POD_MAC) and out[6:12] == mac(HOST_MAC)
    hrd, pro, hln, pln, op, sha, sip, tha, tip = struct.unpack("!HHBBH6s4s6s4s", out[14:42])
    assert (hrd, pro, hln, pln, op) == (1, ETH_P_IP, 6, 4, 2)
    assert (sha, sip, tha, tip) == (mac(HOST_MAC), ip(GW4), mac(POD_MAC), ip(POD4))
    assert d["arp_reply"] == (1, len(frame))
    assert d.changed() == {"arp_reply"}


@pytest.mark.parametrize(
    ("sip", "tip", "op"),
    [("0.0.0.0", POD4, 1), (POD4, POD4, 1), (PEER4, POD4, 1), (POD4, GW4, 2)],
    ids=["probe-from-0.0.0.0", "gratuitous", "asks-for-its-own-address", "reply-from-pod"],
)
def test_arp_left_to_the_stack(dp: NodeDatapath, sip: str, tip: str, op: int) -> None:
    frame = eth("ff:ff:ff:ff:ff:ff", POD_MAC, ETH_P_ARP) + arp(op, POD_MAC, sip, "00:00:00:00:00:00", tip)
    with Delta(dp) as d:
        verdict, out = run(dp, frame)
    assert verdict == TC_ACT_OK
    assert out == frame, "not rewritten"
    assert d.changed() == {"other"}


def test_arp_without_interface_entry_falls_back_to_the_sender_entry(dp: NodeDatapath) -> None:
    dp.delete_interface(LO)
    try:
        frame = eth("ff:ff:ff:ff:ff:ff", POD_MAC, ETH_P_ARP) + arp(1, POD_MAC, POD4, "00:00:00:00:00:00", GW4)
        verdict, out = run(dp, frame)
        assert verdict == TC_ACT_REDIRECT and out[6:12] == mac(HOST_MAC)
        # A sender address that is not behind this interface gets no answer.
        frame = eth("ff:ff:ff:ff:ff:ff", POD_MAC, ETH_P_ARP) + arp(1, POD_MAC, PEER4, "00:00:00:00:00:00", GW4)
        assert run(dp, frame)[0] == TC_ACT_OK
    finally:
        dp.upsert_endpoint(EndpointEntry(ipaddress.ip_address(POD4), LO, 1, 256, POD_MAC, HOST_MAC))


def test_truncated_arp_is_dropped(dp: NodeDatapath) -> None:
    frame = eth("ff:ff:ff:ff:ff:ff", POD_MAC, ETH_P_ARP) + arp(1, POD_MAC, POD4, "00:00:00:00:00:00", GW4)[:20]
    with Delta(dp) as d:
        assert run(dp, frame)[0] == TC_ACT_SHOT
    assert d["drop_invalid"][0] == 1


# ---------------------------------------------------------------------------- NDP
def check_advertisement(out: bytes, target: str, to: str) -> None:
    assert len(out) == 14 + 40 + 32, "exactly one NA with one option"
    assert out[0:6] == mac(POD_MAC) and out[6:12] == mac(HOST_MAC)
    assert struct.unpack("!H", out[12:14])[0] == ETH_P_IPV6
    vtf, plen, nh, hops, src, dst = struct.unpack("!IHBB16s16s", out[14:54])
    assert (vtf >> 28, plen, nh, hops, src, dst) == (6, 32, IPPROTO_ICMPV6, 255, ip(target), ip(to))
    na = out[54:86]
    typ, code, _ck, flags, tgt, opt_type, opt_len, opt_mac = struct.unpack("!BBHI16sBB6s", na)
    assert (typ, code, tgt, opt_type, opt_len, opt_mac) == (136, 0, ip(target), 2, 1, mac(HOST_MAC))
    assert flags == 0xE0000000, "Router | Solicited | Override, reserved bits zero"
    assert csum(src + dst + struct.pack("!I3xB", 32, IPPROTO_ICMPV6) + na) == 0, "ICMPv6 checksum verifies"


@pytest.mark.parametrize(
    ("src", "options"),
    [(POD_LL, SLLAO), (POD6, SLLAO), (POD_LL, b""), (POD_LL, SLLAO + bytes([14, 1]) + b"\x01" * 6)],
    ids=["link-local-with-sllao", "global-with-sllao", "no-option", "two-options"],
)
def test_neighbour_solicitation_gets_a_valid_advertisement(dp: NodeDatapath, src: str, options: bytes) -> None:
    frame = neighbour_solicitation(src, GW6, options)
    with Delta(dp) as d:
        verdict, out = run(dp, frame)
    assert verdict == TC_ACT_REDIRECT
    check_advertisement(out, target=GW6, to=src)
    assert d["ndp_reply"][0] == 1
    assert d.changed() == {"ndp_reply"}


def test_solicitation_for_a_link_local_gateway_is_answered(dp: NodeDatapath) -> None:
    verdict, out = run(dp, neighbour_solicitation(POD_LL, "fe80::1", SLLAO))
    assert verdict == TC_ACT_REDIRECT
    check_advertisement(out, target="fe80::1", to=POD_LL)


@pytest.mark.parametrize(
    ("src", "target", "hops"),
    [("::", GW6, 255), (POD_LL, POD6, 255), (POD_LL, GW6, 64), (POD_LL, "ff02::1", 255)],
    ids=["dad", "own-address", "routed-hop-limit", "multicast-target"],
)
def test_solicitations_left_to_the_stack(dp: NodeDatapath, src: str, target: str, hops: int) -> None:
    frame = neighbour_solicitation(src, target, SLLAO if src != "::" else b"", hops=hops)
    with Delta(dp) as d:
        verdict, out = run(dp, frame)
    assert verdict == TC_ACT_OK
    assert out == frame
    assert d["ndp_reply"][0] == 0


# ---------------------------------------------------------------------------- forwarding
def test_ipv4_to_a_local_endpoint_is_redirected_to_its_peer(dp: NodeDatapath) -> None:
    frame = eth(HOST_MAC, POD_MAC, ETH_P_IP) + ipv4(POD4, PEER4, tcp_syn())
    with Delta(dp) as d:
        verdict, out = run(dp, frame)
    assert verdict == TC_ACT_REDIRECT, "bpf_redirect_peer's verdict"
    assert out[0:6] == mac(PEER_POD_MAC) and out[6:12] == mac(PEER_HOST_MAC)
    assert out[14 + 8] == 63, "TTL decremented"
    assert csum(out[14:34]) == 0, "IPv4 header checksum still valid"
    assert out[14:22] == frame[14:22] and out[23:24] == frame[23:24] and out[26:] == frame[26:], "nothing else changed"
    assert d["fwd_peer_v4"] == (1, len(frame))
    assert d.changed() == {"fwd_peer_v4"}


def test_ipv6_to_a_local_endpoint_is_redirected_to_its_peer(dp: NodeDatapath) -> None:
    frame = eth(HOST_MAC, POD_MAC, ETH_P_IPV6) + ipv6(POD6, PEER6, tcp_syn())
    with Delta(dp) as d:
        verdict, out = run(dp, frame)
    assert verdict == TC_ACT_REDIRECT
    assert out[0:6] == mac(PEER_POD_MAC) and out[6:12] == mac(PEER_HOST_MAC)
    assert out[14 + 7] == 63, "hop limit decremented"
    assert out[14:21] == frame[14:21] and out[22:] == frame[22:]
    assert d["fwd_peer_v6"] == (1, len(frame))
    assert d.changed() == {"fwd_peer_v6"}


@pytest.mark.parametrize("ttl", [0, 1])
def test_expiring_ttl_goes_to_the_stack(dp: NodeDatapath, ttl: int) -> None:
    frame = eth(HOST_MAC, POD_MAC, ETH_P_IP) + ipv4(POD4, PEER4, tcp_syn(), ttl=ttl)
    verdict, out = run(dp, frame)
    assert verdict == TC_ACT_OK and out == frame, "the stack sends time-exceeded"
    frame6 = eth(HOST_MAC, POD_MAC, ETH_P_IPV6) + ipv6(POD6, PEER6, tcp_syn(), hops=ttl)
    verdict, out = run(dp, frame6)
    assert verdict == TC_ACT_OK and out == frame6


def test_unknown_destination_goes_to_the_stack(dp: NodeDatapath) -> None:
    frame4 = eth(HOST_MAC, POD_MAC, ETH_P_IP) + ipv4(POD4, "192.0.2.9", tcp_syn())
    frame6 = eth(HOST_MAC, POD_MAC, ETH_P_IPV6) + ipv6(POD6, "2001:db8::9", tcp_syn())
    with Delta(dp) as d:
        v4, out4 = run(dp, frame4)
        v6, out6 = run(dp, frame6)
    assert (v4, v6) == (TC_ACT_OK, TC_ACT_OK)
    assert out4 == frame4 and out6 == frame6, "the stack path leaves TTL and MACs alone"
    assert d["to_stack_v4"] == (1, len(frame4)) and d["to_stack_v6"] == (1, len(frame6))


@pytest.mark.parametrize(
    "src", [PEER4, "10.0.0.99", PEER6, "fd00::99"],
    ids=["other-pods-v4", "unknown-v4", "other-pods-v6", "unknown-v6"],
)
def test_spoofed_source_is_dropped_and_counted(dp: NodeDatapath, src: str) -> None:
    # PEER4/PEER6 are real endpoints, but behind another interface than the sender's.
    if ":" in src:
        frame = eth(HOST_MAC, POD_MAC, ETH_P_IPV6) + ipv6(src, POD6, tcp_syn())
    else:
        frame = eth(HOST_MAC, POD_MAC, ETH_P_IP) + ipv4(src, POD4, tcp_syn())
    with Delta(dp) as d:
        verdict, _ = run(dp, frame)
    assert verdict == TC_ACT_SHOT
    assert d["drop_spoof"] == (1, len(frame))
    assert d.changed() == {"drop_spoof"}


def test_own_address_from_another_interface_is_spoofing(dp: NodeDatapath) -> None:
    """The same packet that is forwarded from ifindex 1 is dropped when it arrives on another
    interface (a veth in a scratch netns, since ctx ifindex must exist; no dummy driver here)."""
    netns = f"wdp-ut-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "add", "d0", "type", "veth", "peer", "name", "d1"], check=True)
        index = int(subprocess.run(["ip", "-n", netns, "-o", "link", "show", "d0"], capture_output=True, text=True,
                                   check=True).stdout.split(":", 1)[0])
        assert index != LO
        frame = eth(HOST_MAC, POD_MAC, ETH_P_IP) + ipv4(POD4, PEER4, tcp_syn())
        verdict, _ = run_in_netns(f"/run/netns/{netns}", lambda: run(dp, frame, ifindex=index))
        assert verdict == TC_ACT_SHOT
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


def test_unspecified_and_link_local_sources_pass(dp: NodeDatapath) -> None:
    dhcp = eth("ff:ff:ff:ff:ff:ff", POD_MAC, ETH_P_IP) + ipv4("0.0.0.0", "255.255.255.255", b"\0" * 8,
                                                                 proto=IPPROTO_UDP)
    rs = eth("33:33:00:00:00:02", POD_MAC, ETH_P_IPV6) + ipv6(
        POD_LL, "ff02::2", icmp6(POD_LL, "ff02::2", struct.pack("!BBHI", 133, 0, 0, 0)), hops=255, nh=IPPROTO_ICMPV6)
    with Delta(dp) as d:
        assert run(dp, dhcp) == (TC_ACT_OK, dhcp)
        assert run(dp, rs) == (TC_ACT_OK, rs)
    assert d["other"][0] == 2 and d["drop_spoof"][0] == 0


def test_non_ip_frames_pass_as_other(dp: NodeDatapath) -> None:
    lldp = eth("01:80:c2:00:00:0e", POD_MAC, 0x88CC) + b"\0" * 46
    with Delta(dp) as d:
        assert run(dp, lldp) == (TC_ACT_OK, lldp)
    assert d["other"] == (1, len(lldp))


@pytest.mark.parametrize(
    "frame",
    [
        eth(HOST_MAC, POD_MAC, ETH_P_IP) + b"\x44" + ipv4(POD4, PEER4, tcp_syn())[1:],  # IHL below 5
        eth(HOST_MAC, POD_MAC, ETH_P_IP) + b"\x65" + ipv4(POD4, PEER4, tcp_syn())[1:],  # version 6 in an IPv4 frame
    ],
    ids=["ihl", "wrong-version"],
)
def test_malformed_frames_are_dropped_as_invalid(dp: NodeDatapath, frame: bytes) -> None:
    # Frames too short for an IPv4/IPv6 header cannot be tested here: BPF_PROG_TEST_RUN itself
    # rejects them (EINVAL) before the program runs.
    with Delta(dp) as d:
        assert run(dp, frame)[0] == TC_ACT_SHOT
    assert d["drop_invalid"][0] == 1


# ---------------------------------------------------------------------------- to_container
def test_to_container_counts_and_passes(dp: NodeDatapath) -> None:
    f4 = eth(POD_MAC, HOST_MAC, ETH_P_IP) + ipv4("192.0.2.1", POD4, tcp_syn())
    f6 = eth(POD_MAC, HOST_MAC, ETH_P_IPV6) + ipv6("2001:db8::1", POD6, tcp_syn())
    fa = eth(POD_MAC, HOST_MAC, ETH_P_ARP) + arp(1, HOST_MAC, "192.0.2.1", "00:00:00:00:00:00", POD4)
    with Delta(dp) as d:
        assert run(dp, f4, prog="to_container") == (TC_ACT_OK, f4)
        assert run(dp, f6, prog="to_container") == (TC_ACT_OK, f6)
        assert run(dp, fa, prog="to_container") == (TC_ACT_OK, fa)
    assert d["to_pod_v4"] == (1, len(f4)) and d["to_pod_v6"] == (1, len(f6))
    assert d.changed() == {"to_pod_v4", "to_pod_v6"}


# ---------------------------------------------------------------------------- properties
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(proto=st.sampled_from([ETH_P_IP, ETH_P_IPV6, ETH_P_ARP, 0x8100]), body=st.binary(max_size=120))
def test_arbitrary_frames_never_fail_to_run(dp: NodeDatapath, proto: int, body: bytes) -> None:
    """Garbage after the Ethernet header gets a verdict, never an error; a frame only grows or
    shrinks when it was answered (NDP)."""
    # The test run refuses IP frames shorter than the fixed header (see above): pad them.
    minimum = {ETH_P_IP: 20, ETH_P_IPV6: 40}.get(proto, 0)
    frame = eth(HOST_MAC, POD_MAC, proto) + body.ljust(minimum, b"\0")
    verdict, out = run(dp, frame)
    assert verdict in (TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT)
    if len(out) != len(frame):
        assert verdict == TC_ACT_REDIRECT and len(out) == 86


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ttl=st.integers(2, 255), ident=st.integers(0, 0xFFFF), tos=st.integers(0, 255),
       payload=st.binary(min_size=8, max_size=64))  # at least a UDP header: shorter is malformed
def test_forwarded_ipv4_checksum_always_valid(dp: NodeDatapath, ttl: int, ident: int, tos: int,
                                              payload: bytes) -> None:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), ident, 0, ttl, IPPROTO_UDP, 0, ip(POD4),
                      ip(PEER4))
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    verdict, out = run(dp, eth(HOST_MAC, POD_MAC, ETH_P_IP) + hdr + payload)
    assert verdict == TC_ACT_REDIRECT
    assert out[14 + 8] == ttl - 1
    assert csum(out[14:34]) == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.integers(1, 2**128 - 1).map(ipaddress.IPv6Address).filter(
           lambda a: not a.is_multicast and str(a) not in (POD6, PEER6)),
       src=st.sampled_from([POD_LL, POD6]), n_options=st.integers(0, 4))
def test_every_solicitation_gets_a_valid_advertisement(dp: NodeDatapath, target: ipaddress.IPv6Address, src: str,
                                                       n_options: int) -> None:
    """Any target (but the pod's own and multicast ones), with 0..4 options: the answer is one
    32-byte NA with a checksum that verifies."""
    options = b"".join(struct.pack("!BB6s", 1 if i == 0 else 14, 1, bytes([i]) * 6) for i in range(n_options))
    verdict, out = run(dp, neighbour_solicitation(src, str(target), options))
    assert verdict == TC_ACT_REDIRECT
    check_advertisement(out, target=str(target), to=src)
