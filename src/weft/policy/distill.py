"""Per-endpoint policy kept current incrementally (Cilium's distilled policy and MapChanges).

:func:`weft.policy.resolve.resolve_rules` computes an endpoint's map state from scratch: every
rule selecting it, every identity each rule's peers select. With thousands of rules that is too
slow to do for every endpoint on every change. A :class:`DistilledPolicy` holds the same result
for one *subject* (identity, labels, named ports: endpoints alike in all three share one) and
changes it by deltas:

* a rule added or removed (a policy applied or deleted) adds or removes that rule's keys only;
* a selection change (identities come, go or are relabelled; CIDR identities with policies)
  adds or removes the keys of the identities that entered or left the selection, for the rules
  whose peers use that selector only;
* peers' named ports changing recomputes only the egress rules that name ports.

Every key remembers which rules contribute to it (allow or deny, DNS redirect or not), so its
verdict is recomputed from its contributors alone. Deny precedence (an allow key covered by a
deny key of the same or the wildcard identity is dropped) is kept by re-checking the allow keys
a deny key covers whenever that deny key appears or disappears. Changed keys are collected and
applied on :meth:`DistilledPolicy.flush`; each flush that changes anything the datapath or the
DNS proxy sees bumps :attr:`DistilledPolicy.generation`, and :meth:`DistilledPolicy.changes_since`
tells a consumer which keys to rewrite.

The result is, by construction and by test (``tests/unit/policy/test_policy_incremental.py``),
equal to what :func:`resolve_rules` returns for the same repository state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass

from weft.identity.allocator import LOCAL_MIN
from weft.policy.mapstate import EGRESS, INGRESS, DnsRuleSpec, EndpointPolicy, PolicyKey, PolicyVerdict
from weft.policy.resolve import (
    LOCALHOST_RULE,
    CompiledRule,
    EndpointSubject,
    Enforcement,
    NamedPorts,
    dns_specs,
    keys_for,
)
from weft.policy.selectors import (
    WILDCARD,
    CIDRSelector,
    FQDNSelector,
    IdentityLabels,
    Selector,
    SelectorCache,
    prefix_order,
)
from weft.types.labels import LabelSet

# The contributor id of the allow-localhost entry (rule ids are positive).
LOCALHOST_ID = -1
LOCALHOST_KEY = PolicyKey(INGRESS, 1, 0, 0, 0)
# How many changed keys a policy remembers for consumers that are behind (beyond this, or the
# number of entries, a consumer rewrites everything).
CHANGE_LOG_MIN = 4096


@dataclass(frozen=True)
class SubjectKey:
    """What a resolution depends on about the endpoint itself: endpoints with equal keys share
    one :class:`DistilledPolicy`."""

    identity: int
    labels: LabelSet
    named_ports: frozenset[tuple[str, tuple[int, int]]]
    allow_localhost: bool = True

    @classmethod
    def of(cls, subject: EndpointSubject, allow_localhost: bool = True) -> SubjectKey:
        return cls(subject.identity, subject.labels, frozenset(subject.named_ports.items()), allow_localhost)


def _normalized(key: PolicyKey) -> PolicyKey:
    """As MapStateBuilder.add stores it: LPM keys carry no port bits past their prefix."""
    if key.port_prefix_len < 16:
        mask = (0xFFFF << (16 - key.port_prefix_len)) & 0xFFFF if key.port_prefix_len else 0
        if key.port & ~mask:
            return PolicyKey(key.direction, key.identity, key.proto, key.port & mask, key.port_prefix_len)
    return key


def _deny_candidates(key: PolicyKey) -> Iterable[PolicyKey]:
    """Every key that, denied, covers ``key`` (mapstate's precedence rule): same or any identity,
    any protocol, or the same protocol with the same or a shorter port prefix."""
    idents = (key.identity, 0) if key.identity else (0,)
    for ident in idents:
        yield PolicyKey(key.direction, ident, 0, 0, 0)
        if key.proto == 0:
            continue
        for plen in range(key.port_prefix_len, -1, -1):
            mask = (0xFFFF << (16 - plen)) & 0xFFFF if plen else 0
            yield PolicyKey(key.direction, ident, key.proto, key.port & mask, plen)


class _RuleState:
    """One rule as this subject has it: the peer identities it currently covers, and the keys
    (with the DNS-redirect flag) each of them contributes."""

    __slots__ = ("keys", "rule")

    def __init__(self, rule: CompiledRule) -> None:
        self.rule = rule
        # peer identity (0 = any) -> its keys; an identity with no key (a named port the peer
        # lacks) is still listed: it is part of the rule's selection.
        self.keys: dict[int, dict[PolicyKey, bool]] = {}


class DistilledPolicy:
    """The map state of one subject, changed by deltas (see the module docstring).

    Inputs it reads live from the repository: the selector cache (selections), the peers' named
    ports and the CIDR identity maps. Users of a peer selector are reported through
    ``selector_users`` (selector -> subject keys), which the repository uses to route selection
    changes to the policies that care."""

    def __init__(
        self,
        key: SubjectKey,
        cache: SelectorCache,
        peer_ports: Mapping[int, NamedPorts],
        cidr_ids: Mapping[str, int],
        cidr_by_id: Mapping[int, str],
        selector_users: dict[Selector, set[SubjectKey]],
    ) -> None:
        self.key = key
        self.probe = IdentityLabels(key.identity, key.labels)
        self.subject_ports: NamedPorts = dict(key.named_ports)
        self._cache = cache
        self._peer_ports = peer_ports
        self._cidr_ids = cidr_ids
        self._cidr_by_id = cidr_by_id
        self._selector_users = selector_users
        self._rules: dict[int, _RuleState] = {}
        self._rules_by_peer: dict[Selector, set[int]] = {}
        self._enforcement: dict[int, Enforcement] = {}
        self._ingress_count = 0
        self._egress_count = 0
        # Rules needing more than keys: egress named ports (they follow the peers' ports),
        # toFQDNs peers, egress allow rules with ports (what the DNS proxy is told when any
        # port redirects to it), the rules that redirect, CIDR peers (for cidr_identities).
        self._named_egress: set[int] = set()
        self._fqdn_rules: set[int] = set()
        self._dns_rules: set[int] = set()
        self._redirecting: set[int] = set()
        self._named_prefixes: Counter[str] = Counter()
        # key -> contributor id -> whether that contributor redirects it to the DNS proxy
        self._contrib: dict[PolicyKey, dict[int, bool]] = {}
        self._deny_keys: set[PolicyKey] = set()
        # (direction, identity) -> how many deny keys: most allow keys have no deny key that
        # could cover them, and need no look-up of the candidates.
        self._deny_counts: Counter[tuple[int, int]] = Counter()
        # (direction, identity) -> keys with allow contributors only
        self._allow_keys: dict[tuple[int, int], set[PolicyKey]] = {}
        self._entries: dict[PolicyKey, PolicyVerdict] = {}
        self._dirty: set[PolicyKey] = set()
        self._extras_dirty = False  # enforcement, toFQDNs or DNS rules changed
        self.generation = 0
        self._log: list[tuple[int, tuple[PolicyKey, ...]]] = []
        self._log_size = 0
        self._log_floor = 0  # changes up to this generation are no longer in the log
        self._snapshot: EndpointPolicy | None = None
        # Work counters, for tests and the benchmark: how many rules and identity deltas this
        # policy has processed.
        self.rule_updates = 0
        self.selection_updates = 0

    # ------------------------------------------------------------------ inputs
    def add_rule(self, rule_id: int, rule: CompiledRule) -> None:
        state = _RuleState(rule)
        self._rules[rule_id] = state
        self.rule_updates += 1
        for peer in rule.peers:
            users = self._rules_by_peer.setdefault(peer, set())
            if not users:
                self._selector_users.setdefault(peer, set()).add(self.key)
            users.add(rule_id)
            if isinstance(peer, CIDRSelector):
                self._named_prefixes[peer.cidr] += 1
                self._named_prefixes.update(peer.excepts)
        ports = rule.ports or ()
        if rule.direction == EGRESS and any(pm.name is not None for pm in ports):
            self._named_egress.add(rule_id)
        if rule.direction == EGRESS and not rule.deny:
            if any(isinstance(p, FQDNSelector) for p in rule.peers):
                self._fqdn_rules.add(rule_id)
                self._extras_dirty = True
            if ports:
                self._dns_rules.add(rule_id)
                self._extras_dirty = True
            if any(pm.dns for pm in ports):
                self._redirecting.add(rule_id)
        for ident in self._selected(rule):
            self._add_identity(rule_id, state, ident)

    def remove_rule(self, rule_id: int) -> None:
        state = self._rules.get(rule_id)
        if state is None:
            return
        self.rule_updates += 1
        for ident in list(state.keys):
            self._remove_identity(rule_id, state, ident)
        for peer in state.rule.peers:
            users = self._rules_by_peer.get(peer)
            if users is None:
                continue
            users.discard(rule_id)
            if not users:
                del self._rules_by_peer[peer]
                holders = self._selector_users.get(peer)
                if holders is not None:
                    holders.discard(self.key)
                    if not holders:
                        del self._selector_users[peer]
            if isinstance(peer, CIDRSelector):
                for prefix in (peer.cidr, *peer.excepts):
                    left = self._named_prefixes[prefix] - 1
                    if left > 0:
                        self._named_prefixes[prefix] = left
                    else:
                        del self._named_prefixes[prefix]
        for group in (self._named_egress, self._fqdn_rules, self._dns_rules, self._redirecting):
            if rule_id in group:
                group.discard(rule_id)
                if group is not self._named_egress:
                    self._extras_dirty = True
        del self._rules[rule_id]

    def add_enforcement(self, enforcement_id: int, enforcement: Enforcement) -> None:
        self._set_enforcement(enforcement_id, enforcement)

    def remove_enforcement(self, enforcement_id: int) -> None:
        self._set_enforcement(enforcement_id, None)

    def _set_enforcement(self, enforcement_id: int, enforcement: Enforcement | None) -> None:
        was_ingress = self.ingress_enforced
        old = self._enforcement.pop(enforcement_id, None)
        if old is not None:
            self._ingress_count -= old.ingress
            self._egress_count -= old.egress
        if enforcement is not None:
            self._enforcement[enforcement_id] = enforcement
            self._ingress_count += enforcement.ingress
            self._egress_count += enforcement.egress
        self._extras_dirty = True
        now_ingress = self.ingress_enforced
        if self.key.allow_localhost and was_ingress != now_ingress:
            # Cilium's default: the node may always reach its endpoints once ingress is enforced.
            if now_ingress:
                self._contribute(LOCALHOST_KEY, LOCALHOST_ID, False)
            else:
                self._withdraw(LOCALHOST_KEY, LOCALHOST_ID)

    def selection_changed(self, selector: Selector, added: Set[int], removed: Set[int]) -> None:
        """``selector`` now also selects ``added`` and no longer ``removed`` (the cache already
        holds the new selections)."""
        if selector is WILDCARD:
            return  # the wildcard stands for identity 0, whatever identities exist
        for rule_id in self._rules_by_peer.get(selector, ()):
            state = self._rules[rule_id]
            self.selection_updates += 1
            for ident in added:
                if ident not in state.keys:
                    self._add_identity(rule_id, state, ident)
            for ident in removed:
                if ident in state.keys and not self._still_selected(state.rule, ident):
                    self._remove_identity(rule_id, state, ident)

    def peer_ports_changed(self) -> None:
        """The peers' named ports changed: egress rules to named ports resolve again."""
        for rule_id in list(self._named_egress):
            state = self._rules[rule_id]
            self.rule_updates += 1
            for ident in list(state.keys):
                self._remove_identity(rule_id, state, ident)
            for ident in self._selected(state.rule):
                self._add_identity(rule_id, state, ident)

    # ------------------------------------------------------------------ contributions
    def _selected(self, rule: CompiledRule) -> set[int]:
        ids: set[int] = set()
        for peer in rule.peers:
            if peer is WILDCARD:
                ids.add(0)
            else:
                ids |= self._cache.selection_view(peer)
        return ids

    def _still_selected(self, rule: CompiledRule, ident: int) -> bool:
        if ident == 0:
            return WILDCARD in rule.peers
        return any(peer is not WILDCARD and ident in self._cache.selection_view(peer) for peer in rule.peers)

    def _add_identity(self, rule_id: int, state: _RuleState, ident: int) -> None:
        keys: dict[PolicyKey, bool] = {}
        for key, redirect in keys_for(state.rule, (ident,), self.subject_ports, self._peer_ports):
            key = _normalized(key)
            keys[key] = keys.get(key, False) or redirect
        state.keys[ident] = keys
        for key, redirect in keys.items():
            self._contribute(key, rule_id, redirect)
        self._note_selection(rule_id)

    def _remove_identity(self, rule_id: int, state: _RuleState, ident: int) -> None:
        for key in state.keys.pop(ident, {}):
            self._withdraw(key, rule_id)
        self._note_selection(rule_id)

    def _note_selection(self, rule_id: int) -> None:
        # The DNS proxy's rules carry selections (peers of DNS rules, toFQDNs identities).
        if rule_id in self._fqdn_rules or (self._redirecting and rule_id in self._dns_rules):
            self._extras_dirty = True

    def _is_deny(self, contributor: int) -> bool:
        return contributor != LOCALHOST_ID and self._rules[contributor].rule.deny

    def _contribute(self, key: PolicyKey, contributor: int, redirect: bool) -> None:
        holders = self._contrib.setdefault(key, {})
        holders[contributor] = holders.get(contributor, False) or redirect
        self._reclassify(key)

    def _withdraw(self, key: PolicyKey, contributor: int) -> None:
        holders = self._contrib.get(key)
        if holders is None or holders.pop(contributor, None) is None:
            return
        if not holders:
            del self._contrib[key]
        self._reclassify(key)

    def _reclassify(self, key: PolicyKey) -> None:
        """The contributors of ``key`` changed: re-file it as deny, allow or gone, and when it
        starts or stops being a deny key, re-check every allow key it covers."""
        holders = self._contrib.get(key)
        was_deny = key in self._deny_keys
        is_deny = holders is not None and any(self._is_deny(c) for c in holders)
        bucket_id = (key.direction, key.identity)
        if is_deny or holders is None:
            bucket = self._allow_keys.get(bucket_id)
            if bucket is not None:
                bucket.discard(key)
                if not bucket:
                    del self._allow_keys[bucket_id]
        else:
            self._allow_keys.setdefault(bucket_id, set()).add(key)
        self._dirty.add(key)
        if was_deny != is_deny:
            if is_deny:
                self._deny_keys.add(key)
                self._deny_counts[bucket_id] += 1
            else:
                self._deny_keys.discard(key)
                self._deny_counts[bucket_id] -= 1
                if not self._deny_counts[bucket_id]:
                    del self._deny_counts[bucket_id]
            self._dirty.update(self._allows_covered_by(key))

    def _allows_covered_by(self, deny: PolicyKey) -> list[PolicyKey]:
        if deny.identity:
            buckets: Iterable[set[PolicyKey]] = [self._allow_keys.get((deny.direction, deny.identity), set())]
        else:
            buckets = [keys for (direction, _), keys in self._allow_keys.items() if direction == deny.direction]
        return [key for keys in buckets for key in keys if deny.covers(key)]

    def _verdict(self, key: PolicyKey) -> PolicyVerdict | None:
        """What MapStateBuilder.build gives ``key``: its deny rules if any rule denies it; else,
        unless a deny key covers it, its allow rules (rules in origin order, localhost last)."""
        holders = self._contrib.get(key)
        if not holders:
            return None
        if key in self._deny_keys:
            return PolicyVerdict(True, self._origins(c for c in holders if self._is_deny(c)))
        if (self._deny_counts.get((key.direction, key.identity)) or self._deny_counts.get((key.direction, 0))) and any(
            candidate in self._deny_keys for candidate in _deny_candidates(key)
        ):
            return None
        return PolicyVerdict(False, self._origins(holders), any(holders.values()))

    def _origins(self, contributors: Iterable[int]) -> tuple[str, ...]:
        named = [
            (True, LOCALHOST_RULE) if c == LOCALHOST_ID else (False, self._rules[c].rule.origin) for c in contributors
        ]
        return tuple(dict.fromkeys(origin for _, origin in sorted(named)))

    def peer_selectors(self) -> list[Selector]:
        """The peer selectors this policy's rules use."""
        return list(self._rules_by_peer)

    # ------------------------------------------------------------------ results
    @property
    def dirty(self) -> bool:
        return bool(self._dirty) or self._extras_dirty

    def flush(self) -> bool:
        """Apply the pending changes to the entries; returns whether anything visible changed
        (then :attr:`generation` grew)."""
        if not self.dirty:
            return False
        changed: list[PolicyKey] = []
        for key in self._dirty:
            new = self._verdict(key)
            old = self._entries.get(key)
            if new == old:
                continue
            if new is None:
                del self._entries[key]
            else:
                self._entries[key] = new
            changed.append(key)
        self._dirty.clear()
        extras = self._extras_dirty
        self._extras_dirty = False
        if not changed and not extras:
            return False
        self.generation += 1
        self._snapshot = None
        self._log.append((self.generation, tuple(changed)))
        self._log_size += len(changed)
        while self._log and self._log_size > max(CHANGE_LOG_MIN, len(self._entries)):
            gen, keys = self._log.pop(0)
            self._log_size -= len(keys)
            self._log_floor = gen
        return True

    def changes_since(self, generation: int) -> set[PolicyKey] | None:
        """The keys whose verdict changed after ``generation`` (added, changed or removed), or
        None when the log no longer reaches back that far (rewrite everything then)."""
        self.flush()
        if generation < self._log_floor:
            return None
        out: set[PolicyKey] = set()
        for gen, keys in reversed(self._log):
            if gen <= generation:
                break
            out.update(keys)
        return out

    @property
    def entries(self) -> Mapping[PolicyKey, PolicyVerdict]:
        """The current entries (live, read only)."""
        self.flush()
        return self._entries

    @property
    def ingress_enforced(self) -> bool:
        return self._ingress_count > 0

    @property
    def egress_enforced(self) -> bool:
        return self._egress_count > 0

    def _sorted_rules(self, ids: Iterable[int]) -> list[_RuleState]:
        return sorted((self._rules[i] for i in ids), key=lambda s: s.rule.origin)

    def fqdn_selectors(self) -> tuple[tuple[tuple[str, str], int], ...]:
        fqdn: dict[tuple[str, str], int] = {}
        for state in self._sorted_rules(self._fqdn_rules):
            for peer in state.rule.peers:
                if isinstance(peer, FQDNSelector):
                    pair = next(iter(peer.as_dict().items()))
                    for ident in self._cache.selection_view(peer):
                        fqdn.setdefault(pair, ident)
        return tuple(sorted(fqdn.items()))

    def dns_rules(self) -> tuple[DnsRuleSpec, ...]:
        if not self._redirecting:
            return ()  # nothing redirects: no rule matters to the DNS proxy
        states = self._sorted_rules(self._dns_rules)
        selections: list[set[int] | None] = [None if 0 in s.keys else set(s.keys) for s in states]
        return dns_specs([s.rule for s in states], selections)

    def cidr_identities(self) -> dict[str, int]:
        used = {k.identity for k in self._entries if k.identity >= LOCAL_MIN and k.identity in self._cidr_by_id}
        cidrs = {self._cidr_by_id[i]: i for i in used}
        for prefix in self._named_prefixes:
            ident = self._cidr_ids.get(prefix)
            if ident is not None:
                cidrs[prefix] = ident
        return dict(sorted(cidrs.items(), key=lambda kv: prefix_order(kv[0])))

    def endpoint_policy(self) -> EndpointPolicy:
        """The whole result as :func:`resolve_rules` returns it (cached until the next change)."""
        self.flush()
        if self._snapshot is None:
            self._snapshot = EndpointPolicy(
                self.ingress_enforced,
                self.egress_enforced,
                dict(self._entries),
                self.cidr_identities(),
                fqdn_selectors=self.fqdn_selectors(),
                dns_rules=self.dns_rules(),
            )
        return self._snapshot
