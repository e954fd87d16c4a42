"""The agent's Prometheus endpoint: Hubble's and Cilium's metric names and labels, plus the DNS
proxy's insight and the agent's own health.

Everything is read when Prometheus scrapes (a custom collector), never pushed on the datapath's
path: the datapath already counts per reason in ``weft_metrics``, the DNS proxy counts in its own
process. Only the flow series need counting as flows are made: :class:`FlowMetrics` is handed
each batch the flow reader publishes, and keeps plain counters under a lock.

Threads: the HTTP server scrapes on a thread of its own. What belongs to the agent's state (the
datapath's maps, the policy revision) is read on the agent's single worker thread through
``snapshot`` (the manager needs no locks because only that thread touches it); the DNS proxy is
asked over its socket from the scrape thread.

Cardinality is bounded everywhere: pod context labels are ``namespace/pod`` of this node's
endpoints (or the peer's reserved identity), and a series set that reaches its cap folds new label
values into ``other``; DNS names are the top :data:`TOP_NAMES` by queries, the rest is ``other``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from weft.datapath.abi import DROP_REASONS
from weft.datapath.abi import Metric as DatapathMetric
from weft.dnsproxy.config import default_socket_path
from weft.dnsproxy.control import ProxyCallError, ProxyClient, ProxyUnavailable
from weft.observe import flow as flows

if TYPE_CHECKING:
    from weft.agent.endpoints import EndpointManager

log = logging.getLogger("weft.agent.metrics")

TOP_NAMES = 20  # DNS names with a series of their own; the rest add up under "other"
MAX_CONTEXT_SERIES = 2000  # label sets per flow metric before new pod contexts fold into "other"
OTHER = "other"
KINDS_KEPT = 4096  # kinds of flow whose counts are remembered (FlowMetrics.observe)
SNAPSHOT_TIMEOUT_S = 10.0  # a scrape waits this long for the worker (a reconcile may hold it)

# Hubble's flow type label ("Trace", "Drop", "PolicyVerdict") by monitor event type.
FLOW_TYPE_NAMES = {flows.EVENT_TRACE: "Trace", flows.EVENT_DROP: "Drop", flows.EVENT_POLICY_VERDICT: "PolicyVerdict",
                   flows.EVENT_L7: "L7"}
# Which side of an endpoint a datapath counter is on: traffic leaving a pod is EGRESS, traffic
# delivered into one is INGRESS. Counters bumped on both sides (an explicit deny, an ACK without
# connection) cannot be split after the fact, so they are UNKNOWN, as Cilium labels them.
FORWARD_DIRECTIONS: dict[DatapathMetric, str] = {
    DatapathMetric.FWD_PEER_V4: "EGRESS", DatapathMetric.FWD_PEER_V6: "EGRESS",
    DatapathMetric.TO_STACK_V4: "EGRESS", DatapathMetric.TO_STACK_V6: "EGRESS",
    DatapathMetric.REDIRECT_DNS_PROXY: "EGRESS",
    DatapathMetric.TO_POD_V4: "INGRESS", DatapathMetric.TO_POD_V6: "INGRESS",
    DatapathMetric.TO_OVERLAY_V4: "EGRESS", DatapathMetric.TO_OVERLAY_V6: "EGRESS",
    DatapathMetric.FROM_OVERLAY_V4: "INGRESS", DatapathMetric.FROM_OVERLAY_V6: "INGRESS",
    DatapathMetric.ROUTED_V4: "EGRESS", DatapathMetric.ROUTED_V6: "EGRESS",
    DatapathMetric.FROM_NETDEV_V4: "INGRESS", DatapathMetric.FROM_NETDEV_V6: "INGRESS",
}
DROP_DIRECTIONS: dict[DatapathMetric, str] = {
    DatapathMetric.DROP_INVALID: "UNKNOWN", DatapathMetric.DROP_SPOOF: "EGRESS",
    DatapathMetric.DROP_POLICY_INGRESS: "INGRESS", DatapathMetric.DROP_POLICY_EGRESS: "EGRESS",
    DatapathMetric.DROP_POLICY_DENY: "UNKNOWN", DatapathMetric.DROP_CT_MISSING: "UNKNOWN",
    DatapathMetric.DROP_PROXY_DOWN: "EGRESS", DatapathMetric.DROP_OVERLAY: "UNKNOWN",
}


@dataclass(frozen=True)
class AgentSnapshot:
    """What the agent's worker thread reads for one scrape."""

    datapath_counters: Mapping[str, tuple[int, int]]  # counter name -> (packets, bytes)
    map_fill: Mapping[str, tuple[int, int]]  # map name -> (entries, max_entries)
    flow_status: Mapping[str, Any]  # FlowObserver.status()
    policy_revision: int
    endpoints: int
    regeneration: RegenerationStats


@dataclass
class RegenerationStats:
    """Policy regenerations: how many, the last one's duration and when it ended."""

    count: int = 0
    last_seconds: float = 0.0
    total_seconds: float = 0.0
    last_end_wall: float = 0.0

    def copy(self) -> RegenerationStats:
        return RegenerationStats(self.count, self.last_seconds, self.total_seconds, self.last_end_wall)


def time_regenerations(owner: Any, stats: RegenerationStats) -> None:
    """Wrap ``owner.regenerate`` (the policy controller's) to time every call. An instance
    attribute, so the controller's own ``self.regenerate()`` calls are timed too, without the
    policy layer knowing about metrics."""
    inner: Callable[..., Any] = owner.regenerate

    def regenerate(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - started
            stats.count += 1
            stats.last_seconds = elapsed
            stats.total_seconds += elapsed
            stats.last_end_wall = time.time()

    owner.regenerate = regenerate


@dataclass
class FlowMetrics:
    """Running counters of the flows the observer publishes (Hubble's flow metrics). Called on the
    flow reader thread once per batch; read by the scrape thread."""

    max_series: int = MAX_CONTEXT_SERIES
    processed: Counter[tuple[str, ...]] = field(default_factory=Counter)  # type, subtype, verdict, protocol, src, dst
    drops: Counter[tuple[str, ...]] = field(default_factory=Counter)  # reason, protocol, src, dst
    tcp_flags: Counter[tuple[str, ...]] = field(default_factory=Counter)  # flag, family
    # Hubble's dns handler, from L7 DNS flows: rcode, qtypes, ips_returned, src, dst / type, qtypes, src, dst
    dns_queries: Counter[tuple[str, ...]] = field(default_factory=Counter)
    dns_responses: Counter[tuple[str, ...]] = field(default_factory=Counter)
    dns_response_types: Counter[tuple[str, ...]] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _by_kind: dict[Any, list[Any]] = field(default_factory=dict)  # FlowResponse.kind -> its increments

    def observe(self, responses: Iterable[flows.Item]) -> None:
        # Flows the reader made from one template (FlowResponse.kind) count alike: counted once
        # per kind and batch, times how many (a flood of one kind of drop costs a dict update each).
        kinds: Counter[Any] = Counter()
        with self._lock:
            for response in responses:
                kind = getattr(response, "kind", None)
                if kind is not None:
                    kinds[kind] += 1
                    continue
                flow = flows.as_response(response).get("flow")
                if flow is not None:
                    self._count(flow)
            for kind, n in kinds.items():
                increments = self._by_kind.get(kind)
                if increments is None:
                    if len(self._by_kind) >= KINDS_KEPT:
                        self._by_kind.clear()
                    increments = self._by_kind[kind] = self._increments(kind[0].flows[kind[1]])
                for counter, key, context in increments:
                    if context is None:
                        counter[key] += n
                    else:
                        self._add(counter, key, context, n)

    def _increments(self, flow: Mapping[str, Any]) -> list[tuple[Counter[tuple[str, ...]], tuple[str, ...],
                                                                 tuple[str, str] | None]]:
        """What counting ``flow`` adds (counter, key, pod context or None), without adding it. Not
        for DNS flows (never templated): their counts depend on more than the kind."""
        out: list[tuple[Counter[tuple[str, ...]], tuple[str, ...], tuple[str, str] | None]] = []
        recorder = FlowMetrics(max_series=self.max_series)
        recorder._count(flow)
        for mine, theirs in ((self.processed, recorder.processed), (self.drops, recorder.drops)):
            out.extend((mine, full[:-2], (full[-2], full[-1])) for full in theirs)
        out.extend((self.tcp_flags, key, None) for key in recorder.tcp_flags)
        return out

    def _count(self, flow: Mapping[str, Any]) -> None:
        event_type = flow.get("event_type") or {}
        type_name = FLOW_TYPE_NAMES.get(int(event_type.get("type", 0)), "Unknown")
        subtype = ""
        point = flow.get("trace_observation_point")
        if type_name == "Trace" and point in flows.OBSERVATION_POINTS:
            subtype = flows.OBSERVATION_POINTS[point][1]
        dns = (flow.get("l7") or {}).get("dns") if type_name == "L7" else None
        if dns is not None:
            subtype = "DNS"
        protocol = _protocol(flow.get("l4") or {})
        source, destination = _context(flow.get("source")), _context(flow.get("destination"))
        verdict = str(flow.get("verdict", ""))
        self._add(self.processed, (type_name, subtype, verdict, protocol), (source, destination))
        if dns is not None:
            self._count_dns(flow, dns, verdict, (source, destination))
        if type_name == "PolicyVerdict":
            return  # the same packet's trace or drop flow carries the drop and the flags
        if verdict == "DROPPED":
            self._add(self.drops, (str(flow.get("drop_reason_desc", "DROP_REASON_UNKNOWN")), protocol),
                      (source, destination))
        tcp = (flow.get("l4") or {}).get("TCP")
        if tcp is not None:
            family = str((flow.get("IP") or {}).get("ipVersion", ""))
            for flag in _tcp_flag_names(tcp.get("flags") or {}):
                self.tcp_flags[(flag, family)] += 1

    def _count_dns(self, flow: Mapping[str, Any], dns: Mapping[str, Any], verdict: str,
                   context: tuple[str, str]) -> None:
        """As Hubble's dns handler: a denied query is a query with rcode "Policy denied", a request
        a query without rcode, a reply a response with its rcode's name (and its record types)."""
        qtypes = ",".join(dns.get("qtypes") or [])
        ips_returned = str(len(dns.get("ips") or []))
        if verdict == "DROPPED":
            self._add(self.dns_queries, ("Policy denied", qtypes, ips_returned), context)
        elif not flow.get("is_reply"):
            self._add(self.dns_queries, ("", qtypes, ips_returned), context)
        else:
            rcode = int(dns.get("rcode", 0))
            self._add(self.dns_responses, (flows.rcode_name(rcode), qtypes, ips_returned), context)
            for rrtype in dns.get("rrtypes") or []:
                self._add(self.dns_response_types, (str(rrtype), qtypes), context)

    def dns_copy(self) -> tuple[dict[tuple[str, ...], int], dict[tuple[str, ...], int], dict[tuple[str, ...], int]]:
        with self._lock:
            return dict(self.dns_queries), dict(self.dns_responses), dict(self.dns_response_types)

    def _add(self, counter: Counter[tuple[str, ...]], key: tuple[str, ...], context: tuple[str, str],
             n: int = 1) -> None:
        full = (*key, *context)
        if full not in counter and len(counter) >= self.max_series:
            full = (*key, OTHER, OTHER)  # bounded: a new pod pair past the cap is "other"
        counter[full] += n

    def copy(self) -> tuple[dict[tuple[str, ...], int], dict[tuple[str, ...], int], dict[tuple[str, ...], int]]:
        with self._lock:
            return dict(self.processed), dict(self.drops), dict(self.tcp_flags)


def _protocol(l4: Mapping[str, Any]) -> str:
    for name in ("TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6"):
        if name in l4:
            return name
    return "Unknown"


def _context(side: Mapping[str, Any] | None) -> str:
    """Hubble's pod context (``namespace/pod``) for an endpoint of this node; a peer elsewhere is
    named by its reserved identity label (``reserved:world``), anything else by nothing."""
    if not side:
        return ""
    if side.get("pod_name"):
        return f"{side.get('namespace', '')}/{side['pod_name']}"
    for label in side.get("labels") or ():
        if str(label).startswith("reserved:"):
            return str(label)
    return ""


def _tcp_flag_names(flags: Mapping[str, Any]) -> list[str]:
    """Hubble's flag label values: a SYN with ACK is ``SYN-ACK``, not a SYN and an ACK; ACK on its
    own is not counted (nearly every packet carries it)."""
    out = []
    if flags.get("SYN"):
        out.append("SYN-ACK" if flags.get("ACK") else "SYN")
    out.extend(name for name in ("FIN", "RST", "PSH", "URG", "ECE", "CWR") if flags.get(name))
    return out


@dataclass(frozen=True)
class DnsReport:
    """The DNS proxy's answers to ``status`` and ``names`` (None: not enabled or unreachable)."""

    status: Mapping[str, Any] | None
    names: Sequence[Mapping[str, Any]]
    deny_rcode: str  # what the proxy answers a denied query with (the node's setting)


class WeftCollector(Collector):
    """Builds every series on each scrape from the agent, the flow counters and the DNS proxy."""

    def __init__(self, node_name: str, snapshot: Callable[[], AgentSnapshot], flow_metrics: FlowMetrics,
                 dns: Callable[[], DnsReport]) -> None:
        self.node_name = node_name
        self.snapshot = snapshot
        self.flow_metrics = flow_metrics
        self.dns = dns

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        yield from self._datapath(snap)
        yield from self._flows(snap)
        yield from self._health(snap)
        yield from self._dns(self.dns())

    def _datapath(self, snap: AgentSnapshot) -> Iterator[Metric]:
        fwd_count = CounterMetricFamily("cilium_forward_count", "Packets forwarded by the datapath",
                                        labels=["direction"])
        fwd_bytes = CounterMetricFamily("cilium_forward_bytes", "Bytes forwarded by the datapath",
                                        labels=["direction"])
        drop_count = CounterMetricFamily("cilium_drop_count", "Packets dropped by the datapath",
                                         labels=["reason", "direction"])
        drop_bytes = CounterMetricFamily("cilium_drop_bytes", "Bytes dropped by the datapath",
                                         labels=["reason", "direction"])
        raw_packets = CounterMetricFamily("weft_datapath_packets", "Every datapath counter, by its name",
                                          labels=["counter"])
        raw_bytes = CounterMetricFamily("weft_datapath_bytes", "Every datapath counter's bytes, by its name",
                                        labels=["counter"])
        forwards: Counter[str] = Counter()
        forward_bytes: Counter[str] = Counter()
        drops: Counter[tuple[str, str]] = Counter()
        dropped_bytes: Counter[tuple[str, str]] = Counter()
        for metric in DatapathMetric:
            packets, nbytes = snap.datapath_counters.get(metric.counter_name, (0, 0))
            raw_packets.add_metric([metric.counter_name], packets)
            raw_bytes.add_metric([metric.counter_name], nbytes)
            if metric in FORWARD_DIRECTIONS:
                forwards[FORWARD_DIRECTIONS[metric]] += packets
                forward_bytes[FORWARD_DIRECTIONS[metric]] += nbytes
            elif metric in DROP_DIRECTIONS:
                key = (DROP_REASONS[metric], DROP_DIRECTIONS[metric])
                drops[key] += packets
                dropped_bytes[key] += nbytes
        for direction in sorted(forwards):
            fwd_count.add_metric([direction], forwards[direction])
            fwd_bytes.add_metric([direction], forward_bytes[direction])
        for key in sorted(drops):
            drop_count.add_metric(list(key), drops[key])
            drop_bytes.add_metric(list(key), dropped_bytes[key])
        yield from (fwd_count, fwd_bytes, drop_count, drop_bytes, raw_packets, raw_bytes)

    def _flows(self, snap: AgentSnapshot) -> Iterator[Metric]:
        processed, drops, tcp_flags = self.flow_metrics.copy()
        processed_family = CounterMetricFamily(
            "hubble_flows_processed", "Flows processed, by type, subtype, verdict and protocol",
            labels=["type", "subtype", "verdict", "protocol", "source", "destination"])
        for key, value in sorted(processed.items()):
            processed_family.add_metric(list(key), value)
        drop_family = CounterMetricFamily("hubble_drop", "Dropped flows, by reason and protocol",
                                          labels=["reason", "protocol", "source", "destination"])
        for key, value in sorted(drops.items()):
            drop_family.add_metric(list(key), value)
        flag_family = CounterMetricFamily("hubble_tcp_flags", "TCP flags of flows, by flag and family",
                                          labels=["flag", "family"])
        for key, value in sorted(tcp_flags.items()):
            flag_family.add_metric(list(key), value)
        lost_family = CounterMetricFamily("hubble_lost_events", "Events lost, by where they were lost",
                                          labels=["source"])
        for source, count in sorted((snap.flow_status.get("lost") or {}).items()):
            lost_family.add_metric([str(source)], int(count))
        yield from (processed_family, drop_family, flag_family, lost_family)
        yield from self._dns_flows()

    def _dns_flows(self) -> Iterator[Metric]:
        """Hubble's DNS series (``dns:sourceContext=pod;destinationContext=pod``), from the L7 DNS flows."""
        queries, responses, types = self.flow_metrics.dns_copy()
        context = ["source", "destination"]
        for name, help_text, labels, counts in (
                ("hubble_dns_queries", "Number of DNS queries observed", ["rcode", "qtypes", "ips_returned"],
                 queries),
                ("hubble_dns_responses", "Number of DNS responses observed", ["rcode", "qtypes", "ips_returned"],
                 responses),
                ("hubble_dns_response_types", "Number of DNS response records observed, by type",
                 ["type", "qtypes"], types)):
            family = CounterMetricFamily(name, help_text, labels=[*labels, *context])
            for key, value in sorted(counts.items()):
                family.add_metric(list(key), value)
            yield family

    def _health(self, snap: AgentSnapshot) -> Iterator[Metric]:
        pressure = GaugeMetricFamily("weft_map_pressure", "Fill ratio of each datapath map (entries / max)",
                                     labels=["map_name"])
        for name, (entries, maximum) in sorted(snap.map_fill.items()):
            pressure.add_metric([name], entries / maximum if maximum else 0.0)
        yield pressure
        yield GaugeMetricFamily("weft_policy_revision", "Revision of the node's policy repository",
                                value=snap.policy_revision)
        yield GaugeMetricFamily("weft_endpoints", "Endpoints of this node", value=snap.endpoints)
        regen = snap.regeneration
        yield CounterMetricFamily("weft_policy_regenerations", "Policy regenerations", value=regen.count)
        yield CounterMetricFamily("weft_policy_regeneration_seconds", "Time spent regenerating policy",
                                  value=regen.total_seconds)
        yield GaugeMetricFamily("weft_policy_last_regeneration_seconds", "Duration of the last regeneration",
                                value=regen.last_seconds)
        yield GaugeMetricFamily("weft_policy_last_regeneration_timestamp_seconds",
                                "When the last regeneration ended (Unix time)", value=regen.last_end_wall)
        ring = snap.flow_status.get("ring") or {}
        yield GaugeMetricFamily("weft_flow_ring_stored", "Flows held in the flow ring", value=ring.get("stored", 0))

    def _dns(self, report: DnsReport) -> Iterator[Metric]:
        up = GaugeMetricFamily("weft_dns_proxy_up", "Whether the node's DNS proxy answered its control socket",
                               value=1 if report.status is not None else 0)
        yield up
        if report.status is None:
            return
        counters: Mapping[str, int] = report.status.get("counters") or {}
        # hubble_dns_queries/responses come from the L7 DNS flows (_dns_flows); by transport here.
        queries = CounterMetricFamily("weft_dns_queries", "DNS queries the proxy received, by transport",
                                      labels=["protocol"])
        queries.add_metric(["UDP"], counters.get("queries_udp", 0))
        queries.add_metric(["TCP"], counters.get("queries_tcp", 0))
        yield queries
        errors = CounterMetricFamily("weft_dns_errors", "DNS errors the proxy answered pods with, by rcode",
                                     labels=["rcode"])
        errors.add_metric([report.deny_rcode], counters.get("denied", 0))
        errors.add_metric(["SERVFAIL"], counters.get("servfail_sent", 0))
        yield errors
        yield CounterMetricFamily("weft_dns_timeouts", "Queries that got no response from upstream in time",
                                  value=counters.get("upstream_timeouts", 0))
        yield CounterMetricFamily("weft_dns_throttled", "Queries dropped for load (UDP queries over the proxy's "
                                  "pending limit, TCP connections over the cap)",
                                  value=counters.get("throttled", 0) + counters.get("tcp_rejected", 0))
        proxy = CounterMetricFamily("weft_dns_proxy_events", "Every DNS proxy counter, by its name",
                                    labels=["event"])
        for name, value in sorted(counters.items()):
            proxy.add_metric([name], int(value))
        yield proxy
        yield from self._top_names(report.names)

    def _top_names(self, names: Sequence[Mapping[str, Any]]) -> Iterator[Metric]:
        by_name: Counter[str] = Counter()
        denied: Counter[str] = Counter()
        by_pod: Counter[str] = Counter()
        for row in names:
            name = str(row.get("name", ""))
            by_name[name] += int(row.get("count", 0))
            denied[name] += int(row.get("denied", 0))
            by_pod[str(row.get("pod", ""))] += int(row.get("count", 0))
        top = {name for name, _ in by_name.most_common(TOP_NAMES)}
        queried = CounterMetricFamily("weft_dns_name_queries", f"Queries of the top {TOP_NAMES} names, the rest "
                                      "as other (the proxy keeps a bounded set of names per pod)",
                                      labels=["qname", "verdict"])
        folded: Counter[tuple[str, str]] = Counter()
        for name, count in by_name.items():
            label = name if name in top else OTHER
            folded[(label, "denied")] += denied[name]
            folded[(label, "allowed")] += count - denied[name]
        for key, value in sorted(folded.items()):
            queried.add_metric(list(key), value)
        yield queried
        per_pod = CounterMetricFamily("weft_dns_pod_queries", "Queries by the pod that sent them", labels=["source"])
        for pod, count in sorted(by_pod.items()):
            per_pod.add_metric([pod], count)
        yield per_pod


def registry_for(collector: WeftCollector) -> CollectorRegistry:
    """A registry of our collector only: no process or platform collectors of the default one
    (their names would be the agent's Python runtime, not the node's network)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {address!r} is not host:port")
    return host.strip("[]"), int(port)


class MetricsServer:
    """The agent's /metrics endpoint: prometheus_client's HTTP server on a thread of its own."""

    def __init__(self, manager: EndpointManager, worker: Executor) -> None:
        self.manager = manager
        self.worker = worker
        self.regenerations = RegenerationStats()
        self.flow_metrics = FlowMetrics()
        time_regenerations(manager.policy, self.regenerations)
        manager.flows.on_publish = self.flow_metrics.observe
        config = manager.config
        self.proxy_socket = config.dns_proxy.socket_path or default_socket_path(config.state_dir)
        self.collector = WeftCollector(config.node_name, self._snapshot, self.flow_metrics, self._dns)
        self._server: WSGIServer | None = None

    def start(self, address: str) -> None:
        host, port = parse_address(address)
        self._server, _thread = start_http_server(port, host, registry=registry_for(self.collector))

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _snapshot(self) -> AgentSnapshot:
        # On the worker thread: the manager's state has one thread, and the scrape waits its turn.
        return self.worker.submit(self._read_agent).result(timeout=SNAPSHOT_TIMEOUT_S)

    def _read_agent(self) -> AgentSnapshot:
        manager = self.manager
        return AgentSnapshot(datapath_counters=manager.datapath.counters(), map_fill=manager.datapath.map_fill(),
                             flow_status=manager.flows.status(), policy_revision=manager.policy.repo.revision,
                             endpoints=len(manager.state.endpoints), regeneration=self.regenerations.copy())

    def _dns(self) -> DnsReport:
        settings = self.manager.config.dns_proxy
        deny_rcode = "NXDOMAIN" if settings.deny_response == "nxdomain" else "REFUSED"
        if not settings.enabled:
            return DnsReport(None, [], deny_rcode)
        client = ProxyClient(self.proxy_socket, timeout=1.0)
        try:
            return DnsReport(client.status(), client.names(), deny_rcode)
        except (ProxyUnavailable, ProxyCallError, OSError, ValueError) as exc:
            log.debug("DNS proxy not in this scrape: %s", exc)
            return DnsReport(None, [], deny_rcode)
