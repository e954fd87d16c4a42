"""The flow reader's fast paths make exactly what the plain ones make: FlowMaker's templated flows
equal to_responses' (same keys, same order, same values) for every kind of event, also when a
live lookup (policy rules, DNS names) changes between two events of one kind."""

from __future__ import annotations

import itertools
import json
import random
import socket

import pytest

from weft.datapath import abi
from weft.observe import flow as flows

LABELS = ("k8s:app=web", "k8s:io.kubernetes.pod.namespace=default")
VIEWS = {1: flows.EndpointView(1, 300, "default", "client", LABELS),
         2: flows.EndpointView(2, 301, "default", "sink", ("k8s:app=sink",))}


def _event(proto: int, verdict: int, reason: abi.Metric, flags: int, tcp_flags: int, sport: int, dport: int,
           family: int = abi.FAMILY_V4, egress: int = 0, ingress: int = 7, ts: int = 1_000_000_000) -> bytes:
    ev = abi.Event()
    ev.version = abi.EVENT_VERSION
    ev.family = family
    if family == abi.FAMILY_V4:
        ev.saddr[:4] = [10, 244, 0, 2]
        ev.daddr[:4] = [10, 244, 0, 3]
    else:
        ev.saddr[:] = list(socket.inet_pton(socket.AF_INET6, "fd00::2"))
        ev.daddr[:] = list(socket.inet_pton(socket.AF_INET6, "fd00::3"))
    ev.src_ep_id, ev.dst_ep_id = 1, 2
    ev.src_identity, ev.dst_identity = 300, 301
    ev.proto, ev.verdict, ev.reason, ev.flags, ev.tcp_flags = proto, verdict, int(reason), flags, tcp_flags
    ev.sport, ev.dport = socket.htons(sport), socket.htons(dport)
    ev.policy_port = 8 if proto in (1, 58) else dport
    ev.ifindex = 5
    ev.egress_cookie, ev.ingress_cookie = egress, ingress
    ev.ts_ns = ts
    return bytes(ev)


def _text(responses: list[flows.Response]) -> str:
    return json.dumps(responses)  # keys in order: the agent API and flow logs print them so


@pytest.mark.parametrize(("proto", "verdict", "reason", "flags", "tcp_flags"), [
    (17, abi.VERDICT_DROPPED, abi.Metric.DROP_POLICY_INGRESS, 0, 0),
    (6, abi.VERDICT_FORWARDED, abi.Metric.FWD_PEER_V4, abi.EV_F_POLICY | abi.EV_F_CT_NEW | abi.EV_F_TO_ENDPOINT, 0x02),
    (6, abi.VERDICT_FORWARDED, abi.Metric.FWD_PEER_V4, abi.EV_F_REPLY, 0x12),
    (6, abi.VERDICT_DROPPED, abi.Metric.DROP_POLICY_DENY, 0, 0x02),
    (1, abi.VERDICT_FORWARDED, abi.Metric.TO_STACK_V4, 0, 0),
    (132, abi.VERDICT_REDIRECTED, abi.Metric.REDIRECT_DNS_PROXY, abi.EV_F_POLICY | abi.EV_F_CT_NEW, 0),
    (47, abi.VERDICT_FORWARDED, abi.Metric.FWD_PEER_V4, 0, 0),
])
def test_templated_flows_equal_plain_ones(proto: int, verdict: int, reason: abi.Metric, flags: int,
                                          tcp_flags: int) -> None:
    rules = {7: ("cnp default/sink-ingress ingress[0]",)}
    enrich = flows.Enrichment(node_name="node-1", endpoints_by_id=VIEWS, interfaces={5: "lxc1"},
                              rules_by_cookie=lambda c: rules.get(c, ()),
                              names_of=lambda pod, ip: ("sink.example.",) if pod == "default/client" else ())
    maker = flows.FlowMaker()
    rng = random.Random(5)
    for i, family in itertools.product(range(6), (abi.FAMILY_V4, 6)):
        raw = _event(proto, verdict, reason, flags, tcp_flags, rng.randrange(1, 65536), rng.randrange(1, 65536),
                     family=family, ts=1_000_000_000 + i * 333_333_333)
        made = maker.make(raw, 7, enrich)
        assert _text(made) == _text(flows.to_responses(flows.decode(raw), 1_000_000_007 + i * 333_333_333, enrich))
        assert all(isinstance(r, flows.FlowResponse) and r.ports == (
            socket.ntohs(flows.decode(raw).sport), socket.ntohs(flows.decode(raw).dport)) for r in made)
        if i == 3:
            rules[7] = ("cnp default/other ingress[1]",)  # a policy change: the same kind of event, new rules


def test_a_new_enrichment_and_other_versions() -> None:
    maker = flows.FlowMaker()
    raw = _event(17, abi.VERDICT_DROPPED, abi.Metric.DROP_POLICY_INGRESS, 0, 0, 4000, 9999)
    first = maker.make(raw, 0, flows.Enrichment(node_name="n1"))
    second = maker.make(raw, 0, flows.Enrichment(node_name="n1", endpoints_by_id=VIEWS))
    assert "pod_name" not in first[-1]["flow"]["source"] and second[-1]["flow"]["source"]["pod_name"] == "client"
    with pytest.raises(flows.UnknownRecord):
        maker.make(b"\x02" + raw[1:], 0, flows.Enrichment(node_name="n1"))
    with pytest.raises(flows.UnknownRecord):
        maker.make(raw[:40], 0, flows.Enrichment(node_name="n1"))


def test_templated_wire_equals_the_message_path() -> None:
    from weft.hubble import batch, convert
    from weft.hubble.proto import observer_pb2

    enrich = flows.Enrichment(node_name="node-1", endpoints_by_id=VIEWS, interfaces={5: "lxc1"},
                              rules_by_cookie=lambda c: ("cnp default/sink-ingress ingress[0]",) if c == 7 else ())
    maker = flows.FlowMaker()
    made: list[flows.Response] = []
    for proto, tcp_flags, sport in itertools.product((6, 17, 132, 1, 58, 47), (0, 0x02, 0x11), (0, 40000)):
        raw = _event(proto, abi.VERDICT_DROPPED if sport else abi.VERDICT_FORWARDED,
                     abi.Metric.DROP_POLICY_INGRESS if sport else abi.Metric.FWD_PEER_V4,
                     0 if sport else abi.EV_F_POLICY | abi.EV_F_CT_NEW, tcp_flags, sport, 9999,
                     ts=1_000_000_000 * (1 + sport))
        made += maker.make(raw, 1_700_000_000_000_000_000, enrich) + maker.make(raw, 1_700_000_000_000_000_000, enrich)
    made.append(flows.lost_response(flows.LOST_KERNEL_RING, 3, "node-1", 1_700_000_000_000_000_000))
    wires = [batch.response_wire(r) for r in made]
    assert wires == [batch.response_wire(r) for r in made]  # kept: every follower gets the same bytes
    for response, wire in zip(made, wires, strict=True):
        assert observer_pb2.GetFlowsResponse.FromString(wire) == convert.response_to_message(response)
    parsed = batch.FlowBatch.FromString(b"".join(batch.batches(wires)))
    assert [convert.message_to_response(m) for m in parsed.responses] == [
        convert.message_to_response(convert.response_to_message(r)) for r in made]


def test_json_lines_print_what_json_line_prints() -> None:
    from weft.hubble import convert
    from weft.hubble.proto import observer_pb2
    from weft.observe.output import json_line

    enrich = flows.Enrichment(node_name="node-1", endpoints_by_id=VIEWS, interfaces={5: "lxc1"},
                              rules_by_cookie=lambda c: ("cnp default/sink-ingress ingress[0]",) if c == 7 else (),
                              names_of=lambda _pod, _ip: ("sink.example",))
    maker = flows.FlowMaker()
    responses: list[flows.Response] = []
    for proto, tcp_flags, sport, ts in itertools.product((6, 17, 1, 47), (0, 0x12), (0, 40000, 40001),
                                                         (0, 1_500_000_000, 1_000_000)):
        raw = _event(proto, abi.VERDICT_DROPPED if sport else abi.VERDICT_FORWARDED,
                     abi.Metric.DROP_POLICY_INGRESS if sport else abi.Metric.FWD_PEER_V4,
                     0 if sport else abi.EV_F_POLICY | abi.EV_F_CT_NEW | abi.EV_F_REPLY, tcp_flags, sport, 53, ts=ts)
        responses += maker.make(raw, 1_700_000_000_000_000_000, enrich)
    responses.append(flows.lost_response(flows.LOST_KERNEL_RING, 3, "node-1", 1_700_000_000_000_000_000))
    lines = convert.JsonLines()
    for _ in range(2):  # the second time from its caches
        for response in responses:
            wire = convert.response_to_message(response).SerializeToString()
            expected = json_line(convert.message_to_response(observer_pb2.GetFlowsResponse.FromString(wire)))
            assert lines.line(observer_pb2.GetFlowsResponse.FromString(wire)) == expected


@pytest.mark.parametrize("family", [abi.FAMILY_V4, abi.FAMILY_V6])
def test_repeated_events_of_one_kind_keep_their_ports_and_addresses(family: int) -> None:
    """Events that differ only in ports share a template and still show their own ports; events
    whose addresses differ (also in their last bytes) never share one."""
    enrich = flows.Enrichment(node_name="node-1", endpoints_by_id=VIEWS)
    maker = flows.FlowMaker()
    for sport in (4000, 4000, 4001, 4000):
        raw = _event(17, abi.VERDICT_DROPPED, abi.Metric.DROP_POLICY_INGRESS, 0, 0, sport, 9999, family=family)
        made = maker.make(raw, 0, enrich)
        assert _text(made) == _text(flows.to_responses(flows.decode(raw), 1_000_000_000, enrich))
        assert made[-1]["flow"]["l4"] == {"UDP": {"source_port": sport, "destination_port": 9999}}
    other = bytearray(_event(17, abi.VERDICT_DROPPED, abi.Metric.DROP_POLICY_INGRESS, 0, 0, 4000, 9999,
                             family=family))
    other[39 if family == abi.FAMILY_V6 else 27] ^= 1  # the destination's last byte
    made = maker.make(bytes(other), 0, enrich)
    assert made[-1]["flow"]["IP"]["destination"] == flows.decode(bytes(other)).destination_text()
