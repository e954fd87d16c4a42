"""Selectors, the selector cache, port prefixes and deny precedence in the map state."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weft.policy import EGRESS, INGRESS, EndpointPolicy, PolicyKey, PolicyVerdict, SelectorCache, lookup
from weft.policy.mapstate import MapStateBuilder, port_range_prefixes
from weft.policy.selectors import (
    WILDCARD,
    CIDRSelector,
    EntitySelector,
    IdentityLabels,
    LabelSelector,
    Requirement,
    SelectionChange,
    cidr_labels,
)
from weft.types.labels import Label, pod_labels

POD = IdentityLabels(
    300,
    pod_labels("x", {"app": "web", "tier": "front"}, {"team": "blue"})
    | {Label("container", "app", "web"), Label("container", "only", "c")},
)
HOST = IdentityLabels(1, frozenset({Label("reserved", "host", "")}))


def req(key: str, op: str, *values: str) -> Requirement:
    return Requirement(key, op, frozenset(values))


@pytest.mark.parametrize(
    ("requirement", "ident", "matches"),
    [
        pytest.param(req("k8s:app", "In", "web"), POD, True, id="in"),
        pytest.param(req("k8s:app", "In", "db", "cache"), POD, False, id="in-miss"),
        pytest.param(req("k8s:app", "NotIn", "db"), POD, True, id="notin"),
        pytest.param(req("k8s:app", "NotIn", "web"), POD, False, id="notin-miss"),
        pytest.param(req("k8s:missing", "NotIn", "web"), POD, True, id="notin-absent-key"),
        pytest.param(req("k8s:tier", "Exists"), POD, True, id="exists"),
        pytest.param(req("k8s:nope", "Exists"), POD, False, id="exists-miss"),
        pytest.param(req("k8s:nope", "DoesNotExist"), POD, True, id="doesnotexist"),
        pytest.param(req("k8s:tier", "DoesNotExist"), POD, False, id="doesnotexist-miss"),
        pytest.param(req("any:only", "In", "c"), POD, True, id="any-source-matches-container"),
        pytest.param(req("k8s:only", "In", "c"), POD, False, id="k8s-source-not-container"),
        pytest.param(req("container:only", "Exists"), POD, True, id="container-source"),
        pytest.param(req("any:io.kubernetes.pod.namespace", "In", "x"), POD, True, id="namespace-label"),
        pytest.param(req("k8s:io.cilium.k8s.namespace.labels.team", "In", "blue"), POD, True, id="namespace-labels"),
        pytest.param(
            req("k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name", "In", "x"), POD, True, id="ns-name"
        ),
        pytest.param(req("reserved:host", "In", ""), HOST, True, id="reserved-host"),
        pytest.param(req("reserved:host", "Exists"), POD, False, id="reserved-not-on-pod"),
        pytest.param(req("any:host", "Exists"), HOST, True, id="any-matches-reserved"),
    ],
)
def test_requirement(requirement: Requirement, ident: IdentityLabels, matches: bool) -> None:
    assert requirement.matches(ident) is matches


def test_label_selector_is_and_and_empty_matches_all() -> None:
    assert LabelSelector().matches(POD) and LabelSelector().matches(HOST)
    both = LabelSelector(frozenset({req("k8s:app", "In", "web"), req("k8s:tier", "In", "back")}))
    assert not both.matches(POD)
    assert str(LabelSelector(frozenset({req("k8s:app", "In", "web")}))) == "{k8s:app=web}"


def test_entity_and_cidr_selectors() -> None:
    cidr = IdentityLabels(2**24, cidr_labels("10.1.0.0/16"))
    cidr6 = IdentityLabels(2**24 + 1, cidr_labels("fd00::/64"))
    world = IdentityLabels(2, frozenset({Label("reserved", "world", "")}))
    assert EntitySelector("world").matches(cidr) and EntitySelector("world").matches(world)
    assert EntitySelector("world-ipv4").matches(cidr) and not EntitySelector("world-ipv4").matches(cidr6)
    assert EntitySelector("cluster").matches(POD) and EntitySelector("cluster").matches(HOST)
    assert not EntitySelector("cluster").matches(cidr)
    assert CIDRSelector("10.0.0.0/8").matches(cidr)
    assert not CIDRSelector("10.0.0.0/8", ("10.1.0.0/16",)).matches(cidr)
    assert not CIDRSelector("10.1.0.0/24").matches(cidr)  # the identity is wider than the rule
    assert not CIDRSelector("0.0.0.0/0").matches(world) and not CIDRSelector("0.0.0.0/0").matches(cidr6)


def test_selector_cache_incremental() -> None:
    cache = SelectorCache()
    seen: list[list[SelectionChange]] = []
    cache.subscribe(seen.append)
    web = LabelSelector(frozenset({req("k8s:app", "In", "web")}))
    assert cache.add_selector(web) == frozenset()
    a = pod_labels("x", {"app": "web"})
    changes = cache.update_identities({256: a, 257: pod_labels("x", {"app": "db"})})
    assert changes == [SelectionChange(web, frozenset({256}), frozenset())]
    assert seen == [changes]
    assert cache.selections(web) == {256} and cache.selectors_of(256) == {web}
    version = cache.version
    assert cache.update_identities({256: a}) == [] and cache.version == version  # same labels: nothing
    # Relabel 257 into the selection, drop 256.
    changes = cache.update_identities({257: pod_labels("x", {"app": "web"})}, remove=[256])
    assert changes == [SelectionChange(web, frozenset({257}), frozenset({256}))]
    assert cache.selections(web) == {257}
    # A second user of the selector shares it; it goes away with the last.
    cache.add_selector(web)
    cache.remove_selector(web)
    assert cache.selections(web) == {257} and web in cache.selectors()
    cache.remove_selector(web)
    assert cache.selectors() == [] and cache.selectors_of(257) == frozenset()
    assert cache.sync_identities({}) != [] or cache.identities() == {}
    assert cache.identities() == {}


# ----------------------------------------------------------------------------- ports


@given(st.integers(0, 65535), st.integers(0, 65535))
def test_port_range_prefixes_cover_exactly(a: int, b: int) -> None:
    first, last = min(a, b), max(a, b)
    blocks = port_range_prefixes(first, last)
    covered: list[tuple[int, int]] = []
    for port, plen in blocks:
        assert 0 <= plen <= 16
        size = 1 << (16 - plen)
        assert port % size == 0, "a block is aligned to its size"
        covered.append((port, port + size - 1))
    covered.sort()
    assert covered[0][0] == first and covered[-1][1] == last
    for (_, end), (start, _) in itertools.pairwise(covered):
        assert start == end + 1, "no gap, no overlap"
    assert len(blocks) <= 30  # at most two prefixes per bit


def test_port_range_prefixes_bad() -> None:
    with pytest.raises(ValueError):
        port_range_prefixes(10, 9)


# ----------------------------------------------------------------------------- deny precedence


def K(ident: int, proto: int = 0, port: int = 0, plen: int = 0, direction: int = INGRESS) -> PolicyKey:
    return PolicyKey(direction, ident, proto, port, plen)


@pytest.mark.parametrize(
    ("allow", "deny", "kept"),
    [
        pytest.param(K(300, 6, 80, 16), K(0), False, id="deny-all-covers"),
        pytest.param(K(300, 6, 80, 16), K(300), False, id="deny-identity-covers"),
        pytest.param(K(300, 6, 80, 16), K(300, 6, 0, 0), False, id="deny-proto-covers"),
        pytest.param(K(300, 6, 80, 16), K(300, 6, 64, 10), False, id="deny-range-covers"),
        pytest.param(K(300, 6, 80, 16), K(300, 17), True, id="other-proto"),
        pytest.param(K(300, 6, 80, 16), K(301), True, id="other-identity"),
        pytest.param(K(0, 6, 80, 16), K(300), True, id="any-allow-not-covered-by-one-identity"),
        pytest.param(K(300), K(300, 6, 80, 16), True, id="narrower-deny"),
        pytest.param(K(300, 6, 80, 16), K(300, direction=EGRESS), True, id="other-direction"),
    ],
)
def test_allow_covered_by_deny_is_dropped(allow: PolicyKey, deny: PolicyKey, kept: bool) -> None:
    b = MapStateBuilder()
    b.add(allow, False, "allow")
    b.add(deny, True, "deny")
    entries = b.build()
    assert (allow in entries) is kept
    assert entries[deny] == PolicyVerdict(True, ("deny",))


def test_same_key_deny_wins_and_rules_merge() -> None:
    b = MapStateBuilder()
    b.add(K(300), False, "r1")
    b.add(K(300), False, "r2")
    b.add(K(300), False, "r1")
    assert b.build()[K(300)] == PolicyVerdict(False, ("r1", "r2"))
    b.add(K(300), True, "d")
    b.add(K(300), False, "r3")
    assert b.build()[K(300)] == PolicyVerdict(True, ("d",))
    with pytest.raises(ValueError):
        b.add(K(1, 0, 80, 16), False, "x")


@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.sampled_from([0, 300]),
            st.sampled_from([0, 6]),
            st.integers(0, 65535),
            st.integers(0, 16),
        ),
        max_size=8,
    ),
    st.sampled_from([300, 301]),
    st.integers(0, 65535),
)
def test_lookup_matches_deny_wins_reference(rules: list[tuple[bool, int, int, int, int]], peer: int, port: int) -> None:
    """The two-lookup LPM over the built map equals the reference: deny if any rule that
    matches the packet denies, else allow if any allows, else default deny."""
    b = MapStateBuilder()
    raw: list[tuple[bool, PolicyKey]] = []
    for deny, ident, proto, p, plen in rules:
        key = K(ident, proto, p if proto else 0, plen if proto else 0)
        b.add(key, deny, "r")
        raw.append((deny, key))
    policy = EndpointPolicy(True, False, b.build(), {})
    probe = K(peer, 6, port, 16)
    matching = [deny for deny, key in raw if key.covers(probe)]
    want = "deny" if any(matching) else ("allow" if matching else "default-deny")
    assert lookup(policy, INGRESS, peer, 6, port).verdict == want


def test_lookup_default_allow_when_not_enforced() -> None:
    policy = EndpointPolicy(False, False, {K(300, 6, 80, 16): PolicyVerdict(True, ("d",))}, {})
    assert lookup(policy, INGRESS, 300, 6, 80).verdict == "deny"
    assert lookup(policy, INGRESS, 300, 6, 81).verdict == "default-allow"
    assert policy.has_deny


def test_wildcard_selector() -> None:
    assert WILDCARD.matches(POD) and str(WILDCARD) == "*"


LABEL_POOL = [Label("k8s", k, v) for k in ("app", "tier") for v in ("a", "b")] + [Label("reserved", "host", "")]
SELECTOR_POOL = [
    LabelSelector(frozenset({req("k8s:app", "In", "a")})),
    LabelSelector(frozenset({req("any:tier", "NotIn", "a")})),
    LabelSelector(frozenset({req("k8s:app", "Exists"), req("k8s:tier", "DoesNotExist")})),
    LabelSelector(),
    EntitySelector("host"),
    EntitySelector("cluster"),
]


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("upsert"), st.integers(250, 260), st.frozensets(st.sampled_from(LABEL_POOL))),
            st.tuples(st.just("remove"), st.integers(250, 260), st.just(frozenset())),
            st.tuples(st.just("add_selector"), st.integers(0, len(SELECTOR_POOL) - 1), st.just(frozenset())),
            st.tuples(st.just("remove_selector"), st.integers(0, len(SELECTOR_POOL) - 1), st.just(frozenset())),
        ),
        max_size=30,
    )
)
def test_selector_cache_incremental_equals_recompute(ops: list[tuple[str, int, frozenset[Label]]]) -> None:
    cache = SelectorCache()
    refs: dict[int, int] = {}
    for op, n, labels in ops:
        if op == "upsert":
            cache.update_identities({n: labels})
        elif op == "remove":
            cache.update_identities(remove=[n])
        elif op == "add_selector":
            cache.add_selector(SELECTOR_POOL[n])
            refs[n] = refs.get(n, 0) + 1
        elif refs.get(n):
            cache.remove_selector(SELECTOR_POOL[n])
            refs[n] -= 1
    known = cache.identities()
    for n, count in refs.items():
        sel = SELECTOR_POOL[n]
        if count:
            want = {i for i, lbls in known.items() if sel.matches(IdentityLabels(i, lbls))}
            assert cache.selections(sel) == want
            for i in known:
                assert (sel in cache.selectors_of(i)) is (i in want)
