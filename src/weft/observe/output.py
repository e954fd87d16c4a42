"""Printing flows as ``hubble observe -o`` does: compact (one readable line, colour on a
terminal), table, json (the flow object) and jsonpb (the whole GetFlowsResponse). Pure: every
function returns text."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any

from weft.observe.flow import EVENT_DROP, EVENT_L7, EVENT_POLICY_VERDICT, OBSERVATION_POINTS, parse_time


class OutputFormat(StrEnum):
    compact = "compact"
    table = "table"
    json = "json"
    jsonpb = "jsonpb"


_COLOURS = {"FORWARDED": "32", "REDIRECTED": "36", "DROPPED": "31", "lost": "33"}


def _paint(text: str, colour: str | None, enabled: bool) -> str:
    return f"\x1b[{colour}m{text}\x1b[0m" if enabled and colour else text


def stamp(time_text: str) -> str:
    """``2024-05-01T12:00:00.123456789Z`` -> ``May  1 12:00:00.123`` (hubble's compact time)."""
    try:
        ns = parse_time(time_text)
    except ValueError:
        return time_text
    moment = dt.datetime.fromtimestamp(ns / 1e9, dt.UTC)
    return f"{moment:%b} {moment.day:2d} {moment:%H:%M:%S}.{(ns // 1_000_000) % 1000:03d}"


def _port_of(flow: Mapping[str, Any], which: str) -> int | None:
    l4 = flow.get("l4") or {}
    for key in ("TCP", "UDP", "SCTP"):
        if key in l4:
            return int(l4[key].get(which, 0))
    return None


def endpoint_text(flow: Mapping[str, Any], side: str) -> str:
    """``default/web-1:80`` for a pod, the address otherwise (``[fd00::1]:80`` for IPv6)."""
    ep = flow.get(side) or {}
    ip = str((flow.get("IP") or {}).get(side, ""))
    port = _port_of(flow, "source_port" if side == "source" else "destination_port")
    if ep.get("pod_name"):
        host = f"{ep.get('namespace', '')}/{ep['pod_name']}"
    else:
        names = flow.get("source_names" if side == "source" else "destination_names") or []
        host = str(names[0]) if names else (f"[{ip}]" if ":" in ip and port is not None else ip)
    return f"{host}:{port}" if port is not None else host


def _identity_text(flow: Mapping[str, Any], side: str) -> str:
    ident = (flow.get(side) or {}).get("identity")
    return f" (ID:{ident})" if ident else ""


def _kind(flow: Mapping[str, Any]) -> str:
    """hubble's middle column: ``to-endpoint``, ``policy-verdict:L3-L4 INGRESS``, ``Policy denied``..."""
    etype = int((flow.get("event_type") or {}).get("type", 0))
    direction = str(flow.get("traffic_direction", ""))
    if etype == EVENT_POLICY_VERDICT:
        match = "L3-L4" if flow.get("verdict") != "DROPPED" else "none"
        return f"policy-verdict:{match} {direction}"
    if etype == EVENT_L7:
        # hubble: "<protocol>-<request|response>", then where the L7 record was observed.
        l7 = flow.get("l7") or {}
        protocol = next((k for k in ("dns", "http", "kafka") if k in l7), "l7")
        source = str((l7.get(protocol) or {}).get("observation_source", "")) if protocol == "dns" else ""
        return f"{protocol}-{str(l7.get('type', '')).lower()}" + (f" {source}" if source else "")
    if etype == EVENT_DROP:
        return str(flow.get("drop_reason_desc", "DROPPED")).replace("_", " ").capitalize()
    point = str(flow.get("trace_observation_point", ""))
    return OBSERVATION_POINTS.get(point, (0, point.lower().replace("_", "-")))[1]


def _verdict_text(flow: Mapping[str, Any]) -> str:
    verdict = str(flow.get("verdict", ""))
    if int((flow.get("event_type") or {}).get("type", 0)) == EVENT_POLICY_VERDICT:
        return {"FORWARDED": "ALLOWED", "DROPPED": "DENIED", "REDIRECTED": "REDIRECTED"}.get(verdict, verdict)
    return verdict


def lost_text(response: Mapping[str, Any]) -> str:
    lost = response["lost_events"]
    cpu = lost.get("cpu")
    where = f" CPU({cpu})" if cpu is not None else ""
    return f"EVENTS LOST: {lost.get('source', 'UNKNOWN')}{where} {lost.get('num_events_lost', 0)}"


def compact_line(response: Mapping[str, Any], colour: bool = False, with_node: bool = True) -> str:
    time_text = stamp(str(response.get("time", "")))
    if "lost_events" in response:
        node = f" [{response.get('node_name')}]" if with_node and response.get("node_name") else ""
        return f"{time_text}{node}: " + _paint(lost_text(response), _COLOURS["lost"], colour)
    flow = response["flow"]
    node = f" [{flow.get('node_name')}]" if with_node and flow.get("node_name") else ""
    arrow = "<-" if flow.get("is_reply") else "->"
    src = endpoint_text(flow, "source") + _identity_text(flow, "source")
    dst = endpoint_text(flow, "destination") + _identity_text(flow, "destination")
    if flow.get("is_reply"):
        src, dst = dst, src
    verdict = _verdict_text(flow)
    summary = str(flow.get("Summary", ""))
    return (f"{time_text}{node}: {src} {arrow} {dst} {_kind(flow)} "
            f"{_paint(verdict, _COLOURS.get(str(flow.get('verdict'))), colour)}"
            + (f" ({summary})" if summary else ""))


TABLE_HEADER = ("TIMESTAMP", "NODE", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")


def table_rows(responses: Iterable[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for response in responses:
        when = stamp(str(response.get("time", "")))
        if "lost_events" in response:
            rows.append((when, str(response.get("node_name", "")), "", "", "lost", "", lost_text(response)))
            continue
        flow = response["flow"]
        rows.append((when, str(flow.get("node_name", "")), endpoint_text(flow, "source"),
                     endpoint_text(flow, "destination"), _kind(flow), _verdict_text(flow),
                     str(flow.get("Summary", ""))))
    return rows


def table_text(responses: Iterable[Mapping[str, Any]], header: bool = True) -> str:
    rows = table_rows(responses)
    all_rows = [TABLE_HEADER, *rows] if header else rows
    if not all_rows:
        return ""
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(TABLE_HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in all_rows)


def json_line(response: Mapping[str, Any]) -> str:
    """``-o json``: the flow object alone (a lost-event notice as itself)."""
    return json.dumps(response.get("flow", response), separators=(",", ":"))


def jsonpb_line(response: Mapping[str, Any]) -> str:
    """``-o jsonpb``: the whole GetFlowsResponse (``{"flow": ..., "node_name": ..., "time": ...}``)."""
    return json.dumps(dict(response), separators=(",", ":"))


def render(responses: Iterable[Mapping[str, Any]], fmt: OutputFormat, colour: bool = False,
           header: bool = True) -> str:
    items = list(responses)
    if not items:
        return ""
    if fmt == OutputFormat.table:
        return table_text(items, header=header)
    if fmt == OutputFormat.json:
        return "\n".join(json_line(r) for r in items)
    if fmt == OutputFormat.jsonpb:
        return "\n".join(jsonpb_line(r) for r in items)
    return "\n".join(compact_line(r, colour) for r in items)
