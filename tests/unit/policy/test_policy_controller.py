"""The agent's policy controller on an in-memory datapath: what an incremental regeneration
writes (only the endpoints whose policy changed, only the changed entries, the ipcache only when
CIDR identities change and in the safe order), and that what it writes always equals the
endpoint's policy resolved from scratch."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from weft.agent.policy import PolicyController
from weft.agent.state import EP_READY, AgentState, EndpointRecord
from weft.datapath import abi
from weft.datapath.loader import EndpointEntry, NodeDatapath, PolicyMapKey, PolicyMapValue
from weft.types.addresses import IPNetwork
from weft.types.labels import pod_labels


class _Map(dict[bytes, Any]):
    """A BPF hash map stand-in keyed by the key's bytes, as the kernel keys it."""

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(bytes(key), value)

    def get(self, key: Any, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(bytes(key), default)

    def delete(self, key: Any) -> bool:
        return self.pop(bytes(key), None) is not None


class MemoryDatapath(NodeDatapath):
    """NodeDatapath's own policy logic over dict maps, logging every policy and ipcache write."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent"), Path("/nonexistent"))
        self._obj = object()  # type: ignore[assignment]
        for name in ("_policy", "_ipcache", "_ct", "_endpoints", "_lxc", "_fqdn"):
            setattr(self, name, _Map())
        self.cidrs: dict[IPNetwork, int] = {}
        self.log: list[tuple[str, Any]] = []

    def ipcache(self) -> dict[IPNetwork, int]:
        return dict(self.cidrs)

    def update_ipcache(self, upsert: Mapping[IPNetwork, int], remove: Iterable[IPNetwork] = ()) -> None:
        for net, ident in upsert.items():
            self.cidrs[net] = ident
            self.log.append(("ipcache+", str(net)))
        for net in remove:
            self.cidrs.pop(net, None)
            self.log.append(("ipcache-", str(net)))

    def apply_endpoint_policy(self, addresses: list[EndpointEntry], flags: int,
                              desired: dict[PolicyMapKey, PolicyMapValue],
                              changed_keys: Any = None) -> dict[str, int]:
        result = super().apply_endpoint_policy(addresses, flags, desired, changed_keys)
        self.log.append(("policy", (addresses[0].ep_id, result["written"], result["deleted"])))
        return result


class Node:
    def __init__(self) -> None:
        self.state = AgentState()
        self.datapath = MemoryDatapath()
        self.controller = PolicyController(self.state, self.datapath, self.entries_of, lambda: None)
        self.names: dict[str, EndpointRecord] = {}

    def entries_of(self, record: EndpointRecord) -> list[EndpointEntry]:
        return [EndpointEntry(ip=ip, ifindex=record.host_ifindex, ep_id=record.ep_id, identity=record.identity,
                              pod_mac="02:00:00:00:00:01", host_mac="02:00:00:00:00:02",
                              policy_flags=self.controller.flags.get(record.ep_id, 0)) for ip in record.ips()]

    def add_pod(self, ns: str, name: str, labels: dict[str, str]) -> EndpointRecord:
        """As the endpoint manager's ADD does: identity, program the new endpoint, regenerate."""
        n = len(self.names) + 1
        self.state.pods[f"{ns}/{name}"] = {"labels": labels, "ports": [{"name": "web", "port": 8080}]}
        ident = self.state.identities.acquire(pod_labels(ns, labels, {"ns": ns}))
        record = EndpointRecord(container_id=f"c{n}", ifname="eth0", netns="/x", network="n", ep_id=n,
                                host_ifname=f"h{n}", addresses=[f"10.0.0.{n}"], pod_namespace=ns, pod_name=name,
                                identity=ident, host_ifindex=100 + n)
        self.state.endpoints[record.key] = record
        self.controller.program(record)
        record.state = EP_READY
        if len(self.controller.repo):
            self.controller.regenerate(exclude=record)
        self.names[f"{ns}/{name}"] = record
        return record

    def apply(self, text: str) -> None:
        self.controller.apply({"files": [{"name": "t.yaml", "text": textwrap.dedent(text)}]})

    def delete(self, text: str) -> None:
        self.controller.delete({"files": [{"name": "t.yaml", "text": textwrap.dedent(text)}]})

    def written(self) -> set[int]:
        """The endpoints whose policy was written since the log was last cleared."""
        return {arg[0] for op, arg in self.datapath.log if op == "policy"}

    def check_matches_from_scratch(self) -> None:
        for record in self.names.values():
            policy = self.controller.resolve(record)
            want = {PolicyMapKey(k.direction, k.identity, k.proto, k.port, k.port_prefix_len): (v.deny, v.rules)
                    for k, v in policy.entries.items()}
            got = {k: (v.deny, self.controller.rules_of_cookie(v.cookie))
                   for k, v in self.datapath.policy_entries(record.ep_id).items()}
            assert got == want, record.pod_name
            want_flags = (abi.EP_F_INGRESS_ENFORCED if policy.ingress_enforced else 0) | (
                abi.EP_F_EGRESS_ENFORCED if policy.egress_enforced else 0)
            enforced = abi.EP_F_INGRESS_ENFORCED | abi.EP_F_EGRESS_ENFORCED
            assert self.controller.flags.get(record.ep_id, 0) & enforced == want_flags


def cnp(name: str, ns: str, spec: str) -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ")
    return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n{body}\n")


X_WEB = cnp("web", "x", """
    endpointSelector: {matchLabels: {app: web}}
    ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts: [{ports: [{port: web}]}]
    - fromCIDR: [192.0.2.0/24]
""")
Y_ALL = cnp("all", "y", """
    endpointSelector: {}
    egress:
    - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: x}}]
""")


def node_with_pods() -> Node:
    node = Node()
    for ns in ("x", "y", "z"):
        node.add_pod(ns, "web", {"app": "web"})
        node.add_pod(ns, "client", {"app": "client"})
    return node


def test_apply_writes_only_the_endpoints_it_selects() -> None:
    node = node_with_pods()
    node.apply(Y_ALL)
    node.check_matches_from_scratch()
    node.datapath.log.clear()
    node.apply(X_WEB)
    written = [arg for op, arg in node.datapath.log if op == "policy"]
    assert [ep for ep, _, _ in written] == [node.names["x/web"].ep_id]
    # The CIDR identity is in the ipcache before the entry that uses it.
    assert [op for op, _ in node.datapath.log] == ["ipcache+", "policy"]
    node.check_matches_from_scratch()
    # Unchanged: nothing written at all.
    node.datapath.log.clear()
    node.apply(X_WEB)
    node.controller.regenerate()
    assert node.datapath.log == []


def test_new_identity_rewrites_only_the_endpoints_whose_rules_select_it() -> None:
    node = node_with_pods()
    node.apply(X_WEB)
    node.apply(Y_ALL)
    node.datapath.log.clear()
    # A second client in x: a new identity that x/web's rule selects; y's pods egress to x too.
    node.add_pod("x", "client2", {"app": "client", "tier": "2"})
    ids = {name: r.ep_id for name, r in node.names.items()}
    assert node.written() == {ids["x/client2"], ids["x/web"], ids["y/web"], ids["y/client"]}
    node.check_matches_from_scratch()
    # A pod with the labels of an existing one brings no new identity: only itself is written.
    node.datapath.log.clear()
    node.add_pod("z", "client2", {"app": "client"})
    assert node.written() == {node.names["z/client2"].ep_id}
    node.check_matches_from_scratch()


def test_delete_and_forget_leave_nothing_behind() -> None:
    node = node_with_pods()
    node.apply(X_WEB)
    node.datapath.log.clear()
    node.delete(X_WEB)
    web = node.names["x/web"]
    assert node.datapath.policy_entries(web.ep_id) == {} and not node.controller.flags.get(web.ep_id)
    # The stale prefix leaves the ipcache after the entries that used it.
    assert [op for op, _ in node.datapath.log] == ["policy", "ipcache-"]
    assert node.datapath.cidrs == {}
    node.apply(X_WEB)
    node.controller.forget(web)
    assert node.datapath.policy_entries(web.ep_id) == {} and web.ep_id not in node.controller.flags
    node.names.pop("x/web")
    node.check_matches_from_scratch()


def test_full_regeneration_repairs_the_datapath() -> None:
    node = node_with_pods()
    node.apply(X_WEB)
    web = node.names["x/web"]
    # Something else deleted the endpoint's entries and the ipcache behind the agent's back.
    node.datapath.delete_endpoint_policy(web.ep_id)
    node.datapath.cidrs.clear()
    node.controller.regenerate()
    assert node.datapath.policy_entries(web.ep_id) == {}  # incremental: nothing it knows changed
    node.controller.regenerate(full=True)
    node.check_matches_from_scratch()
    assert node.datapath.cidrs
