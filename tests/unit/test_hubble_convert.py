"""weft flow dicts <-> Hubble messages, and Hubble FlowFilter <-> weft filters (every field)."""

from __future__ import annotations

from typing import Any

import pytest

from weft.hubble import convert
from weft.hubble.proto import flow_pb2, observer_pb2
from weft.observe.filters import Filters, FlowFilter

FLOW: dict[str, Any] = {
    "time": "2026-11-27T01:00:00.123456789Z", "verdict": "DROPPED",
    "IP": {"source": "10.0.0.5", "destination": "10.0.1.7", "ipVersion": "IPv4"},
    "l4": {"TCP": {"source_port": 40000, "destination_port": 80, "flags": {"SYN": True}}},
    "source": {"ID": 12, "identity": 1001, "namespace": "default", "labels": ["k8s:app=client"],
               "pod_name": "client-1"},
    "destination": {"identity": 2, "labels": ["reserved:world"]},
    "Type": "L3_L4", "node_name": "n1", "traffic_direction": "EGRESS", "is_reply": False,
    "Summary": "TCP Flags: SYN", "drop_reason_desc": "POLICY_DENY", "event_type": {"type": 1},
    "interface": {"index": 7, "name": "lxc1"}, "destination_names": ["example.com"],
    "egress_denied_by": [{"name": "deny", "namespace": "default", "kind": "CiliumNetworkPolicy"}],
}


def test_flow_round_trips_through_the_wire_format() -> None:
    response = {"flow": FLOW, "node_name": "n1", "time": FLOW["time"]}
    wire = convert.response_to_message(response).SerializeToString()
    back = convert.message_to_response(observer_pb2.GetFlowsResponse.FromString(wire))
    assert back == response
    message = convert.flow_to_message(FLOW)
    assert message.verdict == flow_pb2.DROPPED and message.drop_reason_desc == flow_pb2.POLICY_DENY
    assert message.l4.TCP.destination_port == 80 and message.source.pod_name == "client-1"
    assert message.time.ToNanoseconds() % 1_000_000_000 == 123456789


def test_lost_events_and_unknown_keys() -> None:
    lost = {"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": 3}, "node_name": "n2",
            "time": "2026-11-27T01:00:00Z"}
    assert convert.message_to_response(convert.response_to_message(lost)) == lost
    # A key weft adds that Hubble's Flow lacks is skipped, not an error.
    assert convert.flow_to_message({**FLOW, "weft_extra": 1}).node_name == "n1"


def _request(**lists: list[Any]) -> Any:
    return observer_pb2.GetFlowsRequest(**lists)


@pytest.mark.parametrize(("field", "value", "weft_field", "weft_value"), [
    ("source_ip", ["10.0.0.0/24"], "from_ip", ("10.0.0.0/24",)),
    ("destination_ip", ["10.0.1.7"], "to_ip", ("10.0.1.7",)),
    ("source_pod", ["default/client"], "from_pod", ("default/client",)),
    ("destination_pod", ["kube-system/"], "to_pod", ("kube-system/",)),
    ("source_fqdn", ["*.example.com"], "from_fqdn", ("*.example.com",)),
    ("destination_fqdn", ["example.com"], "to_fqdn", ("example.com",)),
    ("source_label", ["app=client"], "from_label", ("app=client",)),
    ("destination_label", ["reserved:world"], "to_label", ("reserved:world",)),
    ("source_port", ["40000"], "from_port", ("40000",)),
    ("destination_port", ["80"], "to_port", ("80",)),
    ("protocol", ["tcp"], "protocol", ("tcp",)),
    ("node_name", ["n*"], "node_name", ("n*",)),
    ("verdict", [flow_pb2.DROPPED], "verdict", ("DROPPED",)),
    ("drop_reason_desc", [flow_pb2.POLICY_DENY], "drop_reason_desc", ("POLICY_DENY",)),
    ("traffic_direction", [flow_pb2.EGRESS], "traffic_direction", ("egress",)),
    ("event_type", [flow_pb2.EventTypeFilter(type=1)], "type", ("drop",)),
    ("event_type", [flow_pb2.EventTypeFilter(type=4, match_sub_type=True, sub_type=101 % 100)], "type",
     ("trace:to-proxy",)),
])
def test_every_supported_field_maps_and_matches(field: str, value: list[Any], weft_field: str,
                                                weft_value: tuple[str, ...]) -> None:
    made = convert.filter_from_message(flow_pb2.FlowFilter(**{field: value}))
    assert getattr(made, weft_field) == weft_value


def test_identity_fields_are_one_sided() -> None:
    src = convert.filter_from_message(flow_pb2.FlowFilter(source_identity=[1001]))
    dst = convert.filter_from_message(flow_pb2.FlowFilter(destination_identity=[1001]))
    assert src.matches(FLOW) and not dst.matches(FLOW)
    assert convert.filter_from_message(flow_pb2.FlowFilter(destination_identity=[2])).matches(FLOW)


def test_whitelist_or_blacklist_and() -> None:
    lists = convert.lists_from_request(_request(
        whitelist=[flow_pb2.FlowFilter(verdict=[flow_pb2.FORWARDED]), flow_pb2.FlowFilter(destination_port=["80"])],
        blacklist=[flow_pb2.FlowFilter(source_pod=["default/other"])]))
    assert lists.keep({"flow": FLOW})  # the second whitelist filter matches
    denied = convert.lists_from_request(_request(blacklist=[flow_pb2.FlowFilter(source_pod=["default/client"])]))
    assert not denied.keep({"flow": FLOW})
    assert denied.keep({"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": 1}})


@pytest.mark.parametrize(("field", "value"), [
    ("uuid", ["x"]), ("source_service", ["a/b"]), ("http_status_code", ["404"]), ("dns_query", ["x"]),
    ("http_method", ["GET"]), ("node_labels", ["a=b"]), ("ip_version", [flow_pb2.IPv4]), ("reply", [True]),
    ("trace_id", ["x"]), ("source_ip_xlated", ["1.1.1.1"]), ("http_path", ["/"]), ("http_url", ["/"]),
])
def test_unsupported_fields_are_refused_by_name(field: str, value: list[Any]) -> None:
    with pytest.raises(convert.UnsupportedFilter, match=f"whitelist\\[0\\].*'{field}'"):
        convert.lists_from_request(_request(whitelist=[flow_pb2.FlowFilter(**{field: value})]))


def test_bad_values_are_refused() -> None:
    with pytest.raises(convert.UnsupportedFilter, match="not a port"):
        convert.lists_from_request(_request(blacklist=[flow_pb2.FlowFilter(source_port=["http"])]))
    with pytest.raises(convert.UnsupportedFilter, match="event_type 42"):
        convert.filter_from_message(flow_pb2.FlowFilter(event_type=[flow_pb2.EventTypeFilter(type=42)]))


@pytest.mark.parametrize("weft", [
    FlowFilter(pod=("default/client",)), FlowFilter(ip=("10.0.1.7",), port=("80",)),
    FlowFilter(namespace=("default",), verdict=("DROPPED",)), FlowFilter(identity=("2",)),
    FlowFilter(to_pod=("default/x",)), FlowFilter(type=("trace:to-endpoint",)), FlowFilter(label=("app=client",)),
    FlowFilter(fqdn=("example.com",), traffic_direction=("ingress",)), FlowFilter(drop_reason_desc=("POLICY_DENY",)),
])
def test_weft_filters_keep_their_meaning_over_hubble_filters(weft: FlowFilter) -> None:
    """weft observe's filters sent as whitelist/blacklist select exactly what they select locally."""
    variants = [FLOW, {**FLOW, "source": {"identity": 9}}, {**FLOW, "verdict": "FORWARDED"},
                {**FLOW, "traffic_direction": "INGRESS"}, {**FLOW, "event_type": {"type": 4, "sub_type": 0},
                                                            "trace_observation_point": "TO_ENDPOINT"}]
    for include, exclude in ((weft, FlowFilter()), (FlowFilter(), weft)):
        request = convert.request(Filters(include, exclude))
        lists = convert.lists_from_request(request)
        for flow in variants:
            assert lists.keep({"flow": flow}) == Filters(include, exclude).keep({"flow": flow}), (weft, flow)


@pytest.mark.parametrize("flow", [
    FLOW,
    {**FLOW, "verdict": "FORWARDED", "trace_observation_point": "TO_ENDPOINT", "is_reply": True,
     "l4": {"ICMPv6": {"type": 128}}, "event_type": {"type": 4, "sub_type": 0}, "policy_match_type": 1,
     "ingress_allowed_by": [{"name": "allow", "kind": "NetworkPolicy", "namespace": "default"}]},
    {**FLOW, "l4": {"UDP": {"source_port": 1, "destination_port": 53}}, "time": "2026-11-27T01:00:01Z"},
    {**FLOW, "l4": {}, "source": {"identity": 1, "labels": ["reserved:host"]}},
    {**FLOW, "l4": {"TCP": {"source_port": 1, "destination_port": 2, "flags": {}}}, "IP": {}, "interface": {}},
])
def test_the_direct_conversion_is_protojsons(flow: dict[str, Any]) -> None:
    """The agent's fast path gives the message protojson would (it is what clients read)."""
    from google.protobuf import json_format

    reference = flow_pb2.Flow()
    json_format.ParseDict(flow, reference, ignore_unknown_fields=True)
    assert convert.flow_to_message(flow) == reference
    response = {"flow": flow, "node_name": "n1", "time": flow["time"]}
    expected = observer_pb2.GetFlowsResponse()
    json_format.ParseDict(response, expected)
    assert convert.response_to_message(response) == expected


@pytest.mark.parametrize("flow", [
    FLOW, {**FLOW, "time": "2026-11-27T01:00:01Z", "is_reply": True, "l4": {"ICMPv4": {"type": 8}}},
    {**FLOW, "time": "2026-11-27T01:00:01.120Z", "l7": {"type": "RESPONSE", "latency_ns": 5,
                                                        "dns": {"query": "a.example.", "ips": ["1.2.3.4"]}}},
])
def test_the_direct_decoding_is_protojsons(flow: dict[str, Any]) -> None:
    from google.protobuf import json_format

    message = convert.response_to_message({"flow": flow, "node_name": "n1", "time": flow["time"]})
    assert convert.message_to_response(message) == json_format.MessageToDict(message, preserving_proto_field_name=True)
    lost = convert.response_to_message({"lost_events": {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": 7}})
    assert convert.message_to_response(lost) == {"lost_events": {"source": "PERF_EVENT_RING_BUFFER",
                                                                 "num_events_lost": 7}}
