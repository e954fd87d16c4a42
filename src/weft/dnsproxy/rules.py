"""The agent's rules, compiled for the query path: who asks, may it ask that, which selectors learn.

Pure (no sockets, no maps): :class:`CompiledRules` is built once per ``rules.json`` revision and
answers, per query, in a dictionary lookup or two. Decisions are memoized per endpoint: a pod asks
for the same few names over and over, and a rule set only changes by being replaced whole.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from weft.dnsproxy.config import DnsRule, EndpointRules, ProxyRules
from weft.fqdn.matchpattern import FqdnPatternError, FqdnSelector
from weft.types.addresses import IPAddress, IPNetwork

PROTO_ANY, PROTO_TCP, PROTO_UDP = 0, 6, 17
# Per endpoint: memoized decisions and selector matches. Past this many, the memo starts over (a
# pod walking random names must not grow the proxy without bound).
MEMO_LIMIT = 4096


class RulesError(ValueError):
    """rules.json cannot be used; the message names the endpoint and the field."""


@dataclass(frozen=True)
class CompiledDnsRule:
    peers: frozenset[int] | None
    protocol: int
    port_low: int  # 0..65535; port 0 = any
    port_high: int
    names: tuple[FqdnSelector, ...]  # empty: every name
    rule: str

    def applies(self, peer_identity: int, protocol: int, port: int) -> bool:
        return ((self.peers is None or peer_identity in self.peers)
                and (self.protocol == PROTO_ANY or self.protocol == protocol)
                and self.port_low <= port <= self.port_high)

    def allows_name(self, qname: str) -> bool:
        return not self.names or any(sel.matches(qname) for sel in self.names)


@dataclass
class CompiledEndpoint:
    ep_id: int
    pod: str
    identity: int
    addresses: tuple[str, ...]
    dns_rules: tuple[CompiledDnsRule, ...]
    selectors: tuple[tuple[int, FqdnSelector], ...]  # (selector identity, selector)
    source: EndpointRules
    _decisions: dict[tuple[int, int, int, str], bool] = field(default_factory=dict, repr=False)
    _selector_ids: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @property
    def selector_identities(self) -> frozenset[int]:
        return frozenset(identity for identity, _ in self.selectors)

    def allows(self, peer_identity: int, protocol: int, port: int, qname: str) -> bool:
        """Whether a query for ``qname`` (normalized) to a peer of ``peer_identity`` on
        ``protocol``/``port`` is allowed: some applying rule allows the name."""
        key = (peer_identity, protocol, port, qname)
        decision = self._decisions.get(key)
        if decision is None:
            decision = any(r.applies(peer_identity, protocol, port) and r.allows_name(qname) for r in self.dns_rules)
            if len(self._decisions) >= MEMO_LIMIT:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    def matching_rule(self, peer_identity: int, protocol: int, port: int, qname: str) -> str:
        """Which rule allowed a query (for reports), or "" if none."""
        for r in self.dns_rules:
            if r.applies(peer_identity, protocol, port) and r.allows_name(qname):
                return r.rule
        return ""

    def selector_ids(self, name: str) -> tuple[int, ...]:
        """Identities of the toFQDNs selectors that match ``name`` (normalized), in rule order."""
        ids = self._selector_ids.get(name)
        if ids is None:
            ids = tuple(dict.fromkeys(identity for identity, sel in self.selectors if sel.matches(name)))
            if len(self._selector_ids) >= MEMO_LIMIT:
                self._selector_ids.clear()
            self._selector_ids[name] = ids
        return ids


def _as_mapping(selector: Mapping[Any, str]) -> Mapping[str, object]:
    return {str(key): value for key, value in selector.items()}


def _compile_rule(ep: EndpointRules, index: int, rule: DnsRule) -> CompiledDnsRule:
    where = f"endpoint {ep.ep_id} ({ep.pod}) dns_rules[{index}]"
    if rule.protocol not in (PROTO_ANY, PROTO_TCP, PROTO_UDP):
        raise RulesError(f"{where}: protocol {rule.protocol} is not 0 (any), 6 (TCP) or 17 (UDP)")
    if rule.port == 0:
        low, high = 0, 65535
    else:
        low, high = rule.port, rule.end_port if rule.end_port is not None else rule.port
    if high < low:
        raise RulesError(f"{where}: end_port {rule.end_port} is below port {rule.port}")
    try:
        names = tuple(FqdnSelector.from_dict(_as_mapping(n)) for n in rule.names)
    except FqdnPatternError as exc:
        raise RulesError(f"{where}: {exc}") from exc
    return CompiledDnsRule(peers=None if rule.peers is None else frozenset(rule.peers), protocol=rule.protocol,
                           port_low=low, port_high=high, names=names, rule=rule.rule)


def _canonical(address: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError as exc:
        raise RulesError(f"{where}: {address!r} is not an IP address") from exc


def compile_endpoint(ep: EndpointRules) -> CompiledEndpoint:
    where = f"endpoint {ep.ep_id} ({ep.pod})"
    selectors: list[tuple[int, FqdnSelector]] = []
    for i, sel in enumerate(ep.fqdn_selectors):
        try:
            selectors.append((sel.identity, FqdnSelector.from_dict(_as_mapping(sel.selector))))
        except FqdnPatternError as exc:
            raise RulesError(f"{where} fqdn_selectors[{i}]: {exc}") from exc
    return CompiledEndpoint(
        ep_id=ep.ep_id, pod=ep.pod, identity=ep.identity,
        addresses=tuple(_canonical(a, f"{where} addresses") for a in ep.addresses),
        dns_rules=tuple(_compile_rule(ep, i, r) for i, r in enumerate(ep.dns_rules)),
        selectors=tuple(selectors), source=ep,
    )


@dataclass
class CompiledRules:
    revision: int
    endpoints: dict[int, CompiledEndpoint]
    by_address: dict[str, CompiledEndpoint]  # canonical address text (as recvmsg gives it) -> endpoint
    cluster_cidrs: tuple[IPNetwork, ...]

    @classmethod
    def empty(cls) -> CompiledRules:
        return cls(revision=0, endpoints={}, by_address={}, cluster_cidrs=())

    @classmethod
    def compile(cls, rules: ProxyRules) -> CompiledRules:
        """Raises :class:`RulesError` naming the endpoint and field at fault."""
        endpoints: dict[int, CompiledEndpoint] = {}
        by_address: dict[str, CompiledEndpoint] = {}
        for ep in rules.endpoints:
            if ep.ep_id in endpoints:
                raise RulesError(f"endpoint {ep.ep_id} ({ep.pod}) is listed twice")
            compiled = compile_endpoint(ep)
            endpoints[ep.ep_id] = compiled
            for address in compiled.addresses:
                other = by_address.get(address)
                if other is not None:
                    raise RulesError(f"address {address} belongs to endpoints {other.ep_id} ({other.pod}) "
                                     f"and {ep.ep_id} ({ep.pod})")
                by_address[address] = compiled
        cidrs: list[IPNetwork] = []
        for cidr in rules.cluster_cidrs:
            try:
                cidrs.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError as exc:
                raise RulesError(f"cluster_cidrs: {cidr!r} is not a network") from exc
        return cls(revision=rules.revision, endpoints=endpoints, by_address=by_address, cluster_cidrs=tuple(cidrs))

    def in_cluster(self, address: IPAddress) -> bool:
        """Inside a cluster pod CIDR: toFQDNs never selects those."""
        return any(address.version == net.version and address in net for net in self.cluster_cidrs)


def merge_slots(current: dict[int, int], updates: dict[int, int], max_slots: int) -> tuple[dict[int, int], list[int]]:
    """A weft_fqdn value's slots (selector identity -> expires_ns) after learning ``updates``:
    every slot kept (another selector's, or one the other proxy process wrote), a re-learned one
    keeps the later expiry, and when more than ``max_slots`` selectors remain, the ones expiring
    first give way. Returns the slots and the identities that gave way."""
    merged = dict(current)
    for identity, expires in updates.items():
        merged[identity] = max(expires, merged.get(identity, 0))
    if len(merged) <= max_slots:
        return merged, []
    # Ties: a slot being learned now stays before an older one expiring at the same time.
    ranked = sorted(merged, key=lambda ident: (merged[ident], ident in updates), reverse=True)
    kept = {ident: merged[ident] for ident in ranked[:max_slots]}
    return kept, ranked[max_slots:]
