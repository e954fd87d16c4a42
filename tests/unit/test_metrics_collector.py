"""The metrics collector with fake sources: Hubble's and Cilium's names and labels, directions
from the datapath's counter kinds, bounded cardinality of pod contexts and DNS names."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from weft.agent.metrics import (
    TOP_NAMES,
    AgentSnapshot,
    DnsReport,
    FlowMetrics,
    RegenerationStats,
    WeftCollector,
    parse_address,
    registry_for,
    time_regenerations,
)


def snapshot() -> AgentSnapshot:
    return AgentSnapshot(
        datapath_counters={"fwd_peer_v4": (3, 300), "to_pod_v6": (2, 200), "to_stack_v4": (1, 100),
                           "drop_policy_ingress": (5, 500), "drop_policy_egress": (1, 60), "ct_new": (9, 900)},
        map_fill={"weft_ct": (10, 100), "weft_endpoints": (0, 0)},
        flow_status={"lost": {"PERF_EVENT_RING_BUFFER": 7, "OBSERVER_EVENTS_QUEUE": 0}, "ring": {"stored": 4}},
        policy_revision=12, endpoints=3, regeneration=RegenerationStats(2, 0.5, 0.75, 1000.0))


def flow(event_type: int, verdict: str, **extra: Any) -> dict[str, Any]:
    return {"flow": {"event_type": {"type": event_type}, "verdict": verdict,
                     "IP": {"ipVersion": "IPv4"},
                     "source": {"namespace": "default", "pod_name": "fe", "labels": ["k8s:app=fe"]},
                     "destination": {"identity": 2, "labels": ["reserved:world"]}, **extra}}


def samples(collector: WeftCollector) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry_for(collector)).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(got: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return got[(name, frozenset(labels.items()))]


def make(flow_metrics: FlowMetrics | None = None, dns: DnsReport | None = None) -> WeftCollector:
    return WeftCollector("node-1", snapshot, flow_metrics or FlowMetrics(),
                         lambda: dns or DnsReport(None, [], "REFUSED"))


def test_datapath_counters_become_cilium_series_by_reason_and_direction() -> None:
    got = samples(make())
    assert value(got, "cilium_forward_count_total", direction="EGRESS") == 4
    assert value(got, "cilium_forward_bytes_total", direction="INGRESS") == 200
    assert value(got, "cilium_drop_count_total", reason="POLICY_DENIED", direction="INGRESS") == 5
    assert value(got, "cilium_drop_bytes_total", reason="POLICY_DENIED", direction="EGRESS") == 60
    assert value(got, "weft_datapath_packets_total", counter="ct_new") == 9
    assert value(got, "hubble_lost_events_total", source="PERF_EVENT_RING_BUFFER") == 7


def test_agent_health() -> None:
    got = samples(make())
    assert value(got, "weft_map_pressure", map_name="weft_ct") == 0.1
    assert value(got, "weft_map_pressure", map_name="weft_endpoints") == 0
    assert value(got, "weft_policy_revision") == 12
    assert value(got, "weft_policy_regenerations_total") == 2
    assert value(got, "weft_policy_last_regeneration_seconds") == 0.5
    assert value(got, "weft_dns_proxy_up") == 0


def test_flow_counters_with_pod_context() -> None:
    metrics = FlowMetrics()
    syn = flow(4, "FORWARDED", trace_observation_point="TO_STACK",
               l4={"TCP": {"flags": {"SYN": True}}})
    syn["flow"]["event_type"]["sub_type"] = 3
    synack = flow(4, "FORWARDED", trace_observation_point="TO_ENDPOINT",
                  l4={"TCP": {"flags": {"SYN": True, "ACK": True}}})
    drop = flow(1, "DROPPED", drop_reason_desc="POLICY_DENIED", l4={"UDP": {}})
    verdict = flow(5, "DROPPED", drop_reason_desc="POLICY_DENIED", l4={"UDP": {}})
    metrics.observe([syn, synack, drop, verdict, {"lost_events": {"source": "X", "num_events_lost": 1}}])
    got = samples(make(metrics))
    context = {"source": "default/fe", "destination": "reserved:world"}
    assert value(got, "hubble_flows_processed_total", type="Trace", subtype="to-stack", verdict="FORWARDED",
                 protocol="TCP", **context) == 1
    assert value(got, "hubble_flows_processed_total", type="PolicyVerdict", subtype="", verdict="DROPPED",
                 protocol="UDP", **context) == 1
    # The policy verdict is the same packet as the drop: counted once as a drop.
    assert value(got, "hubble_drop_total", reason="POLICY_DENIED", protocol="UDP", **context) == 1
    assert value(got, "hubble_tcp_flags_total", flag="SYN", family="IPv4") == 1
    assert value(got, "hubble_tcp_flags_total", flag="SYN-ACK", family="IPv4") == 1


def test_pod_contexts_past_the_cap_fold_into_other() -> None:
    metrics = FlowMetrics(max_series=2)
    for pod in ("a", "b", "c", "d"):
        item = flow(1, "DROPPED", drop_reason_desc="POLICY_DENIED", l4={"UDP": {}})
        item["flow"]["source"]["pod_name"] = pod
        metrics.observe([item])
    _processed, drops, _flags = metrics.copy()
    assert len(drops) == 3  # two pods, then "other" for the rest
    assert drops[("POLICY_DENIED", "UDP", "other", "other")] == 2


def test_dns_insight_with_top_names_bounded() -> None:
    names = [{"pod": "default/fe", "name": f"n{i}.example.", "count": 100 - i, "denied": 1 if i == 0 else 0}
             for i in range(TOP_NAMES + 5)]
    status = {"counters": {"queries_udp": 40, "queries_tcp": 2, "responses": 30, "denied": 3, "servfail_sent": 1,
                           "upstream_timeouts": 4, "tcp_rejected": 0}}
    got = samples(make(dns=DnsReport(status, names, "REFUSED")))
    assert value(got, "weft_dns_proxy_up") == 1
    # hubble_dns_queries/responses come from L7 DNS flows (tests/unit/observe/test_dns_l7.py).
    assert value(got, "weft_dns_queries_total", protocol="UDP") == 40
    assert value(got, "weft_dns_errors_total", rcode="REFUSED") == 3
    assert value(got, "weft_dns_errors_total", rcode="SERVFAIL") == 1
    assert value(got, "weft_dns_timeouts_total") == 4
    assert value(got, "weft_dns_name_queries_total", qname="n0.example.", verdict="denied") == 1
    assert value(got, "weft_dns_name_queries_total", qname="n0.example.", verdict="allowed") == 99
    other = sum(100 - i for i in range(TOP_NAMES, TOP_NAMES + 5))
    assert value(got, "weft_dns_name_queries_total", qname="other", verdict="allowed") == other
    qnames = {dict(labels)["qname"] for name, labels in got if name == "weft_dns_name_queries_total"}
    assert len(qnames) == TOP_NAMES + 1
    assert value(got, "weft_dns_pod_queries_total", source="default/fe") == sum(r["count"] for r in names)


def test_regenerations_are_timed_including_nested_calls() -> None:
    class Controller:
        def __init__(self) -> None:
            self.calls = 0

        def regenerate(self, full: bool = False) -> None:
            self.calls += 1

        def apply(self) -> None:
            self.regenerate()

    controller = Controller()
    stats = RegenerationStats()
    time_regenerations(controller, stats)
    controller.apply()
    controller.regenerate(full=True)
    assert controller.calls == 2 and stats.count == 2 and stats.last_end_wall > 0


def test_parse_address() -> None:
    assert parse_address("0.0.0.0:9962") == ("0.0.0.0", 9962)
    assert parse_address("[::1]:9962") == ("::1", 9962)
