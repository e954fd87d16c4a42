"""Compact flows (EventFlow) from batches of records are what the plain path makes wherever they
go: the response dict a reader gets, the flow ring's reads, a follower's queue, the bytes a
server streams, and `weft observe -o json`'s lines read from FlowBatch bytes."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from test_fastflow import VIEWS, _event

from weft.agent.flows import Subscription
from weft.datapath import abi
from weft.hubble import batch, convert
from weft.hubble.proto import observer_pb2, relay_pb2
from weft.observe import flow as flows
from weft.observe.filters import Filters, FlowFilter
from weft.observe.ring import FlowRing

ENRICH = flows.Enrichment(node_name="node-1", endpoints_by_id=VIEWS, interfaces={5: "lxc1"},
                          rules_by_cookie=lambda c: ("cnp default/sink-ingress ingress[0]",) if c == 7 else ())
KINDS = [(17, abi.VERDICT_DROPPED, abi.Metric.DROP_POLICY_INGRESS, 0, 0),
         (6, abi.VERDICT_FORWARDED, abi.Metric.FWD_PEER_V4, abi.EV_F_POLICY | abi.EV_F_CT_NEW | abi.EV_F_TO_ENDPOINT,
          0x02),
         (1, abi.VERDICT_FORWARDED, abi.Metric.TO_STACK_V4, 0, 0)]


def records(n: int) -> tuple[bytes, list[int], list[int], list[bytes]]:
    """n records of the kinds above, few distinct ports (a flood), as one ring batch: 8-byte headers."""
    raws = [_event(*KINDS[i % len(KINDS)], 40000 + i % 2, 9999, family=abi.FAMILY_V4 if i % 5 else 6,
                   ts=1_000_000_000 + i * 1_234_567) for i in range(n)]
    data = b"".join(b"\x58\0\0\0\0\0\0\0" + raw for raw in raws)
    return data, [8 + 96 * i for i in range(n)], [88] * n, raws


def test_a_batch_makes_what_to_responses_makes() -> None:
    data, offsets, lengths, raws = records(30)
    made = flows.FlowMaker().make_batch(data, offsets, lengths, 5, ENRICH)
    assert made.events == 30 and made.unreadable == 0
    plain = [r for raw in raws for r in flows.to_responses(flows.decode(raw), flows.decode(raw).ts_ns + 5, ENRICH)]
    assert json.dumps([f.response() for f in made.flows]) == json.dumps(plain)
    assert all(f.response() is f.response() for f in made.flows), "made once"


def test_unreadable_records_are_counted_not_shown() -> None:
    data, offsets, lengths, _ = records(3)
    bad = bytearray(data)
    bad[offsets[1]] = 9  # another version
    made = flows.FlowMaker().make_batch(bytes(bad), [*offsets, 0], [*lengths, 4], 0, ENRICH)
    assert (made.events, made.unreadable) == (2, 2) and "version 9" in made.first_error


def test_ring_reads_and_follower_queues_give_dicts() -> None:
    data, offsets, lengths, _ = records(20)
    made = flows.FlowMaker().make_batch(data, offsets, lengths, 0, ENRICH)
    ring = FlowRing(100)
    ring.extend(made.flows)
    drops = Filters(include=FlowFilter(type=("drop",)))
    first = ring.read(keep=drops.keep, first=3)
    assert [r["flow"]["event_type"]["type"] for r in first.items] == [1, 1, 1]
    assert ring.read(after=first.cursor, keep=drops.keep).items[0]["time"] > first.items[-1]["time"]
    for by_kind in (True, False):
        sub = Subscription(drops.keep, by_kind=by_kind)
        sub.offer(made.flows)
        compact, _ = sub.poll(100, compact=True)
        assert all(type(item) is flows.EventFlow for item in compact)
        sub.offer(made.flows)
        dicts, _ = sub.poll(100)
        assert [d["flow"] for d in dicts] == [c.response()["flow"] for c in compact]


def test_server_bytes_of_compact_flows_are_the_messages() -> None:
    data, offsets, lengths, _ = records(12)
    made = flows.FlowMaker().make_batch(data, offsets, lengths, 1_700_000_000_000_000_000, ENRICH)
    for item in made.flows:
        wire = batch.response_wire(item)
        expected = convert.response_to_message(item.response()).SerializeToString()
        assert observer_pb2.GetFlowsResponse.FromString(wire) == observer_pb2.GetFlowsResponse.FromString(expected)
        assert batch.response_wire(item) is wire


@pytest.mark.parametrize("value", [0, 1, 127, 128, 16383, 16384, (1 << 21) - 1, 1 << 21, (1 << 28) - 1, 1 << 28,
                                   999_999_999, 1_764_201_600, (1 << 35) - 1, 1 << 35, 1 << 63])
def test_varint(value: int) -> None:
    assert batch.varint(value) == batch._varint(value)


def _lines_plain(blob: bytes) -> list[Any]:
    out: list[Any] = []
    for message in batch.FlowBatch.FromString(blob).responses:
        out.append(message if message.HasField("node_status") else convert.JsonLines().line(message))
    return out


def test_json_lines_from_batch_bytes_are_the_plain_lines() -> None:
    data, offsets, lengths, _ = records(40)
    made = flows.FlowMaker().make_batch(data, offsets, lengths, 1_700_000_000_000_000_000, ENRICH)
    lost = flows.lost_response(flows.LOST_KERNEL_RING, 5, "node-1", 1_700_000_000_500_000_000)
    no_time = {"flow": {"verdict": "DROPPED", "node_name": "node-1"}, "node_name": "node-1"}
    status = observer_pb2.GetFlowsResponse(node_status=relay_pb2.NodeStatusEvent(
        state_change=relay_pb2.NODE_UNAVAILABLE, node_names=["node-2"]))
    wires = [batch.response_wire(f) for f in made.flows[:10]]
    wires += [batch.response_wire(lost), batch.response_wire(no_time)]
    wires += [batch.response_wire(f) for f in made.flows[10:]]
    wires += [convert.response_to_message(f.response()).SerializeToString() for f in made.flows[:5]]
    wires.append(status.SerializeToString())
    blob = batch.frame(wires)
    lines = convert.JsonLines()
    for _ in range(2):  # the second time from the cache
        got = lines.batch_lines(blob)
        plain = _lines_plain(blob)
        assert [g if isinstance(g, str) else g.SerializeToString() for g in got] == \
            [p if isinstance(p, str) else p.SerializeToString() for p in plain]
    first = json.loads(got[0])
    assert first["l4"] == made.flows[0].response()["flow"]["l4"] and first["verdict"] == "DROPPED"
    assert json.loads(got[10])["lost_events"] == {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": 5}


def test_ports_of_a_compact_flow() -> None:
    raw = _event(17, abi.VERDICT_DROPPED, abi.Metric.DROP_POLICY_INGRESS, 0, 0, 4000, 9999)
    made = flows.FlowMaker().make_batch(raw, [0], [len(raw)], 0, ENRICH)
    assert made.flows[-1].ports == (4000, 9999) == (socket.ntohs(flows.decode(raw).sport), 9999)
