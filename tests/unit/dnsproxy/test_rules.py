"""Rule matching and slot merging, pure."""

from __future__ import annotations

import ipaddress

import pytest

from weft.dnsproxy.config import DnsRule, EndpointRules, FqdnSelectorRule, ProxyRules
from weft.dnsproxy.rules import CompiledRules, RulesError, merge_slots

UDP, TCP = 17, 6


def rules(*dns_rules: DnsRule, selectors: list[FqdnSelectorRule] | None = None) -> CompiledRules:
    ep = EndpointRules(ep_id=3, pod="ns/a", identity=300, addresses=["10.0.0.3", "FD00::0003"],
                       dns_rules=list(dns_rules), fqdn_selectors=selectors or [])
    return CompiledRules.compile(ProxyRules(revision=4, cluster_cidrs=["10.0.0.0/16", "fd00::/64"], endpoints=[ep]))


def test_source_address_finds_the_endpoint_in_canonical_form() -> None:
    r = rules()
    assert r.by_address["fd00::3"].ep_id == 3 and r.by_address["10.0.0.3"].pod == "ns/a"
    assert r.revision == 4


def test_names_peers_protocol_and_ports() -> None:
    r = rules(DnsRule(peers=[10], protocol=UDP, port=53, names=[{"matchName": "a.example.com"}]),
              DnsRule(peers=None, protocol=0, port=5300, end_port=5400, names=[{"matchPattern": "*.corp"}]))
    ep = r.endpoints[3]
    assert ep.allows(10, UDP, 53, "a.example.com.")
    assert not ep.allows(10, TCP, 53, "a.example.com."), "the rule is UDP only"
    assert not ep.allows(11, UDP, 53, "a.example.com."), "another peer"
    assert not ep.allows(10, UDP, 53, "b.example.com."), "another name"
    assert ep.allows(99, TCP, 5350, "x.corp.") and not ep.allows(99, TCP, 5401, "x.corp.")
    assert ep.matching_rule(10, UDP, 53, "a.example.com.") == ""  # rules without a name report ""


def test_empty_names_allow_everything_and_port_zero_any_port() -> None:
    ep = rules(DnsRule(peers=None, protocol=0, port=0, names=[])).endpoints[3]
    assert ep.allows(2, TCP, 853, "anything.at.all.")


def test_no_rule_denies() -> None:
    assert not rules().endpoints[3].allows(2, UDP, 53, "a.example.com.")


def test_selector_identities_per_name() -> None:
    ep = rules(selectors=[FqdnSelectorRule(identity=1000, selector={"matchPattern": "*.example.com"}),
                          FqdnSelectorRule(identity=1001, selector={"matchName": "api.example.com"}),
                          FqdnSelectorRule(identity=1000, selector={"matchName": "other.org"})]).endpoints[3]
    assert ep.selector_ids("api.example.com.") == (1000, 1001)
    assert ep.selector_ids("www.example.com.") == (1000,)
    assert ep.selector_ids("other.org.") == (1000,)
    assert ep.selector_ids("example.com.") == ()
    assert ep.selector_identities == {1000, 1001}


def test_cluster_cidrs() -> None:
    r = rules()
    assert r.in_cluster(ipaddress.ip_address("10.0.200.1")) and r.in_cluster(ipaddress.ip_address("fd00::99"))
    assert not r.in_cluster(ipaddress.ip_address("192.0.2.1"))


@pytest.mark.parametrize(("endpoint", "message"), [
    (EndpointRules(ep_id=1, pod="ns/a", identity=1, addresses=["10.0.0.300"]), "is not an IP address"),
    (EndpointRules(ep_id=1, pod="ns/a", identity=1, addresses=[],
                   dns_rules=[DnsRule(names=[{"matchPattern": "bad pattern"}])]), "dns_rules[0]"),
    (EndpointRules(ep_id=1, pod="ns/a", identity=1, addresses=[], dns_rules=[DnsRule(port=60, end_port=50)]),
     "end_port 50 is below port 60"),
    (EndpointRules(ep_id=1, pod="ns/a", identity=1, addresses=[], dns_rules=[DnsRule(protocol=1)]),
     "protocol 1"),
])
def test_bad_rules_name_the_endpoint_and_field(endpoint: EndpointRules, message: str) -> None:
    with pytest.raises(RulesError) as info:
        CompiledRules.compile(ProxyRules(endpoints=[endpoint]))
    assert message in str(info.value) and "endpoint 1 (ns/a)" in str(info.value)


def test_an_address_of_two_endpoints_is_refused() -> None:
    a = EndpointRules(ep_id=1, pod="ns/a", identity=1, addresses=["10.0.0.1"])
    b = EndpointRules(ep_id=2, pod="ns/b", identity=1, addresses=["10.0.0.1"])
    with pytest.raises(RulesError, match="belongs to endpoints 1"):
        CompiledRules.compile(ProxyRules(endpoints=[a, b]))


def test_merge_slots_keeps_others_and_later_expiry() -> None:
    merged, gone = merge_slots({1: 100, 2: 500}, {2: 300, 3: 400}, 4)
    assert merged == {1: 100, 2: 500, 3: 400} and gone == []


def test_merge_slots_fifth_selector_replaces_the_one_expiring_first() -> None:
    merged, gone = merge_slots({1: 100, 2: 200, 3: 300, 4: 400}, {5: 250}, 4)
    assert merged == {2: 200, 3: 300, 4: 400, 5: 250} and gone == [1]
    # A new slot expiring before every other still displaces nothing it should not: it goes itself.
    merged, gone = merge_slots({1: 100, 2: 200, 3: 300, 4: 400}, {5: 50}, 4)
    assert gone == [5] and merged == {1: 100, 2: 200, 3: 300, 4: 400}
