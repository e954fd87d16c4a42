"""The DNS proxy's L7 records without root: the proxy's ring (cursor, loss, epoch), record -> L7
flow in Hubble's shape, filters and hubble-like output on those flows, and Hubble's DNS metrics
(labels and values) counted from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dns.message
import dns.rrset
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from weft.agent.dnsflows import DnsFlowFollower
from weft.agent.metrics import AgentSnapshot, DnsReport, FlowMetrics, RegenerationStats, WeftCollector, registry_for
from weft.dnsproxy.l7ring import REQUEST, RESPONSE, VERDICT_DROPPED, VERDICT_FORWARDED, L7Ring
from weft.observe import flow as flows
from weft.observe.filters import Filters, FlowFilter
from weft.observe.output import compact_line, table_rows

POD = flows.EndpointView(3, 300, "default", "client", ("k8s:app=client",))
DNS_POD = flows.EndpointView(9, 900, "kube-system", "coredns", ("k8s:k8s-app=kube-dns",))
ENRICH = flows.Enrichment(node_name="node-1", endpoints_by_id={3: POD}, endpoints_by_ip={"10.0.0.9": DNS_POD})
CLIENT = ("10.0.0.3", 41508)
SERVER = ("10.0.0.9", 53)


def answer_wire(qname: str, *ips: str, ttl: int = 2, cname: str = "") -> bytes:
    query = dns.message.make_query(qname, "A")
    response = dns.message.make_response(query)
    owner = qname
    if cname:
        response.answer.append(dns.rrset.from_text(qname, ttl, "IN", "CNAME", cname))
        owner = cname
    if ips:
        response.answer.append(dns.rrset.from_text(owner, ttl, "IN", "A", *ips))
    return response.to_wire()


def refused_wire(qname: str) -> bytes:
    response = dns.message.make_response(dns.message.make_query(qname, "A"))
    response.set_rcode(5)
    return response.to_wire()


def filled_ring() -> L7Ring:
    ring = L7Ring()
    ring.add(1_700_000_000_000_000_000, REQUEST, 3, "default/client", CLIENT, SERVER, 17, "app1.example.com.", "A",
             VERDICT_FORWARDED)
    ring.add(1_700_000_000_002_000_000, RESPONSE, 3, "default/client", CLIENT, SERVER, 17, "app1.example.com.",
             "A", VERDICT_FORWARDED, 2_000_000, answer_wire("app1.example.com.", "198.51.100.10"))
    ring.add(1_700_000_000_003_000_000, REQUEST, 3, "default/client", CLIENT, SERVER, 17, "evil.example.org.", "A",
             VERDICT_DROPPED)
    return ring


def converted() -> list[dict[str, Any]]:
    return [flows.l7_dns_response(r, ENRICH) for r in filled_ring().read(0)["records"]]


def test_ring_cursor_follows_and_reports_what_was_overwritten() -> None:
    ring = L7Ring(size=3)
    for i in range(5):
        ring.add(i, REQUEST, 3, "p", CLIENT, SERVER, 17, f"n{i}.", "A", VERDICT_FORWARDED)
    page = ring.read(1)
    assert page["missed"] == 2  # seq 1 and 2 were overwritten before this reader came
    assert [r["dns"]["query"] for r in page["records"]] == ["n2.", "n3.", "n4."]
    assert page["next"] == 6
    again = ring.read(page["next"])
    assert again["records"] == [] and again["missed"] == 0
    # A cursor past the end (another process's) reads this one from its start, nothing missed.
    assert ring.read(100)["records"][0]["seq"] == 3
    assert ring.read(0, max_items=1)["next"] == 4
    with pytest.raises(ValueError, match="cursor"):
        ring.read(-1)


def test_ring_bounds_the_response_bytes_it_holds() -> None:
    ring = L7Ring(size=100, max_bytes=1000)
    for i in range(10):
        ring.add(i, RESPONSE, 3, "p", CLIENT, SERVER, 6, "big.", "A", VERDICT_FORWARDED, 1, b"x" * 300)
    assert len(ring.records) == 3 and ring.bytes == 900
    assert ring.read(1)["missed"] == 7


def test_response_record_carries_answers_ttl_and_types() -> None:
    ring = L7Ring()
    ring.add(5, RESPONSE, 3, "p", CLIENT, SERVER, 6, "www.example.com.", "A", VERDICT_FORWARDED, 7,
             answer_wire("www.example.com.", "192.0.2.1", "192.0.2.2", ttl=30, cname="edge.example.net."))
    ring.add(6, RESPONSE, 3, "p", CLIENT, SERVER, 17, "x.example.com.", "A", VERDICT_FORWARDED, 7,
             refused_wire("x.example.com."))
    cname, refused = ring.read(0)["records"]
    assert cname["protocol"] == "TCP"
    # dnspython writes an rrset in a random order: the answer order is the wire order.
    assert sorted(cname["dns"]["ips"]) == ["192.0.2.1", "192.0.2.2"] and cname["dns"]["ttl"] == 30
    assert cname["dns"]["cnames"] == ["edge.example.net."]
    assert cname["dns"]["rrtypes"] == ["CNAME", "A"] and cname["dns"]["rcode"] == 0
    assert refused["dns"]["rcode"] == 5 and "ips" not in refused["dns"]


def test_records_become_hubble_l7_flows() -> None:
    request, response, denied = (r["flow"] for r in converted())
    assert request["Type"] == "L7" and request["event_type"] == {"type": 129}
    assert request["l7"] == {"type": "REQUEST", "dns": {"query": "app1.example.com.", "observation_source": "proxy",
                                                        "qtypes": ["A"]}}
    assert request["IP"] == {"source": "10.0.0.3", "destination": "10.0.0.9", "ipVersion": "IPv4"}
    assert request["l4"] == {"UDP": {"source_port": 41508, "destination_port": 53}}
    assert request["source"]["pod_name"] == "client" and request["source"]["ID"] == 3
    assert request["destination"]["pod_name"] == "coredns" and request["node_name"] == "node-1"
    assert request["is_reply"] is False and request["verdict"] == "FORWARDED"
    # The response goes from the server back to the pod, with answers and latency (uint64: a string).
    assert response["is_reply"] is True and response["IP"]["source"] == "10.0.0.9"
    assert response["l4"]["UDP"] == {"source_port": 53, "destination_port": 41508}
    assert response["l7"]["latency_ns"] == "2000000"
    assert response["l7"]["dns"]["ips"] == ["198.51.100.10"] and response["l7"]["dns"]["ttl"] == 2
    assert response["l7"]["dns"]["rrtypes"] == ["A"] and "rcode" not in response["l7"]["dns"]  # 0 is omitted
    assert denied["verdict"] == "DROPPED" and denied["l7"]["type"] == "REQUEST"
    assert "drop_reason_desc" not in denied  # as Hubble's L7 parser: DROP_REASON_UNKNOWN
    with pytest.raises(flows.UnknownRecord, match="type"):
        flows.l7_dns_response({**filled_ring().read(0)["records"][0], "type": "BOTH"}, ENRICH)
    with pytest.raises(flows.UnknownRecord, match="source"):
        flows.l7_dns_response({"type": "REQUEST"}, ENRICH)


def test_compact_and_table_output_like_hubble() -> None:
    request, response, denied = converted()
    line = compact_line(request)
    assert line.endswith("default/client:41508 (ID:300) -> kube-system/coredns:53 (ID:900) dns-request proxy "
                         "FORWARDED (DNS Query app1.example.com. A)")
    assert compact_line(response).endswith(
        "default/client:41508 (ID:300) <- kube-system/coredns:53 (ID:900) dns-response proxy FORWARDED "
        '(DNS Answer "198.51.100.10" TTL: 2 (Proxy app1.example.com. A))')
    refused = flows.l7_dns_response({**filled_ring().read(0)["records"][1],
                                     "dns": {"query": "x.", "qtypes": ["A"], "rcode": 5,
                                             "observation_source": "proxy"}}, ENRICH)
    assert refused["flow"]["Summary"] == "DNS Answer RCode: Query Refused TTL: 0 (Proxy x. A)"
    cname = flows.l7_dns_response({**filled_ring().read(0)["records"][1],
                                   "dns": {"query": "www.", "qtypes": ["A"], "ips": ["192.0.2.1"], "ttl": 5,
                                           "cnames": ["a.", "b."], "observation_source": "proxy"}}, ENRICH)
    assert cname["flow"]["Summary"] == 'DNS Answer "192.0.2.1" CNAMEs: "a.,b." TTL: 5 (Proxy www. A)'
    assert "dns-request proxy DROPPED (DNS Query evil.example.org. A)" in compact_line(denied)
    assert table_rows([response])[0][4:] == ("dns-response proxy", "FORWARDED",
                                             'DNS Answer "198.51.100.10" TTL: 2 (Proxy app1.example.com. A)')


def test_filters_select_dns_l7_flows() -> None:
    items = converted()

    def kept(**spec: Any) -> list[str]:
        f = Filters(include=FlowFilter.from_json(spec))
        return [str(r["flow"]["l7"]["type"]) + ":" + r["flow"]["verdict"] for r in items if f.keep(r)]

    assert kept(protocol=["dns"]) == ["REQUEST:FORWARDED", "RESPONSE:FORWARDED", "REQUEST:DROPPED"]
    assert kept(type=["l7"]) == ["REQUEST:FORWARDED", "RESPONSE:FORWARDED", "REQUEST:DROPPED"]
    assert kept(type=["trace"]) == []
    assert kept(verdict=["DROPPED"], protocol=["dns"]) == ["REQUEST:DROPPED"]
    assert kept(protocol=["tcp"]) == []
    # Hubble's semantics: --to-fqdn matches resolved names, not the DNS query of an L7 flow.
    assert kept(to_fqdn=["app1.example.com"]) == []


def test_hubble_dns_metrics_from_l7_flows() -> None:
    metrics = FlowMetrics()
    items = converted()
    refused_record = {**filled_ring().read(0)["records"][1]}
    refused_record["dns"] = {"query": "x.example.com.", "qtypes": ["A"], "rcode": 3, "observation_source": "proxy"}
    items.append(flows.l7_dns_response(refused_record, ENRICH))
    metrics.observe(items)
    collector = WeftCollector("node-1", lambda: AgentSnapshot({}, {}, {}, 0, 0, RegenerationStats()),
                              metrics, lambda: DnsReport(None, [], "REFUSED"))
    got: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(generate_latest(registry_for(collector)).decode()):
        for sample in family.samples:
            got[(sample.name, frozenset(sample.labels.items()))] = sample.value
    ctx = {"source": "default/client", "destination": "kube-system/coredns"}
    back = {"source": "kube-system/coredns", "destination": "default/client"}

    def value(name: str, **labels: str) -> float:
        return got.get((name, frozenset(labels.items())), 0.0)

    assert value("hubble_dns_queries_total", rcode="", qtypes="A", ips_returned="0", **ctx) == 1
    assert value("hubble_dns_queries_total", rcode="Policy denied", qtypes="A", ips_returned="0", **ctx) == 1
    assert value("hubble_dns_responses_total", rcode="No Error", qtypes="A", ips_returned="1", **back) == 1
    assert value("hubble_dns_responses_total", rcode="Non-Existent Domain", qtypes="A", ips_returned="0",
                 **back) == 1
    assert value("hubble_dns_response_types_total", type="A", qtypes="A", **back) == 1
    assert value("hubble_flows_processed_total", type="L7", subtype="DNS", verdict="DROPPED", protocol="UDP",
                 **ctx) == 1



class FakeObserver:
    def __init__(self) -> None:
        self.enrichment = ENRICH
        self.published: list[dict[str, Any]] = []
        self.injected_lost = 0

    def inject(self, responses: list[dict[str, Any]]) -> None:
        self.published.extend(responses)


class RingClient:
    def __init__(self, ring: L7Ring) -> None:
        self.ring = ring

    def l7_get(self, cursor: int, max_items: int = 1024) -> dict[str, Any]:
        return self.ring.read(cursor, max_items)


def test_follower_resumes_after_restart_and_reports_what_it_missed(tmp_path: Path) -> None:
    ring = L7Ring(size=4)
    observer = FakeObserver()
    follower = DnsFlowFollower(observer, tmp_path / "none.sock", tmp_path)  # type: ignore[arg-type]
    follower.client = RingClient(ring)  # type: ignore[assignment]
    ring.add(1, REQUEST, 3, "p", CLIENT, SERVER, 17, "a.", "A", VERDICT_FORWARDED)
    assert follower.poll_once() and not follower.poll_once()
    assert [r["flow"]["l7"]["dns"]["query"] for r in observer.published] == ["a."]
    # A new agent (same state dir) resumes at the saved cursor: nothing twice...
    again = FakeObserver()
    follower = DnsFlowFollower(again, tmp_path / "none.sock", tmp_path)  # type: ignore[arg-type]
    follower.client = RingClient(ring)  # type: ignore[assignment]
    follower._load_cursor()
    for i in range(6):  # ... and the 2 records overwritten while no agent read are lost events
        ring.add(2 + i, REQUEST, 3, "p", CLIENT, SERVER, 17, f"n{i}.", "A", VERDICT_FORWARDED)
    follower.poll_once()
    assert again.published[0]["lost_events"] == {"source": "OBSERVER_EVENTS_QUEUE", "num_events_lost": 2}
    assert [r["flow"]["l7"]["dns"]["query"] for r in again.published[1:]] == ["n2.", "n3.", "n4.", "n5."]
    assert again.injected_lost == 2
    # A new proxy process (another epoch) is read from its start.
    fresh = L7Ring()
    fresh.add(9, REQUEST, 3, "p", CLIENT, SERVER, 17, "new.", "A", VERDICT_FORWARDED)
    follower.client = RingClient(fresh)  # type: ignore[assignment]
    follower.poll_once()
    assert again.published[-1]["flow"]["l7"]["dns"]["query"] == "new."
