"""Selectors over identities, and the cache of which identities each selector selects.

An identity is a numeric id with a label set (``weft.types.labels``). Selectors:

* :class:`LabelSelector` — Kubernetes label-selector semantics over Cilium labels. Each
  requirement's key carries a label source: ``k8s:app`` matches only labels of source ``k8s``,
  ``any:app`` a label ``app`` of any source, ``reserved:host`` the reserved label. (A policy key
  written without a source means ``any:``.)
* :class:`EntitySelector` — Cilium's entities (``world``, ``cluster``, ``host``...).
* :class:`CIDRSelector` — CIDR identities inside a prefix and outside its ``except`` prefixes.
* :data:`WILDCARD` — every peer, including ones weft has no identity for; it becomes identity 0
  ("any") in the map state rather than a list of identities.

Namespace labels. Namespace selectors (NetworkPolicy ``namespaceSelector``) are label
selectors on the pod's identity: the agent must put each namespace label on the identities of the
pods in it as ``k8s:io.cilium.k8s.namespace.labels.<key>=<value>`` (``pod_labels`` in
``weft.types.labels`` does this, and adds ``kubernetes.io/metadata.name``), exactly as Cilium does.

CIDR identities carry ``cidr:<prefix>`` and ``reserved:world``, so ``world`` selects them too.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field

from weft.identity.allocator import CLUSTER_MAX, CLUSTER_MIN, RESERVED
from weft.types.labels import NAMESPACE_LABEL, Label, LabelSet

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

POD_NAMESPACE_KEY = f"k8s:{NAMESPACE_LABEL}"
ANY_NAMESPACE_KEY = f"any:{NAMESPACE_LABEL}"
NAMESPACE_LABELS_KEY_PREFIX = "io.cilium.k8s.namespace.labels."


@functools.lru_cache(maxsize=1 << 16)
def parse_network(text: str) -> IPNetwork:
    """``ipaddress.ip_network`` of a prefix policies name, parsed once: CIDR identities and
    selectors are matched against each other far more often than new prefixes appear."""
    return ipaddress.ip_network(text)


def prefix_order(prefix: str) -> tuple[int, int, int]:
    """The order of prefixes everywhere in policy (family, address, length), from the parsed
    prefix cache (``resolve.prefix_sort_key`` parses each time)."""
    net = parse_network(prefix)
    return (net.version, int(net.network_address), net.prefixlen)


def network_within(inner: IPNetwork, outer: IPNetwork) -> bool:
    """``inner.subnet_of(outer)`` for prefixes of any family (False across families), on the
    integers: the standard method builds addresses and is the hot spot of CIDR matching."""
    if inner.version != outer.version or inner.prefixlen < outer.prefixlen:
        return False
    shift = inner.max_prefixlen - outer.prefixlen
    return int(inner.network_address) >> shift == int(outer.network_address) >> shift


class IdentityLabels:
    """An identity's labels indexed by key, so a requirement is a dict lookup."""

    __slots__ = ("by_key", "cidr", "ident", "labels")

    def __init__(self, ident: int, labels: LabelSet) -> None:
        self.ident = ident
        self.labels = labels
        self.by_key: dict[str, list[tuple[str, str]]] = {}
        self.cidr: IPNetwork | None = None
        for label in labels:
            self.by_key.setdefault(label.key, []).append((label.source, label.value))
            if label.source == "cidr":
                self.cidr = parse_network(label.key)


@dataclass(frozen=True, order=True)
class Requirement:
    """``key`` is ``source:name``; ``values`` matter for In and NotIn only."""

    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: frozenset[str] = frozenset()

    def matches(self, ident: IdentityLabels) -> bool:
        source, _, name = self.key.partition(":")
        entries = ident.by_key.get(name, ())
        found = [v for s, v in entries if source == "any" or s == source]
        if self.operator == "Exists":
            return bool(found)
        if self.operator == "DoesNotExist":
            return not found
        hit = any(v in self.values for v in found)
        return hit if self.operator == "In" else not hit

    def __str__(self) -> str:
        if self.operator == "In" and len(self.values) == 1:
            return f"{self.key}={next(iter(self.values))}"
        if self.operator in ("Exists", "DoesNotExist"):
            return f"{self.key} {self.operator}"
        return f"{self.key} {self.operator} ({','.join(sorted(self.values))})"


@dataclass(frozen=True)
class LabelSelector:
    """All requirements must hold (an empty selector selects every identity)."""

    requirements: frozenset[Requirement] = frozenset()

    def matches(self, ident: IdentityLabels) -> bool:
        return all(r.matches(ident) for r in self.requirements)

    def has_key(self, key: str) -> bool:
        return any(r.key == key for r in self.requirements)

    def has_key_prefix(self, prefix: str) -> bool:
        return any(r.key.startswith(prefix) for r in self.requirements)

    def with_requirement(self, req: Requirement) -> LabelSelector:
        return LabelSelector(self.requirements | {req})

    def without_key(self, *keys: str) -> LabelSelector:
        return LabelSelector(frozenset(r for r in self.requirements if r.key not in keys))

    def __str__(self) -> str:
        return "{" + ", ".join(str(r) for r in sorted(self.requirements)) + "}"


_CLUSTER_RESERVED = ("host", "remote-node", "init", "ingress", "health", "unmanaged", "kube-apiserver")


@dataclass(frozen=True)
class EntitySelector:
    """A Cilium entity. ``cluster`` is the reserved cluster identities (host, remote-node, init,
    ingress, health, unmanaged, kube-apiserver) plus every pod identity (256-65535); ``world``
    is identity 2 plus every CIDR identity; ``world-ipv4``/``world-ipv6`` narrow the CIDR part to
    one family (weft has a single world identity, which both keep)."""

    entity: str

    def matches(self, ident: IdentityLabels) -> bool:
        name = self.entity
        reserved = {k for k, entries in ident.by_key.items() if any(s == "reserved" for s, _ in entries)}
        if name == "none":
            return False
        if name in ("world", "world-ipv4", "world-ipv6"):
            if ident.cidr is not None:
                return name == "world" or ident.cidr.version == (4 if name == "world-ipv4" else 6)
            return "world" in reserved
        if name == "cluster":
            return bool(reserved & set(_CLUSTER_RESERVED)) or CLUSTER_MIN <= ident.ident <= CLUSTER_MAX
        return name in reserved

    def __str__(self) -> str:
        return f"entity:{self.entity}"


@dataclass(frozen=True)
class CIDRSelector:
    """CIDR identities whose prefix lies inside ``cidr`` and outside every ``excepts`` prefix.

    Identity 2 (world) is never selected: the datapath's ipcache gives every prefix a policy
    names its own identity (``0.0.0.0/0`` included), so world only stands for addresses of a
    family no CIDR rule covers."""

    cidr: str
    excepts: tuple[str, ...] = ()

    def matches(self, ident: IdentityLabels) -> bool:
        if ident.cidr is None or not network_within(ident.cidr, parse_network(self.cidr)):
            return False
        return not any(network_within(ident.cidr, parse_network(text)) for text in self.excepts)

    def __str__(self) -> str:
        return f"cidr:{self.cidr}" + (f" except {','.join(self.excepts)}" if self.excepts else "")


def fqdn_label_key(name_or_pattern: str) -> str:
    """The key of the ``fqdn:`` label standing for a toFQDNs selector (as Cilium writes it:
    lower case, without the trailing dot)."""
    return name_or_pattern.lower().rstrip(".")


@dataclass(frozen=True)
class FQDNSelector:
    """``toFQDNs``: selects the identity the agent allocates for this selector (labels
    ``fqdn:<name or pattern>``). That identity has ordinary policy entries; the DNS proxy
    binds the addresses it learns for matching names to it, per endpoint (``weft_fqdn``).
    ``matchName: x`` and ``matchPattern: x`` without a wildcard select the same names, and so
    share one identity."""

    match_name: str | None = None
    match_pattern: str | None = None

    @property
    def label_key(self) -> str:
        return fqdn_label_key(self.match_name or self.match_pattern or "")

    def matches(self, ident: IdentityLabels) -> bool:
        return any(source == "fqdn" for source, _ in ident.by_key.get(self.label_key, ()))

    def as_dict(self) -> dict[str, str]:
        return {"matchName": self.match_name} if self.match_name else {"matchPattern": self.match_pattern or ""}

    def __str__(self) -> str:
        return f"fqdn:{self.label_key}"


def fqdn_labels(selector: FQDNSelector) -> LabelSet:
    return frozenset({Label("fqdn", selector.label_key, "")})


@dataclass(frozen=True)
class WildcardSelector:
    """Every peer. Resolves to identity 0 in the map state, never to a list."""

    def matches(self, ident: IdentityLabels) -> bool:
        return True

    def __str__(self) -> str:
        return "*"


WILDCARD = WildcardSelector()

Selector = LabelSelector | EntitySelector | CIDRSelector | FQDNSelector | WildcardSelector


def reserved_identities() -> dict[int, LabelSet]:
    """The reserved identities (1-8) with their ``reserved:<name>`` label."""
    return {ident: frozenset({Label("reserved", name, "")}) for name, ident in RESERVED.items() if ident}


def cidr_labels(prefix: str) -> LabelSet:
    return frozenset({Label("cidr", prefix, ""), Label("reserved", "world", "")})


@dataclass(frozen=True)
class SelectionChange:
    """What one identity update did to one selector's selection."""

    selector: Selector
    added: frozenset[int]
    removed: frozenset[int]


def _network_key(net: IPNetwork) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)


def _required_key(selector: Selector) -> str | None:
    """A label key (without source) that every identity ``selector`` selects carries, or None.

    Label selectors with an In or Exists requirement, and FQDN selectors, can only select
    identities that have the key: the cache indexes them by it, so an identity is tested against
    the selectors of its own keys only. Among several keys the namespace is the last choice: it
    is on every pod of the namespace, so it narrows least."""
    if isinstance(selector, FQDNSelector):
        return selector.label_key
    if isinstance(selector, LabelSelector):
        names = [r.key.partition(":")[2] for r in selector.requirements if r.operator in ("In", "Exists")]
        if names:
            return min(names, key=lambda name: (name == NAMESPACE_LABEL, name))
    return None


@dataclass
class SelectorCache:
    """Each registered selector -> the identities it selects, kept current incrementally.

    Selectors are registered with reference counts (several rules share a selector). Adding an
    identity tests it against the selectors that can select it; adding a selector tests it
    against the identities it can select; lookups are then dict reads. ``version`` changes
    whenever any selection changes, and subscribers get the changes as they happen.

    "Can select" comes from indexes, so that neither side is a scan of the other when there are
    thousands of CIDR identities and selectors: label and FQDN selectors are indexed by a key
    they require (:func:`_required_key`) and identities by their label keys; CIDR selectors by
    their prefix, found from an identity's prefix by walking its supernets; CIDR identities in a
    list sorted by address, where a selector's prefix is one contiguous range. Selectors without
    a required key (entities, the wildcard, only NotIn/DoesNotExist) are tested against every
    identity, as before.
    """

    _identities: dict[int, IdentityLabels] = field(default_factory=dict)
    _selections: dict[Selector, set[int]] = field(default_factory=dict)
    _refs: dict[Selector, int] = field(default_factory=dict)
    _selected_by: dict[int, set[Selector]] = field(default_factory=dict)
    _subscribers: list[Callable[[list[SelectionChange]], None]] = field(default_factory=list)
    # label key -> identities with a label of that key (any source)
    _ids_by_key: dict[str, set[int]] = field(default_factory=dict)
    # (version, network as int, prefix length, identity) of every identity with a cidr label, sorted
    _cidr_rows: list[tuple[int, int, int, int]] = field(default_factory=list)
    # registered selectors, by how an identity finds them (see the class docstring)
    _by_key: dict[str, set[Selector]] = field(default_factory=dict)
    _by_network: dict[tuple[int, int, int], set[CIDRSelector]] = field(default_factory=dict)
    _unindexed: set[Selector] = field(default_factory=set)
    version: int = 0

    # -- selectors
    def add_selector(self, selector: Selector) -> frozenset[int]:
        if selector in self._refs:
            self._refs[selector] += 1
            return frozenset(self._selections[selector])
        self._refs[selector] = 1
        chosen = self._select(selector)
        self._selections[selector] = chosen
        for i in chosen:
            self._selected_by.setdefault(i, set()).add(selector)
        self._index_selector(selector, add=True)
        return frozenset(chosen)

    def remove_selector(self, selector: Selector) -> None:
        count = self._refs.get(selector, 0) - 1
        if count > 0:
            self._refs[selector] = count
            return
        if self._refs.pop(selector, None) is None:
            return
        self._index_selector(selector, add=False)
        for i in self._selections.pop(selector, set()):
            users = self._selected_by.get(i)
            if users is not None:
                users.discard(selector)

    def selections(self, selector: Selector) -> frozenset[int]:
        """The identities ``selector`` selects (computed on the spot if it is not registered)."""
        got = self._selections.get(selector)
        if got is not None:
            return frozenset(got)
        return frozenset(self._select(selector))

    def selection_view(self, selector: Selector) -> Set[int]:
        """Like :meth:`selections` without the copy (read only; it changes with the cache)."""
        got = self._selections.get(selector)
        return got if got is not None else self.selections(selector)

    def selectors_of(self, ident: int) -> frozenset[Selector]:
        """Every registered selector that selects ``ident``."""
        return frozenset(self._selected_by.get(ident, ()))

    def selectors(self) -> list[Selector]:
        return list(self._refs)

    def fqdn_selectors(self) -> list[FQDNSelector]:
        """The registered toFQDNs selectors (found through the index, not by a scan)."""
        return [s for users in self._by_key.values() for s in users if isinstance(s, FQDNSelector)]

    def identities(self) -> dict[int, LabelSet]:
        return {i: lbl.labels for i, lbl in self._identities.items()}

    def labels_of(self, ident: int) -> LabelSet | None:
        got = self._identities.get(ident)
        return got.labels if got is not None else None

    # -- indexes
    def _select(self, selector: Selector) -> set[int]:
        """The known identities ``selector`` selects, testing only those it can select."""
        candidates: Iterable[int]
        if isinstance(selector, CIDRSelector):
            outer = parse_network(selector.cidr)
            rows = self._cidr_rows
            lo = bisect.bisect_left(rows, (outer.version, int(outer.network_address), -1, -1))
            hi = bisect.bisect_right(rows, (outer.version, int(outer.broadcast_address), outer.max_prefixlen + 1, 0))
            candidates = [row[3] for row in rows[lo:hi]]
        else:
            key = _required_key(selector)
            candidates = self._ids_by_key.get(key, ()) if key is not None else self._identities
        identities = self._identities
        return {i for i in candidates if selector.matches(identities[i])}

    def _candidate_selectors(self, entry: IdentityLabels) -> set[Selector]:
        """The registered selectors that may select ``entry`` (a superset of those that do)."""
        out = set(self._unindexed)
        for name in entry.by_key:
            users = self._by_key.get(name)
            if users:
                out |= users
        net = entry.cidr
        if net is not None and self._by_network:
            addr, bits = int(net.network_address), net.max_prefixlen
            for plen in range(net.prefixlen + 1):
                shift = bits - plen
                found = self._by_network.get((net.version, addr >> shift << shift, plen))
                if found:
                    out |= found
        return out

    def _index_selector(self, selector: Selector, *, add: bool) -> None:
        if isinstance(selector, CIDRSelector):
            net_key = _network_key(parse_network(selector.cidr))
            cidr_bucket = self._by_network.setdefault(net_key, set())
            if add:
                cidr_bucket.add(selector)
            else:
                cidr_bucket.discard(selector)
                if not cidr_bucket:
                    del self._by_network[net_key]
            return
        key = _required_key(selector)
        if key is None:
            if add:
                self._unindexed.add(selector)
            else:
                self._unindexed.discard(selector)
            return
        bucket = self._by_key.setdefault(key, set())
        if add:
            bucket.add(selector)
        else:
            bucket.discard(selector)
            if not bucket:
                del self._by_key[key]

    def _index_identity(self, entry: IdentityLabels, *, add: bool) -> None:
        for name in entry.by_key:
            if add:
                self._ids_by_key.setdefault(name, set()).add(entry.ident)
                continue
            ids = self._ids_by_key.get(name)
            if ids is not None:
                ids.discard(entry.ident)
                if not ids:
                    del self._ids_by_key[name]
        if entry.cidr is not None:
            row = (*_network_key(entry.cidr), entry.ident)
            at = bisect.bisect_left(self._cidr_rows, row)
            present = at < len(self._cidr_rows) and self._cidr_rows[at] == row
            if add and not present:
                self._cidr_rows.insert(at, row)
            elif not add and present:
                del self._cidr_rows[at]

    # -- identities
    def subscribe(self, callback: Callable[[list[SelectionChange]], None]) -> None:
        self._subscribers.append(callback)

    def update_identities(
        self, upsert: Mapping[int, LabelSet] | None = None, remove: Iterable[int] = ()
    ) -> list[SelectionChange]:
        """Add or relabel ``upsert`` and drop ``remove``; returns (and publishes) what changed."""
        added: dict[Selector, set[int]] = {}
        removed: dict[Selector, set[int]] = {}
        for ident in remove:
            gone = self._identities.pop(ident, None)
            if gone is None:
                continue
            self._index_identity(gone, add=False)
            for sel in self._selected_by.pop(ident, set()):
                self._selections[sel].discard(ident)
                removed.setdefault(sel, set()).add(ident)
        for ident, labels in (upsert or {}).items():
            old = self._identities.get(ident)
            if old is not None and old.labels == labels:
                continue
            entry = IdentityLabels(ident, labels)
            if old is not None:
                self._index_identity(old, add=False)
            self._identities[ident] = entry
            self._index_identity(entry, add=True)
            before = self._selected_by.get(ident, set())
            after = {sel for sel in self._candidate_selectors(entry) if sel.matches(entry)}
            for sel in after - before:
                self._selections[sel].add(ident)
                added.setdefault(sel, set()).add(ident)
            for sel in before - after:
                self._selections[sel].discard(ident)
                removed.setdefault(sel, set()).add(ident)
            self._selected_by[ident] = after
        changes = [
            SelectionChange(sel, frozenset(added.get(sel, ())), frozenset(removed.get(sel, ())))
            for sel in {**added, **removed}
        ]
        if changes:
            self.version += 1
            for cb in self._subscribers:
                cb(changes)
        return changes

    def sync_identities(self, identities: Mapping[int, LabelSet]) -> list[SelectionChange]:
        """Make the known identities exactly ``identities`` (diffing against the current ones)."""
        current = {i: lbl.labels for i, lbl in self._identities.items()}
        if current == identities:
            return []
        upsert = {i: lbls for i, lbls in identities.items() if current.get(i) != lbls}
        remove = [i for i in current if i not in identities]
        return self.update_identities(upsert, remove)
