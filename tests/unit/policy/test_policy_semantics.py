"""Policy meaning, end to end from YAML to the datapath lookup, on the e2e layout.

Each scenario applies policies and checks the full pod-to-pod reachability matrix (9 pods,
72 ordered pairs) against an expectation written as a predicate on (src, dst).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from policy_world import World

from weft.policy import EGRESS, INGRESS, PolicyKey, PolicyRepository, lookup, trace
from weft.policy.resolve import LOCALHOST_RULE
from weft.types.labels import Label

Pred = Callable[[str, str], bool]


def ns(name: str) -> str:
    return name.split("/")[0]


def pod(name: str) -> str:
    return name.split("/")[1]


NP_DENY_INGRESS_X = """
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: deny-all, namespace: x}
    spec:
      podSelector: {}
      policyTypes: [Ingress]
"""


def netpol(spec: str, namespace: str = "x", name: str = "np") -> str:
    body = "\n".join("      " + line for line in spec.strip("\n").splitlines())
    return (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{body}\n"
    )


def cnp(spec: str, namespace: str = "x", name: str = "cnp", kind: str = "CiliumNetworkPolicy") -> str:
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    meta = f"{{name: {name}, namespace: {namespace}}}" if kind == "CiliumNetworkPolicy" else f"{{name: {name}}}"
    return f"apiVersion: cilium.io/v2\nkind: {kind}\nmetadata: {meta}\nspec:\n{body}\n"


def ccnp(spec: str, name: str = "ccnp") -> str:
    return cnp(spec, name=name, kind="CiliumClusterwideNetworkPolicy")


def into_xa_only_from(pred: Pred) -> Pred:
    return lambda s, d: d != "x/a" or pred(s, d)


SCENARIOS: list[tuple[str, list[str], int, str, Pred]] = [
    ("no-policy-allows-all", [], 80, "tcp", lambda s, d: True),
    ("np-deny-all-ingress", [NP_DENY_INGRESS_X], 80, "tcp", lambda s, d: ns(d) != "x"),
    (
        "np-ingress-empty-rule-allows-all",
        [netpol("podSelector: {}\ningress:\n- {}")],
        80,
        "tcp",
        lambda s, d: True,
    ),
    (
        "np-ingress-empty-list-denies",
        [netpol("podSelector: {}\npolicyTypes: [Ingress]\ningress: []")],
        80,
        "tcp",
        lambda s, d: ns(d) != "x",
    ),
    (
        "np-pod-selector-same-namespace",
        [netpol("podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - podSelector: {matchLabels: {pod: b}}")],
        80,
        "tcp",
        into_xa_only_from(lambda s, d: s == "x/b"),
    ),
    (
        "np-namespace-selector",
        [
            netpol(
                "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {ns: y}}"
            )
        ],
        80,
        "tcp",
        into_xa_only_from(lambda s, d: ns(s) == "y"),
    ),
    (
        "np-namespace-and-pod-in-one-peer-is-AND",
        [
            netpol(
                "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n"
                "  - namespaceSelector: {matchLabels: {ns: y}}\n    podSelector: {matchLabels: {pod: b}}"
            )
        ],
        80,
        "tcp",
        into_xa_only_from(lambda s, d: s == "y/b"),
    ),
    (
        "np-namespace-and-pod-as-two-peers-is-OR",
        [
            netpol(
                "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n"
                "  - namespaceSelector: {matchLabels: {ns: y}}\n  - podSelector: {matchLabels: {pod: b}}"
            )
        ],
        80,
        "tcp",
        into_xa_only_from(lambda s, d: ns(s) == "y" or s == "x/b"),
    ),
    (
        "np-empty-namespace-selector-is-every-namespace",
        [netpol("podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - namespaceSelector: {}")],
        80,
        "tcp",
        lambda s, d: True,
    ),
    (
        "np-namespace-selector-by-metadata-name",
        [
            netpol(
                "podSelector: {}\ningress:\n- from:\n"
                "  - namespaceSelector:\n      matchExpressions:\n"
                "      - {key: kubernetes.io/metadata.name, operator: NotIn, values: [y]}"
            )
        ],
        80,
        "tcp",
        lambda s, d: ns(d) != "x" or ns(s) != "y",
    ),
    (
        "np-port-80-allowed",
        [netpol("podSelector: {matchLabels: {pod: a}}\ningress:\n- ports: [{port: 80}]")],
        80,
        "tcp",
        lambda s, d: True,
    ),
    (
        "np-port-80-only-blocks-81",
        [netpol("podSelector: {matchLabels: {pod: a}}\ningress:\n- ports: [{port: 80}]")],
        81,
        "tcp",
        into_xa_only_from(lambda s, d: False),
    ),
    (
        "np-port-80-tcp-blocks-udp",
        [netpol("podSelector: {matchLabels: {pod: a}}\ningress:\n- ports: [{port: 80}]")],
        80,
        "udp",
        into_xa_only_from(lambda s, d: False),
    ),
    (
        "np-named-port",
        [netpol("podSelector: {matchLabels: {pod: a}}\ningress:\n- ports: [{port: serve-81-udp, protocol: UDP}]")],
        81,
        "udp",
        lambda s, d: True,
    ),
    (
        "np-named-port-other-port-denied",
        [netpol("podSelector: {matchLabels: {pod: a}}\ningress:\n- ports: [{port: serve-81-udp, protocol: UDP}]")],
        80,
        "udp",
        into_xa_only_from(lambda s, d: False),
    ),
    (
        "np-named-port-protocol-mismatch",
        [netpol("podSelector: {matchLabels: {pod: a}}\ningress:\n- ports: [{port: serve-81-udp, protocol: TCP}]")],
        81,
        "udp",
        into_xa_only_from(lambda s, d: False),
    ),
    (
        "np-endport-range",
        [netpol("podSelector: {matchLabels: {pod: a}}\ningress:\n- ports: [{port: 79, endPort: 81}]")],
        81,
        "tcp",
        lambda s, d: True,
    ),
    (
        "np-empty-policyTypes-defaults",
        [netpol("podSelector: {}\npolicyTypes: []")],
        80,
        "tcp",
        lambda s, d: ns(d) != "x",
    ),
    (
        "np-egress-deny-all",
        [netpol("podSelector: {}\npolicyTypes: [Egress]")],
        80,
        "tcp",
        lambda s, d: ns(s) != "x",
    ),
    (
        "np-default-policyTypes-with-egress-enforce-both",
        [netpol("podSelector: {matchLabels: {pod: a}}\negress:\n- to:\n  - podSelector: {matchLabels: {pod: b}}")],
        80,
        "tcp",
        lambda s, d: (s != "x/a" or d == "x/b") and d != "x/a",
    ),
    (
        "np-egress-type-only-leaves-ingress",
        [
            netpol(
                "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- to:\n"
                "  - podSelector: {matchLabels: {pod: b}}"
            )
        ],
        80,
        "tcp",
        lambda s, d: s != "x/a" or d == "x/b",
    ),
    (
        "np-ingress-rules-ignored-without-Ingress-type",
        [netpol("podSelector: {}\npolicyTypes: [Egress]\ningress:\n- {}\negress:\n- {}")],
        80,
        "tcp",
        lambda s, d: True,
    ),
    (
        "np-egress-named-port-per-destination",
        [
            netpol(
                "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- ports: [{port: serve-81-tcp}]"
            )
        ],
        81,
        "tcp",
        lambda s, d: True,
    ),
    (
        "np-egress-named-port-blocks-other",
        [
            netpol(
                "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n- ports: [{port: serve-81-tcp}]"
            )
        ],
        80,
        "tcp",
        lambda s, d: s != "x/a",
    ),
    (
        "np-two-policies-union",
        [
            netpol("podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - podSelector: {matchLabels: {pod: b}}"),
            netpol(
                "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - podSelector: {matchLabels: {pod: c}}",
                name="np2",
            ),
        ],
        80,
        "tcp",
        into_xa_only_from(lambda s, d: s in ("x/b", "x/c")),
    ),
    (
        "cnp-empty-selectors-namespace-scoped",
        [cnp("endpointSelector: {}\ningress:\n- fromEndpoints: [{}]")],
        80,
        "tcp",
        lambda s, d: ns(d) != "x" or ns(s) == "x",
    ),
    (
        "ccnp-empty-from-is-every-pod",
        [ccnp("endpointSelector: {matchLabels: {pod: a}}\ningress:\n- fromEndpoints: [{}]")],
        80,
        "tcp",
        lambda s, d: True,
    ),
    (
        "ccnp-selects-every-namespace",
        [ccnp("endpointSelector: {matchLabels: {pod: a}}\ningress:\n- fromEndpoints: [{matchLabels: {pod: b}}]")],
        80,
        "tcp",
        lambda s, d: pod(d) != "a" or pod(s) == "b",
    ),
    (
        "cnp-from-other-namespace-by-label",
        [
            cnp(
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n"
                "- fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: y}}]"
            )
        ],
        80,
        "tcp",
        into_xa_only_from(lambda s, d: ns(s) == "y"),
    ),
    (
        "cnp-namespace-key-without-source-is-any",
        [
            cnp(
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n"
                "- fromEndpoints: [{matchLabels: {io.kubernetes.pod.namespace: z, pod: c}}]"
            )
        ],
        80,
        "tcp",
        into_xa_only_from(lambda s, d: s == "z/c"),
    ),
    (
        "cnp-namespace-labels-not-scoped",
        [
            cnp(
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n"
                "- fromEndpoints: [{matchLabels: {k8s:io.cilium.k8s.namespace.labels.ns: z}}]"
            )
        ],
        80,
        "tcp",
        into_xa_only_from(lambda s, d: ns(s) == "z"),
    ),
    (
        "cnp-endpointSelector-cannot-leave-namespace",
        [cnp("endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: y}}\ningress:\n- {}")],
        80,
        "tcp",
        lambda s, d: ns(d) != "x",
    ),
    (
        "cnp-ingress-empty-rule-is-default-deny",
        [cnp("endpointSelector: {}\ningress:\n- {}")],
        80,
        "tcp",
        lambda s, d: ns(d) != "x",
    ),
    ("cnp-ingress-empty-list-has-no-effect", [cnp("endpointSelector: {}\ningress: []")], 80, "tcp", lambda s, d: True),
    (
        "cnp-l4-only-applies-to-every-peer",
        [
            cnp(
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n"
                "- toPorts: [{ports: [{port: '80', protocol: TCP}]}]"
            )
        ],
        80,
        "tcp",
        lambda s, d: True,
    ),
    (
        "cnp-l4-only-blocks-other-port",
        [
            cnp(
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n"
                "- toPorts: [{ports: [{port: '80', protocol: TCP}]}]"
            )
        ],
        81,
        "tcp",
        into_xa_only_from(lambda s, d: False),
    ),
    (
        "cnp-protocol-any-covers-udp",
        [cnp("endpointSelector: {matchLabels: {pod: a}}\ningress:\n- toPorts: [{ports: [{port: '80'}]}]")],
        80,
        "udp",
        lambda s, d: True,
    ),
    (
        "cnp-ingress-deny-beats-allow-all",
        [
            cnp(
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- fromEntities: [all]\n"
                "ingressDeny:\n- fromEndpoints: [{matchLabels: {pod: b}}]"
            )
        ],
        80,
        "tcp",
        into_xa_only_from(lambda s, d: s != "x/b"),
    ),
    (
        "ccnp-deny-beats-cnp-allow",
        [
            cnp("endpointSelector: {matchLabels: {pod: a}}\ningress:\n- fromEndpoints: [{}]"),
            ccnp(
                "endpointSelector: {}\nenableDefaultDeny: {ingress: false}\ningressDeny:\n"
                "- fromEndpoints: [{matchLabels: {pod: c}}]\n  toPorts: [{ports: [{port: '80', protocol: TCP}]}]"
            ),
        ],
        80,
        "tcp",
        lambda s, d: pod(s) != "c" and (d != "x/a" or ns(s) == "x"),
    ),
    (
        "ccnp-deny-port-leaves-other-port",
        [
            cnp("endpointSelector: {matchLabels: {pod: a}}\ningress:\n- fromEndpoints: [{}]"),
            ccnp(
                "endpointSelector: {}\nenableDefaultDeny: {ingress: false}\ningressDeny:\n"
                "- fromEndpoints: [{matchLabels: {pod: c}}]\n  toPorts: [{ports: [{port: '80', protocol: TCP}]}]"
            ),
        ],
        81,
        "tcp",
        into_xa_only_from(lambda s, d: ns(s) == "x"),
    ),
    (
        "deny-only-policy-puts-in-default-deny",
        [cnp("endpointSelector: {matchLabels: {pod: a}}\ningressDeny:\n- fromEndpoints: [{matchLabels: {pod: b}}]")],
        80,
        "tcp",
        into_xa_only_from(lambda s, d: False),
    ),
    (
        "ccnp-deny-only-puts-every-pod-in-default-deny",
        [ccnp("endpointSelector: {}\ningressDeny:\n- fromEntities: [world]")],
        80,
        "tcp",
        lambda s, d: False,
    ),
    (
        "enableDefaultDeny-false-only-adds",
        [
            cnp(
                "endpointSelector: {matchLabels: {pod: a}}\nenableDefaultDeny: {ingress: false}\n"
                "ingressDeny:\n- fromEndpoints: [{matchLabels: {pod: b}}]"
            )
        ],
        80,
        "tcp",
        into_xa_only_from(lambda s, d: s != "x/b"),
    ),
    (
        "cnp-egress-deny-port",
        [
            cnp(
                "endpointSelector: {matchLabels: {pod: a}}\negress:\n- toEntities: [all]\n"
                "egressDeny:\n- toPorts: [{ports: [{port: '80', protocol: TCP}]}]"
            )
        ],
        80,
        "tcp",
        lambda s, d: s != "x/a",
    ),
    (
        "cnp-matchExpressions-NotIn",
        [
            cnp(
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- fromEndpoints:\n"
                "  - matchExpressions: [{key: pod, operator: NotIn, values: [a, b]}]"
            )
        ],
        80,
        "tcp",
        into_xa_only_from(lambda s, d: s == "x/c"),
    ),
    (
        "cnp-matchExpressions-DoesNotExist",
        [
            cnp(
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- fromEndpoints:\n"
                "  - matchExpressions: [{key: pod, operator: DoesNotExist}]"
            )
        ],
        80,
        "tcp",
        into_xa_only_from(lambda s, d: False),
    ),
    (
        "cnp-egress-to-cluster-entity",
        [cnp("endpointSelector: {matchLabels: {pod: a}}\negress:\n- toEntities: [cluster]")],
        80,
        "tcp",
        lambda s, d: True,
    ),
    (
        "cnp-egress-to-world-only",
        [cnp("endpointSelector: {matchLabels: {pod: a}}\negress:\n- toEntities: [world]")],
        80,
        "tcp",
        lambda s, d: s != "x/a",
    ),
]


@pytest.mark.parametrize(
    ("policies", "port", "proto", "expect"), [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS]
)
def test_reachability_matrix(policies: list[str], port: int, proto: str, expect: Pred) -> None:
    world = World.default()
    repo = world.repo(*policies)
    got = world.reachable(repo, port, proto)
    want = {(s, d) for s, d in world.all_pairs() if expect(s, d)}
    assert sorted(got - want) == [], "allowed but should be denied"
    assert sorted(want - got) == [], "denied but should be allowed"


# ----------------------------------------------------------------------------- non-pod peers


def test_entities_world_host_and_localhost() -> None:
    world = World.default()
    repo = world.repo(
        cnp(
            "endpointSelector: {matchLabels: {pod: a}}\negress:\n- toEntities: [world]\n"
            "ingress:\n- fromEntities: [world]"
        )
    )
    assert world.allowed(repo, "x/a", 2, 443)
    assert not world.allowed(repo, "x/a", 1, 443)  # host is not world
    assert world.allowed(repo, 2, "x/a", 80)
    # Cilium's allow-localhost default: the node reaches its pods whatever the policy.
    assert world.allowed(repo, 1, "x/a", 80)
    policy = repo.resolve(world.pods["x/a"], None, world.named_ports, allow_localhost=False)
    assert not lookup(policy, INGRESS, 1, 6, 80).allowed
    assert lookup(repo.resolve(world.pods["x/a"]), INGRESS, 1, 6, 80).rules == (LOCALHOST_RULE,)


@pytest.mark.parametrize(
    ("entity", "allowed_ids"),
    [
        ("host", {1}),
        ("remote-node", {6}),
        ("health", {4}),
        ("init", {5}),
        ("unmanaged", {3}),
        ("kube-apiserver", {7}),
        ("ingress", {8}),
        ("world", {2}),
        ("cluster", {1, 3, 4, 5, 6, 7, 8, 257}),
        ("all", {1, 2, 3, 4, 5, 6, 7, 8, 257}),
        ("none", set()),
    ],
)
def test_entity_identities(entity: str, allowed_ids: set[int]) -> None:
    world = World.default()
    repo = world.repo(cnp(f"endpointSelector: {{matchLabels: {{pod: a}}}}\negress:\n- toEntities: [{entity}]"))
    got = {i for i in (1, 2, 3, 4, 5, 6, 7, 8, 257) if world.allowed(repo, "x/a", i, 80)}
    assert got == allowed_ids


def test_cidr_nesting_except_and_world() -> None:
    world = World.default()
    repo = world.repo(
        cnp(
            "endpointSelector: {matchLabels: {pod: a}}\negress:\n"
            "- toCIDRSet: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}]\n"
            "- toCIDR: [10.1.0.0/16]\n  toPorts: [{ports: [{port: '443', protocol: TCP}]}]"
        ),
        cnp("endpointSelector: {matchLabels: {pod: b}}\negress:\n- toCIDR: [10.1.2.0/24, 192.0.2.1]", name="other"),
    )
    ids = repo.cidr_identities()
    assert list(ids) == ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "192.0.2.1/32"]
    assert list(ids.values()) == [2**24, 2**24 + 1, 2**24 + 2, 2**24 + 3, 2**24 + 4]
    ip = repo.identity_of_address
    assert world.allowed(repo, "x/a", ip("8.8.8.8"), 80)
    assert world.allowed(repo, "x/a", ip("192.0.2.1"), 80)  # a /32 inside 0.0.0.0/0
    assert not world.allowed(repo, "x/a", ip("10.9.9.9"), 80)  # excepted
    assert world.allowed(repo, "x/a", ip("10.1.2.3"), 443)  # the /16 rule covers the /24 identity
    assert not world.allowed(repo, "x/a", ip("10.1.2.3"), 80)
    assert not world.allowed(repo, "x/a", ip("2001:db8::1"), 80)  # world (2): no IPv6 rule
    policy = repo.resolve(world.pods["x/a"])
    assert "10.0.0.0/8" in policy.cidr_identities  # the except prefix: the ipcache needs it
    assert "192.0.2.1/32" in policy.cidr_identities
    # Removing the other policy releases the prefixes only it named.
    repo.delete(("CiliumNetworkPolicy", "x", "other"))
    assert "10.1.2.0/24" not in repo.cidr_identities()


def test_netpol_ipblock_except() -> None:
    world = World.default()
    repo = world.repo(
        netpol(
            "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\negress:\n"
            "- to:\n  - ipBlock: {cidr: 192.168.0.0/16, except: [192.168.5.0/24]}"
        )
    )
    ip = repo.identity_of_address
    assert world.allowed(repo, "x/a", ip("192.168.1.1"), 80)
    assert not world.allowed(repo, "x/a", ip("192.168.5.5"), 80)
    assert not world.allowed(repo, "x/a", ip("8.8.8.8"), 80)
    assert not world.allowed(repo, "x/a", "x/b", 80)  # ipBlock does not select pods


@pytest.mark.parametrize(
    ("proto", "icmp_type", "allowed"),
    [("icmp", 8, True), ("icmp", 0, False), ("icmpv6", 128, True), ("icmpv6", 129, False), ("tcp", 8, False)],
)
def test_icmps(proto: str, icmp_type: int, allowed: bool) -> None:
    world = World.default()
    repo = world.repo(
        cnp(
            "endpointSelector: {matchLabels: {pod: a}}\ningress:\n"
            "- icmps: [{fields: [{type: 8, family: IPv4}, {type: EchoRequest, family: IPv6}]}]"
        )
    )
    assert world.allowed(repo, "x/b", "x/a", icmp_type, proto) is allowed
    keys = set(repo.resolve(world.pods["x/a"]).entries)
    assert PolicyKey(INGRESS, 0, 1, 8, 16) in keys and PolicyKey(INGRESS, 0, 58, 128, 16) in keys


def test_port_range_entries_are_prefixes() -> None:
    world = World.default()
    repo = world.repo(
        cnp(
            "endpointSelector: {matchLabels: {pod: a}}\negress:\n"
            "- toPorts: [{ports: [{port: '80', endPort: 444, protocol: TCP}]}]"
        )
    )
    keys = sorted(k for k in repo.resolve(world.pods["x/a"]).entries if k.direction == EGRESS)
    assert [(k.identity, k.proto, k.port, k.port_prefix_len) for k in keys] == [
        (0, 6, 80, 12),
        (0, 6, 96, 11),
        (0, 6, 128, 9),
        (0, 6, 256, 9),
        (0, 6, 384, 11),
        (0, 6, 416, 12),
        (0, 6, 432, 13),
        (0, 6, 440, 14),
        (0, 6, 444, 16),
    ]
    for port, ok in [(79, False), (80, True), (300, True), (444, True), (445, False)]:
        assert world.allowed(repo, "x/a", "y/b", port) is ok


def test_named_port_resolves_per_destination_identity() -> None:
    world = World.default()
    world.add_pod("y", "d", 300, {"pod": "d"}, {"ns": "y"}, ports={"web": (6, 8080)})
    world.add_pod("y", "e", 301, {"pod": "e"}, {"ns": "y"}, ports={"web": (6, 9090)})
    repo = world.repo(
        cnp(
            "endpointSelector: {matchLabels: {pod: a}}\negress:\n"
            "- toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: y}}]\n"
            "  toPorts: [{ports: [{port: web, protocol: TCP}]}]"
        )
    )
    assert world.allowed(repo, "x/a", "y/d", 8080)
    assert not world.allowed(repo, "x/a", "y/d", 9090)
    assert world.allowed(repo, "x/a", "y/e", 9090)
    assert not world.allowed(repo, "x/a", "y/e", 8080)
    assert not world.allowed(repo, "x/a", "y/b", 8080)  # no port called web


def test_ingress_named_port_uses_own_ports() -> None:
    world = World.default()
    world.add_pod("x", "web", 300, {"app": "web"}, {"ns": "x"}, ports={"http": (6, 8080)})
    repo = world.repo(
        cnp("endpointSelector: {matchLabels: {app: web}}\ningress:\n- toPorts: [{ports: [{port: http}]}]")
    )
    assert world.allowed(repo, "y/a", "x/web", 8080)
    assert not world.allowed(repo, "y/a", "x/web", 80)


def test_label_change_takes_effect() -> None:
    world = World.default()
    repo = world.repo(
        netpol(
            "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - podSelector: {matchLabels: {role: client}}"
        )
    )
    assert not world.allowed(repo, "x/b", "x/a", 80)
    relabelled = world.add_pod("x", "b", 257, {"pod": "b", "role": "client"}, {"ns": "x"})
    repo.sync_identities(world.identities)
    assert world.allowed(repo, relabelled.identity, "x/a", 80)
    assert world.allowed(repo, "x/b", "x/a", 80)


def test_trace_output_names_deciding_rules() -> None:
    world = World.default()
    repo = world.repo(
        netpol(
            "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - podSelector: {matchLabels: {pod: b}}",
            name="web",
        ),
        cnp(
            "endpointSelector: {matchLabels: {pod: c}}\negressDeny:\n- toEndpoints: [{matchLabels: {pod: a}}]",
            name="no-c",
        ),
    )
    ok = trace(repo, world.pods["x/b"], world.pods["x/a"], 80, "tcp")
    assert ok.verdict == "allowed"
    assert ok.egress_decision.verdict == "default-allow"
    assert ok.ingress_decision.verdict == "allow"
    assert ok.deciding_rules == ("netpol x/web ingress[0]",)
    assert ok.lines() == [
        "verdict: allowed",
        "  egress: allowed (no policy selects the endpoint for egress)",
        "  ingress: allowed by netpol x/web ingress[0]",
    ]
    no = trace(repo, world.pods["y/b"], world.pods["x/a"], 80, "tcp")
    assert no.verdict == "denied"
    assert no.ingress_decision.verdict == "default-deny"
    assert no.deciding_rules == ("netpol x/web",)
    assert "denied by default (selected by netpol x/web; no rule allows it)" in no.lines()[2]
    deny = trace(repo, world.pods["x/c"], world.pods["x/a"], 80, "tcp")
    assert deny.verdict == "denied"
    assert deny.egress_decision.verdict == "deny"
    assert deny.deciding_rules[0] == "cnp x/no-c egressDeny[0]"
    out = trace(repo, world.pods["x/a"], 2, 53, "udp")
    assert out.verdict == "allowed" and out.ingress_decision.verdict == "not-applicable"
    with pytest.raises(ValueError, match="unknown protocol"):
        trace(repo, 2, 2, 1, "gre")


def test_repository_revision_and_plan() -> None:
    world = World.default()
    repo = PolicyRepository()
    from weft.policy import load_policies

    [p] = load_policies(NP_DENY_INGRESS_X, "a.yaml")
    assert repo.revision == 1
    assert repo.plan([p]).created == (p.key,) and repo.revision == 1  # dry run changes nothing
    r = repo.apply([p])
    assert r.created == (p.key,) and r.revision == 2
    assert repo.apply([p]).unchanged == (p.key,) and repo.revision == 2
    [p2] = load_policies(NP_DENY_INGRESS_X.replace("[Ingress]", "[Ingress, Egress]"), "a.yaml")
    assert repo.apply([p2]).configured == (p.key,) and repo.revision == 3
    assert repo.get(p.key) is p2 and repo.find("deny-all", "x") == [p2]
    assert repo.resolve(world.pods["x/a"], world.identities).egress_enforced
    assert repo.delete(p.key) and repo.revision == 4 and not repo.delete(p.key)
    policy = repo.resolve(world.pods["x/a"], world.identities)
    assert not policy.ingress_enforced and not policy.entries
    assert repo.cache.selectors() == []  # every selector released


def test_repeated_resolve_reuses_selections() -> None:
    world = World.default()
    repo = world.repo(NP_DENY_INGRESS_X, cnp("endpointSelector: {}\ningress:\n- fromEndpoints: [{}]"))
    first = repo.resolve(world.pods["x/a"], world.identities, world.named_ports)
    version = repo.cache.version
    again = repo.resolve(world.pods["x/a"], world.identities, world.named_ports)
    assert again == first and repo.cache.version == version


def test_sync_identities_keeps_reserved_and_cidr() -> None:
    world = World.default()
    repo = world.repo(cnp("endpointSelector: {matchLabels: {pod: a}}\negress:\n- toCIDR: [10.0.0.0/8]"))
    repo.sync_identities({**world.identities, 1: frozenset({Label("reserved", "host", ""), Label("k8s", "n", "1")})})
    repo.sync_identities({})
    known = repo.cache.identities()
    assert known[1] == frozenset({Label("reserved", "host", "")})
    assert set(known) == {1, 2, 3, 4, 5, 6, 7, 8, 2**24}
    assert world.allowed(repo, "x/a", repo.identity_of_address("10.2.3.4"), 80)


def test_cnp_endpoint_selector_namespace_is_noted() -> None:
    from weft.policy import load_policies

    [p] = load_policies(cnp("endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: y}}\ningress: [{}]"))
    assert any("the namespace is ignored" in n for n in p.notes)
