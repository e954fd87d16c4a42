"""Policy and connection tracking in the datapath, on crafted packets (BPF_PROG_TEST_RUN):
default deny per direction, allow entries by identity, protocol and port prefix, explicit deny
winning, replies and related ICMP passing by conntrack, drop reasons counted, ipcache identities,
and policy updates that write only what changed."""

from __future__ import annotations

import ipaddress
import secrets
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from weft.datapath import abi, libbpf
from weft.datapath.loader import (
    EndpointEntry,
    NodeDatapath,
    PolicyMapKey,
    PolicyMapValue,
    default_object_path,
    unpin_all,
)

from labutil import csum

ROOT = Path(__file__).resolve().parents[2]
OK, SHOT, REDIRECT = 0, 2, 7
LO, B_IFINDEX = 1, 1000
A4, B4, A6, B6 = "10.0.0.2", "10.0.0.3", "fd00::2", "fd00::3"
A_ID, B_ID, WORLD, CIDR_ID = 256, 257, 2, 1 << 24
A_EP, B_EP = 1, 2
TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58
SYN, ACK = 0x02, 0x10
ING, EGR = abi.DIR_INGRESS, abi.DIR_EGRESS


def a_entries(flags: int = 0) -> list[EndpointEntry]:
    return [EndpointEntry(ipaddress.ip_address(x), LO, A_EP, A_ID, "02:00:00:00:0a:02", "02:00:00:00:0b:02", flags)
            for x in (A4, A6)]


def b_entries(flags: int = 0) -> list[EndpointEntry]:
    return [EndpointEntry(ipaddress.ip_address(x), B_IFINDEX, B_EP, B_ID, "02:00:00:00:0a:03", "02:00:00:00:0b:03",
                          flags) for x in (B4, B6)]


@pytest.fixture
def dp() -> Iterator[NodeDatapath]:
    subprocess.run(["make", "-s", "bpf"], cwd=ROOT, check=True)
    pin = Path(f"/sys/fs/bpf/weft-test-{secrets.token_hex(4)}")
    datapath = NodeDatapath(pin, default_object_path())
    try:
        datapath.load()
        for entry in a_entries() + b_entries():
            datapath.upsert_endpoint(entry)
        yield datapath
    finally:
        datapath.close()
        unpin_all(pin)


def l4(proto: int, sport: int, dport: int, flags: int = SYN) -> bytes:
    if proto == TCP:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    return struct.pack("!HHHH", sport, dport, 8, 0)


def frame(src: str, dst: str, payload: bytes, proto: int) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    eth = bytes.fromhex("020000000b02" "020000000a02") + struct.pack("!H", 0x0800 if s.version == 4 else 0x86DD)
    if s.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0, s.packed, d.packed)
        return eth + hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload
    return eth + struct.pack("!IHBB16s16s", 0x60000000, len(payload), proto, 64, s.packed, d.packed) + payload


def send(dp: NodeDatapath, src: str, dst: str, proto: int, sport: int, dport: int, flags: int = SYN,
         prog: str = "from_container", ifindex: int = LO) -> int:
    verdict, _ = libbpf.prog_test_run(dp.program_fd(prog), frame(src, dst, l4(proto, sport, dport, flags), proto),
                                      ctx=libbpf.skb_ctx(ifindex=ifindex))
    return verdict


def allow(direction: int, identity: int, proto: int = 0, port: int = 0, plen: int = 0) -> tuple[PolicyMapKey,
                                                                                                PolicyMapValue]:
    return PolicyMapKey(direction, identity, proto, port, plen if proto else 0), PolicyMapValue(False)


def deny(direction: int, identity: int, proto: int = 0, port: int = 0, plen: int = 0) -> tuple[PolicyMapKey,
                                                                                               PolicyMapValue]:
    return PolicyMapKey(direction, identity, proto, port, plen if proto else 0), PolicyMapValue(True)


def counter(dp: NodeDatapath, name: str) -> int:
    return dp.counters()[name][0]


def test_no_policy_allows_everything(dp: NodeDatapath) -> None:
    assert send(dp, A4, B4, TCP, 40000, 81) == REDIRECT
    assert send(dp, A6, B6, UDP, 40000, 5353) == REDIRECT


def test_ingress_default_deny_with_allowed_port(dp: NodeDatapath) -> None:
    dp.apply_endpoint_policy(b_entries(), abi.EP_F_INGRESS_ENFORCED, dict([allow(ING, A_ID, TCP, 80, 16)]))
    before = counter(dp, "drop_policy_ingress")
    assert send(dp, A4, B4, TCP, 40001, 80) == REDIRECT
    assert send(dp, A6, B6, TCP, 40001, 80) == REDIRECT
    assert send(dp, A4, B4, TCP, 40002, 81) == SHOT
    assert send(dp, A4, B4, UDP, 40003, 80) == SHOT
    assert counter(dp, "drop_policy_ingress") == before + 2


def test_replies_pass_by_conntrack_and_only_replies(dp: NodeDatapath) -> None:
    dp.apply_endpoint_policy(b_entries(), abi.EP_F_INGRESS_ENFORCED, dict([allow(ING, A_ID, TCP, 80, 16)]))
    dp.apply_endpoint_policy(a_entries(), abi.EP_F_INGRESS_ENFORCED | abi.EP_F_EGRESS_ENFORCED,
                             dict([allow(EGR, B_ID, TCP, 80, 16)]))
    assert send(dp, A4, B4, TCP, 40010, 80) == REDIRECT
    # B answers. Test runs all come in on lo, so for its source check B moves behind lo.
    dp.upsert_endpoint(EndpointEntry(ipaddress.ip_address(B4), LO, B_EP, B_ID, "02:00:00:00:0a:03",
                                     "02:00:00:00:0b:03", abi.EP_F_INGRESS_ENFORCED))
    # A enforces ingress with no entries, yet the reply passes: it belongs to A's connection.
    before = counter(dp, "ct_reply")
    assert send(dp, B4, A4, TCP, 80, 40010, SYN | ACK) == REDIRECT
    assert counter(dp, "ct_reply") == before + 1
    # A new connection from B to A is not a reply: A's ingress denies it.
    assert send(dp, B4, A4, TCP, 80, 40011, SYN) == SHOT


def test_deny_wins_over_allow_and_applies_without_enforcement(dp: NodeDatapath) -> None:
    # Allow all TCP from A, deny 1024-2047 (one prefix of 6 bits) from any peer.
    dp.apply_endpoint_policy(b_entries(), 0, dict([allow(ING, A_ID, TCP), deny(ING, 0, TCP, 1024, 6)]))
    before = counter(dp, "drop_policy_deny")
    assert send(dp, A4, B4, TCP, 40020, 1500) == SHOT
    assert send(dp, A4, B4, TCP, 40021, 2047) == SHOT
    assert send(dp, A4, B4, TCP, 40022, 2048) == REDIRECT
    assert send(dp, A4, B4, TCP, 40023, 1023) == REDIRECT
    assert counter(dp, "drop_policy_deny") == before + 2
    dp.apply_endpoint_policy(b_entries(), abi.EP_F_INGRESS_ENFORCED,
                             dict([allow(ING, A_ID, TCP), deny(ING, 0, TCP, 1024, 6)]))
    assert send(dp, A4, B4, TCP, 40024, 1500) == SHOT
    assert send(dp, A4, B4, TCP, 40025, 3000) == REDIRECT


def test_egress_to_world_and_cidr_identities(dp: NodeDatapath) -> None:
    dp.sync_ipcache({ipaddress.ip_network("192.0.2.0/24"): CIDR_ID})
    dp.apply_endpoint_policy(a_entries(), abi.EP_F_EGRESS_ENFORCED,
                             dict([allow(EGR, WORLD, UDP, 53, 16), allow(EGR, CIDR_ID, TCP, 443, 16)]))
    before = counter(dp, "drop_policy_egress")
    assert send(dp, A4, "198.51.100.7", UDP, 40030, 53) == OK  # world, to the node's stack
    assert send(dp, A4, "198.51.100.7", UDP, 40031, 54) == SHOT
    assert send(dp, A4, "192.0.2.10", TCP, 40032, 443) == OK  # the CIDR's identity, not world
    assert send(dp, A4, "192.0.2.10", UDP, 40033, 53) == SHOT
    assert counter(dp, "drop_policy_egress") == before + 2


def test_tcp_without_syn_and_without_connection_is_ct_missing(dp: NodeDatapath) -> None:
    dp.apply_endpoint_policy(b_entries(), abi.EP_F_INGRESS_ENFORCED, {})
    before = counter(dp, "drop_ct_missing")
    assert send(dp, A4, B4, TCP, 40040, 80, ACK) == SHOT
    assert counter(dp, "drop_ct_missing") == before + 1


def test_icmp_echo_by_type_and_reply_by_conntrack(dp: NodeDatapath) -> None:
    dp.apply_endpoint_policy(b_entries(), abi.EP_F_INGRESS_ENFORCED, dict([allow(ING, A_ID, ICMP, 8, 16)]))
    echo = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1)
    verdict, _ = libbpf.prog_test_run(dp.program_fd("from_container"), frame(A4, B4, echo, ICMP),
                                      ctx=libbpf.skb_ctx(ifindex=LO))
    assert verdict == REDIRECT
    timestamp = struct.pack("!BBHHH", 13, 0, 0, 0x1234, 1)
    verdict, _ = libbpf.prog_test_run(dp.program_fd("from_container"), frame(A4, B4, timestamp, ICMP),
                                      ctx=libbpf.skb_ctx(ifindex=LO))
    assert verdict == SHOT


def test_stack_to_pod_is_ingress_policed_with_ipcache_identity(dp: NodeDatapath) -> None:
    dp.sync_ipcache({ipaddress.ip_network("10.99.0.1/32"): 1})  # the node: host identity
    dp.apply_endpoint_policy(b_entries(), abi.EP_F_INGRESS_ENFORCED, dict([allow(ING, 1, TCP, 80, 16)]))
    # to_container finds the destination by the interface (lo in test runs): B moves behind lo.
    dp.upsert_endpoint(EndpointEntry(ipaddress.ip_address(B4), LO, B_EP, B_ID, "02:00:00:00:0a:03",
                                     "02:00:00:00:0b:03", abi.EP_F_INGRESS_ENFORCED))
    assert send(dp, "10.99.0.1", B4, TCP, 50001, 80, prog="to_container") == OK
    assert send(dp, "10.99.0.1", B4, TCP, 50002, 22, prog="to_container") == SHOT
    assert send(dp, "198.51.100.9", B4, TCP, 50003, 80, prog="to_container") == SHOT, "world is not host"


def test_updates_write_only_changes_and_delete_stale(dp: NodeDatapath) -> None:
    first = dict([allow(ING, A_ID, TCP, 80, 16), allow(ING, A_ID, TCP, 443, 16)])
    assert dp.apply_endpoint_policy(b_entries(), abi.EP_F_INGRESS_ENFORCED, first) == {"written": 2, "deleted": 0}
    assert dp.apply_endpoint_policy(b_entries(), abi.EP_F_INGRESS_ENFORCED, first) == {"written": 0, "deleted": 0}
    second = dict([allow(ING, A_ID, TCP, 80, 16), deny(ING, A_ID, TCP, 443, 16)])
    assert dp.apply_endpoint_policy(b_entries(), abi.EP_F_INGRESS_ENFORCED, second) == {"written": 1, "deleted": 0}
    assert send(dp, A4, B4, TCP, 40050, 443) == SHOT
    assert dp.policy_entries(B_EP) == second
    assert dp.apply_endpoint_policy(b_entries(), 0, {}) == {"written": 0, "deleted": 2}
    assert send(dp, A4, B4, TCP, 40051, 443) == REDIRECT
    flags = {e.ip: e.policy_flags for e in dp.endpoints().values() if e.ep_id == B_EP}
    assert set(flags.values()) == {0}


def test_policy_cache_rebuilt_after_reload(dp: NodeDatapath) -> None:
    want = dict([allow(ING, A_ID, TCP, 0x1F00, 8), deny(EGR, 0, UDP)])
    dp.apply_endpoint_policy(b_entries(), abi.EP_F_INGRESS_ENFORCED, want)
    again = NodeDatapath(dp.pin_dir, default_object_path())
    again.load()
    try:
        assert again.policy_entries(B_EP) == want
    finally:
        again.close()
