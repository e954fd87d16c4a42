"""NetworkPolicy ipBlock and CNP toCIDRSet with real addresses beyond the node (the lab's
world), and Cilium's meaning for pod addresses: a CIDR rule selects addresses outside the
cluster's endpoints; a pod's address is the pod's identity, not the CIDR's (as in Cilium, whose
conformance runs skip the upstream ipBlock-on-pod-IP cases for this reason)."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import pytest

from weft.lab.cluster import Lab, PodInfo
from weft.lab.probe import probe

from conftest import one_node_lab
from labutil import pod_name

APP1, APP2, OTHER = "198.51.100.10", "198.51.100.11", "203.0.113.10"
APP1_V6, APP2_V6 = "2001:db8:100::10", "2001:db8:100::11"


@pytest.fixture(scope="module")
def world_lab() -> Iterator[Lab]:
    yield from one_node_lab("b", world=True)


def apply(lab: Lab, text: str) -> None:
    lab.client(lab.load().nodes[0]).call("policy.apply", {"files": [{"name": "p.yaml", "text": text}]})


def delete(lab: Lab, text: str) -> None:
    lab.client(lab.load().nodes[0]).call("policy.delete", {"files": [{"name": "p.yaml", "text": text}]})


@pytest.fixture
def pods(world_lab: Lab) -> Iterator[tuple[PodInfo, PodInfo]]:
    client = world_lab.pod_add(f"default/{pod_name('cl')}", labels={"app": "client"})
    server = world_lab.pod_add(f"default/{pod_name('sv')}", labels={"app": "server"}, serve=["tcp:80"])
    try:
        yield client, server
    finally:
        world_lab.pod_del(client.key)
        world_lab.pod_del(server.key)


NETPOL = textwrap.dedent("""\
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata:
      name: egress-blob-range
      namespace: default
    spec:
      podSelector:
        matchLabels:
          app: client
      policyTypes: [Egress]
      egress:
      - to:
        - ipBlock:
            cidr: 198.51.100.0/24
            except: [198.51.100.11/32]
        - ipBlock:
            cidr: 2001:db8:100::/64
            except: [2001:db8:100::11/128]
        - ipBlock:
            cidr: 10.244.0.0/16
        ports:
        - port: 80
          protocol: TCP
    """)


def test_netpol_ipblock_with_except_on_world_addresses(world_lab: Lab, pods: tuple[PodInfo, PodInfo]) -> None:
    client, server = pods
    assert probe(client.netns, "tcp", APP2, 80).outcome == "connected"
    apply(world_lab, NETPOL)
    try:
        assert probe(client.netns, "tcp", APP1, 80).outcome == "connected"
        assert probe(client.netns, "tcp", APP1_V6, 80).outcome == "connected"
        assert probe(client.netns, "tcp", APP2, 80, timeout=1).outcome == "timeout"  # the except
        assert probe(client.netns, "tcp", APP2_V6, 80, timeout=1).outcome == "timeout"
        assert probe(client.netns, "tcp", OTHER, 80, timeout=1).outcome == "timeout"  # outside the block
        assert probe(client.netns, "tcp", APP1, 443, timeout=1).outcome == "timeout"  # port
        # Cilium's meaning: the pod CIDR block does not select the pod (its address is the pod's
        # identity, which no rule allows).
        v4 = next(a for a in server.addresses if ":" not in a)
        assert probe(client.netns, "tcp", v4, 80, timeout=1).outcome == "timeout"
    finally:
        delete(world_lab, NETPOL)


CNP = textwrap.dedent("""\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata:
      name: to-cidrset
      namespace: default
    spec:
      endpointSelector:
        matchLabels:
          app: client
      egress:
      - toCIDRSet:
        - cidr: 198.51.100.0/24
          except: [198.51.100.10/32]
      - toCIDR: [203.0.113.10/32]
        toPorts:
        - ports:
          - port: "443"
            protocol: TCP
    """)


def test_cnp_tocidrset_and_tocidr_on_world_addresses(world_lab: Lab, pods: tuple[PodInfo, PodInfo]) -> None:
    client, _ = pods
    apply(world_lab, CNP)
    try:
        assert probe(client.netns, "tcp", APP2, 80).outcome == "connected"
        assert probe(client.netns, "tcp", APP1, 80, timeout=1).outcome == "timeout"
        assert probe(client.netns, "tcp", OTHER, 443).outcome == "connected"
        assert probe(client.netns, "tcp", OTHER, 80, timeout=1).outcome == "timeout"
    finally:
        delete(world_lab, CNP)
