"""The service-map model: flows -> workload nodes by namespace, edges with counts per verdict and
drop reasons, an edge's recent flows, the DNS panel, and the layout the page draws."""

from __future__ import annotations

from typing import Any

import pytest

from weft.ui import servicemap as sm


def pod(namespace: str, name: str, identity: int = 1000, app: str = "") -> dict[str, Any]:
    labels = [f"k8s:app={app}"] if app else []
    labels.append(f"k8s:io.kubernetes.pod.namespace={namespace}")
    return {"ID": 1, "identity": identity, "namespace": namespace, "pod_name": name, "labels": labels}


def make_flow(src: dict[str, Any], dst: dict[str, Any], *, verdict: str = "FORWARDED", port: int = 80,
              proto: str = "TCP", time: str = "2026-11-27T01:00:00.000000000Z", reason: str = "",
              src_ip: str = "10.0.0.1", dst_ip: str = "10.0.0.2", **extra: Any) -> dict[str, Any]:
    flow: dict[str, Any] = {
        "time": time, "verdict": verdict, "IP": {"source": src_ip, "destination": dst_ip, "ipVersion": "IPv4"},
        "l4": {proto: {"source_port": 40000, "destination_port": port}} if proto in ("TCP", "UDP") else {proto: {}},
        "source": src, "destination": dst, "Type": "L3_L4", "node_name": "n1", "traffic_direction": "EGRESS",
        "is_reply": False, "event_type": {"type": 1 if verdict == "DROPPED" else 4}}
    if reason:
        flow["drop_reason_desc"] = reason
    flow.update(extra)
    return flow


WORLD = {"identity": 2, "labels": ["reserved:world"]}
HOST = {"identity": 1, "labels": ["reserved:host"]}


@pytest.mark.parametrize(("pod_name", "workload"), [
    ("web-7d9f8b6c5d-x2k4p", "web"),       # Deployment
    ("node-agent-x7k2p", "node-agent"),    # DaemonSet / Job
    ("db-0", "db"), ("db-12", "db"),       # StatefulSet
    ("client", "client"), ("web-front", "web-front"),  # vowels: not a generated suffix
    ("a-b", "a-b"), ("7", "7"),
])
def test_workload_name_strips_only_replica_suffixes(pod_name: str, workload: str) -> None:
    assert sm.workload_name(pod_name) == workload


def test_node_of_each_kind_of_peer() -> None:
    flow = make_flow(pod("default", "web-0"), WORLD, dst_ip="192.0.2.9")
    assert sm.node_of(flow, "source") == sm.NodeKey("default/web", "web", "default", "workload")
    assert sm.node_of(flow, "destination") == sm.NodeKey("ip:192.0.2.9", "192.0.2.9", sm.WORLD_NAMESPACE, "ip")
    named = make_flow(pod("default", "web-0"), WORLD, destination_names=["api.example.com."])
    assert sm.node_of(named, "destination").id == "fqdn:api.example.com"
    assert sm.node_of(make_flow(HOST, pod("a", "b")), "source") == sm.NodeKey(
        "reserved:host", "host", sm.RESERVED_NAMESPACE, "reserved")
    remote = {"identity": 4242, "labels": ["k8s:app=backend", "k8s:io.kubernetes.pod.namespace=shop"]}
    assert sm.node_of(make_flow(remote, HOST), "source").id == "shop/backend"
    unknown = {"identity": 77}
    assert sm.node_of(make_flow(unknown, HOST, src_ip=""), "source").id == "identity:77"
    with pytest.raises(ValueError, match="side must be"):
        sm.node_of(flow, "middle")


def test_map_counts_verdicts_and_drop_reasons_per_edge() -> None:
    web, db, cli = pod("shop", "web-0"), pod("shop", "db-0"), pod("default", "client-1")
    flows = [
        make_flow(cli, web, time="2026-11-27T01:00:01Z"),
        make_flow(pod("default", "client-2"), web, time="2026-11-27T01:00:02Z"),
        make_flow(cli, web, verdict="DROPPED", reason="POLICY_DENIED", time="2026-11-27T01:00:03Z"),
        make_flow(cli, web, verdict="DROPPED", reason="POLICY_DENY", time="2026-11-27T01:00:04Z"),
        make_flow(cli, web, verdict="DROPPED", reason="POLICY_DENIED", time="2026-11-27T01:00:05Z"),
        make_flow(web, db, port=5432),
        make_flow(web, db, port=6379, proto="UDP"),
        make_flow(cli, WORLD, proto="ICMPv4", dst_ip="192.0.2.1"),
    ]
    m = sm.service_map(flows)
    edges = {(e["source"], e["destination"], e["protocol"], e["port"]): e for e in m["edges"]}
    assert set(edges) == {("default/client", "shop/web", "TCP", 80), ("shop/web", "shop/db", "TCP", 5432),
                          ("shop/web", "shop/db", "UDP", 6379), ("default/client", "ip:192.0.2.1", "ICMPv4", 0)}
    web_edge = edges[("default/client", "shop/web", "TCP", 80)]
    assert web_edge["verdicts"] == {"DROPPED": 3, "FORWARDED": 2}
    assert web_edge["drop_reasons"] == {"POLICY_DENIED": 2, "POLICY_DENY": 1}
    assert web_edge["total"] == 5
    assert web_edge["last_seen"] == "2026-11-27T01:00:05Z"
    assert web_edge["id"] == sm.edge_id("default/client", "shop/web", "TCP", 80)
    assert len({e["id"] for e in m["edges"]}) == 4
    nodes = {n["id"]: n for n in m["nodes"]}
    assert set(nodes) == {"default/client", "shop/web", "shop/db", "ip:192.0.2.1"}
    assert nodes["default/client"]["pods"] == ["client-1", "client-2"]
    assert m["flows"] == 8


def test_replies_policy_verdicts_and_l7_are_not_counted_twice() -> None:
    a, b = pod("default", "a"), pod("default", "b")
    flows = [
        make_flow(a, b),
        make_flow(b, a, is_reply=True),
        make_flow(a, b, event_type={"type": 5}),
        make_flow(a, b, Type="L7", l7={"dns": {"query": "x."}}),
    ]
    m = sm.service_map(flows)
    assert [e["verdicts"] for e in m["edges"]] == [{"FORWARDED": 1}]
    assert m["flows"] == 1


def test_layout_puts_namespaces_in_columns_without_overlap() -> None:
    flows = [make_flow(pod("alpha", f"p{i}"), pod("beta", "q")) for i in range(3)]
    flows.append(make_flow(pod("alpha", "p0"), WORLD, dst_ip="192.0.2.1"))
    flows.append(make_flow(HOST, pod("beta", "q")))
    m = sm.service_map(flows)
    assert [ns["name"] for ns in m["namespaces"]] == ["alpha", "beta", sm.RESERVED_NAMESPACE, sm.WORLD_NAMESPACE]
    boxes = {ns["name"]: ns for ns in m["namespaces"]}
    for node in m["nodes"]:
        ns = boxes[node["namespace"]]
        assert ns["x"] <= node["x"] and node["x"] + node["w"] <= ns["x"] + ns["w"]
        assert ns["y"] <= node["y"] and node["y"] + node["h"] <= ns["y"] + ns["h"]
        assert node["x"] + node["w"] <= m["width"] and node["y"] + node["h"] <= m["height"]
    rects = [(n["x"], n["y"], n["x"] + n["w"], n["y"] + n["h"]) for n in m["nodes"]]
    for i, r in enumerate(rects):
        for s in rects[i + 1:]:
            assert r[2] <= s[0] or s[2] <= r[0] or r[3] <= s[1] or s[3] <= r[1], (r, s)


def test_empty_map() -> None:
    m = sm.service_map([])
    assert m["nodes"] == [] and m["edges"] == [] and m["namespaces"] == [] and m["flows"] == 0


def test_edge_flows_newest_first_with_drop_reasons() -> None:
    cli, web = pod("default", "client-1"), pod("default", "web-1")
    flows = [make_flow(cli, web, time=f"2026-11-27T01:00:0{i}Z") for i in range(5)]
    flows.append(make_flow(cli, web, verdict="DROPPED", reason="POLICY_DENIED", time="2026-11-27T01:00:09Z"))
    flows.append(make_flow(cli, web, port=443, time="2026-11-27T01:00:08Z"))
    eid = sm.edge_id("default/client", "default/web", "TCP", 80)
    rows = sm.edge_flows(flows, eid, 3)
    assert [r["time"] for r in rows] == ["2026-11-27T01:00:09Z", "2026-11-27T01:00:04Z", "2026-11-27T01:00:03Z"]
    assert rows[0] | {"summary": ""} == {
        "time": "2026-11-27T01:00:09Z", "source": "default/client-1", "destination": "default/web-1",
        "port": "80/TCP", "verdict": "DROPPED", "drop_reason": "POLICY_DENIED", "node_name": "n1", "summary": ""}
    assert sm.edge_flows(flows, "enope", 10) == []
    with pytest.raises(ValueError, match="limit must be at least 1"):
        sm.edge_flows(flows, eid, 0)
    world = make_flow(cli, WORLD, dst_ip="192.0.2.1", destination_names=["a.example."], proto="UDP", port=53)
    (row,) = sm.edge_flows([world], sm.edge_of(world)[2], 5)
    assert row["destination"] == "a.example (192.0.2.1)" and row["port"] == "53/UDP"


def dns_flow(query: str, kind: str = "REQUEST", rcode: int = 0, verdict: str = "FORWARDED") -> dict[str, Any]:
    return make_flow(pod("default", "client-1"), pod("kube-system", "coredns-0"), proto="UDP", port=53,
                     verdict=verdict, Type="L7", l7={"type": kind, "dns": {"query": query, "rcode": rcode}})


def test_dns_panel_top_names_errors_by_rcode_and_denied() -> None:
    flows = [dns_flow("a.example.") for _ in range(3)]
    flows += [dns_flow("b.example."), dns_flow("b.example.", "RESPONSE", 3), dns_flow("b.example.", "RESPONSE", 3)]
    flows += [dns_flow("c.example.", "RESPONSE", 2), dns_flow("a.example.", "RESPONSE", 0)]
    flows += [dns_flow("denied.example.", verdict="DROPPED")]
    flows += [make_flow(pod("default", "x"), pod("default", "y"))]  # not DNS: ignored
    panel = sm.dns_panel(flows)
    assert panel["names"] == [
        {"name": "a.example", "queries": 3, "errors": 0, "denied": 0},
        {"name": "b.example", "queries": 1, "errors": 2, "denied": 0},
        {"name": "denied.example", "queries": 1, "errors": 0, "denied": 1},
        {"name": "c.example", "queries": 0, "errors": 1, "denied": 0},
    ]
    assert panel["rcodes"] == [{"rcode": "NXDOMAIN", "count": 2}, {"rcode": "SERVFAIL", "count": 1}]
    assert panel["queries"] == 5 and panel["errors"] == 3
    assert [n["name"] for n in sm.dns_panel(flows, top=1)["names"]] == ["a.example"]
    with pytest.raises(ValueError, match="top must be at least 1"):
        sm.dns_panel(flows, top=0)


def test_rcode_names() -> None:
    assert [sm.rcode_name(r) for r in (0, 2, 3, 5)] == ["NOERROR", "SERVFAIL", "NXDOMAIN", "REFUSED"]
    assert sm.rcode_name(5000) == "RCODE5000"
