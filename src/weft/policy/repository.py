"""The policy repository: every applied policy, a revision counter, the selector cache and the
node-local CIDR identities, and per-endpoint resolution into map state.

Identities the repository knows without being told: the reserved ones (1-8) and one node-local
identity (from 2**24) per distinct prefix that any policy names, ``except`` prefixes included.
The datapath's ipcache must hold every prefix of :meth:`PolicyRepository.cidr_identities` (an
LPM), so an address resolves to the most specific prefix's identity; CIDR selectors select
every CIDR identity inside them, which is how a /8 rule also covers a /24 another policy named.
CIDR identities are allocated lowest-free-first in prefix order and kept while any policy names
the prefix, so the same sequence of applies yields the same numbers.

Two ways to get an endpoint's map state. :meth:`PolicyRepository.resolve` computes it from
scratch (``weft policy trace``, and the reference the incremental path is tested against).
:meth:`PolicyRepository.acquire` hands out a :class:`~weft.policy.distill.DistilledPolicy` that
the repository keeps current: an apply or delete changes only the policies whose subject the
changed rules select (the old and the new version of each changed policy), and identity changes
reach only the policies whose rules use a selector whose selection changed. Endpoints with the
same identity and named ports share one.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from weft.identity.allocator import LOCAL_MIN
from weft.policy.distill import DistilledPolicy, SubjectKey
from weft.policy.loader import Policy, PolicyKey
from weft.policy.mapstate import EndpointPolicy
from weft.policy.resolve import (
    CompiledPolicy,
    CompiledRule,
    EndpointSubject,
    Enforcement,
    NamedPorts,
    compile_policy,
    resolve_rules,
)
from weft.policy.selectors import (
    IdentityLabels,
    SelectionChange,
    Selector,
    SelectorCache,
    cidr_labels,
    prefix_order,
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
    # The ids given to each policy's rules and enforcement entries (ids are never reused, so a
    # distilled policy can tell a rule from its replacement).
    _ids_of: dict[PolicyKey, tuple[list[int], list[int]]] = field(default_factory=dict)
    _next_id: int = 1
    # Subject selector -> the rules and enforcement entries it carries, by id: a subject's rules
    # are found through the selector cache's reverse index instead of testing every policy.
    _rules_by_subject: dict[Selector, dict[int, CompiledRule]] = field(default_factory=dict)
    _enforce_by_subject: dict[Selector, dict[int, Enforcement]] = field(default_factory=dict)
    _cidr_ids: dict[str, int] = field(default_factory=dict)
    _cidr_by_id: dict[int, str] = field(default_factory=dict)
    _cidr_refs: dict[str, int] = field(default_factory=dict)
    # Lowest-free allocation without a scan: ids below _cidr_next that are free, as a heap.
    _cidr_free: list[int] = field(default_factory=list)
    _cidr_next: int = LOCAL_MIN
    # Grows whenever the CIDR identities change (the agent syncs its ipcache then only).
    cidr_generation: int = 0
    _cidr_sorted: tuple[int, dict[str, int]] | None = None
    _external: dict[int, LabelSet] = field(default_factory=dict)
    # Incremental resolution: the distilled policies handed out, their users, which of them use
    # each peer selector, and the peers' named ports they resolve egress named ports with.
    _distilled: dict[SubjectKey, DistilledPolicy] = field(default_factory=dict)
    _distilled_refs: dict[SubjectKey, int] = field(default_factory=dict)
    _selector_users: dict[Selector, set[SubjectKey]] = field(default_factory=dict)
    _peer_ports: dict[int, NamedPorts] = field(default_factory=dict)
    # How many distilled policies were built from scratch (tests and benchmarks read it).
    full_resolutions: int = 0

    def __post_init__(self) -> None:
        self.cache.subscribe(self._on_selection_changes)
        self.cache.update_identities(reserved_identities())

    # ------------------------------------------------------------------ policies
    def get(self, key: PolicyKey) -> Policy | None:
        got = self._policies.get(key)
        return got.policy if got is not None else None

    def policies(self) -> list[Policy]:
        return [c.policy for _, c in sorted(self._policies.items())]

    def __len__(self) -> int:
        """How many policies (cheaper than ``len(policies())``)."""
        return len(self._policies)

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
            self._flush()
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
        self._flush()
        return True

    def delete_policies(self, policies: Iterable[Policy]) -> list[PolicyKey]:
        """Remove the given policies (``weft delete -f``); returns the keys that existed."""
        gone = [p.key for p in policies if p.key in self._policies]
        for key in gone:
            self._remove(key)
        if gone:
            self.revision += 1
            self._flush()
        return gone

    def _insert(self, compiled: CompiledPolicy) -> None:
        key = compiled.policy.key
        self._policies[key] = compiled
        # New CIDR identities first (existing rules' selections grow through the cache's
        # change events), then the policy's selectors, then its rules with their selections.
        self._add_cidrs(compiled.cidrs())
        for sel in compiled.selectors():
            self.cache.add_selector(sel)
        rule_ids, enf_ids = [], []
        for rule in compiled.rules:
            rule_ids.append(self._next_id)
            self._rules_by_subject.setdefault(rule.subject, {})[self._next_id] = rule
            self._next_id += 1
        for enf in compiled.enforcement:
            enf_ids.append(self._next_id)
            self._enforce_by_subject.setdefault(enf.subject, {})[self._next_id] = enf
            self._next_id += 1
        self._ids_of[key] = (rule_ids, enf_ids)
        self._update_distilled(compiled, rule_ids, enf_ids, add=True)

    def _remove(self, key: PolicyKey) -> None:
        compiled = self._policies.pop(key, None)
        if compiled is None:
            return
        rule_ids, enf_ids = self._ids_of.pop(key)
        # Rules out of the distilled policies first (their recorded keys go), then the
        # selectors, then the CIDR identities (remaining rules shrink through change events).
        self._update_distilled(compiled, rule_ids, enf_ids, add=False)
        for rule_id, rule in zip(rule_ids, compiled.rules, strict=True):
            rules = self._rules_by_subject.get(rule.subject, {})
            rules.pop(rule_id, None)
            if not rules:
                self._rules_by_subject.pop(rule.subject, None)
        for enf_id, enf in zip(enf_ids, compiled.enforcement, strict=True):
            enfs = self._enforce_by_subject.get(enf.subject, {})
            enfs.pop(enf_id, None)
            if not enfs:
                self._enforce_by_subject.pop(enf.subject, None)
        for sel in compiled.selectors():
            self.cache.remove_selector(sel)
        self._release_cidrs(compiled.cidrs())

    def _update_distilled(self, compiled: CompiledPolicy, rule_ids: list[int], enf_ids: list[int], *,
                          add: bool) -> None:
        """Add (or remove) a policy's rules and enforcement entries to (from) the distilled
        policies whose subject they select: only those are touched."""
        if not self._distilled:
            return
        subjects: dict[Selector, list[DistilledPolicy]] = {}

        def selected(subject_selector: Selector) -> list[DistilledPolicy]:
            found = subjects.get(subject_selector)
            if found is None:
                found = [d for d in self._distilled.values() if subject_selector.matches(d.probe)]
                subjects[subject_selector] = found
            return found

        for enf_id, enf in zip(enf_ids, compiled.enforcement, strict=True):
            for dp in selected(enf.subject):
                if add:
                    dp.add_enforcement(enf_id, enf)
                else:
                    dp.remove_enforcement(enf_id)
        for rule_id, rule in zip(rule_ids, compiled.rules, strict=True):
            for dp in selected(rule.subject):
                if add:
                    dp.add_rule(rule_id, rule)
                else:
                    dp.remove_rule(rule_id)

    # ------------------------------------------------------------------ CIDR identities
    def _add_cidrs(self, prefixes: set[str]) -> None:
        new: dict[int, LabelSet] = {}
        for prefix in sorted(prefixes, key=prefix_order):
            self._cidr_refs[prefix] = self._cidr_refs.get(prefix, 0) + 1
            if prefix in self._cidr_ids:
                continue
            if self._cidr_free:
                ident = heapq.heappop(self._cidr_free)
            else:
                ident = self._cidr_next
                self._cidr_next += 1
            self._cidr_ids[prefix] = ident
            self._cidr_by_id[ident] = prefix
            new[ident] = cidr_labels(prefix)
        if new:
            self.cidr_generation += 1
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
                del self._cidr_by_id[ident]
                heapq.heappush(self._cidr_free, ident)
                gone.append(ident)
        if gone:
            self.cidr_generation += 1
            self.cache.update_identities(remove=gone)

    def cidr_identities(self) -> dict[str, int]:
        """Every CIDR prefix any policy names -> its node-local identity (for the ipcache)."""
        if self._cidr_sorted is None or self._cidr_sorted[0] != self.cidr_generation:
            ordered = dict(sorted(self._cidr_ids.items(), key=lambda kv: prefix_order(kv[0])))
            self._cidr_sorted = (self.cidr_generation, ordered)
        return dict(self._cidr_sorted[1])

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
        remove = [i for i in remove if i not in self._cidr_by_id]
        self._external.update(upsert)
        for i in remove:
            self._external.pop(i, None)
        self.cache.update_identities(upsert, remove)
        self._flush()

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
        self._flush()

    def _on_selection_changes(self, changes: list[SelectionChange]) -> None:
        """Selector cache events: each reaches the distilled policies using that selector."""
        for change in changes:
            for key in list(self._selector_users.get(change.selector, ())):
                self._distilled[key].selection_changed(change.selector, change.added, change.removed)

    # ------------------------------------------------------------------ resolution
    def _selecting(self, subject: EndpointSubject) -> tuple[list[tuple[int, CompiledRule]],
                                                            list[tuple[int, Enforcement]]]:
        known = self.cache.labels_of(subject.identity)
        if known == subject.labels:
            subjects = self.cache.selectors_of(subject.identity)
        else:
            probe = IdentityLabels(subject.identity, subject.labels)
            subjects = frozenset(s for s in self._enforce_by_subject if s.matches(probe))
        rules: list[tuple[int, CompiledRule]] = []
        enforcement: list[tuple[int, Enforcement]] = []
        for sel in subjects:
            rules.extend(self._rules_by_subject.get(sel, {}).items())
            enforcement.extend(self._enforce_by_subject.get(sel, {}).items())
        rules.sort(key=lambda r: r[1].origin)
        enforcement.sort(key=lambda e: e[1].origin)
        return rules, enforcement

    def selecting(self, subject: EndpointSubject) -> tuple[list[CompiledRule], list[Enforcement]]:
        """The rules and enforcement entries whose subject selector selects ``subject``."""
        rules, enforcement = self._selecting(subject)
        return [r for _, r in rules], [e for _, e in enforcement]

    def resolve(
        self,
        endpoint: EndpointSubject,
        identities: Mapping[int, LabelSet] | None = None,
        named_ports: Mapping[int, NamedPorts] | None = None,
        *,
        allow_localhost: bool = True,
    ) -> EndpointPolicy:
        """The map state of ``endpoint``, computed from scratch.

        ``identities`` (cluster identity -> labels) is synced into the selector cache first
        (skip it with None when :meth:`update_identities` keeps the cache current);
        ``named_ports`` gives each peer identity's named ports, for egress to a named port.
        ``allow_localhost`` keeps Cilium's default: the local host may always reach the endpoint.
        """
        if identities is not None:
            self.sync_identities(identities)
        rules, enforcement = self.selecting(endpoint)
        return resolve_rules(
            endpoint, rules, enforcement, self.cache, named_ports or {}, self._cidr_by_id,
            allow_localhost=allow_localhost,
        )

    # ------------------------------------------------------------------ incremental resolution
    def set_peer_named_ports(self, named_ports: Mapping[int, NamedPorts]) -> None:
        """The peers' named ports the distilled policies resolve egress named ports with."""
        if named_ports == self._peer_ports:
            return
        self._peer_ports.clear()
        self._peer_ports.update({i: dict(p) for i, p in named_ports.items()})
        for dp in self._distilled.values():
            dp.peer_ports_changed()
        self._flush()

    def acquire(self, endpoint: EndpointSubject, *, allow_localhost: bool = True) -> DistilledPolicy:
        """The distilled policy of ``endpoint``, kept current from now on until every
        :meth:`acquire` of it is matched by a :meth:`release`. The first acquire resolves it
        from scratch; endpoints with the same identity, labels and named ports share it."""
        key = SubjectKey.of(endpoint, allow_localhost)
        dp = self._distilled.get(key)
        if dp is None:
            dp = DistilledPolicy(key, self.cache, self._peer_ports, self._cidr_ids, self._cidr_by_id,
                                 self._selector_users)
            rules, enforcement = self._selecting(endpoint)
            for enf_id, enf in enforcement:
                dp.add_enforcement(enf_id, enf)
            for rule_id, rule in rules:
                dp.add_rule(rule_id, rule)
            dp.flush()
            self._distilled[key] = dp
            self.full_resolutions += 1
        self._distilled_refs[key] = self._distilled_refs.get(key, 0) + 1
        return dp

    def release(self, key: SubjectKey) -> None:
        """One user less of a distilled policy; the last one drops it."""
        count = self._distilled_refs.get(key, 0) - 1
        if count > 0:
            self._distilled_refs[key] = count
            return
        self._distilled_refs.pop(key, None)
        dp = self._distilled.pop(key, None)
        if dp is None:
            return
        for sel in dp.peer_selectors():
            users = self._selector_users.get(sel)
            if users is not None:
                users.discard(key)
                if not users:
                    del self._selector_users[sel]

    def distilled(self) -> list[DistilledPolicy]:
        return list(self._distilled.values())

    def _flush(self) -> None:
        for dp in self._distilled.values():
            dp.flush()
