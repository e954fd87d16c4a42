"""The lab's Hubble relay over real agents: a two-node lab (its relay started by ``weft lab up``),
UDP between pods on each node, and a client generated from proto/ asking the relay over gRPC:
flows of both nodes merged in time order, whitelist/blacklist applied by the servers, follow
streaming new flows of both nodes, ServerStatus summing the nodes, GetNodes listing them; and
``weft observe`` through the relay."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from weft.hubble.proto import flow_pb2, observer_grpc, observer_pb2, relay_pb2
from weft.hubble.relay import relay_socket
from weft.lab.cluster import Lab, PodInfo

from conftest import unique_lab_name
from labutil import in_netns, wait_until

UDP_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    made = Lab(unique_lab_name("r"))
    try:
        made.up(nodes=2, ip_family="ipv4", world=False)
        yield made
    finally:
        made.down(quiet=True)


@pytest.fixture(scope="module")
def pods(lab: Lab) -> dict[str, PodInfo]:
    nodes = [n.name for n in lab.load().nodes]
    return {f"{role}{i}": lab.pod_add(f"default/{role}{i}", node_name=node, labels={"app": role})
            for i, node in enumerate(nodes, 1) for role in ("client", "server")}


@pytest.fixture()
def stub(lab: Lab) -> Iterator[Any]:
    with grpc.insecure_channel(f"unix://{relay_socket(lab.base)}") as channel:
        yield observer_grpc.ObserverStub(channel)


def send(pods: dict[str, PodInfo], i: int, port: int, count: int = 1) -> None:
    """``count`` datagrams from client<i> to server<i> (one connection: the datapath reports its
    first packet, one flow per send)."""
    in_netns(pods[f"client{i}"].netns, sys.executable, "-c", UDP_SEND, pods[f"server{i}"].addresses[0], str(port),
             str(count))


def flows(stub: Any, **request: Any) -> list[Any]:
    return [r for r in stub.GetFlows(observer_pb2.GetFlowsRequest(**request), timeout=20) if r.HasField("flow")]


def to_port(port: int) -> list[Any]:
    return [flow_pb2.FlowFilter(destination_port=[str(port)])]


def test_flows_of_both_nodes_merged_in_time_order(lab: Lab, pods: dict[str, PodInfo], stub: Any) -> None:
    nodes = {n.name for n in lab.load().nodes}
    send(pods, 1, 7001)
    send(pods, 2, 7001)
    send(pods, 1, 7001)
    got: list[Any] = []

    def both() -> bool:
        got[:] = flows(stub, whitelist=to_port(7001))
        return {r.node_name for r in got} == nodes and len(got) >= 3
    wait_until("flows of both nodes through the relay", both, timeout=15, interval=0.2)
    times = [r.time.ToNanoseconds() for r in got]
    assert times == sorted(times)
    assert all(r.flow.node_name == r.node_name and r.flow.l4.UDP.destination_port == 7001 for r in got)
    last = flows(stub, number=2, whitelist=to_port(7001))
    assert [r.time.ToNanoseconds() for r in last] == times[-2:]


def test_filters_are_applied_by_the_servers(lab: Lab, pods: dict[str, PodInfo], stub: Any) -> None:
    send(pods, 1, 7002)
    send(pods, 2, 7002)
    wait_until("flows to 7002 on both nodes",
               lambda: len({r.node_name for r in flows(stub, whitelist=to_port(7002))}) == 2, timeout=15, interval=0.2)
    only2 = flows(stub, whitelist=to_port(7002), blacklist=[flow_pb2.FlowFilter(source_pod=["default/client1"])])
    assert only2 and {r.flow.source.pod_name for r in only2} == {"client2"}
    either = flows(stub, whitelist=[flow_pb2.FlowFilter(destination_port=["7002"], source_pod=["default/client1"]),
                                    flow_pb2.FlowFilter(destination_port=["7001"], source_pod=["default/client2"])])
    assert {(r.flow.source.pod_name, r.flow.l4.UDP.destination_port) for r in either} == \
        {("client1", 7002), ("client2", 7001)}
    with pytest.raises(grpc.RpcError) as info:
        flows(stub, whitelist=[flow_pb2.FlowFilter(http_method=["GET"])])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "http_method" in info.value.details()


def test_follow_streams_new_flows_of_both_nodes(lab: Lab, pods: dict[str, PodInfo], stub: Any) -> None:
    nodes = {n.name for n in lab.load().nodes}
    call = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True, whitelist=to_port(7003)), timeout=30)
    try:
        seen: set[str] = set()
        # The streams to the nodes open asynchronously: keep sending until both nodes' flows came.
        send(pods, 1, 7003)
        send(pods, 2, 7003)
        for response in call:
            if response.HasField("flow"):
                seen.add(response.node_name)
                assert response.flow.l4.UDP.destination_port == 7003
            if seen == nodes:
                break
            send(pods, 1, 7003)
            send(pods, 2, 7003)
        assert seen == nodes
    finally:
        call.cancel()


def test_server_status_and_nodes(lab: Lab, pods: dict[str, PodInfo], stub: Any) -> None:
    status = stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
    assert status.num_connected_nodes.value == 2 and status.num_unavailable_nodes.value == 0
    assert status.num_flows > 0 and status.seen_flows >= status.num_flows and status.max_flows >= 2
    nodes = stub.GetNodes(observer_pb2.GetNodesRequest(), timeout=10).nodes
    assert sorted(n.name for n in nodes) == sorted(n.name for n in lab.load().nodes)
    assert all(n.state == relay_pb2.NODE_CONNECTED and n.num_flows > 0 for n in nodes)
    assert sum(n.num_flows for n in nodes) <= status.num_flows + 1000  # both counted, taken a moment apart


def test_weft_observe_goes_through_the_relay(lab: Lab, pods: dict[str, PodInfo]) -> None:
    send(pods, 1, 7004)
    send(pods, 2, 7004)
    nodes = {n.name for n in lab.load().nodes}

    def observed() -> list[dict[str, Any]]:
        out = subprocess.run([sys.executable, "-m", "weft.cli.main", "observe", "--lab", lab.name, "-o", "jsonpb",
                              "--all", "--to-port", "7004"], capture_output=True, text=True, timeout=60, check=True)
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    wait_until("weft observe with both nodes", lambda: {r["node_name"] for r in observed()} == nodes, timeout=15,
               interval=0.2)
    # The node's Observer alone, past the relay: only that node's flows.
    one = subprocess.run([sys.executable, "-m", "weft.cli.main", "observe", "--lab", lab.name, "--node",
                          sorted(nodes)[0], "-o", "json", "--all", "--to-port", "7004"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert {json.loads(line)["node_name"] for line in one.stdout.splitlines()} == {sorted(nodes)[0]}


NODE_TCP_STATUS = r"""
import grpc
from weft.hubble.proto import observer_grpc, observer_pb2
with grpc.insecure_channel("127.0.0.1:4244") as channel:
    print(observer_grpc.ObserverStub(channel).ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10).version)
"""


def test_each_node_serves_hubbles_port_in_its_namespace(lab: Lab) -> None:
    for node in lab.load().nodes:
        assert in_netns(node.netns, sys.executable, "-c", NODE_TCP_STATUS).stdout.startswith("weft")
