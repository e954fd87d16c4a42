"""The learned-address cache: expiry, min TTL, grace, zombies, the live-safe cap, persistence."""

from __future__ import annotations

import ipaddress
import json

import dns.message
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.fqdn.cache import CacheEntry, LearnResult, NameCache
from weft.fqdn.dnsmsg import parse_response
from weft.types.addresses import IPAddress


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def ips(n: int, base: str = "10.0.0.") -> list[IPAddress]:
    return [ip(f"{base}{i}") for i in range(n)]


A, B, C, D = ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"), ip("2001:db8::1")


class Live:
    """A settable set of live (endpoint, address) connections."""

    def __init__(self, *pairs: tuple[int, IPAddress]) -> None:
        self.pairs = set(pairs)

    def __call__(self, ep_id: int, address: IPAddress) -> bool:
        return (ep_id, address) in self.pairs


# ----------------------------------------------------------------------------- learning and expiry


def test_learn_records_and_reports() -> None:
    cache = NameCache()
    r = cache.learn(1, "WWW.Example.com", [A, D], ttl=30, now=100.0)
    assert isinstance(r, LearnResult)
    assert r.name == "www.example.com."
    assert r.added == [(1, A), (1, D)]
    assert r.refreshed == r.evicted == r.rejected == r.released == []
    assert r.over_cap == 0
    assert cache.addresses_for(1) == {A: {"www.example.com.": 135.0}, D: {"www.example.com.": 135.0}}
    assert cache.addresses_for(2) == {}
    assert len(cache) == 2


def test_expiry_is_ttl_plus_grace() -> None:
    cache = NameCache(grace=5.0)
    cache.learn(1, "a.com", [A], ttl=30, now=100.0)
    assert cache.expired(134.9) == []
    assert cache.expired(135.0) == [(1, "a.com.", A)]  # due at expiry exactly


def test_min_ttl_raises_short_ttls_only() -> None:
    cache = NameCache(min_ttl=60, grace=0.0)
    cache.learn(1, "short.com", [A], ttl=10, now=0.0)
    cache.learn(1, "long.com", [B], ttl=3600, now=0.0)
    assert cache.addresses_for(1) == {A: {"short.com.": 60.0}, B: {"long.com.": 3600.0}}


def test_zero_ttl_lives_for_the_grace() -> None:
    cache = NameCache(grace=2.5)
    cache.learn(1, "a.com", [A], ttl=0, now=10.0)
    assert cache.expired(12.4) == []
    assert cache.expired(12.5) == [(1, "a.com.", A)]


def test_no_grace() -> None:
    cache = NameCache(grace=0.0)
    cache.learn(1, "a.com", [A], ttl=0, now=10.0)
    assert cache.expired(10.0) == [(1, "a.com.", A)]


def test_relearning_refreshes() -> None:
    cache = NameCache(grace=0.0)
    cache.learn(1, "a.com", [A, B], ttl=10, now=0.0)
    r = cache.learn(1, "a.com.", [B, C], ttl=10, now=8.0, source="lookup")
    assert r.added == [(1, C)] and r.refreshed == [(1, B)]
    assert cache.expired(10.0) == [(1, "a.com.", A)]  # A was not in the new answer
    assert cache.expired(18.0) == [(1, "a.com.", A), (1, "a.com.", B), (1, "a.com.", C)]


def test_refresh_never_shortens() -> None:
    cache = NameCache(grace=0.0)
    cache.learn(1, "a.com", [A], ttl=300, now=0.0)
    cache.learn(1, "a.com", [A], ttl=5, now=10.0)
    assert cache.addresses_for(1)[A]["a.com."] == 300.0
    assert cache.entries(10.0)[0].ttl == 5  # the latest answer's TTL is what a listing shows


def test_same_address_under_two_names_and_two_endpoints() -> None:
    cache = NameCache(grace=0.0)
    cache.learn(1, "a.com", [A], ttl=10, now=0.0)
    cache.learn(1, "b.com", [A], ttl=20, now=0.0)
    cache.learn(2, "a.com", [A], ttl=30, now=0.0)
    assert cache.addresses_for(1) == {A: {"a.com.": 10.0, "b.com.": 20.0}}
    assert cache.addresses_for(2) == {A: {"a.com.": 30.0}}
    gone, released = cache.collect(10.0)
    assert gone == [(1, "a.com.", A)]
    assert released == []  # endpoint 1 still holds A through b.com
    gone, released = cache.collect(30.0)
    assert gone == [(1, "b.com.", A), (2, "a.com.", A)]
    assert released == [(1, A), (2, A)]
    assert len(cache) == 0 and cache.endpoints() == []


def test_duplicate_addresses_in_one_answer() -> None:
    cache = NameCache()
    r = cache.learn(1, "a.com", [A, A, B], ttl=10, now=0.0)
    assert r.added == [(1, A), (1, B)]


def test_empty_answer_changes_nothing() -> None:
    cache = NameCache()
    r = cache.learn(1, "a.com", [], ttl=10, now=0.0)
    assert r.added == [] and len(cache) == 0 and cache.endpoints() == []


def test_negative_ttl_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        NameCache().learn(1, "a.com", [A], ttl=-1, now=0.0)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [({"min_ttl": -1}, "min_ttl"), ({"grace": -0.5}, "grace"), ({"max_ips_per_name": 0}, "max_ips_per_name")],
)
def test_bad_settings(kwargs: dict[str, float], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        NameCache(**kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- zombies


def test_expired_with_live_connection_is_a_zombie_until_it_closes() -> None:
    live = Live((1, A))
    cache = NameCache(grace=0.0, is_live=live)
    cache.learn(1, "a.com", [A, B], ttl=10, now=0.0)
    assert cache.expired(20.0) == [(1, "a.com.", B)]
    assert cache.remove([(1, "a.com.", B)]) == [(1, B)]
    [row] = cache.entries(20.0)
    assert (row.address, row.zombie, row.ttl_left) == (A, True, 0.0)
    assert cache.addresses_for(1) == {A: {"a.com.": 10.0}}  # still allowed
    live.pairs.clear()  # the connection closed
    assert cache.expired(21.0) == [(1, "a.com.", A)]
    assert cache.remove(cache.expired(21.0)) == [(1, A)]
    assert len(cache) == 0


def test_relearned_zombie_is_alive_again() -> None:
    live = Live((1, A))
    cache = NameCache(grace=0.0, is_live=live)
    cache.learn(1, "a.com", [A], ttl=10, now=0.0)
    cache.expired(15.0)
    assert cache.entries(15.0)[0].zombie
    cache.learn(1, "a.com", [A], ttl=10, now=16.0)
    row = cache.entries(16.0)[0]
    assert not row.zombie and row.ttl_left == 10.0


def test_is_live_per_call_overrides_constructor() -> None:
    cache = NameCache(grace=0.0, is_live=lambda ep, a: True)
    cache.learn(1, "a.com", [A], ttl=1, now=0.0)
    assert cache.expired(5.0) == []
    assert cache.expired(5.0, is_live=lambda ep, a: False) == [(1, "a.com.", A)]


def test_liveness_is_per_endpoint() -> None:
    cache = NameCache(grace=0.0, is_live=Live((2, A)))
    cache.learn(1, "a.com", [A], ttl=1, now=0.0)
    cache.learn(2, "a.com", [A], ttl=1, now=0.0)
    assert cache.expired(5.0) == [(1, "a.com.", A)]


def test_remove_ignores_absent_entries_and_normalizes() -> None:
    cache = NameCache()
    cache.learn(1, "a.com", [A], ttl=1, now=0.0)
    assert cache.remove([(1, "A.COM", A), (1, "a.com.", B), (9, "x.", A)]) == [(1, A)]
    assert cache.remove([(1, "a.com.", A)]) == []


# ----------------------------------------------------------------------------- the cap


def test_cap_evicts_oldest_refreshed_first() -> None:
    cache = NameCache(max_ips_per_name=3, grace=0.0)
    first = ips(3)
    cache.learn(1, "a.com", first[:1], ttl=100, now=0.0)
    cache.learn(1, "a.com", first[1:2], ttl=100, now=1.0)
    cache.learn(1, "a.com", first[2:3], ttl=100, now=2.0)
    r = cache.learn(1, "a.com", [C], ttl=100, now=3.0)
    assert r.added == [(1, C)] and r.evicted == [(1, first[0])] and r.released == [(1, first[0])]
    assert set(cache.addresses_for(1)) == {first[1], first[2], C}


def test_cap_evicts_expired_before_fresher() -> None:
    cache = NameCache(max_ips_per_name=2, grace=0.0)
    cache.learn(1, "a.com", [A], ttl=100, now=0.0)  # older, but valid until 100
    cache.learn(1, "a.com", [B], ttl=1, now=5.0)  # newer, expired at 6
    r = cache.learn(1, "a.com", [C], ttl=100, now=10.0)
    assert r.evicted == [(1, B)]
    assert set(cache.addresses_for(1)) == {A, C}


def test_cap_never_evicts_live_addresses() -> None:
    live = Live((1, A))
    cache = NameCache(max_ips_per_name=2, grace=0.0, is_live=live)
    cache.learn(1, "a.com", [A], ttl=100, now=0.0)
    cache.learn(1, "a.com", [B], ttl=100, now=1.0)
    r = cache.learn(1, "a.com", [C], ttl=100, now=2.0)
    assert r.evicted == [(1, B)]  # A is older but has a live connection
    assert set(cache.addresses_for(1)) == {A, C}


def test_cap_exceeded_while_everything_is_live() -> None:
    old = ips(2)
    live = Live(*((1, a) for a in old))
    cache = NameCache(max_ips_per_name=2, grace=0.0, is_live=live)
    cache.learn(1, "a.com", old, ttl=100, now=0.0)
    new = ips(2, "10.1.0.")
    # New addresses are not live yet: they are the ones that do not fit.
    r = cache.learn(1, "a.com", new, ttl=100, now=1.0)
    assert r.rejected == [(1, new[1]), (1, new[0])] and r.added == [] and r.evicted == []
    assert r.over_cap == 0
    # When the new ones have connections too, nothing can go: the cap is exceeded.
    live.pairs |= {(1, a) for a in new}
    r = cache.learn(1, "a.com", new, ttl=100, now=2.0)
    assert r.added == [(1, new[0]), (1, new[1])] and r.over_cap == 2
    assert len(cache.addresses_for(1)) == 4
    # Once they close, the next learn brings the name back under the cap.
    live.pairs.clear()
    r = cache.learn(1, "a.com", [new[0]], ttl=100, now=3.0)
    assert r.evicted == [(1, old[1]), (1, old[0])] and r.over_cap == 0  # later in their answer first
    assert set(cache.addresses_for(1)) == set(new)


def test_answer_larger_than_cap_keeps_its_first_addresses() -> None:
    cache = NameCache(max_ips_per_name=50)
    many = ips(60)
    r = cache.learn(1, "big.com", many, ttl=60, now=0.0)
    assert [a for _, a in r.added] == many[:50]
    assert sorted(a for _, a in r.rejected) == many[50:]
    assert set(cache.addresses_for(1)) == set(many[:50])


def test_default_cap_is_50() -> None:
    assert NameCache().max_ips_per_name == 50


def test_cap_is_per_endpoint_and_per_name() -> None:
    cache = NameCache(max_ips_per_name=1)
    cache.learn(1, "a.com", [A], ttl=60, now=0.0)
    cache.learn(1, "b.com", [B], ttl=60, now=0.0)
    cache.learn(2, "a.com", [C], ttl=60, now=0.0)
    assert len(cache) == 3


def test_eviction_of_address_held_under_other_name_is_not_released() -> None:
    cache = NameCache(max_ips_per_name=1)
    cache.learn(1, "a.com", [A], ttl=60, now=0.0)
    cache.learn(1, "b.com", [A], ttl=60, now=0.0)
    r = cache.learn(1, "a.com", [B], ttl=60, now=1.0)
    assert r.evicted == [(1, A)] and r.released == []


def test_refreshed_address_can_be_evicted_by_fresher_ones() -> None:
    cache = NameCache(max_ips_per_name=1)
    cache.learn(1, "a.com", [A], ttl=60, now=0.0)
    r = cache.learn(1, "a.com", [A, B], ttl=60, now=1.0)
    # Both refreshed at 1.0: the answer's first address stays.
    assert r.refreshed == [(1, A)] and r.rejected == [(1, B)]


# ----------------------------------------------------------------------------- listing, endpoints


def test_entries_listing() -> None:
    cache = NameCache(grace=5.0)
    cache.learn(2, "b.com", [D, A], ttl=30, now=0.0, source="cname")
    cache.learn(1, "z.com", [B], ttl=10, now=0.0)
    rows = cache.entries(now=4.0)
    assert rows == [
        CacheEntry(1, "z.com.", B, ttl=10, ttl_left=11.0, source="lookup", zombie=False),
        CacheEntry(2, "b.com.", A, ttl=30, ttl_left=31.0, source="cname", zombie=False),
        CacheEntry(2, "b.com.", D, ttl=30, ttl_left=31.0, source="cname", zombie=False),
    ]
    assert cache.names_for(2) == ["b.com."] and cache.endpoints() == [1, 2]


def test_forget_endpoint() -> None:
    cache = NameCache()
    cache.learn(1, "a.com", [A, B], ttl=30, now=0.0)
    cache.learn(1, "b.com", [C], ttl=30, now=0.0)
    cache.learn(2, "a.com", [A], ttl=30, now=0.0)
    assert cache.forget_endpoint(1) == [("a.com.", A), ("a.com.", B), ("b.com.", C)]
    assert cache.endpoints() == [2]
    assert cache.forget_endpoint(1) == []


# ----------------------------------------------------------------------------- CNAME-derived names


def _response(records: list[tuple[str, int, str, list[str]]]) -> bytes:
    r = dns.message.make_response(dns.message.make_query("www.example.com", "A"))
    for name, ttl, rtype, values in records:
        r.answer.append(dns.rrset.from_text(name, ttl, "IN", rtype, *values))
    wire: bytes = r.to_wire()
    return wire


def test_learn_response_learns_every_chain_name() -> None:
    resp = parse_response(
        _response(
            [
                ("www.example.com.", 300, "CNAME", ["cdn.example.net."]),
                ("cdn.example.net.", 40, "A", ["192.0.2.1"]),
            ]
        )
    )
    cache = NameCache(grace=0.0)
    results = cache.learn_response(7, resp, now=0.0)
    assert [r.name for r in results] == ["www.example.com.", "cdn.example.net."]
    assert cache.addresses_for(7) == {A: {"www.example.com.": 40.0, "cdn.example.net.": 40.0}}
    assert [(row.name, row.source) for row in cache.entries(0.0)] == [
        ("cdn.example.net.", "cname"),
        ("www.example.com.", "lookup"),
    ]


def test_learn_response_nothing_for_nodata() -> None:
    cache = NameCache()
    assert cache.learn_response(1, parse_response(_response([])), now=0.0) == []
    assert len(cache) == 0


# ----------------------------------------------------------------------------- persistence


def _populated(live: Live | None = None) -> NameCache:
    cache = NameCache(min_ttl=10, grace=3.0, max_ips_per_name=5, is_live=live)
    cache.learn(1, "a.com", [A, D], ttl=30, now=1000.0)
    cache.learn(1, "b.com", [B], ttl=5, now=1001.0, source="cname")
    cache.learn(2, "a.com", [C], ttl=100, now=1002.0)
    return cache


def test_round_trip_same_boot_keeps_monotonic_times() -> None:
    cache = _populated(Live((1, A)))
    cache.expired(1100.0)  # A becomes a zombie
    data = json.loads(json.dumps(cache.to_json(wall_now=1.7e9, mono_now=1100.0, boot_id="boot-1")))
    # Restart on the same boot, 20 s later, with the wall clock stepped by an hour meanwhile.
    back = NameCache.from_json(data, wall_now=1.7e9 + 3620, mono_now=1120.0, boot_id="boot-1")
    assert back.entries(1120.0) == cache.entries(1120.0)
    assert back.addresses_for(1) == cache.addresses_for(1)
    assert (back.min_ttl, back.grace, back.max_ips_per_name) == (10, 3.0, 5)
    assert [r.zombie for r in back.entries(1120.0)] == [True, False, False, False]


def test_round_trip_same_boot_without_boot_id() -> None:
    cache = _populated()
    data = cache.to_json(wall_now=5000.0, mono_now=1010.0)
    back = NameCache.from_json(data, wall_now=5010.5, mono_now=1020.0)
    assert back.addresses_for(1) == cache.addresses_for(1)


def test_round_trip_after_reboot_goes_through_the_wall_clock() -> None:
    cache = _populated()
    data = cache.to_json(wall_now=5000.0, mono_now=1010.0, boot_id="boot-1")
    # Rebooted: the monotonic clock restarted; 10 s of wall time passed.
    back = NameCache.from_json(data, wall_now=5010.0, mono_now=3.0, boot_id="boot-2")
    before = {(r.ep_id, r.name, r.address): r.ttl_left for r in cache.entries(1020.0)}
    after = {(r.ep_id, r.name, r.address): r.ttl_left for r in back.entries(3.0)}
    assert after == pytest.approx(before)
    # Without boot ids the monotonic clock going backwards says the same.
    back2 = NameCache.from_json(data | {"saved": data["saved"] | {"boot_id": None}}, wall_now=5010.0, mono_now=3.0)
    assert {(r.ep_id, r.name, r.address): r.ttl_left for r in back2.entries(3.0)} == pytest.approx(before)


def test_restored_entries_expire_on_time() -> None:
    cache = NameCache(grace=0.0)
    cache.learn(1, "a.com", [A], ttl=30, now=100.0)  # expires at mono 130
    data = cache.to_json(wall_now=10_000.0, mono_now=110.0)
    back = NameCache.from_json(data, wall_now=10_040.0, mono_now=5.0)  # rebooted, 40 s later
    assert back.expired(5.0) == [(1, "a.com.", A)]  # 130 - 110 = 20 s left at save, 40 s passed


def test_from_json_overrides_and_is_live() -> None:
    data = _populated().to_json(wall_now=0.0, mono_now=1010.0)
    back = NameCache.from_json(
        data, wall_now=0.0, mono_now=1010.0, min_ttl=0, grace=1.0, max_ips_per_name=2, is_live=lambda e, a: True
    )
    assert (back.min_ttl, back.grace, back.max_ips_per_name) == (0, 1.0, 2)
    assert back.expired(10_000.0) == []  # everything "live"


def test_restored_cache_keeps_learning() -> None:
    data = _populated().to_json(wall_now=0.0, mono_now=1010.0)
    back = NameCache.from_json(data, wall_now=0.0, mono_now=1010.0)
    r = back.learn(1, "a.com", [A], ttl=30, now=1011.0)
    assert r.refreshed == [(1, A)]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(version=2),
        lambda d: d.pop("entries"),
        lambda d: d["entries"][0].update(address="not-an-ip"),
        lambda d: d["entries"][0].pop("expiry"),
        lambda d: d.update(saved=None),
    ],
)
def test_from_json_rejects_bad_snapshots(mutate: object) -> None:
    data = _populated().to_json(wall_now=0.0, mono_now=0.0)
    mutate(data)  # type: ignore[operator]
    with pytest.raises(ValueError):
        NameCache.from_json(data, wall_now=0.0, mono_now=0.0)


def test_snapshot_is_deterministic() -> None:
    assert _populated().to_json(1.0, 2.0) == _populated().to_json(1.0, 2.0)


# ----------------------------------------------------------------------------- a model check

_addr = st.sampled_from([*ips(6), D])
_op = st.tuples(
    st.sampled_from(["learn", "expire"]),
    st.integers(min_value=1, max_value=2),  # endpoint
    st.sampled_from(["a.com", "b.com"]),
    st.lists(_addr, max_size=4),
    st.integers(min_value=0, max_value=20),  # ttl
    st.floats(min_value=0.0, max_value=10.0),  # time step
    st.frozensets(_addr, max_size=3),  # live addresses (for any endpoint)
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_op, max_size=25))
def test_invariants(ops: list[tuple[str, int, str, list[IPAddress], int, float, frozenset[IPAddress]]]) -> None:
    cache = NameCache(max_ips_per_name=3, grace=1.0)
    now = 0.0
    for kind, ep, name, addrs, ttl, step, live_set in ops:
        now += step

        def live(e: int, a: IPAddress, live_set: frozenset[IPAddress] = live_set) -> bool:
            return a in live_set

        if kind == "learn":
            r = cache.learn(ep, name, addrs, ttl, now, is_live=live)
            held = cache.addresses_for(ep)
            for _, a in r.added + r.refreshed:
                assert name + "." in held[a]
            for _, a in r.evicted:
                assert not live(ep, a)  # never a live one
                assert name + "." not in held.get(a, {})
            count = sum(1 for names in held.values() if name + "." in names)
            assert count <= 3 + r.over_cap
            assert r.over_cap == 0 or count > 3
        else:
            gone, released = cache.collect(now, is_live=live)
            for e, _, a in gone:
                assert not live(e, a)
            for e, a in released:
                assert a not in cache.addresses_for(e)
        for row in cache.entries(now):
            assert row.ttl_left >= 0.0
