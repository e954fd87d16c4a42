"""The datapath's own packet rate with observability on, per CPU: the real compiled
``from_container`` program run by the kernel with BPF_PROG_TEST_RUN, no NIC, no veth, no generator.

    python bench/observe_capacity.py [--packets N] [--flows 1,8] [--cpu C] [--json FILE]

A scratch network namespace (the test run's ``skb->ifindex`` must name a device of the caller's
netns: its loopback), a scratch pin directory, and a :class:`weft.datapath.loader.NodeDatapath`
loaded as an agent loads it: the object's default event ring (8 MiB) and event level (``medium``,
the agent's default). Two endpoints as in bench/observe.py's lab: default/client (identity 256)
and default/sink (257), whose ingress is enforced with one allow entry: the client's UDP 9000.

Figures, each over ``--packets`` runs on one CPU (the process is pinned to it):

* allowed UDP, 1 flow and a handful of flows (different source ports), with events at
  ``medium`` and again with events ``off`` (the baseline, each case right after its twin on a
  second datapath loaded alike): packets/s from the
  kernel's own timing of the runs (``duration``: mean ns per run, measured with the program
  pinned to the CPU, excluding time the runner was rescheduled), and from the wall clock
  (syscalls included); the forwarded counter must grow by exactly the packets run, the ring
  must hold one event per flow (its first packet: ``medium`` reports a connection's opening),
  and ``events_lost`` must not move.
* the same flow repeated in one call (``repeat`` = all packets): the kernel runs a program
  again on the packet as the previous run left it, and the datapath decrements the TTL of a
  forwarded packet, so after 254 runs the packet has TTL 1 and goes to the stack (as a router
  would: the stack sends the ICMP time-exceeded). This row is the literal ``repeat =
  1,000,000`` and says which paths it took; the chunked rows above keep every run on the
  forwarding path (a fresh packet with TTL 255 every 254 runs).
* denied UDP (every packet a drop event): drop events produced per second per CPU, the ring
  drained between calls (as the agent's reader does), none lost.

What this shows: the per-packet cost of parsing, endpoint lookups, connection tracking, policy
and event emission with observability on. What it does not: no NIC, driver, veth, socket or
softirq cost, and the redirect to the peer is decided but not carried out; one CPU, one packet
in cache, no contention on the conntrack map from other CPUs.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    PREFIX,
    BenchError,
    bench_env,
    ensure_bpf,
    in_netns,
    median,
    netns_add,
    netns_del,
    say,
    table,
)
from weft.datapath import abi, libbpf
from weft.datapath.loader import (
    EndpointEntry,
    NodeDatapath,
    PolicyMapKey,
    PolicyMapValue,
    default_object_path,
    unpin_all,
)
from weft.datapath.ringbuf import MappedRing

CLIENT4, SINK4 = "10.244.1.2", "10.244.1.3"
CLIENT_MAC, CLIENT_HOST_MAC = "02:00:00:00:0a:02", "02:00:00:00:0b:02"
SINK_MAC, SINK_HOST_MAC = "02:00:00:00:0a:03", "02:00:00:00:0b:03"
CLIENT_EP, SINK_EP, CLIENT_ID, SINK_ID = 1, 2, 256, 257
LO = 1  # the client's interface as the test run's ctx names it (the anti-spoofing check wants it)
SINK_IFINDEX = 1000  # a redirect is decided, not carried out, in a test run: it need not exist
ALLOWED_UDP, DENIED_UDP = 9000, 9999
PAYLOAD = 16  # bench/udpgen's default datagram
TC_ACT_SHOT, TC_ACT_REDIRECT = 2, 7
FRESH_TTL = 255
# Runs per call that keep a forwarded packet on the forwarding path: each run decrements the
# TTL of the kernel's one copy of the packet, and at TTL 1 the datapath hands it to the stack.
RUNS_PER_FRESH_PACKET = FRESH_TTL - 1
DROP_RUNS_PER_CALL = 50_000  # drop events per call: well under what the 8 MiB ring holds (~87,000)
VERDICT_NAMES = {abi.VERDICT_FORWARDED: "forwarded", abi.VERDICT_DROPPED: "dropped",
                 abi.VERDICT_REDIRECTED: "redirected"}
VERDICT_OFFSET = abi.Event.verdict.offset
WARM_UP_RUNS = 20_000  # before the first case: the program's code and maps in the CPU's caches


def checksum(data: bytes) -> int:
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(sport: int, dport: int, ttl: int = FRESH_TTL) -> bytes:
    """Ethernet + IPv4 + UDP from the client to the sink, as the client's veth would carry it."""
    udp = struct.pack("!HHHH", sport, dport, 8 + PAYLOAD, 0) + b"w" * PAYLOAD
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, ttl, 17, 0,
                      ipaddress.ip_address(CLIENT4).packed, ipaddress.ip_address(SINK4).packed)
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    eth = abi.mac_bytes(CLIENT_HOST_MAC) + abi.mac_bytes(CLIENT_MAC) + struct.pack("!H", 0x0800)
    return bytes(eth + hdr + udp)


class TestRun:
    """BPF_PROG_TEST_RUN with ``repeat``: weft.datapath.libbpf.prog_test_run runs a packet once
    and does not return the kernel's timing, so this sets up ``bpf_test_run_opts`` itself."""

    def __init__(self, prog_fd: int) -> None:
        self.prog_fd = prog_fd
        self.ctx = libbpf.skb_ctx(ifindex=LO)
        self.ctx_buf = ctypes.create_string_buffer(self.ctx, len(self.ctx))
        self.out = ctypes.create_string_buffer(2048)

    def __call__(self, frame: bytes, repeat: int) -> tuple[int, int]:
        """Run the program ``repeat`` times on ``frame``: (last return value, kernel ns in total)."""
        data = ctypes.create_string_buffer(frame, len(frame))
        opts = libbpf.BpfTestRunOpts(sz=ctypes.sizeof(libbpf.BpfTestRunOpts))
        opts.data_in = ctypes.cast(data, ctypes.c_void_p)
        opts.data_size_in = len(frame)
        opts.data_out = ctypes.cast(self.out, ctypes.c_void_p)
        opts.data_size_out = len(self.out)
        opts.ctx_in = ctypes.cast(self.ctx_buf, ctypes.c_void_p)
        opts.ctx_size_in = len(self.ctx)
        opts.repeat = repeat
        rc = libbpf._test_run(self.prog_fd, ctypes.byref(opts))
        if rc != 0:
            raise BenchError(f"bpf_prog_test_run_opts: {os.strerror(ctypes.get_errno() or -rc)}")
        # duration: the mean ns per run, rounded down by the kernel (< 1 ns of ~100-300 ns).
        return int(opts.retval), int(opts.duration) * repeat


@dataclass
class Row:
    case: str
    level: str  # the datapath's event level
    packets: int
    flows: int
    kernel_pps: float  # from the kernel's timing of the runs
    wall_pps: float  # from the wall clock around the calls (syscalls included, draining the ring not)
    ns_per_packet: float
    counters: dict[str, int]  # datapath counters that moved (packets)
    events: int  # records the ring got
    events_by_verdict: dict[str, int]
    events_lost: int  # the datapath's events_lost counter
    ring_bytes: int


class Capacity:
    def __init__(self, pin: Path, events: bool = True) -> None:
        """``events``: the agent's default event level (medium), else events off (the baseline)."""
        self.pin = pin
        self.level = "medium" if events else "off"
        # The object's default ring, as the agent loads it.
        self.dp = NodeDatapath(pin, default_object_path(), event_level=abi.EV_LEVEL_MEDIUM if events
                               else abi.EV_LEVEL_OFF)
        self.ring: MappedRing | None = None

    def setup(self) -> None:
        self.dp.load()
        client = EndpointEntry(ipaddress.ip_address(CLIENT4), LO, CLIENT_EP, CLIENT_ID, CLIENT_MAC, CLIENT_HOST_MAC)
        sink = EndpointEntry(ipaddress.ip_address(SINK4), SINK_IFINDEX, SINK_EP, SINK_ID, SINK_MAC, SINK_HOST_MAC)
        self.dp.upsert_endpoint(client)
        self.dp.upsert_endpoint(sink)
        self.dp.apply_endpoint_policy([sink], abi.EP_F_INGRESS_ENFORCED, {
            PolicyMapKey(abi.DIR_INGRESS, CLIENT_ID, 17, ALLOWED_UDP, 16): PolicyMapValue(False, cookie=1)})
        self.ring = MappedRing(self.dp.events_fd(), self.dp.events_ring_size())
        self.run = TestRun(self.dp.program_fd("from_container"))

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        self.dp.close()
        unpin_all(self.pin)

    def drain(self) -> dict[int, int]:
        """Empty the ring: records per verdict (one decoded per batch and verdict byte read for
        the rest: a million records decoded in Python would take longer than producing them)."""
        assert self.ring is not None
        per_verdict: dict[int, int] = {}
        while True:
            batch = self.ring.drain()
            if not batch.offsets:
                return per_verdict
            for off in batch.offsets:
                verdict = batch.data[off + VERDICT_OFFSET]
                per_verdict[verdict] = per_verdict.get(verdict, 0) + 1
            first = abi.Event.from_buffer_copy(batch.data, batch.offsets[0])
            if first.version != abi.EVENT_VERSION:
                raise BenchError(f"an event record of version {first.version}, expected {abi.EVENT_VERSION}")

    def counters(self) -> dict[str, int]:
        return {name: packets for name, (packets, _bytes) in self.dp.counters().items()}

    def measure(self, case: str, frames: list[bytes], packets: int, per_call: int, expect: int) -> Row:
        """Run ``packets`` runs, ``per_call`` per call, cycling through ``frames`` (one per flow);
        every call must return ``expect``. The ring is drained between calls when a call makes
        an event per run (as the agent's reader would, before it fills), else at the end."""
        self.drain()
        before = self.counters()
        kernel_ns = 0
        wall = 0.0
        events: dict[int, int] = {}
        done = 0
        calls = 0
        while done < packets:
            repeat = min(per_call, packets - done)
            t0 = time.perf_counter()
            verdict, ns = self.run(frames[calls % len(frames)], repeat)
            wall += time.perf_counter() - t0
            if verdict != expect:
                raise BenchError(f"{case}: the program returned {verdict}, expected {expect}")
            kernel_ns += ns
            done += repeat
            calls += 1
            if per_call >= DROP_RUNS_PER_CALL:
                for k, v in self.drain().items():
                    events[k] = events.get(k, 0) + v
        for k, v in self.drain().items():
            events[k] = events.get(k, 0) + v
        after = self.counters()
        moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        by_verdict = {VERDICT_NAMES.get(k, str(k)): v for k, v in events.items()}
        return Row(case, self.level, packets, len(frames), packets / (kernel_ns / 1e9), packets / wall,
                   kernel_ns / packets, moved, sum(events.values()), by_verdict, moved.get("events_lost", 0),
                   self.dp.events_ring_size())

    def warm_up(self) -> None:
        """Runs not counted: a flow of their own, so the measured flows still open their connections."""
        frame = udp_frame(39999, ALLOWED_UDP)
        for _ in range(WARM_UP_RUNS // RUNS_PER_FRESH_PACKET):
            self.run(frame, RUNS_PER_FRESH_PACKET)
        self.drain()


def measure_here(packets: int, flow_counts: list[int], cpu: int) -> list[Row]:
    """All cases in this process's netns (its loopback is the client's interface): with events
    at the default level, and the allowed-UDP cases again with events off (the baseline), each
    right after its twin so that load from elsewhere hits both alike."""
    os.sched_setaffinity(0, {cpu})
    on = Capacity(Path(f"/sys/fs/bpf/{PREFIX}-capacity"))
    off = Capacity(Path(f"/sys/fs/bpf/{PREFIX}-capacity-off"), events=False)
    rows: list[Row] = []
    try:
        for cap in (on, off):
            cap.setup()
            cap.warm_up()
        sport = 40000
        for flows in flow_counts:
            frames = [udp_frame(sport + i, ALLOWED_UDP) for i in range(flows)]
            sport += flows  # new flows for every case: each opens its connections (one event each)
            for cap in (on, off):
                rows.append(cap.measure(f"allowed UDP, {flows} flow{'s' if flows > 1 else ''}, events {cap.level}, "
                                        f"{RUNS_PER_FRESH_PACKET} runs per fresh packet",
                                        frames, packets, RUNS_PER_FRESH_PACKET, TC_ACT_REDIRECT))
        # The literal single call: all but the first 254 runs see TTL 1 and go to the stack.
        rows.append(on.measure(f"allowed UDP, 1 flow, events medium, one call of repeat={packets}",
                               [udp_frame(sport, ALLOWED_UDP)], packets, packets, 0))
        rows.append(on.measure(f"denied UDP (a drop event per packet), events medium, {DROP_RUNS_PER_CALL} runs per "
                               "call, ring drained between calls",
                               [udp_frame(sport + 1, DENIED_UDP)], packets, DROP_RUNS_PER_CALL, TC_ACT_SHOT))
    finally:
        on.close()
        off.close()
    return rows


def measure(packets: int = 1_000_000, flow_counts: tuple[int, ...] = (1, 8), cpu: int | None = None) -> list[Row]:
    """All cases in a scratch netns (a child process entered into it): the rows."""
    if cpu is None:
        cpus = sorted(os.sched_getaffinity(0))
        cpu = cpus[-1]  # not CPU 0 when there is another: it takes most device interrupts
    ensure_bpf()
    netns = f"{PREFIX}-cap"
    netns_add(netns)
    try:
        argv = in_netns(netns, [sys.executable, __file__, "--inside", "--packets", str(packets),
                                "--flows", ",".join(map(str, flow_counts)), "--cpu", str(cpu)])
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, env=bench_env())
        if proc.returncode != 0:
            raise BenchError(f"observe_capacity: rc={proc.returncode}: {proc.stderr.strip()}")
        return [Row(**row) for row in json.loads(proc.stdout)]
    finally:
        netns_del(netns)


def describe(rows: list[Row]) -> str:
    def events(r: Row) -> str:
        if not r.events:
            return "0"
        return f"{r.events} (" + ", ".join(f"{k} {v}" for k, v in sorted(r.events_by_verdict.items())) + ")"

    return table(["case", "packets", "Mpps/CPU (kernel time)", "Mpps (wall)", "ns/packet", "counters moved",
                  "events in ring", "events lost"],
                 [[r.case, r.packets, f"{r.kernel_pps / 1e6:.2f}", f"{r.wall_pps / 1e6:.2f}", f"{r.ns_per_packet:.0f}",
                   ", ".join(f"{k} {v}" for k, v in sorted(r.counters.items())), events(r), r.events_lost]
                  for r in rows])


def forwarding(rows: list[Row], level: str = "medium") -> list[Row]:
    """The allowed-UDP cases that stay on the forwarding path, at one event level."""
    return [r for r in rows if r.case.startswith("allowed UDP") and "one call" not in r.case and r.level == level]


def headline(rows: list[Row]) -> Row:
    """The forwarding figure: the slowest allowed-UDP case with events on (1 flow or several)."""
    return min(forwarding(rows), key=lambda r: r.kernel_pps)


def on_off_ratio(rows: list[Row]) -> float:
    """Packets/s with events at medium over events off: the median over the flow counts measured."""
    off = {r.flows: r.kernel_pps for r in forwarding(rows, "off")}
    return median([r.kernel_pps / off[r.flows] for r in forwarding(rows) if r.flows in off])


def forwarded_cleanly(row: Row) -> bool:
    """Every run forwarded to the peer, one event per flow, none lost."""
    return (row.counters.get("fwd_peer_v4", 0) == row.packets and row.events == row.flows
            and row.events_by_verdict.get("forwarded", 0) == row.flows
            and row.events_lost == 0 and not any(k.startswith("drop") for k in row.counters))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=1_000_000, help="runs per case (default 1,000,000)")
    ap.add_argument("--flows", default="1,8", help="allowed-UDP cases: flows each (default 1,8)")
    ap.add_argument("--cpu", type=int, default=None, help="the CPU to run on (default: the last one)")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # the child, in the scratch netns
    ap.add_argument("--json", help="also write the rows to this file")
    opts = ap.parse_args(argv)
    flow_counts = tuple(int(f) for f in opts.flows.split(","))
    if opts.inside:
        json.dump([asdict(r) for r in measure_here(opts.packets, list(flow_counts), opts.cpu)], sys.stdout)
        return 0
    if os.geteuid() != 0:
        raise BenchError("this benchmark loads eBPF programs and needs root")
    rows = measure(opts.packets, flow_counts, opts.cpu)
    say(describe(rows))
    best = headline(rows)
    say(f"forwarding with observability on: {best.kernel_pps / 1e6:.2f} Mpps per CPU, "
        f"{best.events} events, {best.events_lost} lost ({'clean' if forwarded_cleanly(best) else 'NOT clean'}); "
        f"events medium / off: {on_off_ratio(rows):.3f}")
    if opts.json:
        Path(opts.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
