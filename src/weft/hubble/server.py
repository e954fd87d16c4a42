"""A node's Observer service (Hubble's GetFlows, GetNodes, ServerStatus) over its flow ring,
served with grpc.aio on the agent's event loop: on a unix socket next to the agent's
(``hubble.sock``, as Cilium's), optionally on TCP too.

GetFlows: ``number`` last (or ``first``) flows, everything held for 0; ``since``/``until``
bound by time; ``follow`` keeps streaming what the ring gets (polled: the ring has no
notifications), a follower that fell behind the ring gets a ``HUBBLE_RING_BUFFER`` lost event.
Filters the request cannot express in weft are refused with INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from weft.hubble import batch, convert
from weft.hubble.proto import flow_pb2, observer_grpc, observer_pb2, relay_pb2
from weft.observe import flow as flows
from weft.observe.ring import FlowRing, ReadResult

FOLLOW_POLL_S = 0.1  # a follower of a bare ring (no FlowSource): how often it looks
FOLLOW_IDLE_S = 0.02  # a follower with a queue: how long it sleeps while the queue is empty
FOLLOW_BATCH = 1000
# Hubble's per-node port; the second is for a namespace without IPv6 (the first binds both).
TCP_ADDRESSES = ["[::]:4244", "0.0.0.0:4244"]
VERSION = f"weft {importlib.metadata.version('weft')}"


def hubble_socket(agent_socket: Path) -> Path:
    """Where a node's Observer listens: next to its agent socket."""
    return agent_socket.parent / "hubble.sock"


@dataclass
class Window:
    """What a GetFlowsRequest asks of the history held."""

    keep: Callable[[dict[str, Any]], bool]
    first: int | None
    last: int | None
    mask: Any | None = None  # google.protobuf.FieldMask: the Flow fields to return
    timeless: bool = True  # keep() does not look at time (no since/until): it may answer once per kind

    def message(self, item: dict[str, Any]) -> Any:
        response = convert.response_to_message(item)
        if self.mask is not None and response.HasField("flow"):
            masked = flow_pb2.Flow()
            self.mask.MergeMessage(response.flow, masked)
            response.flow.CopyFrom(masked)
        return response


def window(request: Any) -> Window:
    """A GetFlowsRequest -> what to read; raises UnsupportedFilter / ValueError on bad input."""
    lists = convert.lists_from_request(request)
    since = int(request.since.ToNanoseconds()) if request.HasField("since") else None
    until = int(request.until.ToNanoseconds()) if request.HasField("until") else None

    def keep(item: dict[str, Any]) -> bool:
        if since is not None or until is not None:
            when = convert.response_time_ns(item)
            if (since is not None and when < since) or (until is not None and when > until):
                return False
        return lists.keep(item)

    mask = None
    if request.HasField("field_mask") and request.field_mask.paths:
        if not request.field_mask.IsValidForDescriptor(flow_pb2.Flow.DESCRIPTOR):
            raise ValueError(f"field_mask {list(request.field_mask.paths)} names fields flow.Flow does not have")
        mask = request.field_mask
    number = int(request.number)
    if number == 0:
        # Hubble: no number with --follow means only new flows; without, everything held.
        has_time = since is not None or until is not None
        return Window(keep, None, 0 if request.follow and not has_time else None, mask, not has_time)
    return Window(keep, number if request.first else None, None if request.first else number, mask,
                  since is None and until is None)


class Follower(Protocol):
    """A follower's queue (the agent's ``Subscription``)."""

    def poll(self, max_items: int, compact: bool = False) -> tuple[list[Any], int]: ...


class FlowSource(Protocol):
    """What feeds followers as flows are published (the agent's ``FlowObserver``): a queue per
    follower, so a follower's pace is bounded by its queue, not by the ring."""

    def subscribe(self, keep: Callable[[dict[str, Any]], bool], read_first: Callable[[], Any] | None = None,
                  by_kind: bool = False) -> tuple[str, Follower, Any]: ...

    def unsubscribe(self, sub_id: str) -> None: ...


class NodeObserver(observer_grpc.ObserverServicer):  # type: ignore[misc]
    def __init__(self, node_name: str, ring: FlowRing, address: str = "", source: FlowSource | None = None) -> None:
        self.node_name = node_name
        self.ring = ring
        self.address = address
        self.source = source  # None: followers poll the ring
        self.started_ns = time.monotonic_ns()

    async def GetFlows(self, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            win = window(request)
        except (convert.UnsupportedFilter, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return

        def read_first() -> ReadResult:
            return self.ring.read(after=None, keep=win.keep, first=win.first, last=win.last)

        if request.follow and self.source is not None:
            sub_id, follower, result = self.source.subscribe(win.keep, read_first, by_kind=win.timeless)
            try:
                for item in result.items:
                    yield win.message(item)
                async for item in self._drain(follower):
                    yield win.message(item)
            finally:
                self.source.unsubscribe(sub_id)
            return
        result = read_first()
        for item in result.items:
            yield win.message(item)
        if not request.follow:
            return
        cursor = result.cursor
        while True:
            await asyncio.sleep(FOLLOW_POLL_S)
            news = self.ring.read(after=cursor, keep=win.keep)
            cursor = news.cursor
            if news.missed:
                yield win.message(flows.lost_response(flows.LOST_FLOW_RING, news.missed, self.node_name,
                                                      time.time_ns()))
            for item in news.items:
                yield win.message(item)

    async def GetFlowBatches(self, request: Any, context: Any) -> AsyncIterator[bytes]:
        """GetFlows in FlowBatches (:mod:`weft.hubble.batch`): what GetFlows would stream, many
        responses per message, each serialized once however many followers get it."""
        try:
            win = window(request)
        except (convert.UnsupportedFilter, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        wire = batch.response_wire if win.mask is None else (lambda item: batch.message_wire(win.message(item)))

        def read_first() -> ReadResult:
            return self.ring.read(after=None, keep=win.keep, first=win.first, last=win.last)

        if request.follow and self.source is not None:
            sub_id, follower, result = self.source.subscribe(win.keep, read_first, by_kind=win.timeless)
            try:
                for blob in batch.batches(wire(item) for item in result.items):
                    yield blob
                while True:
                    # Compact flows are serialized from their templates, never made into dicts here.
                    items, lost = follower.poll(batch.MAX_BATCH_FLOWS, compact=win.mask is None)
                    if lost:
                        items.insert(0, flows.lost_response(flows.LOST_FLOW_RING, lost, self.node_name,
                                                            time.time_ns()))
                    if not items:
                        await asyncio.sleep(FOLLOW_IDLE_S)
                        continue
                    for blob in batch.batches(wire(item) for item in items):
                        yield blob
            finally:
                self.source.unsubscribe(sub_id)
            return
        # No queue to follow (a bare ring) or no follow: GetFlows' own stream, batched.
        chunk: list[bytes] = []
        async for message in self.GetFlows(request, context):
            chunk.append(batch.message_wire(message))
            if len(chunk) >= batch.MAX_BATCH_FLOWS or request.follow:  # a follower gets what comes at once
                yield batch.frame(chunk)
                chunk = []
        if chunk:
            yield batch.frame(chunk)

    async def _drain(self, follower: Follower) -> AsyncIterator[dict[str, Any]]:
        """A follower's queue, as it fills. Never blocks the event loop (the agent's API and
        CNI requests share it): polls without waiting, sleeps while empty."""
        while True:
            items, lost = follower.poll(FOLLOW_BATCH)
            if lost:
                yield flows.lost_response(flows.LOST_FLOW_RING, lost, self.node_name, time.time_ns())
            if not items:
                await asyncio.sleep(FOLLOW_IDLE_S)
                continue
            for item in items:
                yield item

    def status(self) -> Any:
        return observer_pb2.ServerStatusResponse(
            num_flows=len(self.ring), max_flows=self.ring.capacity, seen_flows=self.ring.total,
            uptime_ns=time.monotonic_ns() - self.started_ns, version=VERSION)

    async def ServerStatus(self, request: Any, context: Any) -> Any:
        return self.status()

    async def GetNodes(self, request: Any, context: Any) -> Any:
        status = self.status()
        node = observer_pb2.Node(name=self.node_name, version=VERSION, address=self.address,
                                 state=relay_pb2.NODE_CONNECTED, uptime_ns=status.uptime_ns,
                                 num_flows=status.num_flows, max_flows=status.max_flows,
                                 seen_flows=status.seen_flows)
        return observer_pb2.GetNodesResponse(nodes=[node])


async def serve(servicer: Any, addresses: list[str], optional: list[str] | None = None,
                skipped: list[str] | None = None) -> grpc.aio.Server:
    """Start a grpc.aio server for ``servicer`` on every address (``unix:///path``, ``host:port``);
    an ``optional`` address that cannot be bound is skipped (added to ``skipped``, with why)."""
    server = grpc.aio.server()
    observer_grpc.add_ObserverServicer_to_server(servicer, server)
    if hasattr(servicer, batch.METHOD):
        # Bytes out as they are: the servicer yields serialized FlowBatches.
        handler = grpc.unary_stream_rpc_method_handler(
            getattr(servicer, batch.METHOD), request_deserializer=observer_pb2.GetFlowsRequest.FromString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(batch.SERVICE,
                                                                               {batch.METHOD: handler}),))
    for address in addresses:
        if address.startswith("unix://"):
            Path(address.removeprefix("unix://")).unlink(missing_ok=True)
        if _bind(server, address) == 0:
            raise OSError(f"cannot listen on {address}")
    for address in optional or []:
        if _bind(server, address) == 0 and skipped is not None:
            skipped.append(address)
    await server.start()
    return server


def _bind(server: grpc.aio.Server, address: str) -> int:
    try:
        return int(server.add_insecure_port(address))
    except RuntimeError:  # some grpcio versions raise instead of returning 0
        return 0
