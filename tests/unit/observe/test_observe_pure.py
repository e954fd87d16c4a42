"""weft.observe without root: event decoding, every filter flag (OR within, AND across, --not),
output formats, the flow ring's cursors and loss, flow log rotation and include rules."""

from __future__ import annotations

import ctypes
import ipaddress
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from weft.cli.observe import merge, parse_when
from weft.datapath import abi
from weft.observe import flow as flows
from weft.observe.config import FlowLogInclude, FlowLogSettings, FlowSettings
from weft.observe.filters import FilterError, Filters, FlowFilter, flags_from_argv, from_flags
from weft.observe.flowlog import FlowLog
from weft.observe.output import OutputFormat, compact_line, render, table_text
from weft.observe.ring import FlowRing

NOW = flows.parse_time("2024-05-01T12:00:00Z")
FE = flows.EndpointView(1, 256, "default", "frontend-7d9", ("k8s:app=frontend", "k8s:tier=web"))
BE = flows.EndpointView(2, 257, "prod", "backend", ("k8s:app=backend",))
ENRICH = flows.Enrichment(
    node_name="node-1", endpoints_by_id={1: FE, 2: BE}, endpoints_by_ip={"10.0.0.2": FE, "10.0.0.3": BE},
    interfaces={7: "lxcfe"}, rules_by_cookie=lambda c: ("cnp prod/allow-fe ingress[0]",) if c == 9 else (),
    names_of=lambda pod, ip: ("api.example.com",) if ip == "10.0.0.3" else ())


def event(verdict: int = abi.VERDICT_FORWARDED, reason: int = abi.Metric.FWD_PEER_V4, flags: int = abi.EV_F_CT_NEW,
          proto: int = 6, tcp_flags: int = 0x02, src: str = "10.0.0.2", dst: str = "10.0.0.3", sport: int = 40000,
          dport: int = 80, direction: int = abi.DIR_EGRESS, src_ep: int = 1, dst_ep: int = 2,
          ingress_cookie: int = 0, version: int = abi.EVENT_VERSION) -> abi.Event:
    e = abi.Event(version=version, verdict=verdict, reason=reason, flags=flags, proto=proto, tcp_flags=tcp_flags,
                  direction=direction, ifindex=7, src_ep_id=src_ep, dst_ep_id=dst_ep, src_identity=256,
                  dst_identity=257, ingress_cookie=ingress_cookie, policy_port=dport)
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    e.family = abi.FAMILY_V4 if a.version == 4 else abi.FAMILY_V6
    ctypes.memmove(e.saddr, a.packed, len(a.packed))
    ctypes.memmove(e.daddr, b.packed, len(b.packed))
    e.sport, e.dport = socket.htons(sport), socket.htons(dport)
    return e


def responses(e: abi.Event, at: int = NOW) -> list[dict[str, Any]]:
    return flows.to_responses(flows.decode(bytes(e)), at, ENRICH)


def the_flow(e: abi.Event) -> dict[str, Any]:
    return responses(e)[-1]["flow"]


# ------------------------------------------------------------------ decoding
def test_decode_refuses_other_versions_and_sizes() -> None:
    with pytest.raises(flows.UnknownRecord, match="version 9"):
        flows.decode(bytes(event(version=9)))
    with pytest.raises(flows.UnknownRecord, match="bytes"):
        flows.decode(b"\x01" * 10)


def test_forwarded_syn_in_hubble_field_names() -> None:
    f = the_flow(event(ingress_cookie=9))
    assert f["verdict"] == "FORWARDED" and f["Type"] == "L3_L4" and f["node_name"] == "node-1"
    assert f["IP"] == {"source": "10.0.0.2", "destination": "10.0.0.3", "ipVersion": "IPv4"}
    assert f["l4"] == {"TCP": {"source_port": 40000, "destination_port": 80, "flags": {"SYN": True}}}
    assert f["source"] == {"ID": 1, "identity": 256, "namespace": "default", "labels": list(FE.labels),
                           "pod_name": "frontend-7d9"}
    assert f["traffic_direction"] == "EGRESS" and f["is_reply"] is False and f["Summary"] == "TCP Flags: SYN"
    assert f["interface"] == {"index": 7, "name": "lxcfe"} and f["event_type"] == {"type": 4, "sub_type": 0}
    assert f["trace_observation_point"] == "TO_ENDPOINT" and f["time"] == "2024-05-01T12:00:00.000000000Z"
    assert f["ingress_allowed_by"] == [{"name": "allow-fe", "kind": "CiliumNetworkPolicy", "namespace": "prod"}]
    assert f["destination_names"] == ["api.example.com"]


@pytest.mark.parametrize(("reason", "desc"), [(abi.Metric.DROP_POLICY_INGRESS, "POLICY_DENIED"),
                                              (abi.Metric.DROP_POLICY_DENY, "POLICY_DENY"),
                                              (abi.Metric.DROP_CT_MISSING, "CT_NO_MAP_FOUND"),
                                              (abi.Metric.DROP_SPOOF, "INVALID_SOURCE_IP")])
def test_drops_carry_their_reason_and_policy_drops_a_policy_verdict(reason: abi.Metric, desc: str) -> None:
    out = responses(event(verdict=abi.VERDICT_DROPPED, reason=reason, direction=abi.DIR_INGRESS))
    drop = out[-1]["flow"]
    assert drop["verdict"] == "DROPPED" and drop["drop_reason_desc"] == desc and drop["event_type"] == {"type": 1}
    policy = reason in flows.POLICY_DROP_REASONS
    assert len(out) == (2 if policy else 1)
    if policy:
        assert out[0]["flow"]["event_type"] == {"type": 5} and out[0]["flow"]["verdict"] == "DROPPED"


def test_other_protocols_and_peers() -> None:
    udp = the_flow(event(proto=17, tcp_flags=0, dport=53))
    assert udp["l4"] == {"UDP": {"source_port": 40000, "destination_port": 53}} and udp["Summary"] == "UDP"
    icmp6 = the_flow(event(proto=58, src="fd00::2", dst="fd00::9", dport=128, src_ep=0, dst_ep=0))
    assert icmp6["l4"] == {"ICMPv6": {"type": 128}} and icmp6["IP"]["ipVersion"] == "IPv6"
    world = the_flow(event(src="8.8.8.8", src_ep=0, dst="10.0.0.3", flags=abi.EV_F_REPLY | abi.EV_F_TO_ENDPOINT))
    assert world["is_reply"] is True and "pod_name" not in world["source"]
    redirected = the_flow(event(verdict=abi.VERDICT_REDIRECTED, reason=abi.Metric.REDIRECT_DNS_PROXY, proto=17))
    assert redirected["verdict"] == "REDIRECTED" and redirected["trace_observation_point"] == "TO_PROXY"


def test_times_round_trip() -> None:
    assert flows.parse_time(flows.rfc3339(NOW + 123)) == NOW + 123
    assert flows.parse_time("2024-05-01T14:00:00.5+02:00") == NOW + 500_000_000
    assert parse_when("5m", now_ns=NOW) == flows.rfc3339(NOW - 300 * 10**9)
    assert parse_when("1h30m", now_ns=NOW) == flows.rfc3339(NOW - 5400 * 10**9)
    with pytest.raises(FilterError, match="duration"):
        parse_when("yesterday")


# ------------------------------------------------------------------ filters
SYN = responses(event())[-1]
DROP = responses(event(verdict=abi.VERDICT_DROPPED, reason=abi.Metric.DROP_POLICY_INGRESS,
                       direction=abi.DIR_INGRESS, src="10.0.0.3", dst="10.0.0.2", src_ep=2, dst_ep=1,
                       sport=5000, dport=443))[-1]
DNS = responses(event(verdict=abi.VERDICT_REDIRECTED, reason=abi.Metric.REDIRECT_DNS_PROXY, proto=17, dport=53,
                      tcp_flags=0))[-1]
V6 = responses(event(proto=1, src="10.0.0.2", dst="1.1.1.1", dst_ep=0, tcp_flags=0, dport=8))[-1]
LOST = flows.lost_response(flows.LOST_KERNEL_RING, 3, "node-1", NOW)
ALL = {"syn": SYN, "drop": DROP, "dns": DNS, "icmp": V6}


def shown(*flags: tuple[str, str]) -> set[str]:
    f = from_flags(flags)
    assert f.keep(LOST), "lost events always pass"
    return {name for name, r in ALL.items() if f.keep(r)}


@pytest.mark.parametrize(("flags", "expected"), [
    ((), {"syn", "drop", "dns", "icmp"}),
    ((("pod", "frontend"),), {"syn", "drop", "dns", "icmp"}),
    ((("pod", "prod/back"),), {"syn", "drop", "dns"}),
    ((("from-pod", "prod/backend"),), {"drop"}),
    ((("to-pod", "prod/backend"),), {"syn", "dns"}),
    ((("to-pod", "backend"),), set()),  # no namespace: default
    ((("namespace", "prod"),), {"syn", "drop", "dns"}),
    ((("from-namespace", "prod"),), {"drop"}),
    ((("to-namespace", "default"),), {"drop"}),
    ((("label", "app=backend"),), {"syn", "drop", "dns"}),
    ((("from-label", "k8s:app=frontend,tier=web"),), {"syn", "dns", "icmp"}),
    ((("from-label", "app=frontend,tier!=web"),), set()),
    ((("to-label", "!tier"),), {"syn", "dns", "icmp"}),
    ((("ip", "1.1.1.0/24"),), {"icmp"}),
    ((("from-ip", "10.0.0.3"),), {"drop"}),
    ((("to-ip", "10.0.0.3"), ("to-ip", "1.1.1.1")), {"syn", "dns", "icmp"}),
    ((("fqdn", "*.example.com"),), {"syn", "dns"}),
    ((("to-fqdn", "api.example.com"),), {"syn", "dns"}),
    ((("from-fqdn", "api.example.com"),), set()),
    ((("port", "443"),), {"drop"}),
    ((("from-port", "5000"),), {"drop"}),
    ((("to-port", "80"), ("to-port", "53")), {"syn", "dns"}),
    ((("protocol", "tcp"),), {"syn", "drop"}),
    ((("protocol", "udp,icmp"),), {"dns", "icmp"}),
    ((("protocol", "dns"),), {"dns"}),
    ((("verdict", "DROPPED"),), {"drop"}),
    ((("verdict", "forwarded,redirected"),), {"syn", "dns", "icmp"}),
    ((("drop-reason-desc", "POLICY_DENIED"),), {"drop"}),
    ((("type", "drop"),), {"drop"}),
    ((("type", "trace:to-proxy"),), {"dns"}),
    ((("type", "policy-verdict"),), set()),
    ((("traffic-direction", "ingress"),), {"drop"}),
    ((("identity", "256"),), {"syn", "drop", "dns", "icmp"}),
    ((("identity", "999"),), set()),
    ((("node-name", "node-*"),), {"syn", "drop", "dns", "icmp"}),
    ((("node-name", "node-2"),), set()),
    ((("verdict", "FORWARDED"), ("protocol", "tcp")), {"syn"}),  # flags AND'ed
    ((("not", ""), ("verdict", "DROPPED")), {"syn", "dns", "icmp"}),
    ((("protocol", "tcp"), ("not", ""), ("to-port", "80")), {"drop"}),
])
def test_each_filter(flags: tuple[tuple[str, str], ...], expected: set[str]) -> None:
    assert shown(*flags) == expected


@pytest.mark.parametrize(("flag", "value", "names"), [
    ("verdict", "MAYBE", "FORWARDED, DROPPED, REDIRECTED"), ("protocol", "gre", "tcp, udp"),
    ("type", "capture", "drop, trace"), ("type", "drop:x", "trace:to-endpoint"),
    ("traffic-direction", "up", "ingress, egress"), ("port", "99999", "0-65535"), ("identity", "web", "numeric"),
    ("ip", "10.0.0.300", "CIDR"), ("label", "a=b=c", "key=value"), ("pod", "a/b/c", "[namespace/]pod"),
    ("bogus", "1", "--pod")])
def test_bad_values_name_the_valid_ones(flag: str, value: str, names: str) -> None:
    with pytest.raises(FilterError, match=names.replace("[", r"\[")):
        from_flags([(flag, value)])


def test_argv_order_decides_what_not_negates() -> None:
    argv = ["observe", "--lab", "x", "--verdict", "DROPPED", "--not", "--from-pod=prod/backend", "-o", "json"]
    assert flags_from_argv(argv) == [("verdict", "DROPPED"), ("not", ""), ("from-pod", "prod/backend")]
    f = from_flags(flags_from_argv(argv))
    assert f.include.verdict == ("DROPPED",) and f.exclude.from_pod == ("prod/backend",)
    assert Filters.from_json(f.to_json()) == f
    with pytest.raises(FilterError, match="unknown filter"):
        FlowFilter.from_json({"colour": ["red"]})


# ------------------------------------------------------------------ output
def test_compact_table_json_jsonpb() -> None:
    line = compact_line(SYN)
    assert line == ("May  1 12:00:00.000 [node-1]: default/frontend-7d9:40000 (ID:256) -> prod/backend:80 (ID:257) "
                    "to-endpoint FORWARDED (TCP Flags: SYN)")
    assert "Policy denied DROPPED" in compact_line(DROP)
    assert "\x1b[31mDROPPED\x1b[0m" in compact_line(DROP, colour=True)
    assert compact_line(LOST).endswith("EVENTS LOST: PERF_EVENT_RING_BUFFER 3")
    table = table_text([SYN, DROP, LOST]).splitlines()
    assert table[0].split() == ["TIMESTAMP", "NODE", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    assert len(table) == 4 and "EVENTS LOST" in table[3]
    assert json.loads(render([SYN], OutputFormat.json)) == SYN["flow"]
    assert json.loads(render([SYN], OutputFormat.jsonpb)) == SYN
    assert render([], OutputFormat.table) == ""


def test_merge_orders_nodes_by_time() -> None:
    late = responses(event(), at=NOW + 5)[-1]
    early = responses(event(), at=NOW - 5)[-1]
    assert merge([[SYN, late], [early]]) == [early, SYN, late]


# ------------------------------------------------------------------ ring
def test_ring_keeps_the_last_n_and_tells_a_follower_what_it_missed() -> None:
    ring = FlowRing(4)
    for i in range(3):
        ring.append({"flow": {"n": i}})
    start = ring.read(last=0).cursor
    assert start == 3
    for i in range(3, 10):
        ring.append({"flow": {"n": i}})
    got = ring.read(after=start)
    assert got.missed == 3 and [r["flow"]["n"] for r in got.items] == [6, 7, 8, 9] and got.cursor == 10
    assert ring.read(after=got.cursor).items == [] and ring.read(after=got.cursor).missed == 0
    assert [r["flow"]["n"] for r in ring.read(last=2).items] == [8, 9]
    first = ring.read(first=2)
    assert [r["flow"]["n"] for r in first.items] == [6, 7] and first.cursor == 8
    assert ring.read(after=99).items, "a cursor from an earlier agent starts over"
    odd = ring.read(keep=lambda r: r["flow"]["n"] % 2 == 1)
    assert [r["flow"]["n"] for r in odd.items] == [7, 9]
    with pytest.raises(ValueError):
        FlowRing(0)


# ------------------------------------------------------------------ flow log and settings
def test_flow_log_rotates_by_size_and_keeps_what_include_rules_select(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    flow_log = FlowLog(FlowLogSettings(path=path, max_bytes=4096, max_files=2,
                                       include=[FlowLogInclude(verdict=["dropped"]),
                                                FlowLogInclude(namespace=["default"], protocol=["udp"])]))
    flow_log.write([SYN, DNS, LOST])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == [DNS, LOST], "SYN is neither dropped nor UDP"
    for _ in range(40):
        flow_log.write([DROP])
    flow_log.close()
    assert path.with_name("flows.log.1").exists() and path.with_name("flows.log.2").exists()
    assert not path.with_name("flows.log.3").exists()
    assert all(p.stat().st_size <= 4096 for p in tmp_path.iterdir())
    assert flow_log.rotations >= 2


def test_settings_defaults_and_checks() -> None:
    settings = FlowSettings()
    assert (settings.ring_capacity, settings.event_level, settings.level) == (4095, "medium", abi.EV_LEVEL_MEDIUM)
    with pytest.raises(ValueError, match="power of two"):
        FlowSettings(events_ring_bytes=5000)
    with pytest.raises(ValueError):
        FlowSettings(event_level="loud")  # type: ignore[arg-type]


@pytest.mark.parametrize("address", ["10.244.1.2", "0.0.0.0", "255.255.255.255", "fd12:3456:789a::1", "::1",
                                     "2001:db8::ffff:1.2.3.4", "fe80::1"])
def test_event_address_text_is_the_ipaddress_text(address: str) -> None:
    ip = ipaddress.ip_address(address)
    ev = abi.Event()
    ev.family = abi.FAMILY_V4 if ip.version == 4 else abi.FAMILY_V6
    ctypes.memmove(ev.saddr, ip.packed, len(ip.packed))
    ctypes.memmove(ev.daddr, ip.packed, len(ip.packed))
    assert ev.source_text() == str(ev.source()) == str(ip)
    assert ev.destination_text() == str(ip)


def test_rfc3339_within_one_second_and_across_seconds() -> None:
    base = 1_700_000_000 * 10**9
    for ns in (base + 5, base + 999_999_999, base + 10**9, base - 1, base + 7):
        assert flows.parse_time(flows.rfc3339(ns)) == ns
    assert flows.rfc3339(base + 10**9).startswith("2023-11-14T22:13:21.")
