"""``weft relay``: one Observer for the whole lab, as Hubble Relay. It connects to every node's
Observer and serves the same service (on 127.0.0.1:4245 by default, loopback only).

GetFlows without follow asks every node with the same request, sorts what came back by time and
keeps the first/last ``number``; with follow it streams each node's responses as they arrive.
A node that cannot be reached is reported (a ``node_status`` NODE_UNAVAILABLE event in GetFlows,
its state in GetNodes, counted in ServerStatus), never waited for. ``recent_flows`` and
``node_names`` are for in-process callers (the web UI).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from weft.hubble import batch, convert
from weft.hubble.proto import observer_grpc, observer_pb2, relay_pb2
from weft.hubble.server import VERSION, hubble_socket, serve, window

T = TypeVar("T")

log = logging.getLogger("weft.relay")

DEFAULT_ADDRESS = "127.0.0.1:4245"
CALL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Peer:
    name: str
    address: str  # gRPC target: unix:///run/weft/labs/L/n1/hubble.sock


class Relay(observer_grpc.ObserverServicer):  # type: ignore[misc]
    def __init__(self, peers: list[Peer]) -> None:
        self.peers = peers
        self.started_ns = time.monotonic_ns()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Future[None]] = set()

    def _stub(self, peer: Peer) -> Any:
        channel = self._channels.get(peer.name)
        if channel is None:
            channel = grpc.aio.insecure_channel(peer.address)
            self._channels[peer.name] = channel
        return observer_grpc.ObserverStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    def _forget(self, peer: Peer) -> None:
        """Drop a peer's channel after a failure: the next call dials afresh, instead of waiting
        out gRPC's reconnect backoff while a restarted agent is already serving again."""
        channel = self._channels.pop(peer.name, None)
        if channel is not None:
            closing = asyncio.ensure_future(channel.close())
            self._closing.add(closing)  # held until done: a task nobody references may be collected
            closing.add_done_callback(self._closing.discard)

    async def _collect(self, peer: Peer, request: Any) -> list[Any]:
        try:
            return [r async for r in self._stub(peer).GetFlows(request, timeout=CALL_TIMEOUT_S)]
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                self._forget(peer)
            raise

    async def GetFlows(self, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            window(request)  # refuse what a node would refuse, once, with the same message
        except (convert.UnsupportedFilter, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        if request.follow:
            async for response in self._follow(request):
                yield response
            return
        results = await asyncio.gather(*(self._collect(p, request) for p in self.peers), return_exceptions=True)
        merged: list[Any] = []
        unavailable: list[str] = []
        for peer, result in zip(self.peers, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError) and result.code() == grpc.StatusCode.INVALID_ARGUMENT:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{peer.name}: {result.details()}")
                return
            if isinstance(result, BaseException):
                unavailable.append(peer.name)
                continue
            merged.extend(result)
        if unavailable:
            yield _node_status(unavailable, "unreachable")
        merged.sort(key=convert.message_time_ns)  # stable: each node's own order is kept on ties
        number = int(request.number)
        if number:
            merged = merged[:number] if request.first else merged[-number:]
        for response in merged:
            yield response

    async def _follow(self, request: Any) -> AsyncIterator[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=10000)

        async def pump(peer: Peer) -> None:
            try:
                async for response in self._stub(peer).GetFlows(request):
                    await queue.put(response)
            except grpc.aio.AioRpcError as exc:
                self._forget(peer)
                await queue.put(_node_status([peer.name], exc.details() or str(exc.code())))

        async for item in _fan_in(queue, [pump(p) for p in self.peers]):
            yield item

    async def GetFlowBatches(self, request: Any, context: Any) -> AsyncIterator[bytes]:
        """GetFlows in FlowBatches (:mod:`weft.hubble.batch`). Following, each node's batches are
        passed on as they come, never parsed here (a node without batches is followed with
        GetFlows, each response a batch of one); else GetFlows' merged answer, batched."""
        try:
            window(request)
        except (convert.UnsupportedFilter, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        if not request.follow:
            wires = [batch.message_wire(m) async for m in self.GetFlows(request, context)]
            for blob in batch.batches(wires):
                yield blob
            return
        # Bounded: a slow client holds the nodes' streams back (their own queues then count losses).
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)

        async def pump(peer: Peer) -> None:
            try:
                try:
                    async for blob in self._batch_stub(peer)(request):
                        await queue.put(blob)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    async for response in self._stub(peer).GetFlows(request):
                        await queue.put(batch.frame([batch.message_wire(response)]))
            except grpc.aio.AioRpcError as exc:
                self._forget(peer)
                await queue.put(batch.frame([batch.message_wire(
                    _node_status([peer.name], exc.details() or str(exc.code())))]))

        async for item in _fan_in(queue, [pump(p) for p in self.peers]):
            yield item

    def _batch_stub(self, peer: Peer) -> Any:
        self._stub(peer)  # the peer's channel, made if need be
        return self._channels[peer.name].unary_stream(
            batch.PATH, request_serializer=observer_pb2.GetFlowsRequest.SerializeToString)

    async def _statuses(self) -> list[tuple[Peer, Any | None]]:
        async def one(peer: Peer) -> Any | None:
            try:
                return await self._stub(peer).ServerStatus(observer_pb2.ServerStatusRequest(), timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                self._forget(peer)
                return None
        results = await asyncio.gather(*(one(p) for p in self.peers))
        return list(zip(self.peers, results, strict=True))

    async def ServerStatus(self, request: Any, context: Any) -> Any:
        statuses = await self._statuses()
        up = [s for _p, s in statuses if s is not None]
        down = [p.name for p, s in statuses if s is None]
        response = observer_pb2.ServerStatusResponse(
            num_flows=sum(s.num_flows for s in up), max_flows=sum(s.max_flows for s in up),
            seen_flows=sum(s.seen_flows for s in up),
            uptime_ns=max([s.uptime_ns for s in up], default=time.monotonic_ns() - self.started_ns),
            unavailable_nodes=down, version=VERSION)
        response.num_connected_nodes.value = len(up)
        response.num_unavailable_nodes.value = len(down)
        return response

    async def GetNodes(self, request: Any, context: Any) -> Any:
        nodes = []
        for peer, status in await self._statuses():
            node = observer_pb2.Node(name=peer.name, address=peer.address,
                                     state=relay_pb2.NODE_CONNECTED if status else relay_pb2.NODE_UNAVAILABLE)
            if status is not None:
                node.version = status.version
                node.uptime_ns = status.uptime_ns
                node.num_flows = status.num_flows
                node.max_flows = status.max_flows
                node.seen_flows = status.seen_flows
            nodes.append(node)
        return observer_pb2.GetNodesResponse(nodes=nodes)

    # ------------------------------------------------------------------ in-process API (web UI)
    async def recent_flows(self, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` flows of every reachable node, merged, oldest first, as weft's
        Hubble-shaped flow dicts (lost-event notices left out)."""
        if limit <= 0:
            return []
        request = observer_pb2.GetFlowsRequest(number=limit)
        results = await asyncio.gather(*(self._collect(p, request) for p in self.peers), return_exceptions=True)
        merged = [r for result in results if not isinstance(result, BaseException) for r in result
                  if r.HasField("flow")]
        merged.sort(key=convert.message_time_ns)
        return [convert.message_to_flow(r.flow) for r in merged[-limit:]]

    async def node_names(self) -> list[str]:
        return [p.name for p in self.peers]


async def _fan_in(queue: asyncio.Queue[T], pumps: list[Coroutine[Any, Any, None]]) -> AsyncIterator[T]:
    """What the pumps put in ``queue``, as it comes, for as long as the caller reads; the pumps
    are cancelled when the caller stops (the client went away)."""
    tasks = [asyncio.create_task(pump) for pump in pumps]
    try:
        while True:
            yield await queue.get()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _node_status(names: list[str], message: str) -> Any:
    response = observer_pb2.GetFlowsResponse(
        node_status=relay_pb2.NodeStatusEvent(state_change=relay_pb2.NODE_UNAVAILABLE, node_names=names,
                                              message=message))
    response.time.FromNanoseconds(time.time_ns())
    return response


# ---------------------------------------------------------------------- the process
def relay_socket(lab_base: Path) -> Path:
    """Where a lab's relay always listens (TCP 4245 is one per machine; labs may be several)."""
    return lab_base / "relay.sock"


def lab_peers(lab_name: str) -> tuple[list[Peer], Path]:
    """Every node of a lab as a relay peer, and the lab's directory."""
    from weft.lab.cluster import Lab  # the process's entry only: the relay's logic needs no lab

    lab = Lab(lab_name)
    state = lab.load()
    peers = [Peer(n.name, f"unix://{hubble_socket(Path(n.socket_path))}") for n in state.nodes]
    return peers, lab.base


async def run(peers: list[Peer], addresses: list[str], optional: list[str], ui_port: int = 0) -> None:
    """Serve until SIGTERM/SIGINT: on every address of ``addresses``, and on those of
    ``optional`` that are free (a taken 4245 must not keep a second lab without its relay);
    the web UI on 127.0.0.1:``ui_port`` too, unless 0."""
    relay = Relay(peers)
    skipped: list[str] = []
    server = await serve(relay, addresses, optional, skipped)
    for address in optional:
        if address in skipped:
            log.warning("relay not on %s: cannot bind (taken?)", address)
        else:
            log.info("relay on %s", address)
    log.info("relay for %s on %s", ", ".join(p.name for p in peers), ", ".join(addresses))
    ui = None
    if ui_port:
        from weft.ui.server import start_ui  # only a relay with a UI loads aiohttp

        try:
            ui = await start_ui(relay, port=ui_port)
            log.info("web UI on http://127.0.0.1:%d/", ui_port)
        except OSError as exc:  # an observer of the observer: a taken port must not stop the relay
            log.warning("web UI not on port %d: %s", ui_port, exc)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if ui is not None:
        await ui.cleanup()
    await server.stop(grace=0.5)
    await relay.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="weft relay", description="Hubble-compatible relay over a lab's nodes")
    parser.add_argument("--lab", default="weft", help="lab name")
    parser.add_argument("--listen", default=DEFAULT_ADDRESS, help="TCP address (loopback), if free; '' for none")
    parser.add_argument("--ui-port", type=int, default=0, help="serve the web UI on 127.0.0.1:PORT (0: none)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if not 0 <= args.ui_port <= 65535:
        print(f"weft relay: --ui-port {args.ui_port}: a TCP port (1-65535), or 0 for no UI", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = args.listen.rpartition(":")[0].strip("[]")
    if args.listen and host not in ("127.0.0.1", "::1", "localhost"):
        print(f"weft relay: --listen {args.listen}: loopback addresses only (127.0.0.1, ::1)", file=sys.stderr)
        return 2
    try:
        peers, base = lab_peers(args.lab)
    except Exception as exc:
        print(f"weft relay: lab {args.lab!r}: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run(peers, [f"unix://{relay_socket(base)}"], [args.listen] if args.listen else [], args.ui_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())

