"""Flows in batches between weft's own gRPC hops (a node -> the relay -> ``weft observe``).

Hubble's GetFlows sends one flow per message; gRPC in Python moves about 14,000 messages a
second per stream on this kind of machine, far below what a node's datapath reports. weft's
Observers (nodes and relay) therefore also serve ``/weft.hubble.Batches/GetFlowBatches``: the
same GetFlowsRequest, answered by messages that each hold many GetFlowsResponses (a
``FlowBatch``: ``repeated observer.GetFlowsResponse responses = 1``, the wire format of a
concatenation of length-prefixed responses). Hubble's GetFlows stays as it is for every Hubble
client; weft's clients fall back to it against a server without batches (UNIMPLEMENTED).

A flow the agent's reader made from a template (:class:`weft.observe.flow.FlowResponse`) is
serialized from its template's bytes plus its time and ports, and kept on the response: every
follower of the node reuses the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from weft.hubble import convert
from weft.hubble.proto import observer_pb2
from weft.observe.flow import EventFlow, parse_time

SERVICE = "weft.hubble.Batches"
METHOD = "GetFlowBatches"
PATH = f"/{SERVICE}/{METHOD}"
MAX_BATCH_BYTES = 1 << 20  # well under gRPC's default 4 MiB message limit
MAX_BATCH_FLOWS = 2000


def _batch_class() -> Any:
    pool = descriptor_pool.Default()
    name = "weft/hubble/flow_batch.proto"
    try:
        pool.FindFileByName(name)
    except KeyError:
        file = descriptor_pb2.FileDescriptorProto(name=name, package=SERVICE.rpartition(".")[0], syntax="proto3",
                                                  dependency=[observer_pb2.DESCRIPTOR.name])
        message = file.message_type.add(name="FlowBatch")
        message.field.add(name="responses", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                          label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
                          type_name=".observer.GetFlowsResponse")
        pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("weft.hubble.FlowBatch"))


FlowBatch: Any = _batch_class()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = [_varint(v) for v in range(1 << 14)]  # ports, lengths: one list index


def varint(value: int) -> bytes:
    """A protobuf varint of a non-negative number."""
    if value < 0x4000:
        return _SMALL_VARINTS[value]
    if value < 1 << 35:  # nanoseconds, seconds of a day: five bytes at most, no loop
        b = [(value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, (value >> 14) & 0x7F]
        if value >= 1 << 21:
            b[2] |= 0x80
            b.append((value >> 21) & 0x7F)
            if value >= 1 << 28:
                b[3] |= 0x80
                b.append(value >> 28)
        return bytes(b)
    return _varint(value)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, bytes."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def frame(wires: Iterable[bytes]) -> bytes:
    """Serialized GetFlowsResponses -> one serialized FlowBatch."""
    parts: list[bytes] = []
    append = parts.append
    for wire in wires:
        append(b"\x0a")
        append(varint(len(wire)))
        append(wire)
    return b"".join(parts)


def batches(wires: Iterable[bytes]) -> Iterable[bytes]:
    """Serialized responses -> FlowBatches within MAX_BATCH_BYTES / MAX_BATCH_FLOWS each."""
    chunk: list[bytes] = []
    size = 0
    for wire in wires:
        if chunk and (size + len(wire) > MAX_BATCH_BYTES or len(chunk) >= MAX_BATCH_FLOWS):
            yield frame(chunk)
            chunk, size = [], 0
        chunk.append(wire)
        size += len(wire) + 6
    if chunk:
        yield frame(chunk)


# ---------------------------------------------------------------------- a response's bytes
_L4_FIELDS = {"TCP": 1, "UDP": 2, "SCTP": 5}
_NODE_NAME_TAG = varint(1000 << 3 | 2)
_RESPONSE_TIME_TAG = varint(1001 << 3 | 2)
_seconds_cache: tuple[str, int] = ("", 0)
_seconds_bytes: tuple[int, bytes] = (-1, b"")
L4_KEPT = 4096  # a template's serialized l4 per ports, before they are forgotten


def _timestamp_ns(ns: int) -> bytes:
    """Nanoseconds since the epoch -> a Timestamp's bytes (as the message path writes them)."""
    global _seconds_bytes
    seconds, nanos = divmod(ns, 1_000_000_000)
    cached_seconds, head = _seconds_bytes
    if cached_seconds != seconds:
        head = b"\x08" + varint(seconds) if seconds else b""
        _seconds_bytes = (seconds, head)  # one tuple: a reader on another thread sees a whole pair
    return head + b"\x10" + varint(nanos) if nanos else head


def _timestamp(text: str) -> bytes | None:
    """``...SS.nnnnnnnnnZ`` -> a Timestamp's bytes; None for any other form (the slow path)."""
    global _seconds_cache
    if not (len(text) == 30 and text[19] == "." and text[29] == "Z"):
        return None
    head = text[:19]
    cached_head, seconds = _seconds_cache
    if cached_head != head:
        seconds = parse_time(head + "Z") // 1_000_000_000
        _seconds_cache = (head, seconds)
    nanos = int(text[20:29])
    return (b"\x08" + varint(seconds) if seconds else b"") + (b"\x10" + varint(nanos) if nanos else b"")


def response_wire(item: Mapping[str, Any] | EventFlow) -> bytes:
    """A response dict or compact flow -> its serialized GetFlowsResponse: from its template when
    the reader made it from one (kept on the item for the next follower), else through the message."""
    wire = getattr(item, "wire", None)
    if wire is not None:
        return wire  # type: ignore[no-any-return]
    kind = getattr(item, "kind", None)
    if type(item) is EventFlow:
        stamp: bytes | None = _timestamp_ns(item.wall_ns)
        template, index = item.kind
        static = template.memo.get(index)
        if static is None:
            static = _static_parts(template, index, item.response())
    else:
        flow = item.get("flow")  # type: ignore[union-attr]
        time_text = str(item.get("time") or "")  # type: ignore[union-attr]
        stamp = _timestamp(time_text) if time_text else None
        if kind is None or flow is None or stamp is None or flow.get("time") != time_text:
            return bytes(convert.response_to_message(item).SerializeToString())  # type: ignore[arg-type]
        template, index = kind
        static = template.memo.get(index)
        if static is None:
            static = _static_parts(template, index, item)  # type: ignore[arg-type]
    rest_bytes, flags, node = static
    l4 = b""
    if template.l4_key is not None:
        ports = item.ports  # type: ignore[union-attr]
        by_ports = template.memo.get("l4")
        if by_ports is None:
            by_ports = template.memo["l4"] = {}
        cached: bytes | None = by_ports.get(ports)
        if cached is None:
            if len(by_ports) >= L4_KEPT:
                by_ports.clear()
            sport, dport = ports
            body = (b"\x08" + varint(sport) if sport else b"") + (b"\x10" + varint(dport) if dport else b"") + flags
            cached = by_ports[ports] = _field(6, _field(_L4_FIELDS[template.l4_key], body))
        l4 = cached
    assert stamp is not None
    flow_bytes = b"\x0a" + varint(len(stamp)) + stamp + rest_bytes + l4
    made = b"".join((b"\x0a", varint(len(flow_bytes)), flow_bytes, node, _RESPONSE_TIME_TAG, varint(len(stamp)),
                     stamp))
    item.wire = made  # type: ignore[union-attr]
    return made


def _static_parts(template: Any, index: int, item: Mapping[str, Any]) -> tuple[bytes, bytes, bytes]:
    """What a template's flow serializes to but its time and l4 (the parts that vary), as the
    message path makes it (its own l4 too when it has no ports: ICMP, other protocols); its TCP
    flags' bytes; the response's node name field. Kept in the template's memo."""
    flow = item["flow"]
    rest = {k: v for k, v in flow.items() if k not in ("time", "l4")}
    own_l4 = b"" if template.l4_key else convert.flow_to_message({"l4": flow["l4"]}).SerializeToString()
    flags = b""
    if template.l4_key == "TCP":
        flags = _field(3, convert.flow_to_message({"l4": {"TCP": {"flags": template.flags}}}).l4.TCP.flags
                       .SerializeToString())
    node_name = str(item.get("node_name") or "").encode()
    node = _NODE_NAME_TAG + varint(len(node_name)) + node_name if node_name else b""
    static = template.memo[index] = (convert.flow_to_message(rest).SerializeToString() + own_l4, flags, node)
    return static


def message_wire(message: Any) -> bytes:
    out: bytes = message.SerializeToString()
    return out
