"""A follower gets every flow however small the node's flow ring is: its own queue is fed as flows
are published (filtered at that moment), and what overflows that queue is reported as lost.
Real drops from a real pod, on a node whose flow ring holds 16 flows."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from weft.agent.client import AgentCallError
from weft.lab.cluster import Lab

from conftest import one_node_lab
from labutil import in_netns, wait_until

DENY_ALL_INGRESS = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: sink-closed
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: sink
  ingress:
  - {}
  ingressDeny:
  - fromEntities: [all]
"""

UDP_BURST = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from one_node_lab("fo")


def test_a_follower_is_not_bounded_by_the_flow_ring(lab: Lab) -> None:
    state = lab.load()
    node = state.nodes[0]
    config_path = Path(node.config_path)
    config = json.loads(config_path.read_text())
    config["flows"] = {"ring_capacity": 16}
    config_path.write_text(json.dumps(config))
    lab.stop_agent(state, node.name)
    lab.start_agent(state, node.name)
    client = lab.client(node)
    wait_until("the agent with a 16-flow ring", lambda: client.call("status")["flows"]["ring"]["capacity"] == 16)
    src = lab.pod_add("default/src", labels={"app": "src"})
    sink = lab.pod_add("default/sink", labels={"app": "sink"})
    sink_v4 = next(a for a in sink.addresses if ":" not in a)
    client.call("policy.apply", {"files": [{"name": "sink.yaml", "text": DENY_ALL_INGRESS}]})

    only_drops = {"include": {"type": ["drop"], "to_pod": ["default/sink"]}, "exclude": {}}
    first = client.call("flows.get", {"filters": only_drops, "last": 0, "subscribe": True})
    sub = first["subscription"]
    in_netns(src.netns, sys.executable, "-c", UDP_BURST, sink_v4, "9", "300")
    got: list[dict[str, object]] = []

    def all_there() -> bool:
        got.extend(client.call("flows.get", {"subscription": sub})["responses"])
        return len(got) >= 300

    wait_until("300 drops through the subscription", all_there, timeout=30)
    assert len(got) == 300, "each drop once, nothing else (the filter applies as flows are published)"
    assert all(r["flow"]["verdict"] == "DROPPED" and r["flow"]["destination"]["pod_name"] == "sink" for r in got)
    assert client.call("status")["flows"]["ring"]["stored"] <= 16, "while the ring itself held 16"

    # A subscription nobody polls any more is gone after the agent restarts: the follower is told.
    lab.stop_agent(state, node.name)
    lab.start_agent(state, node.name)
    with pytest.raises(AgentCallError, match="no subscription"):
        lab.client(node).call("flows.get", {"subscription": sub})
