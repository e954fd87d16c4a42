"""from_container on crafted packets with BPF_PROG_TEST_RUN: the real program in the kernel,
no namespaces needed. ARP and NDP answered, local delivery rewritten, spoofing dropped."""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from weft.datapath import abi, libbpf
from weft.datapath.loader import EndpointEntry, NodeDatapath, default_object_path

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
POD_MAC = "02:00:00:00:0a:02"
HOST_MAC = "02:00:00:00:0b:02"
PEER_POD_MAC = "02:00:00:00:0a:03"
PEER_HOST_MAC = "02:00:00:00:0b:03"


@pytest.fixture(scope="module")
def dp() -> Iterator[NodeDatapath]:
    pin = Path(f"/sys/fs/bpf/weft-test-{secrets.token_hex(3)}")
    datapath = NodeDatapath(pin, default_object_path())
    try:
        datapath.load()
        # The sender lives behind ifindex 1 (lo): test runs happen on lo's skb.
        for ip in ("10.0.0.2", "fd00::2"):
            datapath.upsert_endpoint(EndpointEntry(ipaddress.ip_address(ip), 1, 1, 256, POD_MAC, HOST_MAC))
        for ip in ("10.0.0.3", "fd00::3"):
            # Delivery is not carried out in a test run, so the peer's ifindex need not exist.
            datapath.upsert_endpoint(EndpointEntry(ipaddress.ip_address(ip), 2, 2, 257, PEER_POD_MAC, PEER_HOST_MAC))
        yield datapath
    finally:
        datapath.close()
        shutil.rmtree(pin, ignore_errors=True)


def run(dp: NodeDatapath, packet: bytes) -> tuple[int, bytes]:
    # Test runs use the loopback device, so the program sees skb->ifindex == 1.
    return libbpf.prog_test_run(dp.program_fd("from_container"), packet)


def mac(text: str) -> bytes:
    return abi.mac_bytes(text)


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def eth(dst: str, src: str, proto: int) -> bytes:
    return mac(dst) + mac(src) + struct.pack("!H", proto)


def ipv4_tcp(src: str, dst: str, ttl: int = 64) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, ttl, 6, 0,
                      ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + tcp


def test_arp_request_is_answered_with_the_host_mac(dp: NodeDatapath) -> None:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac(POD_MAC), ipaddress.ip_address("10.0.0.2").packed,
                      b"\0" * 6, ipaddress.ip_address("10.0.0.1").packed)
    before = dp.counters()["arp_reply"][0]
    verdict, out = run(dp, eth("ff:ff:ff:ff:ff:ff", POD_MAC, 0x0806) + arp)
    assert verdict == TC_ACT_REDIRECT
    assert out[0:6] == mac(POD_MAC) and out[6:12] == mac(HOST_MAC)
    op, sha, sip, tha, tip = struct.unpack("!6xH6s4s6s4s", out[14:42])
    assert op == 2 and sha == mac(HOST_MAC) and tha == mac(POD_MAC)
    assert ipaddress.ip_address(sip) == ipaddress.ip_address("10.0.0.1")
    assert ipaddress.ip_address(tip) == ipaddress.ip_address("10.0.0.2")
    assert dp.counters()["arp_reply"][0] == before + 1


def test_neighbour_solicitation_gets_a_valid_advertisement(dp: NodeDatapath) -> None:
    src = ipaddress.ip_address("fe80::2").packed  # probes come from the link-local address
    target = ipaddress.ip_address("fd00::1").packed
    dst = ipaddress.ip_address("ff02::1:ff00:1").packed
    body = struct.pack("!BBHI16sBB6s", 135, 0, 0, 0, target, 1, 1, mac(POD_MAC))
    pseudo = src + dst + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", csum(pseudo + body)) + body[4:]
    ip6 = struct.pack("!IHBB16s16s", 0x60000000, len(body), 58, 255, src, dst)
    verdict, out = run(dp, eth("33:33:ff:00:00:01", POD_MAC, 0x86DD) + ip6 + body)
    assert verdict == TC_ACT_REDIRECT
    assert out[0:6] == mac(POD_MAC) and out[6:12] == mac(HOST_MAC)
    _, plen, nh, hops, osrc, odst = struct.unpack("!IHBB16s16s", out[14:54])
    assert (plen, nh, hops, osrc, odst) == (32, 58, 255, target, src)
    na = out[54:86]
    typ, code, _ck, flags, tgt, opt_type, opt_len, opt_mac = struct.unpack("!BBHI16sBB6s", na)
    assert (typ, code, flags >> 29, tgt, opt_type, opt_len, opt_mac) == (136, 0, 0b111, target, 2, 1, mac(HOST_MAC))
    assert csum(osrc + odst + struct.pack("!I3xB", 32, 58) + na) == 0, "ICMPv6 checksum verifies"


def test_local_delivery_rewrites_l2_and_ttl(dp: NodeDatapath) -> None:
    before = dp.counters()["fwd_peer_v4"][0]
    verdict, out = run(dp, eth(HOST_MAC, POD_MAC, 0x0800) + ipv4_tcp("10.0.0.2", "10.0.0.3"))
    assert verdict == TC_ACT_REDIRECT
    assert out[0:6] == mac(PEER_POD_MAC) and out[6:12] == mac(PEER_HOST_MAC)
    assert out[14 + 8] == 63, "TTL decremented"
    assert csum(out[14:34]) == 0, "IPv4 header checksum still valid"
    assert dp.counters()["fwd_peer_v4"][0] == before + 1


def test_unknown_destination_goes_to_the_stack(dp: NodeDatapath) -> None:
    verdict, out = run(dp, eth(HOST_MAC, POD_MAC, 0x0800) + ipv4_tcp("10.0.0.2", "192.0.2.9"))
    assert verdict == TC_ACT_OK
    assert out[14 + 8] == 64, "the stack path leaves the TTL to the stack"


@pytest.mark.parametrize("src", ["10.0.0.3", "10.0.0.99"], ids=["other-pods-address", "unknown-address"])
def test_spoofed_source_is_dropped_and_counted(dp: NodeDatapath, src: str) -> None:
    # 10.0.0.3 is a real endpoint, but behind another interface than the sender's.
    before = dp.counters()["drop_spoof"][0]
    verdict, _ = run(dp, eth(HOST_MAC, POD_MAC, 0x0800) + ipv4_tcp(src, "10.0.0.2"))
    assert verdict == TC_ACT_SHOT
    assert dp.counters()["drop_spoof"][0] == before + 1


def test_truncated_frames_are_dropped_as_invalid(dp: NodeDatapath) -> None:
    before = dp.counters()["drop_invalid"][0]
    bad_ihl = b"\x44" + ipv4_tcp("10.0.0.2", "10.0.0.3")[1:]  # a header length below the minimum
    verdict, _ = run(dp, eth(HOST_MAC, POD_MAC, 0x0800) + bad_ihl)
    assert verdict == TC_ACT_SHOT
    assert dp.counters()["drop_invalid"][0] == before + 1
