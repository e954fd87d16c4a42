"""The policy repository: every applied policy, a revision counter, the selector cache and the
node-local CIDR identities, and per-endpoint resolution into map state.

Identities the repository knows without being told: the reserved ones (1-8) and one node-local
identity (from 2**24) per distinct prefix that any policy names, ``except`` prefixes included.
The datapath's ipcache must hold every prefix of :meth:`PolicyRepository.cidr_identities` (an
LPM), so an address resolves to the most specific prefix's identity; CIDR selectors select
every CIDR identity inside them, which is how a /8 rule also covers a /24 another policy named.
CIDR identities are allocated lowest-free-first in prefix order and kept while any policy names
the prefix, so the same sequence of applies yields the same numbers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from weft.identity.allocator import LOCAL_MIN
from weft.policy.loader import Policy, PolicyKey
from weft.policy.mapstate import EndpointPolicy
from weft.policy.resolve import (
    CompiledPolicy,
    CompiledRule,
    EndpointSubject,
    Enforcement,
    NamedPorts,
    compile_policy,
    prefix_sort_key,
    resolve_rules,
)
from weft.policy.selectors import (
    IdentityLabels,
    Selector,
    SelectorCache,
    cidr_labels,
    reserved_identities,
)
from weft.types.labels import LabelSet


@dataclass(frozen=True)
class ApplyResult:
    """What an apply did (or, for a dry run, would do), by policy key."""

    revision: int
    created: tuple[PolicyKey, ...]
    configured: tuple[PolicyKey, ...]
    unchanged: tuple[PolicyKey, ...]


@dataclass
class PolicyRepository:
    """Policies keyed by (kind, namespace, name), with a revision that grows on every change."""

    cache: SelectorCache = field(default_factory=SelectorCache)
    revision: int = 1
    _policies: dict[PolicyKey, CompiledPolicy] = field(default_factory=dict)
    # Subject selector -> the rules and enforcement entries it carries: a subject's rules are
    # found through the selector cache's reverse index instead of testing every policy.
    _rules_by_subject: dict[Selector, list[CompiledRule]] = field(default_factory=dict)
    _enforce_by_subject: dict[Selector, list[Enforcement]] = field(default_factory=dict)
    _cidr_ids: dict[str, int] = field(default_factory=dict)
    _cidr_refs: dict[str, int] = field(default_factory=dict)
    _external: dict[int, LabelSet] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cache.update_identities(reserved_identities())

    # ------------------------------------------------------------------ policies
    def get(self, key: PolicyKey) -> Policy | None:
        got = self._policies.get(key)
        return got.policy if got is not None else None

    def policies(self) -> list[Policy]:
        return [c.policy for _, c in sorted(self._policies.items())]

    def find(self, name: str, namespace: str | None = None) -> list[Policy]:
        """Policies called ``name`` (in ``namespace`` if given; CCNPs match any namespace)."""
        return [
            c.policy
            for (_, ns, n), c in sorted(self._policies.items())
            if n == name and (namespace is None or ns in (namespace, ""))
        ]

    def plan(self, policies: Iterable[Policy]) -> ApplyResult:
        """What :meth:`apply` would do, changing nothing (``weft apply --dry-run``)."""
        created, configured, unchanged = [], [], []
        for p in policies:
            old = self._policies.get(p.key)
            if old is None:
                created.append(p.key)
            elif old.policy.document == p.document:
                unchanged.append(p.key)
            else:
                configured.append(p.key)
        return ApplyResult(self.revision, tuple(created), tuple(configured), tuple(unchanged))

    def apply(self, policies: Iterable[Policy]) -> ApplyResult:
        """Add or replace every policy at once (one revision step if anything changed)."""
        items = list(policies)
        result = self.plan(items)
        changed = set(result.created) | set(result.configured)
        if changed:
            for p in items:
                if p.key in changed:
                    self._remove(p.key)
                    self._insert(compile_policy(p))
            self.revision += 1
        return ApplyResult(self.revision, result.created, result.configured, result.unchanged)

    def upsert(self, policy: Policy) -> int:
        """Add or replace one policy; returns the revision."""
        return self.apply([policy]).revision

    def delete(self, key: PolicyKey) -> bool:
        """Remove one policy; returns whether it existed."""
        if key not in self._policies:
            return False
        self._remove(key)
        self.revision += 1
        return True

    def delete_policies(self, policies: Iterable[Policy]) -> list[PolicyKey]:
        """Remove the given policies (``weft delete -f``); returns the keys that existed."""
        gone = [p.key for p in policies if p.key in self._policies]
        for key in gone:
            self._remove(key)
        if gone:
            self.revision += 1
        return gone

    def _insert(self, compiled: CompiledPolicy) -> None:
        self._policies[compiled.policy.key] = compiled
        self._add_cidrs(compiled.cidrs())
        for sel in compiled.selectors():
            self.cache.add_selector(sel)
        for rule in compiled.rules:
            self._rules_by_subject.setdefault(rule.subject, []).append(rule)
        for enf in compiled.enforcement:
            self._enforce_by_subject.setdefault(enf.subject, []).append(enf)

    def _remove(self, key: PolicyKey) -> None:
        compiled = self._policies.pop(key, None)
        if compiled is None:
            return
        for rule in compiled.rules:
            rules = self._rules_by_subject.get(rule.subject, [])
            rules.remove(rule)
            if not rules:
                self._rules_by_subject.pop(rule.subject, None)
        for enf in compiled.enforcement:
            enfs = self._enforce_by_subject.get(enf.subject, [])
            enfs.remove(enf)
            if not enfs:
                self._enforce_by_subject.pop(enf.subject, None)
        for sel in compiled.selectors():
            self.cache.remove_selector(sel)
        self._release_cidrs(compiled.cidrs())

    # ------------------------------------------------------------------ CIDR identities
    def _add_cidrs(self, prefixes: set[str]) -> None:
        new: dict[int, LabelSet] = {}
        for prefix in sorted(prefixes, key=prefix_sort_key):
            self._cidr_refs[prefix] = self._cidr_refs.get(prefix, 0) + 1
            if prefix in self._cidr_ids:
                continue
            used = set(self._cidr_ids.values())
            ident = LOCAL_MIN
            while ident in used:
                ident += 1
            self._cidr_ids[prefix] = ident
            new[ident] = cidr_labels(prefix)
        if new:
            self.cache.update_identities(new)

    def _release_cidrs(self, prefixes: set[str]) -> None:
        gone: list[int] = []
        for prefix in prefixes:
            count = self._cidr_refs.get(prefix, 0) - 1
            if count > 0:
                self._cidr_refs[prefix] = count
                continue
            self._cidr_refs.pop(prefix, None)
            ident = self._cidr_ids.pop(prefix, None)
            if ident is not None:
                gone.append(ident)
        if gone:
            self.cache.update_identities(remove=gone)

    def cidr_identities(self) -> dict[str, int]:
        """Every CIDR prefix any policy names -> its node-local identity (for the ipcache)."""
        return dict(sorted(self._cidr_ids.items(), key=lambda kv: prefix_sort_key(kv[0])))

    def identity_of_address(self, address: str) -> int:
        """The identity the datapath's ipcache gives ``address`` from policy prefixes alone:
        the longest prefix containing it, else world (2). Pod addresses are the agent's."""
        addr = ipaddress.ip_address(address)
        best: tuple[int, int] | None = None
        for prefix, ident in self._cidr_ids.items():
            net = ipaddress.ip_network(prefix)
            if addr.version == net.version and addr in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, ident)
        return best[1] if best else 2

    # ------------------------------------------------------------------ identities
    def update_identities(self, upsert: Mapping[int, LabelSet] | None = None, remove: Iterable[int] = ()) -> None:
        """Incremental identity changes (pods and namespaces created, relabelled, deleted)."""
        upsert = dict(upsert or {})
        remove = [i for i in remove if i not in self._cidr_ids.values()]
        self._external.update(upsert)
        for i in remove:
            self._external.pop(i, None)
        self.cache.update_identities(upsert, remove)

    def sync_identities(self, identities: Mapping[int, LabelSet]) -> None:
        """Make the cluster identities exactly ``identities``. Reserved and CIDR identities are
        the repository's own and stay (an entry for a reserved id relabels it)."""
        if identities == self._external:
            return
        upsert = {i: lbl for i, lbl in identities.items() if self._external.get(i) != lbl}
        reserved = reserved_identities()
        remove = [i for i in self._external if i not in identities and i not in reserved]
        # A reserved id the caller stops sending goes back to its reserved labels.
        restore = {i: reserved[i] for i in self._external if i in reserved and i not in identities}
        self._external = dict(identities)
        self.cache.update_identities({**upsert, **restore}, remove)

    # ------------------------------------------------------------------ resolution
    def selecting(self, subject: EndpointSubject) -> tuple[list[CompiledRule], list[Enforcement]]:
        """The rules and enforcement entries whose subject selector selects ``subject``."""
        known = self.cache.labels_of(subject.identity)
        if known == subject.labels:
            subjects = self.cache.selectors_of(subject.identity)
        else:
            probe = IdentityLabels(subject.identity, subject.labels)
            subjects = frozenset(s for s in self._enforce_by_subject if s.matches(probe))
        rules: list[CompiledRule] = []
        enforcement: list[Enforcement] = []
        for sel in subjects:
            rules.extend(self._rules_by_subject.get(sel, ()))
            enforcement.extend(self._enforce_by_subject.get(sel, ()))
        rules.sort(key=lambda r: r.origin)
        enforcement.sort(key=lambda e: e.origin)
        return rules, enforcement

    def resolve(
        self,
        endpoint: EndpointSubject,
        identities: Mapping[int, LabelSet] | None = None,
        named_ports: Mapping[int, NamedPorts] | None = None,
        *,
        allow_localhost: bool = True,
    ) -> EndpointPolicy:
        """The map state of ``endpoint``.

        ``identities`` (cluster identity -> labels) is synced into the selector cache first
        (skip it with None when :meth:`update_identities` keeps the cache current);
        ``named_ports`` gives each peer identity's named ports, for egress to a named port.
        ``allow_localhost`` keeps Cilium's default: the local host may always reach the endpoint.
        """
        if identities is not None:
            self.sync_identities(identities)
        rules, enforcement = self.selecting(endpoint)
        by_id = {i: p for p, i in self._cidr_ids.items()}
        return resolve_rules(
            endpoint, rules, enforcement, self.cache, named_ports or {}, by_id, allow_localhost=allow_localhost
        )
