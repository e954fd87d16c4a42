"""Flows -> the service map, the DNS panel and the page's layout (pure).

Nodes are workloads grouped by namespace: a pod's name without its replica suffix (Deployment
``web-7d9f8b6c5d-x2k4p`` -> ``web``, StatefulSet ``db-0`` -> ``db``), a remote pod by its labels,
reserved identities (host, world, ...) as their own nodes, and addresses outside the cluster as one
node per DNS name (``destination_names``) or, without a name, per IP.

Edges are (source node, destination node, protocol/port) with counts per verdict and per drop
reason. A connection is drawn once, in the direction it was opened: reply flows are left out, and
so are ``policy-verdict`` flows (each is the twin of a trace or drop flow of the same packet) and
L7 flows (the DNS panel's, twins of the L3/L4 flows of the same packets).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dns.rcode

Flow = Mapping[str, Any]

POLICY_VERDICT_EVENT = 5
RESERVED_NAMESPACE = "(reserved)"
WORLD_NAMESPACE = "(world)"
NAMESPACE_LABEL = "k8s:io.kubernetes.pod.namespace"
# Kubernetes' generated-name alphabet (no vowels, no 0/1/3): what replica suffixes are made of.
_K8S_ALNUM = "[bcdfghjklmnpqrstvwxz2456789]"
_DEPLOYMENT_SUFFIX = re.compile(rf"-{_K8S_ALNUM}{{6,10}}-{_K8S_ALNUM}{{5}}$")
_SHORT_SUFFIX = re.compile(rf"-{_K8S_ALNUM}{{5}}$")
_ORDINAL_SUFFIX = re.compile(r"-\d+$")
_L4_KEYS = ("TCP", "UDP", "SCTP")


def workload_name(pod_name: str) -> str:
    """A pod's workload: its name minus the replica suffix its controller added."""
    for pattern in (_DEPLOYMENT_SUFFIX, _SHORT_SUFFIX, _ORDINAL_SUFFIX):
        stripped = pattern.sub("", pod_name)
        if stripped and stripped != pod_name:
            return stripped
    return pod_name


@dataclass(frozen=True)
class NodeKey:
    """Who one side of a flow is, as the map draws it."""

    id: str
    label: str
    namespace: str
    kind: str  # "workload", "reserved", "fqdn", "ip"


def _label_value(labels: Iterable[str], key: str) -> str | None:
    for label in labels:
        name, sep, value = label.partition("=")
        if sep and (name == key or name.split(":", 1)[-1] == key):
            return value
    return None


def node_of(flow: Flow, side: str) -> NodeKey:
    """The node of a flow's ``source`` or ``destination``."""
    if side not in ("source", "destination"):
        raise ValueError(f"node_of: side must be 'source' or 'destination', not {side!r}")
    ep = flow.get(side) or {}
    labels = [str(x) for x in ep.get("labels") or ()]
    pod = str(ep.get("pod_name") or "")
    namespace = str(ep.get("namespace") or "") or _label_value(labels, NAMESPACE_LABEL) or ""
    if pod:
        name = workload_name(pod)
        return NodeKey(f"{namespace}/{name}", name, namespace or "default", "workload")
    reserved = [x.split(":", 1)[1] for x in labels if x.startswith("reserved:")]
    if namespace:  # a pod of another node: known by its identity's labels only
        name = _label_value(labels, "app") or _label_value(labels, "k8s-app") or f"identity-{ep.get('identity', '?')}"
        return NodeKey(f"{namespace}/{name}", name, namespace, "workload")
    if reserved and reserved != ["world"]:
        return NodeKey(f"reserved:{reserved[0]}", reserved[0], RESERVED_NAMESPACE, "reserved")
    names = flow.get("destination_names" if side == "destination" else "source_names") or []
    if names:
        name = str(names[0]).rstrip(".")
        return NodeKey(f"fqdn:{name}", name, WORLD_NAMESPACE, "fqdn")
    address = str((flow.get("IP") or {}).get(side) or "")
    if address and (reserved == ["world"] or not labels):
        return NodeKey(f"ip:{address}", address, WORLD_NAMESPACE, "ip")
    if reserved:
        return NodeKey("reserved:world", "world", RESERVED_NAMESPACE, "reserved")
    return NodeKey(f"identity:{ep.get('identity', '?')}", f"identity {ep.get('identity', '?')}",
                   RESERVED_NAMESPACE, "reserved")


def port_of(flow: Flow) -> tuple[str, int]:
    """(protocol, destination port) of a flow; port 0 for ICMP and protocols without ports."""
    l4 = flow.get("l4") or {}
    for key in _L4_KEYS:
        if key in l4:
            return key, int((l4[key] or {}).get("destination_port") or 0)
    for key in ("ICMPv4", "ICMPv6"):
        if key in l4:
            return key, 0
    return "IP", 0


def edge_id(source: str, destination: str, protocol: str, port: int) -> str:
    """A short URL-safe id, the same for the same edge in every map."""
    text = f"{source}|{destination}|{protocol}|{port}"
    return "e" + hashlib.sha256(text.encode()).hexdigest()[:12]


def counts_on_map(flow: Flow) -> bool:
    """Whether a flow is drawn on the map (see the module's docstring for what is not)."""
    if flow.get("is_reply") or str(flow.get("Type", "L3_L4")) == "L7":
        return False
    return (flow.get("event_type") or {}).get("type") != POLICY_VERDICT_EVENT


@dataclass
class Edge:
    id: str
    source: str
    destination: str
    protocol: str
    port: int
    verdicts: Counter[str] = field(default_factory=Counter)
    drop_reasons: Counter[str] = field(default_factory=Counter)
    last_seen: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "destination": self.destination, "protocol": self.protocol,
                "port": self.port, "verdicts": dict(sorted(self.verdicts.items())),
                "drop_reasons": dict(self.drop_reasons.most_common()), "total": sum(self.verdicts.values()),
                "last_seen": self.last_seen}


def edge_of(flow: Flow) -> tuple[NodeKey, NodeKey, str]:
    """The source node, destination node and edge id of a flow."""
    src, dst = node_of(flow, "source"), node_of(flow, "destination")
    protocol, port = port_of(flow)
    return src, dst, edge_id(src.id, dst.id, protocol, port)


# The page's geometry: namespaces are columns of node boxes.
NODE_W, NODE_H, GAP_Y, COL_GAP, MARGIN, HEADER = 180, 44, 36, 150, 30, 34
LABEL_ROOM = 240  # right of the last column: edges within a column bend there, with their counts


def _namespace_order(namespace: str) -> tuple[int, str]:
    return ({RESERVED_NAMESPACE: 1, WORLD_NAMESPACE: 2}.get(namespace, 0), namespace)


def service_map(flows: Iterable[Flow]) -> dict[str, Any]:
    """The map of some flows: nodes with their positions, namespace boxes, and edges."""
    nodes: dict[str, NodeKey] = {}
    pods: dict[str, set[str]] = {}
    edges: dict[str, Edge] = {}
    seen = 0
    for flow in flows:
        if not counts_on_map(flow):
            continue
        seen += 1
        src, dst, eid = edge_of(flow)
        for side, key in (("source", src), ("destination", dst)):
            nodes.setdefault(key.id, key)
            pod = (flow.get(side) or {}).get("pod_name")
            if pod:
                pods.setdefault(key.id, set()).add(str(pod))
        protocol, port = port_of(flow)
        edge = edges.get(eid)
        if edge is None:
            edge = edges[eid] = Edge(eid, src.id, dst.id, protocol, port)
        verdict = str(flow.get("verdict") or "VERDICT_UNKNOWN")
        edge.verdicts[verdict] += 1
        if verdict == "DROPPED":
            edge.drop_reasons[str(flow.get("drop_reason_desc") or "DROP_REASON_UNKNOWN")] += 1
        edge.last_seen = max(edge.last_seen, str(flow.get("time") or ""))
    columns: dict[str, list[NodeKey]] = {}
    for key in sorted(nodes.values(), key=lambda k: k.label):
        columns.setdefault(key.namespace, []).append(key)
    out_nodes: list[dict[str, Any]] = []
    namespaces: list[dict[str, Any]] = []
    x = MARGIN
    height = 0
    for namespace in sorted(columns, key=_namespace_order):
        members = columns[namespace]
        y = MARGIN + HEADER
        for key in members:
            out_nodes.append({"id": key.id, "label": key.label, "namespace": key.namespace, "kind": key.kind,
                              "pods": sorted(pods.get(key.id, ())), "x": x + 15, "y": y, "w": NODE_W, "h": NODE_H})
            y += NODE_H + GAP_Y
        box_h = y - GAP_Y + 15 - MARGIN
        namespaces.append({"name": namespace, "x": x, "y": MARGIN, "w": NODE_W + 30, "h": box_h})
        height = max(height, MARGIN + box_h)
        x += NODE_W + 30 + COL_GAP
    return {"nodes": out_nodes, "namespaces": namespaces,
            "edges": [e.to_json() for e in sorted(edges.values(), key=lambda e: (e.source, e.destination, e.port))],
            "flows": seen, "width": max(x - COL_GAP + LABEL_ROOM, 400), "height": height + MARGIN}


def edge_flows(flows: Iterable[Flow], wanted: str, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` flows of edge ``wanted``, newest first, as table rows."""
    if limit < 1:
        raise ValueError(f"edge_flows: limit must be at least 1, not {limit}")
    rows: list[dict[str, Any]] = []
    for flow in flows:
        if not counts_on_map(flow):
            continue
        src, dst, eid = edge_of(flow)
        if eid != wanted:
            continue
        protocol, port = port_of(flow)
        rows.append({"time": str(flow.get("time") or ""), "source": _side_text(flow, "source", src),
                     "destination": _side_text(flow, "destination", dst),
                     "port": f"{port}/{protocol}" if port else protocol,
                     "verdict": str(flow.get("verdict") or ""), "drop_reason": str(flow.get("drop_reason_desc") or ""),
                     "node_name": str(flow.get("node_name") or ""), "summary": str(flow.get("Summary") or "")})
    rows.sort(key=lambda r: r["time"], reverse=True)
    return rows[:limit]


def _side_text(flow: Flow, side: str, key: NodeKey) -> str:
    ep = flow.get(side) or {}
    if ep.get("pod_name"):
        return f"{ep.get('namespace') or key.namespace}/{ep['pod_name']}"
    address = str((flow.get("IP") or {}).get(side) or "")
    return f"{key.label} ({address})" if address and address != key.label else key.label


def rcode_name(rcode: int) -> str:
    """NXDOMAIN for 3, as dig prints it."""
    return dns.rcode.to_text(dns.rcode.Rcode.make(rcode)) if 0 <= rcode < 4096 else f"RCODE{rcode}"


def dns_panel(flows: Iterable[Flow], top: int = 10) -> dict[str, Any]:
    """Top names by queries, and answers that were errors by rcode, from L7 DNS flows. A request
    the DNS proxy refused by policy (a DROPPED L7 flow) counts as a query and as ``denied``."""
    if top < 1:
        raise ValueError(f"dns_panel: top must be at least 1, not {top}")
    queries: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    denied: Counter[str] = Counter()
    by_rcode: Counter[str] = Counter()
    for flow in flows:
        if str(flow.get("Type", "")) != "L7":
            continue
        l7 = flow.get("l7") or {}
        record = l7.get("dns")
        if not isinstance(record, Mapping):
            continue
        name = str(record.get("query") or "").rstrip(".") or "(empty)"
        kind = str(l7.get("type") or "REQUEST")
        if kind == "REQUEST":
            queries[name] += 1
            if flow.get("verdict") == "DROPPED":
                denied[name] += 1
        elif kind == "RESPONSE":
            rcode = int(record.get("rcode") or 0)
            if rcode:
                errors[name] += 1
                by_rcode[rcode_name(rcode)] += 1
    names = sorted(set(queries) | set(errors), key=lambda n: (-queries[n], -errors[n], n))[:top]
    return {"names": [{"name": n, "queries": queries[n], "errors": errors[n], "denied": denied[n]} for n in names],
            "rcodes": [{"rcode": r, "count": c} for r, c in by_rcode.most_common()],
            "queries": sum(queries.values()), "errors": sum(errors.values())}
