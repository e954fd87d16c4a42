"""Two node Observers (real gRPC servers on unix sockets, fed flow rings) behind a relay: flows of
both merged in time order, filters applied server-side, follow, ServerStatus, GetNodes, and an
unreachable node reported. Clients are the stubs generated from proto/."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from weft.hubble import convert, server
from weft.hubble.proto import flow_pb2, observer_grpc, observer_pb2, relay_pb2
from weft.hubble.relay import Peer, Relay
from weft.observe.flow import rfc3339
from weft.observe.ring import FlowRing

from labutil import wait_until

T0 = 1_790_000_000_000_000_000


def _response(node: str, i: int, port: int, verdict: str = "FORWARDED") -> dict[str, Any]:
    when = rfc3339(T0 + i * 1_000_000)
    flow = {"time": when, "verdict": verdict, "node_name": node, "Type": "L3_L4",
            "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4"},
            "l4": {"UDP": {"source_port": 5000 + i, "destination_port": port}},
            "source": {"identity": 1000, "namespace": "default", "pod_name": f"{node}-pod", "labels": []},
            "destination": {"identity": 2}, "event_type": {"type": 4}}
    return {"flow": flow, "node_name": node, "time": when}


class Cluster:
    """Runs the servers on an event loop of their own thread, as the agent and relay processes do."""

    def __init__(self, tmp: Path) -> None:
        self.rings = {"n1": FlowRing(100), "n2": FlowRing(100)}
        # Interleaved: n1 has even milliseconds, n2 odd ones; n2 also has a drop.
        self.rings["n1"].extend([_response("n1", i, 80) for i in (0, 2, 4, 6)])
        self.rings["n2"].extend([_response("n2", i, 53) for i in (1, 3, 5)] + [_response("n2", 7, 443, "DROPPED")])
        self.peers = [Peer(name, f"unix://{tmp}/{name}.sock") for name in self.rings]
        self.peers.append(Peer("gone", f"unix://{tmp}/gone.sock"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[Any] = []
        self.relay = Relay(self.peers)
        for peer in self.peers[:2]:
            observer = server.NodeObserver(peer.name, self.rings[peer.name], peer.address)
            self.servers.append(self.run(server.serve(observer, [peer.address])))
        self.relay_address = f"unix://{tmp}/relay.sock"
        self.servers.append(self.run(server.serve(self.relay, [self.relay_address])))

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def close(self) -> None:
        for s in self.servers:
            self.run(s.stop(grace=0))
        self.run(self.relay.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    made = Cluster(tmp_path_factory.mktemp("hubble"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture()
def stub(cluster: Cluster) -> Iterator[Any]:
    with grpc.insecure_channel(cluster.relay_address) as channel:
        yield observer_grpc.ObserverStub(channel)


def _flows(stub: Any, request: Any) -> list[Any]:
    return [r for r in stub.GetFlows(request, timeout=10) if r.HasField("flow")]


def test_flows_of_every_node_merged_in_time_order(stub: Any) -> None:
    responses = list(stub.GetFlows(observer_pb2.GetFlowsRequest(), timeout=10))
    statuses = [r for r in responses if r.HasField("node_status")]
    assert [list(s.node_status.node_names) for s in statuses] == [["gone"]]
    assert statuses[0].node_status.state_change == relay_pb2.NODE_UNAVAILABLE
    flows = [r for r in responses if r.HasField("flow")]
    assert [r.node_name for r in flows] == ["n1", "n2"] * 4
    times = [r.time.ToNanoseconds() for r in flows]
    assert times == sorted(times) and len(set(times)) == 8
    last3 = _flows(stub, observer_pb2.GetFlowsRequest(number=3))
    assert [r.flow.l4.UDP.source_port for r in last3] == [5005, 5006, 5007]
    first3 = _flows(stub, observer_pb2.GetFlowsRequest(number=3, first=True))
    assert [r.flow.l4.UDP.source_port for r in first3] == [5000, 5001, 5002]


def test_filters_apply_server_side(stub: Any) -> None:
    allow = _flows(stub, observer_pb2.GetFlowsRequest(whitelist=[flow_pb2.FlowFilter(destination_port=["53"])]))
    assert {r.node_name for r in allow} == {"n2"} and len(allow) == 3
    deny = _flows(stub, observer_pb2.GetFlowsRequest(blacklist=[flow_pb2.FlowFilter(source_pod=["default/n1"])]))
    assert {r.node_name for r in deny} == {"n2"} and len(deny) == 4
    both = _flows(stub, observer_pb2.GetFlowsRequest(
        whitelist=[flow_pb2.FlowFilter(node_name=["n2"])], blacklist=[flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])]))
    assert len(both) == 3 and all(r.flow.verdict == flow_pb2.FORWARDED for r in both)
    since = _flows(stub, observer_pb2.GetFlowsRequest(since=_ts(T0 + 5_500_000)))
    assert [r.flow.l4.UDP.source_port for r in since] == [5006, 5007]


def _ts(ns: int) -> Any:
    request = observer_pb2.GetFlowsRequest()
    request.since.FromNanoseconds(ns)
    return request.since


def test_unsupported_filter_is_invalid_argument(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GetFlows(observer_pb2.GetFlowsRequest(whitelist=[flow_pb2.FlowFilter(http_method=["GET"])]),
                           timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "http_method" in info.value.details()


def test_follow_streams_new_flows_of_both_nodes(cluster: Cluster, stub: Any) -> None:
    # since: flows added before the relay's streams to the nodes are up are not missed.
    call = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True, since=_ts(T0 + 10_000_000), whitelist=[
        flow_pb2.FlowFilter(destination_port=["8080"])]), timeout=20)
    try:
        cluster.rings["n1"].append(_response("n1", 20, 8080))
        cluster.rings["n2"].append(_response("n2", 21, 8080))
        cluster.rings["n2"].append(_response("n2", 22, 9999))  # filtered out
        seen: list[str] = []
        for response in call:
            if response.HasField("flow"):
                seen.append(response.node_name)
            if len(seen) == 2:
                break
        assert sorted(seen) == ["n1", "n2"]
    finally:
        call.cancel()


def test_server_status_and_nodes(cluster: Cluster, stub: Any) -> None:
    status = stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
    assert status.max_flows == 200 and status.num_flows == sum(len(r) for r in cluster.rings.values())
    assert status.seen_flows == sum(r.total for r in cluster.rings.values())
    assert status.num_connected_nodes.value == 2 and status.num_unavailable_nodes.value == 1
    assert list(status.unavailable_nodes) == ["gone"] and status.version.startswith("weft")
    nodes = {n.name: n for n in stub.GetNodes(observer_pb2.GetNodesRequest(), timeout=10).nodes}
    assert nodes["n1"].state == relay_pb2.NODE_CONNECTED and nodes["n2"].state == relay_pb2.NODE_CONNECTED
    assert nodes["gone"].state == relay_pb2.NODE_UNAVAILABLE
    assert nodes["n1"].num_flows == len(cluster.rings["n1"])
    # A node's own server: only its numbers, no relay counts.
    with grpc.insecure_channel(cluster.peers[0].address) as channel:
        own = observer_grpc.ObserverStub(channel).ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
    assert own.num_flows == len(cluster.rings["n1"]) and not own.HasField("num_connected_nodes")


def test_in_process_api_for_the_ui(cluster: Cluster) -> None:
    flows = cluster.run(cluster.relay.recent_flows(3))
    assert len(flows) == 3
    times = [convert.response_time_ns(f) for f in flows]
    assert times == sorted(times) and "verdict" in flows[-1]
    assert cluster.run(cluster.relay.node_names()) == ["n1", "n2", "gone"]


def test_field_mask_and_experimental_filters(stub: Any) -> None:
    request = observer_pb2.GetFlowsRequest(number=2)
    request.field_mask.paths.extend(["source.pod_name", "verdict"])
    masked = _flows(stub, request)
    assert len(masked) == 2 and all(r.flow.source.pod_name and not r.flow.HasField("l4") for r in masked)
    bad = observer_pb2.GetFlowsRequest()
    bad.field_mask.paths.append("no_such_field")
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GetFlows(bad, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no_such_field" in info.value.details()
    cel = flow_pb2.FlowFilter()
    cel.experimental.cel_expression.append("true")
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GetFlows(observer_pb2.GetFlowsRequest(whitelist=[cel]), timeout=10))
    assert "'experimental'" in info.value.details()


class QueueSource:
    """The agent's follower queues (weft.agent.flows.Subscription), fed by hand."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.subs: dict[str, Any] = {}

    def subscribe(self, keep: Any, read_first: Any = None, by_kind: bool = False) -> tuple[str, Any, Any]:
        from weft.agent.flows import Subscription

        sub = Subscription(keep, self.capacity, by_kind=by_kind)
        self.subs[str(len(self.subs))] = sub
        return str(len(self.subs) - 1), sub, read_first() if read_first else None

    def unsubscribe(self, sub_id: str) -> None:
        self.subs.pop(sub_id, None)

    def publish(self, responses: list[dict[str, Any]]) -> None:
        for sub in list(self.subs.values()):
            sub.offer(responses)


def test_a_follower_with_a_queue_gets_its_overflow_as_lost_events(tmp_path: Path) -> None:
    ring, source = FlowRing(100), QueueSource(capacity=5)
    ring.append(_response("n1", 0, 80))
    address = f"unix://{tmp_path}/q.sock"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    node = asyncio.run_coroutine_threadsafe(
        server.serve(server.NodeObserver("n1", ring, address, source), [address]), loop).result(10)
    try:
        with grpc.insecure_channel(address) as channel:
            call = observer_grpc.ObserverStub(channel).GetFlows(observer_pb2.GetFlowsRequest(number=1, follow=True),
                                                                timeout=20)
            got = [next(call)]  # the ring's last flow: the follower is subscribed by now
            source.publish([_response("n1", i, 80) for i in range(1, 9)])  # 8 into a queue of 5
            while len(got) < 7:
                got.append(next(call))
            call.cancel()
        kinds = [r.WhichOneof("response_types") for r in got]
        assert kinds == ["flow", "flow", "flow", "flow", "flow", "flow", "lost_events"] or \
            kinds == ["flow", "lost_events", "flow", "flow", "flow", "flow", "flow"]
        lost = next(r for r in got if r.HasField("lost_events")).lost_events
        assert lost.num_events_lost == 3 and lost.source == flow_pb2.HUBBLE_RING_BUFFER
        assert [r.flow.l4.UDP.source_port for r in got if r.HasField("flow")] == [5000, 5001, 5002, 5003, 5004, 5005]
        wait_until("the stream's end to unsubscribe", lambda: not source.subs, timeout=10)
    finally:
        asyncio.run_coroutine_threadsafe(node.stop(grace=0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
