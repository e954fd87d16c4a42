"""Verdict events (weft_events) from the real programs on crafted packets (BPF_PROG_TEST_RUN):
what is reported at each aggregation level, the record's fields, and loss counted when the ring
is full. Needs root; no namespaces."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import secrets
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_datapath_progtest import (
    ETH_P_IP,
    HOST_MAC,
    LO,
    PEER4,
    PEER_HOST_MAC,
    PEER_IFINDEX,
    PEER_POD_MAC,
    POD4,
    POD_MAC,
    ROOT,
    TC_ACT_SHOT,
    eth,
    ipv4,
    run,
)

from weft.datapath import abi, libbpf
from weft.datapath.loader import EndpointEntry, NodeDatapath, default_object_path, unpin_all

SMALL_RING = 4096  # one page: 42 records of 88 bytes plus the ring's 8-byte headers


def tcp(flags: int, sport: int = 40000, dport: int = 80) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


SYN, ACK, FIN = 0x02, 0x10, 0x01
MakeDatapath = Callable[..., NodeDatapath]


@pytest.fixture
def make_dp() -> Iterator[MakeDatapath]:
    if os.geteuid() != 0:
        pytest.fail("these tests load eBPF programs and need root")
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True, check=True)
    subprocess.run(["make", "-s", "bpf"], cwd=ROOT, check=True)
    made: list[tuple[NodeDatapath, Path]] = []

    def make(ring_bytes: int | None = None, level: int = abi.EV_LEVEL_MEDIUM) -> NodeDatapath:
        pin = Path(f"/sys/fs/bpf/weft-evtest-{secrets.token_hex(4)}")
        datapath = NodeDatapath(pin, default_object_path(), events_ring_bytes=ring_bytes, event_level=level)
        made.append((datapath, pin))
        datapath.load()
        datapath.upsert_endpoint(EndpointEntry(ipaddress.ip_address(POD4), LO, 1, 256, POD_MAC, HOST_MAC))
        datapath.upsert_endpoint(
            EndpointEntry(ipaddress.ip_address(PEER4), PEER_IFINDEX, 2, 257, PEER_POD_MAC, PEER_HOST_MAC))
        return datapath

    try:
        yield make
    finally:
        for datapath, pin in made:
            datapath.close()
            unpin_all(pin)


def drain(dp: NodeDatapath) -> list[abi.Event]:
    events: list[abi.Event] = []
    ring = libbpf.RingBuffer(dp.events_fd(), lambda raw: events.append(abi.Event.from_buffer_copy(raw)))
    try:
        ring.consume()
    finally:
        ring.close()
    return events


def frame(payload: bytes, src: str = POD4, dst: str = PEER4) -> bytes:
    return eth(HOST_MAC, POD_MAC, ETH_P_IP) + ipv4(src, dst, payload)


def test_medium_reports_connection_open_and_flag_changes_only(make_dp: MakeDatapath) -> None:
    dp = make_dp()
    run(dp, frame(tcp(SYN)))
    [opened] = drain(dp)
    assert (opened.version, opened.verdict, opened.reason) == (abi.EVENT_VERSION, abi.VERDICT_FORWARDED,
                                                                abi.Metric.FWD_PEER_V4)
    assert opened.flags & abi.EV_F_CT_NEW and not opened.flags & abi.EV_F_REPLY
    assert (str(opened.source()), str(opened.destination()), opened.ports()) == (POD4, PEER4, (40000, 80))
    assert (opened.src_ep_id, opened.dst_ep_id, opened.src_identity, opened.dst_identity) == (1, 2, 256, 257)
    assert (opened.tcp_flags, opened.direction, opened.ifindex) == (SYN, abi.DIR_EGRESS, LO)
    for _ in range(5):  # the connection's data: nothing new to say
        run(dp, frame(tcp(ACK)))
    assert drain(dp) == []
    run(dp, frame(tcp(FIN | ACK)))
    [closing] = drain(dp)
    assert closing.tcp_flags == FIN | ACK and not closing.flags & abi.EV_F_CT_NEW


def test_every_packet_at_level_all_and_drops_only_at_level_drops(make_dp: MakeDatapath) -> None:
    every = make_dp(level=abi.EV_LEVEL_ALL)
    for i in range(4):
        run(every, frame(tcp(ACK if i else SYN)))
    assert len(drain(every)) == 4
    drops = make_dp(level=abi.EV_LEVEL_DROPS)
    run(drops, frame(tcp(SYN)))
    assert run(drops, frame(tcp(SYN), src="10.9.9.9"))[0] == TC_ACT_SHOT
    [spoofed] = drain(drops)
    assert (spoofed.verdict, spoofed.reason, str(spoofed.source())) == (abi.VERDICT_DROPPED, abi.Metric.DROP_SPOOF,
                                                                        "10.9.9.9")


def test_a_full_ring_counts_what_it_loses(make_dp: MakeDatapath) -> None:
    dp = make_dp(ring_bytes=SMALL_RING)
    assert dp.events_ring_size() == SMALL_RING
    burst = 100
    before = dp.counters()["events_lost"][0]
    for _ in range(burst):
        run(dp, frame(tcp(SYN), src="10.9.9.9"))  # every drop is an event
    kept = len(drain(dp))
    lost = dp.counters()["events_lost"][0] - before
    assert kept + lost == burst
    assert kept == SMALL_RING // (ctypes.sizeof(abi.Event) + 8)


def test_a_ring_of_another_size_replaces_the_pin(make_dp: MakeDatapath) -> None:
    dp = make_dp(ring_bytes=SMALL_RING)
    pin = dp.pin_dir
    dp.close()
    again = NodeDatapath(pin, default_object_path(), events_ring_bytes=2 * SMALL_RING)
    try:
        again.load()
        assert again.events_ring_size() == 2 * SMALL_RING
    finally:
        again.close()
