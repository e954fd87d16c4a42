"""toFQDNs and DNS rules in the pure policy layer: the seed's policy in its canonical form and
in the literal reading of the web page, resolved into map state (redirects to the DNS proxy, the
FQDN selector identity's entries) and into the DNS proxy's rules."""

from __future__ import annotations

import textwrap
from pathlib import Path

from weft.identity.allocator import FQDN_MIN
from weft.policy import EndpointSubject, PolicyRepository, load_policies
from weft.policy.mapstate import EGRESS, PROTO_TCP, PROTO_UDP, EndpointPolicy, PolicyKey
from weft.policy.selectors import FQDNSelector, fqdn_labels
from weft.types.labels import pod_labels

GENAI, KUBE_DNS, OTHER = 256, 300, 301
APP1 = FQDN_MIN

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "policies"
CANONICAL = (EXAMPLES / "allow-genai-to-blobstorage.yaml").read_text()  # as Cilium's docs write it
LITERAL = (EXAMPLES / "allow-genai-to-blobstorage-literal.yaml").read_text()  # as the page reads


def resolve(text: str) -> EndpointPolicy:
    repo = PolicyRepository()
    repo.apply(load_policies(textwrap.dedent(text), "seed.yaml"))
    genai = pod_labels("default", {"app": "genai_backend"})
    identities = {
        GENAI: genai,
        KUBE_DNS: pod_labels("kube-system", {"k8s-app": "kube-dns"}),
        OTHER: pod_labels("default", {"app": "other"}),
        APP1: fqdn_labels(FQDNSelector(match_name="app1.myblobstorage.com")),
    }
    repo.sync_identities(identities)
    return repo.resolve(EndpointSubject.of(GENAI, genai, "default"), identities, {})


def test_canonical_seed_redirects_dns_to_kube_dns_only() -> None:
    policy = resolve(CANONICAL)
    assert policy.egress_enforced and not policy.ingress_enforced
    for proto in (PROTO_UDP, PROTO_TCP):
        verdict = policy.entries[PolicyKey(EGRESS, KUBE_DNS, proto, 53, 16)]
        assert verdict.redirect and not verdict.deny
    # DNS to any other peer is not allowed at all.
    assert not any(k.identity == 0 for k in policy.entries)
    # toFQDNs: its selector identity is allowed on every port, without redirect.
    assert policy.entries[PolicyKey(EGRESS, APP1, 0, 0, 0)].redirect is False
    assert policy.fqdn_selectors == ((("matchName", "app1.myblobstorage.com"), APP1),)
    (rule,) = policy.dns_rules
    assert rule.peers == frozenset({KUBE_DNS})
    assert set(rule.protos) == {PROTO_UDP, PROTO_TCP} and (rule.first, rule.last) == (53, 53)
    assert rule.names == (("matchPattern", "*.myblobstorage.com"),)


def test_literal_seed_redirects_dns_to_every_peer_with_the_same_names() -> None:
    policy = resolve(LITERAL)
    # Port 53 of any peer goes to the proxy; kube-dns stays reachable on every port (L3 rule).
    assert policy.entries[PolicyKey(EGRESS, 0, PROTO_UDP, 53, 16)].redirect
    assert not policy.entries[PolicyKey(EGRESS, KUBE_DNS, 0, 0, 0)].redirect
    # The L3-only rule adds no DNS rule: the redirect takes precedence and only the pattern
    # decides what resolves (as in Cilium).
    (rule,) = policy.dns_rules
    assert rule.peers is None and rule.names == (("matchPattern", "*.myblobstorage.com"),)
    assert policy.fqdn_selectors == ((("matchName", "app1.myblobstorage.com"), APP1),)


def test_l4_rule_without_dns_rules_on_a_redirected_port_allows_every_name() -> None:
    text = CANONICAL + """
  - toEndpoints:
    - matchLabels:
        app: other
    toPorts:
    - ports:
      - port: "53"
        protocol: UDP
"""
    policy = resolve(text)
    rules = {r.peers: r.names for r in policy.dns_rules}
    assert rules[frozenset({KUBE_DNS})] == (("matchPattern", "*.myblobstorage.com"),)
    assert rules[frozenset({OTHER})] == ()


def test_no_dns_rules_no_redirect_no_proxy_rules() -> None:
    policy = resolve(CANONICAL.replace("""      rules:
        dns:
        - matchPattern: "*.myblobstorage.com"
""", ""))
    assert not policy.redirects and policy.dns_rules == ()


def test_fqdn_selector_without_identity_selects_nothing() -> None:
    repo = PolicyRepository()
    repo.apply(load_policies(textwrap.dedent(CANONICAL), "seed.yaml"))
    genai = pod_labels("default", {"app": "genai_backend"})
    identities = {GENAI: genai}
    policy = repo.resolve(EndpointSubject.of(GENAI, genai, "default"), identities, {})
    assert policy.fqdn_selectors == ()
    assert all(k.identity < FQDN_MIN for k in policy.entries)


def test_match_name_and_equal_pattern_share_one_label() -> None:
    assert fqdn_labels(FQDNSelector(match_name="App1.MyBlobStorage.com.")) == \
        fqdn_labels(FQDNSelector(match_pattern="app1.myblobstorage.com"))
