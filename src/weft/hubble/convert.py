"""weft's flow dicts <-> Hubble's protobuf messages, and Hubble FlowFilters <-> weft filters.

weft's flows already have the shape protojson gives Hubble's messages (proto field names), so a
dict parses into ``flow.Flow`` field by field; keys weft adds that Hubble's messages lack are
skipped. FlowFilter: a Hubble filter is one weft :class:`FlowFilter` of source-/destination-side
fields; weft's either-side fields (``--pod``, ``--ip``...) become one Hubble filter per choice of
sides, OR'ed, as Hubble filters cannot say "source or destination". A Hubble filter field weft
cannot apply is refused by name (:class:`UnsupportedFilter`), never ignored.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from weft.hubble.proto import flow_pb2, observer_pb2
from weft.observe.filters import FilterError, Filters, FlowFilter
from weft.observe.flow import EVENT_TYPE_NAMES, OBSERVATION_POINTS, parse_time, rfc3339

Response = dict[str, Any]


class UnsupportedFilter(ValueError):
    """A Hubble FlowFilter field (or value) weft's filters cannot apply."""


# ---------------------------------------------------------------------- flows
def response_to_message(response: Mapping[str, Any]) -> Any:
    """A GetFlowsResponse-shaped dict (``flow`` or ``lost_events``, ``node_name``, ``time``) ->
    ``observer.GetFlowsResponse``."""
    flow = response.get("flow")
    if flow is not None and set(response) <= _RESPONSE_KEYS:
        message = observer_pb2.GetFlowsResponse(flow=flow_to_message(flow), node_name=response.get("node_name", ""))
        _set_time(message.time, response.get("time"))
        return message
    message = observer_pb2.GetFlowsResponse()
    json_format.ParseDict(dict(response), message, ignore_unknown_fields=True)
    return message


def flow_to_message(flow: Mapping[str, Any]) -> Any:
    """A weft flow -> ``flow.Flow``. The agent's own flows take a direct path (the agent converts
    every flow it streams, on the thread that also serves its API: ParseDict costs ~5x more);
    anything else (L7 records, keys it does not know) goes through protojson."""
    if not set(flow) <= _FAST_FLOW_KEYS:
        message = flow_pb2.Flow()
        json_format.ParseDict(dict(flow), message, ignore_unknown_fields=True)
        return message
    message = flow_pb2.Flow(
        verdict=_VERDICTS.get(flow.get("verdict", ""), 0), Type=_FLOW_TYPES.get(flow.get("Type", ""), 0),
        node_name=flow.get("node_name", ""), traffic_direction=_DIRECTIONS.get(flow.get("traffic_direction", ""), 0),
        policy_match_type=flow.get("policy_match_type", 0),
        trace_observation_point=_POINTS.get(flow.get("trace_observation_point", ""), 0),
        drop_reason_desc=_DROP_REASONS.get(flow.get("drop_reason_desc", ""), 0),
        Summary=flow.get("Summary", ""), source_names=flow.get("source_names", ()),
        destination_names=flow.get("destination_names", ()), proxy_port=flow.get("proxy_port", 0),
        uuid=flow.get("uuid", ""),
    )
    _set_time(message.time, flow.get("time"))
    # A key present with an empty object still sets the field (as protojson does).
    ip = flow.get("IP")
    if ip is not None:
        message.IP.SetInParent()
        message.IP.source = ip.get("source", "")
        message.IP.destination = ip.get("destination", "")
        message.IP.ipVersion = _IP_VERSIONS.get(ip.get("ipVersion", ""), 0)
    l4 = flow.get("l4")
    if l4 is not None:
        message.l4.SetInParent()
        for key, body in l4.items():
            target = getattr(message.l4, key)
            target.SetInParent()
            for name, value in body.items():
                if name == "flags":
                    target.flags.SetInParent()
                    for flag, on in value.items():
                        setattr(target.flags, flag, on)
                else:
                    setattr(target, name, value)
    for side in ("source", "destination"):
        endpoint = flow.get(side)
        if endpoint is not None:
            target = getattr(message, side)
            target.SetInParent()
            target.ID = endpoint.get("ID", 0)
            target.identity = endpoint.get("identity", 0)
            target.namespace = endpoint.get("namespace", "")
            target.labels.extend(endpoint.get("labels", ()))
            target.pod_name = endpoint.get("pod_name", "")
    if "is_reply" in flow:
        message.is_reply.value = bool(flow["is_reply"])
    event_type = flow.get("event_type")
    if event_type is not None:
        message.event_type.SetInParent()
        message.event_type.type = event_type.get("type", 0)
        message.event_type.sub_type = event_type.get("sub_type", 0)
    interface = flow.get("interface")
    if interface is not None:
        message.interface.SetInParent()
        message.interface.index = interface.get("index", 0)
        message.interface.name = interface.get("name", "")
    for key in ("egress_allowed_by", "ingress_allowed_by", "egress_denied_by", "ingress_denied_by"):
        for policy in flow.get(key, ()):
            getattr(message, key).add(**policy)
    return message


_RESPONSE_KEYS = {"flow", "node_name", "time"}
_FAST_FLOW_KEYS = {
    "time", "uuid", "verdict", "IP", "l4", "source", "destination", "Type", "node_name", "source_names",
    "destination_names", "event_type", "traffic_direction", "policy_match_type", "trace_observation_point",
    "drop_reason_desc", "is_reply", "interface", "proxy_port", "Summary", "egress_allowed_by", "ingress_allowed_by",
    "egress_denied_by", "ingress_denied_by",
}
_VERDICTS = dict(flow_pb2.Verdict.items())
_FLOW_TYPES = dict(flow_pb2.FlowType.items())
_DIRECTIONS = dict(flow_pb2.TrafficDirection.items())
_POINTS = dict(flow_pb2.TraceObservationPoint.items())
_DROP_REASONS = dict(flow_pb2.DropReason.items())
_IP_VERSIONS = dict(flow_pb2.IPVersion.items())
_seconds_cache: tuple[str, int] = ("", 0)  # (``YYYY-MM-DDTHH:MM:SS``, its epoch seconds): flows come in bursts


def _set_time(target: Any, text: Any) -> None:
    """RFC 3339 text -> a Timestamp; the common ``...SS.nnnnnnnnnZ`` form without re-parsing the date."""
    global _seconds_cache
    if not text:
        return
    text = str(text)
    if len(text) == 30 and text[19] == "." and text[29] == "Z" and text[20:29].isdigit():
        head = text[:19]
        cached_head, seconds = _seconds_cache
        if cached_head != head:
            seconds = parse_time(head + "Z") // 1_000_000_000
            _seconds_cache = (head, seconds)
        target.seconds = seconds
        target.nanos = int(text[20:29])
        return
    target.FromNanoseconds(parse_time(text))


def message_to_response(message: Any) -> Response:
    """``observer.GetFlowsResponse`` -> weft's dict (as the agent keeps it: counts are ints).
    Field for field what protojson (proto names) writes, without its cost: ``weft observe``
    converts every flow it prints."""
    out = _message_dict(message)
    lost = out.get("lost_events")
    if lost is not None and "num_events_lost" in lost:
        lost["num_events_lost"] = int(lost["num_events_lost"])  # protojson writes uint64 as a string
    return out


def message_to_flow(message: Any) -> dict[str, Any]:
    return _message_dict(message)


_WRAPPERS = {"google.protobuf.BoolValue", "google.protobuf.UInt32Value", "google.protobuf.Int32Value",
             "google.protobuf.StringValue"}
_WIDE = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
         FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def _message_dict(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for descriptor, value in message.ListFields():
        if descriptor.is_repeated:
            out[descriptor.name] = [_field_value(descriptor, v) for v in value]
        else:
            out[descriptor.name] = _field_value(descriptor, value)
    return out


def _field_value(descriptor: Any, value: Any) -> Any:
    kind = descriptor.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        full_name = descriptor.message_type.full_name
        if full_name == "google.protobuf.Timestamp":
            return _timestamp_text(value.seconds, value.nanos)
        if full_name in _WRAPPERS:
            return value.value
        return _message_dict(value)
    if kind == FieldDescriptor.TYPE_ENUM:
        named = descriptor.enum_type.values_by_number.get(value)
        return named.name if named is not None else value
    if kind in _WIDE:
        return str(value)
    return value


_text_cache: tuple[int, str] = (-1, "")


def _timestamp_text(seconds: int, nanos: int) -> str:
    """As protojson writes a Timestamp: 0, 3, 6 or 9 fraction digits."""
    global _text_cache
    cached_seconds, head = _text_cache
    if cached_seconds != seconds:
        head = rfc3339(seconds * 1_000_000_000)[:19]
        _text_cache = (seconds, head)
    if nanos == 0:
        return head + "Z"
    if nanos % 1_000_000 == 0:
        return f"{head}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{head}.{nanos // 1_000:06d}Z"
    return f"{head}.{nanos:09d}Z"


class JsonLines:
    """GetFlowsResponse messages -> ``weft observe -o json`` lines, exactly the text of
    ``json_line(message_to_response(m))`` at a fraction of its cost: a flow's fields other than
    its time and l4 are turned into JSON once per distinct value (their serialized bytes are the
    key) and reused; only time and l4 (ports) are written per flow. Anything but a flow takes
    the plain path."""

    MAX_KINDS = 4096

    def __init__(self) -> None:
        self._rest: dict[bytes, tuple[str, str]] = {}
        self._by_bytes: dict[bytes, str] = {}  # a flow's bytes after its time -> its text after its time
        self._l4: dict[bytes, str] = {}
        self._numbers = {f.name: f.number for f in flow_pb2.Flow.DESCRIPTOR.fields}
        self._l4_number = flow_pb2.Flow.DESCRIPTOR.fields_by_name["l4"].number

    def line(self, message: Any) -> str:
        if not message.HasField("flow"):
            response = message_to_response(message)
            return _json_text(response.get("flow", response))
        flow = message.flow
        parts = []
        if flow.HasField("time"):
            stamp = flow.time
            parts.append('"time":"' + _timestamp_text(stamp.seconds, stamp.nanos) + '"')
            flow.ClearField("time")
        l4_text = ""
        if flow.HasField("l4"):
            l4_key = flow.l4.SerializeToString()
            l4_text = self._l4.get(l4_key, "")
            if not l4_text:
                if len(self._l4) >= self.MAX_KINDS:
                    self._l4.clear()
                l4_text = self._l4[l4_key] = '"l4":' + _json_text(_message_dict(flow.l4))
            flow.ClearField("l4")
        key = flow.SerializeToString()
        rest = self._rest.get(key)
        if rest is None:
            if len(self._rest) >= self.MAX_KINDS:
                self._rest.clear()
            before: list[str] = []
            after: list[str] = []
            for name, value in _message_dict(flow).items():
                (before if self._numbers[name] < self._l4_number else after).append(
                    _json_text(name) + ":" + _json_text(value))
            rest = self._rest[key] = (",".join(before), ",".join(after))
        if rest[0]:
            parts.append(rest[0])
        if l4_text:
            parts.append(l4_text)
        if rest[1]:
            parts.append(rest[1])
        return "{" + ",".join(parts) + "}"


    def batch_lines(self, blob: bytes) -> list[Any]:
        """A serialized FlowBatch (``repeated GetFlowsResponse responses = 1``) -> per response,
        its line (a flow) or its message (anything else: lost events, node notices, for the
        caller to show). A flow whose bytes but its leading time were seen before is written
        from its cached text, without parsing it; any other takes :meth:`line`."""
        out: list[Any] = []
        append = out.append
        by_bytes = self._by_bytes
        pos, end = 0, len(blob)
        while pos < end:
            if blob[pos] != 0x0A:
                return [self._or_message(m) for m in _batch_responses(blob)]
            length, pos = _read_varint(blob, pos + 1)
            response_end = pos + length
            text = None
            # A flow response: field 1 (flow) first; its first field the time (1), as a flow's
            # fields come in number order (Hubble's, weft's servers).
            if length > 2 and blob[pos] == 0x0A:
                flow_length, flow_start = _read_varint(blob, pos + 1)
                flow_end = flow_start + flow_length
                if flow_start < flow_end and blob[flow_start] == 0x0A:
                    stamp_length, stamp_start = _read_varint(blob, flow_start + 1)
                    rest_start = stamp_start + stamp_length
                    # The key: the flow's other fields and everything after the flow (node name, time).
                    cached = by_bytes.get(blob[rest_start:flow_end])
                    if cached is not None and _only_time_after(blob, flow_end, response_end):
                        seconds, nanos = _timestamp_fields(blob, stamp_start, rest_start)
                        text = '{"time":"' + _timestamp_text(seconds, nanos) + '"' + cached
            if text is None:
                message = observer_pb2.GetFlowsResponse.FromString(blob[pos:response_end])
                text = self._or_message(message)
                if isinstance(text, str) and message.HasField("flow") and text.startswith('{"time":"'):
                    self._remember(blob, pos, response_end, text)
            append(text)
            pos = response_end
        return out

    def _or_message(self, message: Any) -> Any:
        if message.HasField("flow") or message.HasField("lost_events"):
            return self.line(message)
        return message

    def _remember(self, blob: bytes, pos: int, response_end: int, text: str) -> None:
        """Keep a flow's text after its time, keyed by the bytes after its time field."""
        flow_length, flow_start = _read_varint(blob, pos + 1)
        flow_end = flow_start + flow_length
        if not (blob[pos] == 0x0A and blob[flow_start] == 0x0A and _only_time_after(blob, flow_end, response_end)):
            return
        stamp_length, stamp_start = _read_varint(blob, flow_start + 1)
        close = text.index('"', 9)  # the time's closing quote
        if len(self._by_bytes) >= self.MAX_KINDS:
            self._by_bytes.clear()
        self._by_bytes[blob[stamp_start + stamp_length:flow_end]] = text[close + 1:]


def _batch_responses(blob: bytes) -> list[Any]:
    from weft.hubble.batch import FlowBatch  # batch imports this module

    return list(FlowBatch.FromString(blob).responses)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it)."""
    value = data[pos]
    if value < 0x80:
        return value, pos + 1
    value &= 0x7F
    shift = 7
    while True:
        pos += 1
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos + 1
        shift += 7


def _timestamp_fields(data: bytes, start: int, end: int) -> tuple[int, int]:
    """A Timestamp's bytes -> (seconds, nanos)."""
    seconds = nanos = 0
    pos = start
    while pos < end:
        tag = data[pos]
        value, pos = _read_varint(data, pos + 1)
        if tag == 0x08:
            seconds = value
        elif tag == 0x10:
            nanos = value
    return seconds, nanos


_NODE_NAME_TAG = b"\xc2\x3e"  # field 1000, length-delimited
_RESPONSE_TIME_TAG = b"\xca\x3e"  # field 1001, length-delimited


def _only_time_after(data: bytes, pos: int, end: int) -> bool:
    """After the flow, a response has only its node name and time (not shown by -o json): the
    cached text holds for it whatever they are."""
    while pos < end:
        tag = data[pos:pos + 2]
        if tag not in (_NODE_NAME_TAG, _RESPONSE_TIME_TAG):
            return False
        length, pos = _read_varint(data, pos + 2)
        pos += length
    return pos == end


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))  # as weft.observe.output.json_line


def response_time_ns(response: Mapping[str, Any]) -> int:
    """When a response dict was observed (0 if it does not say): the relay's merge key."""
    try:
        return parse_time(str(response.get("time", "")))
    except ValueError:
        return 0


def message_time_ns(message: Any) -> int:
    return int(message.time.ToNanoseconds()) if message.HasField("time") else 0


# ---------------------------------------------------------------------- filters
# Hubble field -> the weft FlowFilter field it maps to, for plain string lists.
_STRING_FIELDS = {
    "source_ip": "from_ip", "destination_ip": "to_ip",
    "source_pod": "from_pod", "destination_pod": "to_pod",
    "source_fqdn": "from_fqdn", "destination_fqdn": "to_fqdn",
    "source_label": "from_label", "destination_label": "to_label",
    "source_port": "from_port", "destination_port": "to_port",
    "protocol": "protocol", "node_name": "node_name",
}
_HANDLED = {*_STRING_FIELDS, "verdict", "drop_reason_desc", "traffic_direction", "event_type",
            "source_identity", "destination_identity"}
_EVENT_TYPE_BY_NUMBER = {number: name for name, number in EVENT_TYPE_NAMES.items()}
_SUBTYPE_BY_NUMBER = {number: name for _point, (number, name) in OBSERVATION_POINTS.items()}


@dataclass(frozen=True)
class FilterLists:
    """GetFlowsRequest's whitelist and blacklist as weft filters: a flow passes when the
    whitelist is empty or one of its filters matches, and no blacklist filter matches.
    Lost-event notices always pass."""

    allow: tuple[FlowFilter, ...] = ()
    deny: tuple[FlowFilter, ...] = field(default_factory=tuple)

    def keep(self, response: Mapping[str, Any]) -> bool:
        flow = response.get("flow")
        if flow is None:
            return True
        if self.allow and not any(f.matches(flow) for f in self.allow):
            return False
        return not any(f.matches(flow) for f in self.deny)


def filter_from_message(message: Any, where: str = "filter") -> FlowFilter:
    """One ``flow.FlowFilter`` -> a weft FlowFilter; :class:`UnsupportedFilter` names a field weft
    cannot apply, :class:`weft.observe.filters.FilterError` a value that means nothing."""
    for descriptor, _value in message.ListFields():
        if descriptor.name not in _HANDLED:
            raise UnsupportedFilter(f"{where}: FlowFilter field {descriptor.name!r} is not supported by weft; "
                                    f"supported: {', '.join(sorted(_HANDLED))}")
    values: dict[str, tuple[str, ...]] = {}
    for hubble_name, weft_name in _STRING_FIELDS.items():
        items = tuple(str(v) for v in getattr(message, hubble_name))
        if items:
            values[weft_name] = values.get(weft_name, ()) + items
    if message.verdict:
        values["verdict"] = tuple(flow_pb2.Verdict.Name(v) for v in message.verdict)
    if message.drop_reason_desc:
        values["drop_reason_desc"] = tuple(flow_pb2.DropReason.Name(v) for v in message.drop_reason_desc)
    if message.traffic_direction:
        directions = []
        for v in message.traffic_direction:
            if v == flow_pb2.TRAFFIC_DIRECTION_UNKNOWN:
                raise UnsupportedFilter(f"{where}: traffic_direction TRAFFIC_DIRECTION_UNKNOWN matches no weft flow")
            directions.append(flow_pb2.TrafficDirection.Name(v).lower())
        values["traffic_direction"] = tuple(directions)
    if message.event_type:
        values["type"] = tuple(_event_type_name(e, where) for e in message.event_type)
    if message.source_identity or message.destination_identity:
        if message.source_identity and message.destination_identity:
            # weft's identity filter is either-side only: both sides at once cannot be expressed.
            raise UnsupportedFilter(f"{where}: source_identity together with destination_identity is not "
                                    "supported by weft (use two filters)")
        # weft's --identity matches either side; narrowed to one side by _SideIdentity below.
        values["identity"] = tuple(str(v) for v in (message.source_identity or message.destination_identity))
    made = FlowFilter(**values)
    made.validate()
    if message.source_identity:
        return _SideIdentity(**_as_kwargs(made), side="source")
    if message.destination_identity:
        return _SideIdentity(**_as_kwargs(made), side="destination")
    return made


@dataclass(frozen=True)
class _SideIdentity(FlowFilter):
    """A FlowFilter whose identity values apply to one side only (Hubble's source_identity /
    destination_identity; weft's own --identity matches either side)."""

    side: str = "source"

    def matches(self, flow: Mapping[str, Any]) -> bool:
        endpoint = flow.get(self.side) or {}
        if str(endpoint.get("identity", "")) not in self.identity:
            return False
        return self._others.matches(flow)

    @cached_property
    def _others(self) -> FlowFilter:
        """The same filter without its identity values (made once: it is asked for every flow)."""
        return FlowFilter(**{f.name: getattr(self, f.name) for f in fields(FlowFilter) if f.name != "identity"})


def _as_kwargs(made: FlowFilter) -> dict[str, tuple[str, ...]]:
    return {f.name: getattr(made, f.name) for f in fields(FlowFilter)}


def _event_type_name(message: Any, where: str) -> str:
    name = _EVENT_TYPE_BY_NUMBER.get(int(message.type))
    if name is None:
        raise UnsupportedFilter(f"{where}: event_type {message.type} is not one weft produces; "
                                + ", ".join(f"{n}={t}" for n, t in EVENT_TYPE_NAMES.items()))
    if not message.match_sub_type:
        return name
    sub = _SUBTYPE_BY_NUMBER.get(int(message.sub_type)) if name == "trace" else None
    if sub is None:
        raise UnsupportedFilter(f"{where}: event_type {message.type} sub_type {message.sub_type} is not one weft "
                                "produces; trace sub-types: "
                                + ", ".join(f"{n}={s}" for s, n in _SUBTYPE_BY_NUMBER.items()))
    return f"{name}:{sub}"


def lists_from_request(request: Any) -> FilterLists:
    """A GetFlowsRequest's whitelist/blacklist -> weft filters (errors name the list and index)."""
    try:
        allow = tuple(filter_from_message(m, f"whitelist[{i}]") for i, m in enumerate(request.whitelist))
        deny = tuple(filter_from_message(m, f"blacklist[{i}]") for i, m in enumerate(request.blacklist))
    except FilterError as exc:
        raise UnsupportedFilter(str(exc)) from exc
    return FilterLists(allow, deny)


# weft's either-side fields -> (source-side Hubble field, destination-side Hubble field).
_EITHER_SIDE = {
    "pod": ("source_pod", "destination_pod"), "namespace": ("source_pod", "destination_pod"),
    "label": ("source_label", "destination_label"), "ip": ("source_ip", "destination_ip"),
    "fqdn": ("source_fqdn", "destination_fqdn"), "port": ("source_port", "destination_port"),
    "identity": ("source_identity", "destination_identity"),
}
_ONE_SIDE = {
    "from_pod": "source_pod", "to_pod": "destination_pod", "from_namespace": "source_pod",
    "to_namespace": "destination_pod", "from_label": "source_label", "to_label": "destination_label",
    "from_ip": "source_ip", "to_ip": "destination_ip", "from_fqdn": "source_fqdn", "to_fqdn": "destination_fqdn",
    "from_port": "source_port", "to_port": "destination_port", "protocol": "protocol", "node_name": "node_name",
}


def filter_to_messages(weft: FlowFilter) -> list[Any]:
    """One weft FlowFilter -> the Hubble FlowFilters whose OR means the same (empty list for an
    empty filter). Namespaces become pod filters ``ns/`` as ``hubble observe --namespace`` sends."""
    if weft.empty():
        return []
    base: dict[str, list[Any]] = {}

    def add(name: str, items: Iterable[Any]) -> None:
        base.setdefault(name, []).extend(items)

    for name, hubble in _ONE_SIDE.items():
        values = getattr(weft, name)
        if values:
            add(hubble, [f"{v}/" for v in values] if name.endswith("namespace") else values)
    if weft.verdict:
        add("verdict", [flow_pb2.Verdict.Value(v.upper()) for v in weft.verdict])
    if weft.drop_reason_desc:
        reasons = []
        for v in weft.drop_reason_desc:
            try:
                reasons.append(flow_pb2.DropReason.Value(v.upper()))
            except ValueError:
                raise FilterError(f"--drop-reason-desc {v!r} is not a drop reason weft reports; valid: "
                                  + ", ".join(flow_pb2.DropReason.keys())) from None
        add("drop_reason_desc", reasons)
    if weft.traffic_direction:
        add("traffic_direction", [flow_pb2.TrafficDirection.Value(v.upper()) for v in weft.traffic_direction])
    if weft.type:
        add("event_type", [_event_type_message(v) for v in weft.type])
    # Either-side fields: every combination of sides, so the OR of the filters is weft's AND of ORs.
    either = [(name, getattr(weft, name)) for name in _EITHER_SIDE if getattr(weft, name)]
    out = []
    for sides in itertools.product((0, 1), repeat=len(either)):
        chosen = {k: list(v) for k, v in base.items()}
        for (name, values), side in zip(either, sides, strict=True):
            items: list[Any] = [f"{v}/" for v in values] if name == "namespace" else list(values)
            if name == "identity":
                items = [int(v) for v in values]
            chosen.setdefault(_EITHER_SIDE[name][side], []).extend(items)
        message = flow_pb2.FlowFilter()
        for key, items in chosen.items():
            if key == "event_type":
                message.event_type.extend(items)
            else:
                getattr(message, key).extend(items)
        out.append(message)
    return out


def _event_type_message(value: str) -> Any:
    kind, _, sub = value.lower().partition(":")
    message = flow_pb2.EventTypeFilter(type=EVENT_TYPE_NAMES[kind])
    if sub:
        point = {name: number for _p, (number, name) in OBSERVATION_POINTS.items()}[sub]
        message.match_sub_type = True
        message.sub_type = point
    return message


def filters_to_lists(filters: Filters) -> tuple[list[Any], list[Any]]:
    """weft's include/exclude filters -> GetFlowsRequest's (whitelist, blacklist)."""
    return filter_to_messages(filters.include), filter_to_messages(filters.exclude)


def request(filters: Filters, *, number: int = 0, first: bool = False, follow: bool = False,
            since: str | None = None, until: str | None = None) -> Any:
    """A GetFlowsRequest as ``weft observe`` sends it."""
    whitelist, blacklist = filters_to_lists(filters)
    message = observer_pb2.GetFlowsRequest(number=number, first=first, follow=follow)
    message.whitelist.extend(whitelist)
    message.blacklist.extend(blacklist)
    if since:
        message.since.FromNanoseconds(parse_time(since))
    if until:
        message.until.FromNanoseconds(parse_time(until))
    return message


def merge_sorted(batches: Sequence[Sequence[Response]]) -> list[Response]:
    """Responses of several nodes, oldest first (stable: one node's order is kept on ties)."""
    return sorted((r for batch in batches for r in batch), key=response_time_ns)
