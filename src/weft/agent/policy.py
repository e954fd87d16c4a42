"""The agent's side of network policy: the node's policy repository (persisted with the agent's
state) and its translation into datapath entries for every local endpoint.

Pure policy logic lives in ``weft.policy``; this module only feeds it the node's endpoints and
identities and hands its output (per-endpoint map state, CIDR identities) to the datapath.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from weft.agent.errors import BAD_REQUEST, INVALID_CONFIG, AgentError
from weft.agent.state import EP_READY, AgentState, EndpointRecord
from weft.datapath import abi
from weft.datapath.loader import EndpointEntry, NodeDatapath, PolicyMapKey, PolicyMapValue
from weft.dnsproxy.config import DnsProxySettings, EndpointRules, ProxyRules
from weft.policy import EndpointPolicy, EndpointSubject, Policy, PolicyError, PolicyRepository, load_policies, trace
from weft.policy.selectors import FQDNSelector, fqdn_labels
from weft.types.labels import LabelSet

log = logging.getLogger("weft.agent.policy")
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}


class PolicyController:
    def __init__(self, state: AgentState, datapath: NodeDatapath,
                 entries_of: Callable[[EndpointRecord], list[EndpointEntry]], save: Callable[[], None],
                 proxy: DnsProxySettings | None = None, publish_proxy_rules: Callable[[ProxyRules], None] | None = None,
                 cluster_cidrs: list[str] | None = None) -> None:
        self.state = state
        self.datapath = datapath
        self.entries_of = entries_of
        self.save = save
        self.repo = PolicyRepository()
        self.flags: dict[int, int] = {}
        self.proxy = proxy or DnsProxySettings()
        self.publish_proxy_rules = publish_proxy_rules
        self.cluster_cidrs = list(cluster_cidrs or [])
        # What the DNS proxy is told per endpoint (only endpoints with DNS rules or toFQDNs).
        self.proxy_rules: dict[int, EndpointRules] = {}
        self._published: ProxyRules | None = None
        stored = [p for doc in state.policies for p in self._parse([("agent state", json.dumps(doc))])]
        if stored:
            self.repo.apply(stored)

    # ------------------------------------------------------------------ inputs
    def _parse(self, files: Iterable[tuple[str, str]]) -> list[Policy]:
        policies: list[Policy] = []
        problems: list[str] = []
        for name, text in files:
            try:
                policies.extend(load_policies(text, name))
            except PolicyError as exc:
                problems.extend(str(p) for p in exc.problems)
        if problems:
            raise AgentError(INVALID_CONFIG, f"invalid policy: {len(problems)} problem(s), nothing applied",
                             "\n".join(problems))
        return policies

    @staticmethod
    def _files(p: dict[str, Any]) -> list[tuple[str, str]]:
        files = p.get("files")
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            raise AgentError(BAD_REQUEST, "params.files must be a list of {name, text}")
        return [(str(f.get("name", "<input>")), str(f.get("text", ""))) for f in files]

    def apply(self, p: dict[str, Any]) -> dict[str, Any]:
        policies = self._parse(self._files(p))
        if p.get("dryRun"):
            result = self.repo.plan(policies)
        else:
            result = self.repo.apply(policies)
            self._store()
            self.regenerate()
        return {
            "revision": result.revision,
            "created": ["/".join(k) for k in result.created],
            "configured": ["/".join(k) for k in result.configured],
            "unchanged": ["/".join(k) for k in result.unchanged],
            "notes": [f"{pol.display_name}: {n}" for pol in policies for n in pol.notes],
            "dryRun": bool(p.get("dryRun")),
        }

    def delete(self, p: dict[str, Any]) -> dict[str, Any]:
        policies = self._parse(self._files(p))
        gone = self.repo.delete_policies(policies)
        self._store()
        self.regenerate()
        return {"revision": self.repo.revision, "deleted": ["/".join(k) for k in gone]}

    def _store(self) -> None:
        self.state.policies = [pol.to_dict() for pol in self.repo.policies()]
        self.save()

    def list_policies(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"kind": pol.kind.value, "namespace": pol.namespace, "name": pol.name, "source": pol.source,
                 "revision": self.repo.revision} for pol in self.repo.policies()]

    def get(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        name = str(p.get("name", ""))
        found = self.repo.find(name, p.get("namespace"))
        if not found:
            raise AgentError(BAD_REQUEST, f"no policy named {name!r}")
        return [pol.to_dict() for pol in found]

    # ------------------------------------------------------------------ resolution
    def _identities(self) -> dict[int, LabelSet]:
        return {ident: labels for labels, ident in self.state.identities.by_labels.items()}

    def _named_ports(self, record: EndpointRecord) -> dict[str, tuple[int, int]]:
        meta = self.state.pods.get(f"{record.pod_namespace}/{record.pod_name}", {})
        return {str(x["name"]): (PROTOCOLS.get(str(x.get("protocol", "TCP")).upper(), 6), int(x["port"]))
                for x in meta.get("ports", [])}

    def subject(self, record: EndpointRecord) -> EndpointSubject:
        labels = self.state.identities.labels_of(record.identity) or frozenset()
        return EndpointSubject.of(record.identity, labels, record.pod_namespace, self._named_ports(record))

    def _peer_ports(self) -> dict[int, dict[str, tuple[int, int]]]:
        out: dict[int, dict[str, tuple[int, int]]] = {}
        for record in self.state.endpoints.values():
            out.setdefault(record.identity, {}).update(self._named_ports(record))
        return out

    def resolve(self, record: EndpointRecord, peer_ports: dict[int, dict[str, tuple[int, int]]] | None = None,
                sync: bool = True) -> EndpointPolicy:
        """``sync``: bring the selector cache up to date with the node's identities first (the
        cache applies only the differences); a regeneration does that once for all endpoints."""
        return self.repo.resolve(self.subject(record), self._identities() if sync else None,
                                 peer_ports if peer_ports is not None else self._peer_ports())

    def program(self, record: EndpointRecord, peer_ports: dict[int, dict[str, tuple[int, int]]] | None = None,
                sync: bool = True) -> None:
        """Write one endpoint's policy (entries first, enforcement flags after: see
        NodeDatapath.apply_endpoint_policy). Needs the endpoint's interface (host_ifindex)."""
        if not (self.repo.policies() or self.flags.get(record.ep_id) or self.datapath.policy_entries(record.ep_id)):
            return  # no policy anywhere: nothing to write, and the fast path for CNI ADD
        policy = self.resolve(record, peer_ports, sync)
        flags = (abi.EP_F_INGRESS_ENFORCED if policy.ingress_enforced else 0) | (
            abi.EP_F_EGRESS_ENFORCED if policy.egress_enforced else 0) | (
            abi.EP_F_FQDN if policy.fqdn_selectors and policy.egress_enforced else 0)
        redirect_port = self.proxy.port if self.proxy.enabled else 0
        desired = {PolicyMapKey(k.direction, k.identity, k.proto, k.port, k.port_prefix_len):
                   PolicyMapValue(v.deny, proxy_port=redirect_port if v.redirect else 0)
                   for k, v in policy.entries.items()}
        self.flags[record.ep_id] = flags
        self._note_proxy_rules(record, policy)
        self.datapath.apply_endpoint_policy(self.entries_of(record), flags, desired)
        if not sync:
            return  # a regeneration publishes once, at its end
        self.publish()

    # ------------------------------------------------------------------ DNS proxy
    def _note_proxy_rules(self, record: EndpointRecord, policy: EndpointPolicy) -> None:
        if not (policy.dns_rules or policy.fqdn_selectors) or not policy.egress_enforced:
            self.proxy_rules.pop(record.ep_id, None)
            return
        self.proxy_rules[record.ep_id] = EndpointRules.model_validate({
            "ep_id": record.ep_id, "pod": f"{record.pod_namespace}/{record.pod_name}", "identity": record.identity,
            "addresses": list(record.addresses),
            "dns_rules": [{"peers": None if r.peers is None else sorted(r.peers),
                           "protocol": r.protos[0] if len(r.protos) == 1 else 0, "port": r.first,
                           "end_port": r.last if r.last != r.first else None,
                           "names": [{kind: value} for kind, value in r.names], "rule": r.origin}
                          for r in policy.dns_rules],
            "fqdn_selectors": [{"identity": ident, "selector": {kind: value}}
                               for (kind, value), ident in policy.fqdn_selectors],
        })

    def publish(self) -> None:
        """Hand the DNS proxy its rules when they changed (the proxy keeps the last ones it got
        while the agent is away)."""
        if self.publish_proxy_rules is None:
            return
        rules = ProxyRules(revision=self.repo.revision, cluster_cidrs=self.cluster_cidrs,
                           endpoints=[self.proxy_rules[k] for k in sorted(self.proxy_rules)])
        if self._published is not None and self._published.endpoints == rules.endpoints \
                and self._published.cluster_cidrs == rules.cluster_cidrs:
            return
        self.publish_proxy_rules(rules)
        self._published = rules

    def sync_fqdn_identities(self) -> bool:
        """One node-local identity per toFQDNs selector the policies use (labels
        ``fqdn:<name or pattern>``), kept in the agent's persisted identities so the numbers the
        DNS proxy wrote into weft_fqdn stay valid across restarts. Returns whether any changed."""
        wanted = {fqdn_labels(sel) for sel in self.repo.cache.selectors() if isinstance(sel, FQDNSelector)}
        have = {labels for labels in self.state.identities.by_labels
                if any(label.source == "fqdn" for label in labels)}
        for labels in wanted - have:
            self.state.identities.acquire(labels, local=True)
        for labels in have - wanted:
            self.state.identities.release(self.state.identities.by_labels[labels])
        return wanted != have

    def regenerate(self, exclude: EndpointRecord | None = None) -> None:
        """Every ready endpoint's policy and the node's CIDR identities, after anything that can
        change them: policies, identities (labels), endpoints coming and going."""
        if self.sync_fqdn_identities():
            self.save()
        cidrs = {ipaddress.ip_network(prefix): ident for prefix, ident in self.repo.cidr_identities().items()}
        # New CIDR identities before the entries that use them, stale ones after.
        self.datapath.sync_ipcache({**self._current_ipcache(), **cidrs})
        self.repo.sync_identities(self._identities())
        peer_ports = self._peer_ports()
        for record in self.state.endpoints.values():
            if record.state == EP_READY and record is not exclude:
                self.program(record, peer_ports, sync=False)
        self.datapath.sync_ipcache(cidrs)
        self.publish()

    def _current_ipcache(self) -> dict[Any, int]:
        try:
            return self.datapath.ipcache()
        except Exception:  # a fresh map
            return {}

    def forget(self, record: EndpointRecord) -> None:
        self.flags.pop(record.ep_id, None)
        self.datapath.delete_endpoint_policy(record.ep_id)
        if self.proxy_rules.pop(record.ep_id, None) is not None:
            self.publish()

    def trace(self, p: dict[str, Any], find: Callable[[str], EndpointRecord | None]) -> dict[str, Any]:
        """``weft policy trace``: src and dst are "ns/pod" of this node, or an address."""
        def side(ref: str) -> EndpointSubject | int:
            record = find(ref)
            if record is not None:
                return self.subject(record)
            try:
                return self.repo.identity_of_address(ref)
            except ValueError as exc:
                raise AgentError(BAD_REQUEST, f"{ref!r} is neither a pod of this node nor an address") from exc

        result = trace(self.repo, side(str(p.get("from", ""))), side(str(p.get("to", ""))), int(p.get("port", 0)),
                       str(p.get("protocol", "tcp")), identities=self._identities(), named_ports=self._peer_ports())
        return {"verdict": result.verdict, "lines": result.lines(), "rules": list(result.deciding_rules)}
