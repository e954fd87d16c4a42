"""Compile validated policies into normalised rules, and resolve rules into map state.

Compilation applies Cilium's and Kubernetes' meaning once, when a policy enters the repository:

* CNP: ``endpointSelector`` is restricted to the policy's namespace (a namespace the user wrote
  there is replaced, as Cilium does). ``fromEndpoints``/``toEndpoints`` selectors get
  ``k8s:io.kubernetes.pod.namespace=<ns>`` unless they name the namespace key (``k8s:`` or
  ``any:``), select namespace labels (``io.cilium.k8s.namespace.labels.*``) or a ``reserved:``
  label. CCNP: no namespace for ``endpointSelector``; peer selectors without a namespace key get
  ``k8s:io.kubernetes.pod.namespace`` Exists, so ``{}`` means every pod and not world or host.
* A CNP rule section (``ingress``/``egress``, ``ingressDeny``/``egressDeny``) that is present and
  non-empty puts the selected endpoints in default deny for that direction, unless
  ``enableDefaultDeny`` says otherwise. ``ingress: [{}]`` therefore denies everything and allows
  nothing; ``ingress: []`` has no effect.
* A rule with no peer field but ``toPorts`` or ``icmps`` applies to every peer (identity 0);
  a rule with neither peers nor ports allows nothing. ``protocol: ANY`` (or none) means TCP, UDP
  and SCTP; port 0 (or none) means every port of the protocol.
* NetworkPolicy: ``policyTypes`` defaults to Ingress, plus Egress when ``egress`` has rules;
  rules of a type not listed are ignored. A rule without ``from``/``to`` allows every peer, one
  without ``ports`` every port and protocol. ``podSelector`` and ``namespaceSelector`` in one
  peer are ANDed, separate peers ORed; ``ipBlock`` selects CIDR identities minus ``except``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from weft.identity.allocator import LOCAL_MIN
from weft.policy import model as m
from weft.policy.loader import Policy, PolicyKind
from weft.policy.mapstate import (
    EGRESS,
    INGRESS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    PROTOCOL_NUMBERS,
    DnsRuleSpec,
    EndpointPolicy,
    MapStateBuilder,
    PolicyKey,
    port_range_prefixes,
)
from weft.policy.selectors import (
    ANY_NAMESPACE_KEY,
    NAMESPACE_LABELS_KEY_PREFIX,
    POD_NAMESPACE_KEY,
    WILDCARD,
    CIDRSelector,
    EntitySelector,
    FQDNSelector,
    LabelSelector,
    Requirement,
    Selector,
    SelectorCache,
)
from weft.types.labels import LabelSet

ANY_PROTOCOLS = (PROTO_TCP, PROTO_UDP, PROTO_SCTP)
NamedPorts = Mapping[str, tuple[int, int]]  # name -> (proto, port)


@dataclass(frozen=True)
class PortMatch:
    """One ``ports`` item (or ICMP type): ``protos`` after ANY expansion; ``first..last`` the
    port range (0..65535 = every port), or ``name`` for a named port."""

    protos: tuple[int, ...]
    first: int = 0
    last: int = 65535
    name: str | None = None
    # toPorts[].rules.dns as ("matchName"|"matchPattern", value) pairs: non-empty = the traffic
    # goes through the node's DNS proxy, which allows only these names.
    dns: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CompiledRule:
    """One rule section item, normalised. ``ports`` None means all traffic (L3 only)."""

    origin: str  # "cnp default/web ingress[0]"
    direction: int
    deny: bool
    subject: Selector
    peers: tuple[Selector, ...]
    ports: tuple[PortMatch, ...] | None


@dataclass(frozen=True)
class Enforcement:
    """A policy's subject and whether it puts that subject in default deny per direction."""

    origin: str
    subject: Selector
    ingress: bool
    egress: bool


@dataclass(frozen=True)
class CompiledPolicy:
    policy: Policy
    rules: tuple[CompiledRule, ...]
    enforcement: tuple[Enforcement, ...]

    def selectors(self) -> list[Selector]:
        out: list[Selector] = [e.subject for e in self.enforcement]
        for r in self.rules:
            out.extend(r.peers)
        return out

    def cidrs(self) -> set[str]:
        """Every prefix the policy names (allowed and excepted): each needs an ipcache entry."""
        out: set[str] = set()
        for r in self.rules:
            for p in r.peers:
                if isinstance(p, CIDRSelector):
                    out.add(p.cidr)
                    out.update(p.excepts)
        return out


# ----------------------------------------------------------------------------- selectors


def _requirements(
    sel: m.EndpointSelector | m.K8sLabelSelector, default_source: str, key_prefix: str = ""
) -> frozenset[Requirement]:
    reqs: set[Requirement] = set()

    def full(key: str) -> str:
        if ":" in key and not key_prefix:
            return key
        return f"{default_source}:{key_prefix}{key}"

    for key, value in (sel.matchLabels or {}).items():
        reqs.add(Requirement(full(key), "In", frozenset({value})))
    for expr in sel.matchExpressions or []:
        reqs.add(Requirement(full(expr.key), expr.operator, frozenset(expr.values or ())))
    return frozenset(reqs)


def _cnp_peer(sel: m.EndpointSelector, namespace: str | None) -> LabelSelector:
    """Cilium's getEndpointSelector: scope a fromEndpoints/toEndpoints selector."""
    es = LabelSelector(_requirements(sel, "any"))
    if es.has_key_prefix("reserved:"):
        return es
    if es.has_key(POD_NAMESPACE_KEY) or es.has_key(ANY_NAMESPACE_KEY):
        return es
    if namespace is None:
        return es.with_requirement(Requirement(POD_NAMESPACE_KEY, "Exists"))
    if es.has_key_prefix("k8s:" + NAMESPACE_LABELS_KEY_PREFIX) or es.has_key_prefix(
        "any:" + NAMESPACE_LABELS_KEY_PREFIX
    ):
        return es
    return es.with_requirement(Requirement(POD_NAMESPACE_KEY, "In", frozenset({namespace})))


def _subject(sel: m.EndpointSelector | None, namespace: str | None) -> LabelSelector:
    es = LabelSelector(_requirements(sel or m.EndpointSelector(), "any"))
    if namespace is None:
        return es
    return es.without_key(POD_NAMESPACE_KEY, ANY_NAMESPACE_KEY).with_requirement(
        Requirement(POD_NAMESPACE_KEY, "In", frozenset({namespace}))
    )


def _port_matches(ports: Sequence[m.PortProtocol] | None) -> list[PortMatch]:
    if not ports:
        # A toPorts item without ports: every port of TCP, UDP and SCTP.
        return [PortMatch(ANY_PROTOCOLS)]
    out: list[PortMatch] = []
    for pp in ports:
        protos = ANY_PROTOCOLS if pp.protocol in (None, "ANY") else (PROTOCOL_NUMBERS[pp.protocol],)
        out.append(_port_match(protos, pp.port, pp.endPort))
    return out


def _port_match(protos: tuple[int, ...], port: str | None, end_port: int | None) -> PortMatch:
    if port is None or port == "0":
        return PortMatch(protos)
    if not port.isdigit():
        return PortMatch(protos, name=port)
    first = int(port)
    return PortMatch(protos, first, end_port if end_port is not None else first)


def _icmp_matches(rules: Sequence[m.ICMPRule]) -> list[PortMatch]:
    out: list[PortMatch] = []
    for rule in rules:
        for f in rule.fields:
            names = m.ICMPV4_TYPES if f.family == "IPv4" else m.ICMPV6_TYPES
            icmp_type = f.type if isinstance(f.type, int) else names[f.type]
            out.append(PortMatch((PROTO_ICMP if f.family == "IPv4" else PROTO_ICMPV6,), icmp_type, icmp_type))
    return out


def _compile_cilium(policy: Policy, doc: m.CiliumNetworkPolicy | m.CiliumClusterwideNetworkPolicy) -> CompiledPolicy:
    ns = policy.namespace
    rules: list[CompiledRule] = []
    enforcement: list[Enforcement] = []
    specs: list[tuple[str, m.Rule]] = []
    if doc.spec is not None:
        specs.append(("", doc.spec))
    specs.extend((f"specs[{i}] ", r) for i, r in enumerate(doc.specs or []))
    base = f"{policy.kind.short} {policy.display_name}"
    for label, spec in specs:
        subject = _subject(spec.endpointSelector, ns)
        dd = spec.enableDefaultDeny
        ingress_dd = bool(spec.ingress or spec.ingressDeny)
        egress_dd = bool(spec.egress or spec.egressDeny)
        if dd is not None and dd.ingress is not None:
            ingress_dd = dd.ingress and ingress_dd
        if dd is not None and dd.egress is not None:
            egress_dd = dd.egress and egress_dd
        enforcement.append(Enforcement(f"{base} {label}".rstrip(), subject, ingress_dd, egress_dd))
        prefix = f"{base} {label}"
        for i, ir in enumerate(spec.ingress or []):
            rules.extend(
                _cilium_rule(
                    f"{prefix}ingress[{i}]",
                    INGRESS,
                    False,
                    subject,
                    ns,
                    ir.fromEndpoints,
                    ir.fromCIDR,
                    ir.fromCIDRSet,
                    ir.fromEntities,
                    None,
                    ir.toPorts,
                    ir.icmps,
                )
            )
        for i, idr in enumerate(spec.ingressDeny or []):
            rules.extend(
                _cilium_rule(
                    f"{prefix}ingressDeny[{i}]",
                    INGRESS,
                    True,
                    subject,
                    ns,
                    idr.fromEndpoints,
                    idr.fromCIDR,
                    idr.fromCIDRSet,
                    idr.fromEntities,
                    None,
                    idr.toPorts,
                    idr.icmps,
                )
            )
        for i, er in enumerate(spec.egress or []):
            rules.extend(
                _cilium_rule(
                    f"{prefix}egress[{i}]",
                    EGRESS,
                    False,
                    subject,
                    ns,
                    er.toEndpoints,
                    er.toCIDR,
                    er.toCIDRSet,
                    er.toEntities,
                    er.toFQDNs,
                    er.toPorts,
                    er.icmps,
                )
            )
        for i, edr in enumerate(spec.egressDeny or []):
            rules.extend(
                _cilium_rule(
                    f"{prefix}egressDeny[{i}]",
                    EGRESS,
                    True,
                    subject,
                    ns,
                    edr.toEndpoints,
                    edr.toCIDR,
                    edr.toCIDRSet,
                    edr.toEntities,
                    None,
                    edr.toPorts,
                    edr.icmps,
                )
            )
    return CompiledPolicy(policy, tuple(rules), tuple(enforcement))


def _cilium_rule(
    origin: str,
    direction: int,
    deny: bool,
    subject: Selector,
    ns: str | None,
    eps: Sequence[m.EndpointSelector] | None,
    cidrs: Sequence[str] | None,
    cidr_sets: Sequence[m.CIDRRule] | None,
    entities: Sequence[str] | None,
    fqdns: Sequence[m.FQDNSelector] | None,
    to_ports: Sequence[m.PortRuleBase] | None,
    icmps: Sequence[m.ICMPRule] | None,
) -> list[CompiledRule]:
    """One ingress/egress(-deny) item; none when it is ``{}`` (default deny, allows nothing)."""
    peers: list[Selector] = [_cnp_peer(s, ns) for s in eps or []]
    peers.extend(CIDRSelector(c) for c in cidrs or [])
    peers.extend(CIDRSelector(c.cidr, tuple(c.except_ or ())) for c in cidr_sets or [])
    peers.extend(WILDCARD if e == "all" else EntitySelector(e) for e in entities or [])
    peers.extend(FQDNSelector(f.matchName, f.matchPattern) for f in fqdns or [])
    ports: list[PortMatch] | None = None
    if to_ports:
        ports = []
        for pr in to_ports:
            dns = _dns_rules(pr)
            ports.extend(dataclasses.replace(pm, dns=dns) if dns else pm for pm in _port_matches(pr.ports))
    elif icmps:
        ports = _icmp_matches(icmps)
    if not peers:
        if ports is None:
            return []
        # Only L4 given: it applies to every peer (Cilium's wildcard endpoint selector).
        peers = [WILDCARD]
    return [
        CompiledRule(
            origin, direction, deny, subject, tuple(dict.fromkeys(peers)), tuple(ports) if ports is not None else None
        )
    ]


def _dns_rules(pr: m.PortRuleBase) -> tuple[tuple[str, str], ...]:
    rules = getattr(pr, "rules", None)
    out: list[tuple[str, str]] = []
    for d in (rules.dns if rules is not None else None) or []:
        if d.matchName:
            out.append(("matchName", d.matchName))
        if d.matchPattern:
            out.append(("matchPattern", d.matchPattern))
    return tuple(dict.fromkeys(out))


def _netpol_peer(peer: m.NetworkPolicyPeer, namespace: str) -> Selector:
    if peer.ipBlock is not None:
        return CIDRSelector(peer.ipBlock.cidr, tuple(peer.ipBlock.except_ or ()))
    reqs: set[Requirement] = set()
    if peer.podSelector is not None:
        reqs |= _requirements(peer.podSelector, "k8s")
    if peer.namespaceSelector is not None:
        reqs |= _requirements(peer.namespaceSelector, "k8s", NAMESPACE_LABELS_KEY_PREFIX)
        reqs.add(Requirement(POD_NAMESPACE_KEY, "Exists"))
    else:
        reqs.add(Requirement(POD_NAMESPACE_KEY, "In", frozenset({namespace})))
    return LabelSelector(frozenset(reqs))


def _netpol_rule(
    origin: str,
    direction: int,
    subject: Selector,
    ns: str,
    peers_raw: Sequence[m.NetworkPolicyPeer] | None,
    ports_raw: Sequence[m.NetworkPolicyPort] | None,
) -> CompiledRule:
    # No peers: every source/destination; no ports: every port and protocol.
    peers: tuple[Selector, ...] = (
        tuple(dict.fromkeys(_netpol_peer(p, ns) for p in peers_raw)) if peers_raw else (WILDCARD,)
    )
    ports: tuple[PortMatch, ...] | None = None
    if ports_raw:
        ports = tuple(_port_match((PROTOCOL_NUMBERS[p.protocol],), p.port, p.endPort) for p in ports_raw)
    return CompiledRule(origin, direction, False, subject, peers, ports)


def _compile_netpol(policy: Policy, doc: m.NetworkPolicy) -> CompiledPolicy:
    ns = policy.namespace or "default"
    spec = doc.spec
    subject = LabelSelector(
        _requirements(spec.podSelector, "k8s") | {Requirement(POD_NAMESPACE_KEY, "In", frozenset({ns}))}
    )
    # An empty policyTypes is defaulted like a missing one (Kubernetes checks the length).
    types: list[str] = (
        list(spec.policyTypes) if spec.policyTypes else (["Ingress", "Egress"] if spec.egress else ["Ingress"])
    )
    base = f"{policy.kind.short} {policy.display_name}"
    rules: list[CompiledRule] = []
    if "Ingress" in types:
        for i, ir in enumerate(spec.ingress or []):
            rules.append(_netpol_rule(f"{base} ingress[{i}]", INGRESS, subject, ns, ir.from_, ir.ports))
    if "Egress" in types:
        for i, er in enumerate(spec.egress or []):
            rules.append(_netpol_rule(f"{base} egress[{i}]", EGRESS, subject, ns, er.to, er.ports))
    enforcement = (Enforcement(base, subject, "Ingress" in types, "Egress" in types),)
    return CompiledPolicy(policy, tuple(rules), enforcement)


def compile_policy(policy: Policy) -> CompiledPolicy:
    doc = policy.document
    if isinstance(doc, m.NetworkPolicy):
        return _compile_netpol(policy, doc)
    assert policy.kind in (PolicyKind.CNP, PolicyKind.CCNP)
    return _compile_cilium(policy, doc)


# ----------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class EndpointSubject:
    """The endpoint whose policy is resolved: its identity, labels, namespace and named
    container ports (name -> (proto, port))."""

    identity: int
    labels: LabelSet
    namespace: str
    named_ports: NamedPorts

    @classmethod
    def of(
        cls, identity: int, labels: LabelSet, namespace: str, named_ports: NamedPorts | None = None
    ) -> EndpointSubject:
        return cls(identity, labels, namespace, dict(named_ports or {}))


LOCALHOST_RULE = "allow-localhost (the node may always reach its pods, e.g. kubelet probes)"


def keys_for(
    rule: CompiledRule,
    peer_ids: Iterable[int],
    subject_ports: NamedPorts,
    named_ports: Mapping[int, NamedPorts],
) -> Iterable[tuple[PolicyKey, bool]]:
    """The rule's keys for these peers, each with whether it redirects to the DNS proxy."""
    ids = sorted(set(peer_ids))
    if rule.ports is None:
        for ident in ids:
            yield PolicyKey(rule.direction, ident, 0, 0, 0), False
        return
    for pm in rule.ports:
        redirect = bool(pm.dns)
        if pm.name is None:
            blocks = port_range_prefixes(pm.first, pm.last) if (pm.first, pm.last) != (0, 65535) else [(0, 0)]
            for ident in ids:
                for proto in pm.protos:
                    for port, plen in blocks:
                        yield PolicyKey(rule.direction, ident, proto, port, plen), redirect
        elif rule.direction == INGRESS:
            # Ingress: the name is one of the selected endpoint's own container ports.
            hit = subject_ports.get(pm.name)
            if hit is not None and hit[0] in pm.protos:
                for ident in ids:
                    yield PolicyKey(rule.direction, ident, hit[0], hit[1], 16), redirect
        else:
            # Egress: the name is a port of the destination, which may differ per peer.
            for ident in ids:
                candidates = (
                    [ports[pm.name] for ports in named_ports.values() if pm.name in ports]
                    if ident == 0
                    else [named_ports.get(ident, {}).get(pm.name)]
                )
                for hit in candidates:
                    if hit is not None and hit[0] in pm.protos:
                        yield PolicyKey(rule.direction, ident, hit[0], hit[1], 16), redirect


DNS_PROTOS = (PROTO_UDP, PROTO_TCP)


def dns_specs(rules: Sequence[CompiledRule], selections: Sequence[set[int] | None]) -> tuple[DnsRuleSpec, ...]:
    """The DNS proxy's view of the egress allow rules: every port item with DNS rules, and every
    other port item of the same protocol overlapping a redirected port (those allow every name,
    as a Cilium rule without L7 rules does on a port that has them). L3-only rules add nothing:
    the redirect of a port takes precedence over them (Cilium's proxy-port priority)."""
    redirected = [(pm.protos, pm.first, pm.last) for r in rules if r.direction == EGRESS and not r.deny
                  for pm in (r.ports or ()) if pm.dns and pm.name is None]
    if not redirected:
        return ()
    out: list[DnsRuleSpec] = []
    for rule, peers in zip(rules, selections, strict=True):
        if rule.direction != EGRESS or rule.deny or rule.ports is None:
            continue
        for pm in rule.ports:
            protos = tuple(p for p in pm.protos if p in DNS_PROTOS)
            if not protos or pm.name is not None:
                continue
            if not pm.dns and not any(set(protos) & set(rp) and pm.first <= last and first <= pm.last
                                      for rp, first, last in redirected):
                continue
            out.append(DnsRuleSpec(None if peers is None else frozenset(peers), protos, pm.first, pm.last,
                                   pm.dns, rule.origin))
    return tuple(out)


def resolve_rules(
    subject: EndpointSubject,
    rules: Iterable[CompiledRule],
    enforcement: Iterable[Enforcement],
    cache: SelectorCache,
    named_ports: Mapping[int, NamedPorts],
    cidr_by_identity: Mapping[int, str],
    *,
    allow_localhost: bool = True,
) -> EndpointPolicy:
    """Map state for ``subject`` from the rules and enforcement entries that select it."""
    ingress_enforced = egress_enforced = False
    for e in enforcement:
        ingress_enforced |= e.ingress
        egress_enforced |= e.egress
    rules = list(rules)
    builder = MapStateBuilder()
    selections: list[set[int] | None] = []  # per rule: selected identities, None = any peer
    fqdn: dict[tuple[str, str], int] = {}
    for rule in rules:
        ids: set[int] = set()
        for peer in rule.peers:
            if peer is WILDCARD:
                ids.add(0)
            else:
                selected = cache.selection_view(peer)
                ids |= selected
                if isinstance(peer, FQDNSelector) and rule.direction == EGRESS and not rule.deny:
                    pair = next(iter(peer.as_dict().items()))
                    for ident in selected:
                        fqdn.setdefault(pair, ident)
        selections.append(None if 0 in ids else ids)
        for key, redirect in keys_for(rule, ids, subject.named_ports, named_ports):
            builder.add(key, rule.deny, rule.origin, redirect)
    if allow_localhost and ingress_enforced:
        builder.add(PolicyKey(INGRESS, 1, 0, 0, 0), False, LOCALHOST_RULE)
    entries = builder.build()
    # The prefixes the entries use, and the `except` prefixes of this endpoint's rules: those
    # carry no entry, but the ipcache must hold them so their addresses miss the outer prefix.
    used = {k.identity for k in entries if k.identity >= LOCAL_MIN}
    named: set[str] = set()
    for rule in rules:
        for peer in rule.peers:
            if isinstance(peer, CIDRSelector):
                named.add(peer.cidr)
                named.update(peer.excepts)
    cidrs = {p: i for i, p in cidr_by_identity.items() if i in used or p in named}
    cidrs = dict(sorted(cidrs.items(), key=lambda kv: prefix_sort_key(kv[0])))
    return EndpointPolicy(ingress_enforced, egress_enforced, entries, cidrs,
                          fqdn_selectors=tuple(sorted(fqdn.items())), dns_rules=dns_specs(rules, selections))


def prefix_sort_key(prefix: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(prefix)
    return (net.version, int(net.network_address), net.prefixlen)
