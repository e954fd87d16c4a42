"""The flow reader's mapped ring (weft.datapath.ringbuf.MappedRing) on the real weft_events ring,
fed by the real programs (BPF_PROG_TEST_RUN): every record in order across many wrap-arounds of a
one-page ring, the same records libbpf's consumer reads, a full ring's losses counted by the
datapath while the reader still gets everything that fit. Needs root; no namespaces."""

from __future__ import annotations

import ctypes

from test_datapath_progtest import run
from test_events_progtest import SMALL_RING, SYN, MakeDatapath, frame, make_dp, tcp

from weft.datapath import abi, libbpf
from weft.datapath.ringbuf import MappedRing

__all__ = ["make_dp"]  # the fixture, shared with test_events_progtest
RECORDS_PER_PAGE = SMALL_RING // (ctypes.sizeof(abi.Event) + 8)


def events_of(ring: MappedRing, max_records: int = 4096) -> list[abi.Event]:
    batch = ring.drain(max_records)
    return [abi.Event.from_buffer_copy(raw) for raw in batch.records()]


def test_every_record_in_order_across_wrap_arounds(make_dp: MakeDatapath) -> None:
    dp = make_dp(ring_bytes=SMALL_RING, level=abi.EV_LEVEL_ALL)
    ring = MappedRing(dp.events_fd(), dp.events_ring_size())
    try:
        assert not ring.wait(0.01), "an empty ring: nothing to wait for"
        sport = 1000
        seen: list[int] = []
        for round_size in (RECORDS_PER_PAGE, 7, RECORDS_PER_PAGE - 1, 30, 41, 13, 29, 35, 40, 3) * 3:
            first = sport
            for _ in range(round_size):
                run(dp, frame(tcp(SYN, sport=sport), src="10.9.9.9"))  # a drop: one event each, at any level
                sport += 1
            assert ring.wait(1.0)
            # A small max_records: batches end anywhere, the rest comes with the next drain.
            got = events_of(ring, max_records=11)
            while len(got) < round_size:
                more = events_of(ring, max_records=11)
                assert more, f"round from {first}: {len(got)} of {round_size} records"
                got += more
            seen += [e.ports()[0] for e in got]
            assert all(e.version == abi.EVENT_VERSION and e.verdict == abi.VERDICT_DROPPED for e in got)
        assert seen == list(range(1000, sport)), "each record once, in order"
        assert ring.pending() == 0 and dp.counters()["events_lost"][0] == 0
    finally:
        ring.close()


def test_same_records_as_libbpf_and_losses_counted_when_full(make_dp: MakeDatapath) -> None:
    dp = make_dp(ring_bytes=SMALL_RING)
    ring = MappedRing(dp.events_fd(), dp.events_ring_size())
    try:
        burst = 100
        for i in range(burst):
            run(dp, frame(tcp(SYN, sport=2000 + i), src="10.9.9.9"))
        batch = ring.drain()
        lost = dp.counters()["events_lost"][0]
        assert len(batch) == RECORDS_PER_PAGE and len(batch) + lost == burst
        assert [abi.Event.from_buffer_copy(r).ports()[0] for r in batch.records()] == \
            list(range(2000, 2000 + RECORDS_PER_PAGE))
        # The space is the kernel's again: libbpf's consumer sees what comes next, and the same bytes.
        run(dp, frame(tcp(SYN, sport=3000), src="10.9.9.9"))
        from_libbpf: list[bytes] = []
        consumer = libbpf.RingBuffer(dp.events_fd(), from_libbpf.append)
        try:
            consumer.consume()
        finally:
            consumer.close()
        assert [abi.Event.from_buffer_copy(r).ports()[0] for r in from_libbpf] == [3000]
        assert ring.drain().records() == [], "libbpf moved the consumer position past it"
        run(dp, frame(tcp(SYN, sport=3001), src="10.9.9.9"))
        again = ring.drain().records()
        assert len(again) == 1 and len(again[0]) == ctypes.sizeof(abi.Event)
        assert abi.Event.from_buffer_copy(again[0]).ports()[0] == 3001
    finally:
        ring.close()
