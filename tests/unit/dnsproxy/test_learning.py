"""The proxy's decisions without root: which queries are answered how, what is learned into the
datapath (a fake weft_fqdn) before the answer is released, expiry that spares live connections,
endpoints that vanish, selectors that change, and map entries no cache explains."""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rrset
import pytest

from weft.datapath import abi
from weft.dnsproxy.config import DnsProxySettings
from weft.dnsproxy.dpmaps import PeerInfo, Slots
from weft.dnsproxy.server import DnsProxy, ProxyPaths
from weft.dnsproxy.wire import parse_wire_query
from weft.types.addresses import IPAddress

POD4 = "10.244.1.5"
DNS = ("192.0.2.53", 53)
SEL, SEL2 = 1000, 1001
EP = 7
EXT4, EXT6, CLUSTER4, LOCAL4 = "198.51.100.10", "2001:db8::10", "10.244.9.9", "198.51.100.99"


class FakeMaps:
    """weft_fqdn as a dict, identities and conntrack as given."""

    is_open = True

    def __init__(self) -> None:
        self.fqdn: dict[tuple[int, IPAddress], Slots] = {}
        self.writes = 0
        self.fail = False
        self.local: set[str] = set()
        self.ct: list[tuple[abi.CtKey, abi.CtValue]] = []

    def peer(self, address: str) -> PeerInfo:
        return PeerInfo(2, address in self.local)

    def forget_peers(self) -> None:
        pass

    def read_slots(self, ep_id: int, ip: IPAddress) -> Slots:
        return dict(self.fqdn.get((ep_id, ip), {}))

    def write_slots(self, ep_id: int, ip: IPAddress, slots: Slots) -> None:
        if self.fail:
            raise OSError(28, "no space left in weft_fqdn")
        self.writes += 1
        if slots:
            self.fqdn[(ep_id, ip)] = dict(slots)
        else:
            self.fqdn.pop((ep_id, ip), None)

    def fqdn_entries(self) -> Iterator[tuple[int, IPAddress, Slots]]:
        for (ep_id, ip), slots in list(self.fqdn.items()):
            yield ep_id, ip, dict(slots)

    def ct_items(self) -> Iterator[tuple[abi.CtKey, abi.CtValue]]:
        return iter(self.ct)

    def close(self) -> None:
        pass


def connection(src: str, dst: str, closing: bool = False) -> tuple[abi.CtKey, abi.CtValue]:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    key = abi.CtKey(proto=6, family=abi.FAMILY_V4 if s.version == 4 else abi.FAMILY_V6)
    ctypes.memmove(key.saddr, s.packed, len(s.packed))
    ctypes.memmove(key.daddr, d.packed, len(d.packed))
    now = time.monotonic_ns()
    return key, abi.CtValue(created_ns=now, last_seen_ns=now, flags=abi.CT_F_CLOSING if closing else 0)


def write_rules(state_dir: Path, endpoints: list[dict[str, Any]] | None = None, revision: int = 1) -> None:
    if endpoints is None:
        endpoints = [endpoint()]
    path = state_dir / "dnsproxy" / "rules.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "revision": revision, "cluster_cidrs": ["10.244.0.0/16"],
                                "endpoints": endpoints}))


def endpoint(selectors: list[tuple[int, str]] | None = None) -> dict[str, Any]:
    if selectors is None:
        selectors = [(SEL, "*.example.com")]
    return {"ep_id": EP, "pod": "ns/client", "identity": 300, "addresses": [POD4],
            "dns_rules": [{"port": 53, "names": [{"matchPattern": "*.example.com"}]}],
            "fqdn_selectors": [{"identity": i, "selector": {"matchPattern": p}} for i, p in selectors]}


@pytest.fixture
def proxy(tmp_path: Path) -> DnsProxy:
    write_rules(tmp_path)
    p = DnsProxy(DnsProxySettings(grace_seconds=4.0, min_ttl=0),
                 ProxyPaths(state_dir=tmp_path, pin_dir=tmp_path / "pins", socket_path=tmp_path / "p.sock"))
    p.maps = FakeMaps()  # type: ignore[assignment]
    assert p.load_rules()["loaded"]
    return p


def fake(p: DnsProxy) -> FakeMaps:
    assert isinstance(p.maps, FakeMaps)
    return p.maps


def query(name: str, rdtype: str = "A", qid: int = 0x4242) -> bytes:
    q = dns.message.make_query(name, rdtype)
    q.id = qid
    data: bytes = q.to_wire()
    return data


def answer(name: str, records: list[tuple[str, int, str, str]], rdtype: str = "A", qid: int = 0x9999) -> bytes:
    q = dns.message.make_query(name, rdtype)
    r = dns.message.make_response(q)
    r.id = qid  # the upstream answers the proxy's own id
    for owner, ttl, kind, value in records:
        r.answer.append(dns.rrset.from_text(owner, ttl, "IN", kind, value))
    data: bytes = r.to_wire()
    return data


def release(p: DnsProxy, name: str, records: list[tuple[str, int, str, str]], rdtype: str = "A") -> bytes:
    q = parse_wire_query(query(name, rdtype))
    return p._learn_from(p.rules.endpoints[EP], q, answer(name, records, rdtype))


def test_learned_before_release_with_the_pods_id(proxy: DnsProxy) -> None:
    before = time.monotonic()
    out = release(proxy, "app.example.com", [("app.example.com.", 30, "A", EXT4)])
    msg = dns.message.from_wire(out)
    assert msg.id == 0x4242, "the pod gets its own transaction id back"
    slots = fake(proxy).fqdn[(EP, ipaddress.ip_address(EXT4))]
    assert set(slots) == {SEL}
    assert (before + 30 + 4) * 1e9 <= slots[SEL] <= (time.monotonic() + 30 + 4) * 1e9
    assert proxy.counters["learned_addresses"] == 1 and proxy.dirty


def test_cname_chain_ipv6_and_selector_on_the_target_only(proxy: DnsProxy, tmp_path: Path) -> None:
    write_rules(tmp_path, [endpoint([(SEL2, "cdn.example.net")])], revision=2)
    proxy.load_rules()
    release(proxy, "www.example.com", [("www.example.com.", 60, "CNAME", "cdn.example.net."),
                                       ("cdn.example.net.", 20, "AAAA", EXT6)], rdtype="AAAA")
    assert set(fake(proxy).fqdn[(EP, ipaddress.ip_address(EXT6))]) == {SEL2}
    names = {row.name for row in proxy.cache.entries(time.monotonic())}
    assert names == {"cdn.example.net."}, "only the name a selector matches is learned"


def test_cluster_and_local_endpoint_addresses_are_never_learned(proxy: DnsProxy) -> None:
    fake(proxy).local.add(LOCAL4)
    release(proxy, "mixed.example.com", [("mixed.example.com.", 30, "A", CLUSTER4), ("mixed.example.com.", 30, "A",
                                                                                     LOCAL4),
                                         ("mixed.example.com.", 30, "A", EXT4)])
    assert set(fake(proxy).fqdn) == {(EP, ipaddress.ip_address(EXT4))}
    assert proxy.counters["skipped_cluster_addresses"] == 2


def test_nxdomain_and_unselected_names_learn_nothing(proxy: DnsProxy) -> None:
    q = parse_wire_query(query("gone.example.com"))
    r = dns.message.make_response(dns.message.from_wire(query("gone.example.com")))
    r.set_rcode(dns.rcode.NXDOMAIN)
    proxy._learn_from(proxy.rules.endpoints[EP], q, r.to_wire())
    release(proxy, "example.org", [("example.org.", 30, "A", EXT4)])
    assert fake(proxy).fqdn == {}


def test_the_same_answer_again_is_not_rewritten(proxy: DnsProxy) -> None:
    release(proxy, "app.example.com", [("app.example.com.", 30, "A", EXT4)])
    writes = fake(proxy).writes
    for _ in range(5):
        release(proxy, "app.example.com", [("app.example.com.", 30, "A", EXT4)])
    assert fake(proxy).writes == writes, "within half the grace the datapath already allows it long enough"


def test_map_failure_is_servfail_not_an_unusable_answer(proxy: DnsProxy) -> None:
    fake(proxy).fail = True
    out = release(proxy, "app.example.com", [("app.example.com.", 30, "A", EXT4)])
    assert dns.message.from_wire(out).rcode() == dns.rcode.SERVFAIL
    assert proxy.counters["map_errors"] == 1 and proxy.counters["servfail_sent"] == 1


def test_cap_per_name_evicts_and_withdraws(tmp_path: Path) -> None:
    write_rules(tmp_path)
    p = DnsProxy(DnsProxySettings(grace_seconds=4.0, max_ips_per_name=2),
                 ProxyPaths(state_dir=tmp_path, pin_dir=tmp_path / "pins", socket_path=tmp_path / "p.sock"))
    p.maps = FakeMaps()  # type: ignore[assignment]
    p.load_rules()
    for last in (1, 2, 3):
        release(p, "lb.example.com", [("lb.example.com.", 30, "A", f"198.51.100.{last}")])
    held = {ip for (_, ip) in fake(p).fqdn}
    assert held == {ipaddress.ip_address("198.51.100.2"), ipaddress.ip_address("198.51.100.3")}
    assert p.counters["evictions"] == 1


def test_expiry_spares_live_connections_then_removes(proxy: DnsProxy, tmp_path: Path) -> None:
    proxy.settings = DnsProxySettings(grace_seconds=0.0)
    proxy.cache.grace = 0.0
    release(proxy, "short.example.com", [("short.example.com.", 0, "A", EXT4)])
    release(proxy, "other.example.com", [("other.example.com.", 0, "A", "198.51.100.11")])
    fake(proxy).ct = [connection(POD4, EXT4)]
    asyncio.run(proxy.expire_once())
    assert (EP, ipaddress.ip_address(EXT4)) in fake(proxy).fqdn, "a live connection keeps the entry (zombie)"
    assert (EP, ipaddress.ip_address("198.51.100.11")) not in fake(proxy).fqdn
    assert [r.zombie for r in proxy.cache.entries(time.monotonic())] == [True]
    fake(proxy).ct = [connection(POD4, EXT4, closing=True)]
    asyncio.run(proxy.expire_once())
    assert fake(proxy).fqdn == {} and len(proxy.cache) == 0
    assert proxy.counters["expired"] == 2


def test_vanished_endpoint_loses_everything(proxy: DnsProxy, tmp_path: Path) -> None:
    release(proxy, "app.example.com", [("app.example.com.", 30, "A", EXT4)])
    fake(proxy).fqdn[(EP, ipaddress.ip_address("203.0.113.1"))] = {SEL: 1}  # written by another process
    write_rules(tmp_path, [], revision=2)
    assert proxy.load_rules()["vanished"] == [EP]
    assert fake(proxy).fqdn == {} and len(proxy.cache) == 0


def test_unreadable_rules_keep_the_previous_ones(proxy: DnsProxy, tmp_path: Path) -> None:
    (tmp_path / "dnsproxy" / "rules.json").write_text("{not json")
    result = proxy.load_rules()
    assert not result["loaded"] and "rules.json" in result["error"]
    assert EP in proxy.rules.endpoints and proxy.status()["error"]


def test_changed_selectors_resync_slots(proxy: DnsProxy, tmp_path: Path) -> None:
    release(proxy, "api.example.com", [("api.example.com.", 30, "A", EXT4)])
    write_rules(tmp_path, [endpoint([(SEL2, "api.example.com")])], revision=2)
    assert proxy.load_rules()["selectors_changed"] == [EP]
    assert set(fake(proxy).fqdn[(EP, ipaddress.ip_address(EXT4))]) == {SEL2}, "new selector in, old one out"


def test_map_entries_the_cache_does_not_know_are_kept_until_they_expire(proxy: DnsProxy) -> None:
    stranger = ipaddress.ip_address("203.0.113.7")
    fake(proxy).fqdn[(EP, stranger)] = {SEL: int((time.monotonic() + 3600) * 1e9)}
    proxy.reconcile_map()
    assert (EP, stranger) in proxy.orphans
    asyncio.run(proxy.expire_once())
    assert (EP, stranger) in fake(proxy).fqdn
    fake(proxy).fqdn[(EP, stranger)] = {SEL: 1}
    proxy.reconcile_map()
    asyncio.run(proxy.expire_once())
    assert (EP, stranger) not in fake(proxy).fqdn and not proxy.orphans


def test_state_saved_and_restored_into_the_map(proxy: DnsProxy, tmp_path: Path) -> None:
    release(proxy, "app.example.com", [("app.example.com.", 300, "A", EXT4)])
    proxy.save_state()
    again = DnsProxy(proxy.settings, proxy.paths)
    again.maps = FakeMaps()  # type: ignore[assignment]  (an empty map: the entry was lost)
    again.load_rules()
    again.load_state()
    again.reconcile_map()
    assert SEL in fake(again).fqdn[(EP, ipaddress.ip_address(EXT4))], "the cache's entries are rewritten"


class Sent:
    def __init__(self) -> None:
        self.replies: list[tuple[tuple[str, int], bytes]] = []
        self.forwarded: list[str] = []


@pytest.fixture
def sent(proxy: DnsProxy, monkeypatch: pytest.MonkeyPatch) -> Sent:
    record = Sent()
    monkeypatch.setattr(proxy, "_reply_udp", lambda orig, client, v6, data: record.replies.append((orig, data)))
    monkeypatch.setattr(proxy, "_forward_udp", lambda q, ep, peer, orig, v6: record.forwarded.append(q.qname))
    return record


def rcode_of(data: bytes) -> int:
    return int(dns.message.from_wire(data).rcode())


def test_query_decisions(proxy: DnsProxy, sent: Sent) -> None:
    proxy._query(query("app.example.com"), (POD4, 40000), DNS, False, 17)
    assert sent.forwarded == ["app.example.com."] and not sent.replies
    proxy._query(query("evil.org"), (POD4, 40001), DNS, False, 17)
    assert sent.replies[-1][0] == DNS, "answered from the original destination"
    assert rcode_of(sent.replies[-1][1]) == dns.rcode.REFUSED and proxy.counters["denied"] == 1
    proxy._query(query("app.example.com"), ("10.244.3.3", 40002), DNS, False, 17)
    assert rcode_of(sent.replies[-1][1]) == dns.rcode.REFUSED and proxy.counters["unknown_source"] == 1
    proxy._query(b"\x00\x01\x01", (POD4, 40003), DNS, False, 17)
    assert proxy.counters["malformed_truncated"] == 1 and len(sent.replies) == 2, "garbage gets no answer"
    # Allowed names are noted when their answer comes back; the refusal at once.
    assert [(r["name"], r["denied"], r["last_rcode"]) for r in proxy.names_report()] == [("evil.org.", 1, "REFUSED")]


def test_nxdomain_deny_response(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_rules(tmp_path)
    p = DnsProxy(DnsProxySettings(deny_response="nxdomain"),
                 ProxyPaths(state_dir=tmp_path, pin_dir=tmp_path / "pins", socket_path=tmp_path / "p.sock"))
    p.maps = FakeMaps()  # type: ignore[assignment]
    p.load_rules()
    replies: list[bytes] = []
    monkeypatch.setattr(p, "_reply_udp", lambda orig, client, v6, data: replies.append(data))
    p._query(query("evil.org"), (POD4, 40000), DNS, False, 17)
    assert rcode_of(replies[0]) == dns.rcode.NXDOMAIN
