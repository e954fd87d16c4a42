"""Where a forwarded packet to another node is observed: Hubble's TO_OVERLAY (trace sub-type 4)
when the datapath encapsulated it, TO_NETWORK (sub-type 11) when it routed it (direct mode), in
the flow, its compact line, the `--type trace:...` filter, Hubble's wire format and the FlowMaker."""

from __future__ import annotations

import ctypes
import ipaddress
import socket

import pytest

from weft.datapath import abi
from weft.hubble import convert
from weft.hubble.proto import flow_pb2, observer_pb2
from weft.observe import flow as flows
from weft.observe.filters import Filters, FlowFilter
from weft.observe.output import compact_line

NOW = flows.parse_time("2026-11-27T12:00:00.123456789Z")
A = flows.EndpointView(1, 256, "default", "a", ("k8s:app=a",))
B = flows.EndpointView(0, 257, "default", "b", ("k8s:app=b",))  # a pod of another node
ENRICH = flows.Enrichment(node_name="node-1", endpoints_by_id={1: A},
                          endpoints_by_ip={"10.244.0.2": A, "10.244.1.3": B, "fd00::2": A, "fd00:1::3": B})


def cross_node_event(reason: abi.Metric, v6: bool = False, flags: int = abi.EV_F_CT_NEW) -> abi.Event:
    src, dst = ("fd00::2", "fd00:1::3") if v6 else ("10.244.0.2", "10.244.1.3")
    e = abi.Event(version=abi.EVENT_VERSION, verdict=abi.VERDICT_FORWARDED, reason=int(reason), flags=flags,
                  proto=6, tcp_flags=0x02, direction=abi.DIR_EGRESS, ifindex=7, src_ep_id=1, dst_ep_id=0,
                  src_identity=256, dst_identity=257, policy_port=80)
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    e.family = abi.FAMILY_V6 if v6 else abi.FAMILY_V4
    ctypes.memmove(e.saddr, a.packed, len(a.packed))
    ctypes.memmove(e.daddr, b.packed, len(b.packed))
    e.sport, e.dport = socket.htons(40000), socket.htons(80)
    return e


CASES = [(abi.Metric.TO_OVERLAY_V4, False, "TO_OVERLAY", 4, "to-overlay"),
         (abi.Metric.TO_OVERLAY_V6, True, "TO_OVERLAY", 4, "to-overlay"),
         (abi.Metric.ROUTED_V4, False, "TO_NETWORK", 11, "to-network"),
         (abi.Metric.ROUTED_V6, True, "TO_NETWORK", 11, "to-network")]


@pytest.mark.parametrize(("reason", "v6", "point", "sub_type", "compact"), CASES)
def test_packets_to_another_node_are_observed_where_they_leave(reason: abi.Metric, v6: bool, point: str,
                                                               sub_type: int, compact: str) -> None:
    response = flows.to_responses(flows.decode(bytes(cross_node_event(reason, v6))), NOW, ENRICH)[-1]
    flow = response["flow"]
    assert flow["trace_observation_point"] == point
    assert flow["event_type"] == {"type": flows.EVENT_TRACE, "sub_type": sub_type}
    assert flow["destination"]["pod_name"] == "b" and flow["verdict"] == "FORWARDED"
    assert f" {compact} FORWARDED " in compact_line(response) + " "
    # `--type trace:to-overlay` keeps exactly these; trace:from-endpoint no longer does.
    assert Filters(include=FlowFilter(type=(f"trace:{compact}",))).keep(response)
    assert not Filters(include=FlowFilter(type=("trace:from-endpoint",))).keep(response)
    # Hubble's wire format: the enum value of Cilium's flow.proto, and back.
    message = convert.response_to_message(response)
    assert message.flow.trace_observation_point == flow_pb2.TraceObservationPoint.Value(point)
    assert message.flow.event_type.sub_type == sub_type
    back = convert.message_to_response(observer_pb2.GetFlowsResponse.FromString(message.SerializeToString()))
    assert back["flow"]["trace_observation_point"] == point and back["flow"]["event_type"] == flow["event_type"]
    # The reader's per-kind templates give the same flow.
    made = flows.FlowMaker().make(bytes(cross_node_event(reason, v6)), 0, ENRICH)[-1]
    assert made["flow"]["trace_observation_point"] == point


def test_cilium_enum_values() -> None:
    assert flow_pb2.TraceObservationPoint.Value("TO_OVERLAY") == 4
    assert flow_pb2.TraceObservationPoint.Value("TO_NETWORK") == 11


def test_hubble_sub_type_filters_select_the_new_points() -> None:
    for sub_type, name in ((4, "trace:to-overlay"), (11, "trace:to-network")):
        request = observer_pb2.GetFlowsRequest(whitelist=[flow_pb2.FlowFilter(
            event_type=[flow_pb2.EventTypeFilter(type=4, match_sub_type=True, sub_type=sub_type)])])
        lists = convert.lists_from_request(request)
        assert lists.allow[0].type == (name,)


def test_other_points_unchanged() -> None:
    from_pod = flows.to_responses(flows.decode(bytes(cross_node_event(abi.Metric.FWD_PEER_V4))), NOW, ENRICH)
    assert from_pod[-1]["flow"]["trace_observation_point"] == "TO_ENDPOINT"
    into = cross_node_event(abi.Metric.TO_OVERLAY_V4, flags=abi.EV_F_TO_ENDPOINT)
    assert flows.to_responses(flows.decode(bytes(into)), NOW, ENRICH)[-1]["flow"]["trace_observation_point"] == \
        "TO_ENDPOINT"
    stack = flows.to_responses(flows.decode(bytes(cross_node_event(abi.Metric.TO_STACK_V4))), NOW, ENRICH)
    assert stack[-1]["flow"]["trace_observation_point"] == "TO_STACK"
