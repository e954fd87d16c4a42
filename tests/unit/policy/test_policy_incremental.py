"""Incremental resolution (distilled policies) against from-scratch resolution.

Randomized sequences of policy applies (new and replaced versions), deletes, pods coming,
going and being relabelled, and named-port changes are run against a repository whose distilled
policies are kept current incrementally. After every step each live distilled policy must equal

* ``repo.resolve`` on the same repository (``resolve_rules`` over every selecting rule, from
  scratch), exactly; and
* the resolution of a fresh repository given the same policies and identities, with CIDR
  identities compared by prefix (a fresh repository numbers them in its own apply order).

And: an apply touching one namespace recomputes only the policies of the endpoints it selects.
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weft.identity.allocator import FQDN_MIN
from weft.policy import EndpointPolicy, EndpointSubject, Policy, PolicyRepository, load_policies
from weft.policy.distill import DistilledPolicy, SubjectKey
from weft.policy.loader import PolicyKey as DocKey
from weft.policy.resolve import NamedPorts
from weft.policy.selectors import (
    WILDCARD,
    CIDRSelector,
    EntitySelector,
    FQDNSelector,
    IdentityLabels,
    LabelSelector,
    Requirement,
    SelectorCache,
    cidr_labels,
    fqdn_labels,
)
from weft.types.labels import Label, LabelSet, pod_labels

PORTS_A: NamedPorts = {"serve-80-tcp": (6, 80), "serve-81-tcp": (6, 81), "dns": (17, 53)}
PORTS_B: NamedPorts = {"serve-80-tcp": (6, 8080), "serve-81-udp": (17, 81)}
FQDN_ID = FQDN_MIN


def cnp(name: str, ns: str, spec: str) -> str:
    return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n{textwrap.indent(textwrap.dedent(spec).strip(), '  ')}\n")


def ccnp(name: str, spec: str) -> str:
    return (f"apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: {name}}}\n"
            f"spec:\n{textwrap.indent(textwrap.dedent(spec).strip(), '  ')}\n")


def netpol(name: str, ns: str, spec: str) -> str:
    return (f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n{textwrap.indent(textwrap.dedent(spec).strip(), '  ')}\n")


# Several versions of some keys (applying another version of a key replaces it).
POLICY_TEXTS: list[str] = [
    netpol("deny-all", "x", "podSelector: {}\npolicyTypes: [Ingress]"),
    netpol("deny-all", "x", "podSelector: {}\npolicyTypes: [Ingress, Egress]"),
    netpol("np", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress:
        - from: [{podSelector: {matchLabels: {pod: b}}}]
          ports: [{port: 80, protocol: TCP}]
    """),
    netpol("np", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress:
        - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
          ports: [{port: serve-81-tcp, protocol: TCP}, {port: 1000, endPort: 1100, protocol: UDP}]
    """),
    netpol("np", "y", """
        podSelector: {}
        policyTypes: [Ingress, Egress]
        egress:
        - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}, {podSelector: {matchLabels: {pod: c}}}]
          ports: [{port: serve-80-tcp, protocol: TCP}, {port: 53, protocol: UDP}]
    """),
    cnp("web", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress:
        - fromEndpoints: [{}]
          toPorts: [{ports: [{port: "80", endPort: 90, protocol: TCP}]}]
        - fromCIDR: [10.1.2.0/24]
        ingressDeny:
        - fromEntities: [world]
    """),
    cnp("web", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress:
        - fromEndpoints: [{matchLabels: {pod: c}}]
        - fromEntities: [cluster]
          toPorts: [{ports: [{port: "81", protocol: ANY}]}]
    """),
    cnp("out", "y", """
        endpointSelector: {}
        egress:
        - toCIDR: [10.1.2.0/24, 192.0.2.1/32]
        - toCIDRSet: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}]
          toPorts: [{ports: [{port: "443", protocol: TCP}]}]
        - toEntities: [cluster]
        egressDeny:
        - toEndpoints: [{matchLabels: {pod: c}}]
          toPorts: [{ports: [{port: "81", protocol: TCP}]}]
    """),
    cnp("out", "y", """
        endpointSelector: {matchLabels: {pod: b}}
        egress:
        - toCIDR: [10.0.0.0/8]
        - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: z}}]
          toPorts: [{ports: [{port: serve-80-tcp}]}]
    """),
    ccnp("host", """
        endpointSelector: {}
        ingress:
        - fromEntities: [host, remote-node]
        egress:
        - toEndpoints: [{}]
          toPorts: [{ports: [{port: serve-80-tcp, protocol: TCP}, {port: dns, protocol: UDP}]}]
    """),
    cnp("lockdown", "z", """
        endpointSelector: {}
        ingressDeny:
        - fromEndpoints: [{}]
          toPorts: [{ports: [{port: "81", protocol: TCP}]}]
        ingress:
        - toPorts: [{ports: [{port: "80", protocol: TCP}, {port: "81", protocol: TCP}]}]
        - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: x}}]
    """),
    cnp("deny-port", "x", """
        endpointSelector: {}
        ingressDeny:
        - toPorts: [{ports: [{port: "80", protocol: TCP}]}]
        enableDefaultDeny: {ingress: false}
    """),
    cnp("ping", "z", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress:
        - fromEndpoints: [{matchLabels: {pod: b}}]
          icmps: [{fields: [{type: 8, family: IPv4}, {type: EchoRequest, family: IPv6}]}]
    """),
    cnp("dns", "x", """
        endpointSelector: {matchLabels: {pod: b}}
        egress:
        - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: y}}]
          toPorts:
          - ports: [{port: "53", protocol: ANY}]
            rules: {dns: [{matchPattern: "*.example.com"}]}
        - toFQDNs: [{matchName: app.example.com}]
        - toPorts: [{ports: [{port: "53", protocol: UDP}]}]
    """),
    cnp("all-l3", "y", """
        endpointSelector: {matchLabels: {pod: c}}
        ingress:
        - fromEndpoints: [{matchExpressions: [{key: pod, operator: NotIn, values: [a]}]}]
        - fromEntities: [all]
          toPorts: [{ports: [{port: "22", protocol: TCP}]}]
        ingressDeny:
        - fromEndpoints: [{matchLabels: {pod: b}}]
    """),
]


def _load(text: str) -> Policy:
    [policy] = load_policies(text, "pool.yaml")
    return policy


POOL: list[Policy] = [_load(t) for t in POLICY_TEXTS]
LABEL_CHOICES: list[dict[str, str]] = [{"pod": "a"}, {"pod": "b"}, {"pod": "c"}, {"pod": "a", "tier": "web"}, {}]


@dataclass
class Pod:
    ns: str
    labels: dict[str, str]
    ports: NamedPorts
    identity: int = 0


@dataclass
class Cluster:
    """Pods with identities allocated as the agent does (one per distinct label set), and the
    incremental repository's users: one acquired distilled policy per pod."""

    repo: PolicyRepository = field(default_factory=PolicyRepository)
    pods: dict[str, Pod] = field(default_factory=dict)
    ids: dict[LabelSet, int] = field(default_factory=dict)
    next_id: int = 256
    held: dict[str, DistilledPolicy] = field(default_factory=dict)
    applied: dict[DocKey, Policy] = field(default_factory=dict)

    def labels(self, pod: Pod) -> LabelSet:
        return pod_labels(pod.ns, pod.labels, {"ns": pod.ns})

    def identities(self) -> dict[int, LabelSet]:
        out = {self.ids[self.labels(p)]: self.labels(p) for p in self.pods.values()}
        out[FQDN_ID] = fqdn_labels(FQDNSelector(match_name="app.example.com"))
        return out

    def subject(self, pod: Pod) -> EndpointSubject:
        return EndpointSubject.of(pod.identity, self.labels(pod), pod.ns, pod.ports)

    def peer_ports(self) -> dict[int, NamedPorts]:
        out: dict[int, dict[str, tuple[int, int]]] = {}
        for p in self.pods.values():
            out.setdefault(p.identity, {}).update(p.ports)
        return dict(out)

    def _identity_of(self, pod: Pod) -> int:
        lbls = self.labels(pod)
        if lbls not in self.ids:
            self.ids[lbls] = self.next_id
            self.next_id += 1
        return self.ids[lbls]

    def sync(self) -> None:
        """What the agent does after pods change: identities, peers' named ports, then each
        pod's distilled policy (re-acquired when its subject changed)."""
        for pod in self.pods.values():
            pod.identity = self._identity_of(pod)
        self.repo.sync_identities(self.identities())
        self.repo.set_peer_named_ports(self.peer_ports())
        for name in list(self.held):
            if name not in self.pods or self.held[name].key != SubjectKey.of(self.subject(self.pods[name])):
                self.repo.release(self.held.pop(name).key)
        for name, pod in self.pods.items():
            if name not in self.held:
                self.held[name] = self.repo.acquire(self.subject(pod))

    def add_pod(self, name: str, ns: str, labels: dict[str, str], ports: NamedPorts) -> None:
        self.pods[name] = Pod(ns, dict(labels), dict(ports))

    def apply(self, policy: Policy) -> None:
        self.repo.apply([policy])
        self.applied[policy.key] = policy

    def delete(self, key: DocKey) -> None:
        self.repo.delete(key)
        self.applied.pop(key, None)


def canonical(policy: EndpointPolicy, cidr_ids: dict[str, int]) -> dict[str, Any]:
    """The policy with CIDR identities replaced by their prefixes."""
    prefix_of = {i: p for p, i in cidr_ids.items()}

    def ident(i: int) -> int | str:
        return f"cidr:{prefix_of[i]}" if i in prefix_of else i

    return {
        "enforced": (policy.ingress_enforced, policy.egress_enforced),
        "entries": {(k.direction, ident(k.identity), k.proto, k.port, k.port_prefix_len): v
                    for k, v in policy.entries.items()},
        "cidrs": set(policy.cidr_identities),
        "fqdn": policy.fqdn_selectors,
        "dns": [dataclasses.replace(r, peers=None if r.peers is None else frozenset(map(ident, r.peers)))  # type: ignore[arg-type]
                for r in policy.dns_rules],
    }


def check(cluster: Cluster) -> None:
    repo = cluster.repo
    fresh = PolicyRepository()
    if cluster.applied:
        fresh.apply(cluster.applied.values())
    fresh.sync_identities(cluster.identities())
    peer_ports = cluster.peer_ports()
    for name, dp in cluster.held.items():
        subject = cluster.subject(cluster.pods[name])
        got = dp.endpoint_policy()
        want = repo.resolve(subject, None, peer_ports)
        assert got == want, name
        assert dict(dp.entries) == dict(want.entries)
        from_fresh = fresh.resolve(subject, None, peer_ports)
        assert canonical(got, repo.cidr_identities()) == canonical(from_fresh, fresh.cidr_identities()), name


def world() -> Cluster:
    cluster = Cluster()
    for ns in ("x", "y", "z"):
        for pod in ("a", "b", "c"):
            cluster.add_pod(f"{ns}/{pod}", ns, {"pod": pod}, PORTS_A if pod != "c" else PORTS_B)
    cluster.sync()
    return cluster


OPS = st.one_of(
    st.tuples(st.just("apply"), st.integers(0, len(POOL) - 1)),
    st.tuples(st.just("delete"), st.integers(0, len(POOL) - 1)),
    st.tuples(st.just("relabel"), st.integers(0, 8), st.integers(0, len(LABEL_CHOICES) - 1)),
    st.tuples(st.just("add_pod"), st.integers(0, 2), st.integers(0, len(LABEL_CHOICES) - 1)),
    st.tuples(st.just("remove_pod"), st.integers(0, 20)),
    st.tuples(st.just("ports"), st.integers(0, 20)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=14))
def test_incremental_equals_from_scratch(ops: list[tuple[Any, ...]]) -> None:
    cluster = world()
    extra = 0
    for op in ops:
        names = sorted(cluster.pods)
        if op[0] == "apply":
            cluster.apply(POOL[op[1]])
        elif op[0] == "delete":
            cluster.delete(POOL[op[1]].key)
        elif op[0] == "relabel" and names:
            cluster.pods[names[op[1] % len(names)]].labels = dict(LABEL_CHOICES[op[2]])
            cluster.sync()
        elif op[0] == "add_pod":
            extra += 1
            ns = ("x", "y", "z")[op[1]]
            cluster.add_pod(f"{ns}/new{extra}", ns, LABEL_CHOICES[op[2]], PORTS_B if extra % 2 else PORTS_A)
            cluster.sync()
        elif op[0] == "remove_pod" and names:
            del cluster.pods[names[op[1] % len(names)]]
            cluster.sync()
        elif op[0] == "ports" and names:
            pod = cluster.pods[names[op[1] % len(names)]]
            pod.ports = PORTS_A if pod.ports == PORTS_B else PORTS_B
            cluster.sync()
        check(cluster)


def test_every_pool_policy_alone_and_together() -> None:
    """Each pool policy applied alone, then all of them (one version per key), then removed
    one by one: the incremental result follows each step exactly."""
    cluster = world()
    for policy in POOL:
        cluster.apply(policy)
        check(cluster)
        cluster.delete(policy.key)
        check(cluster)
    latest: dict[DocKey, Policy] = {p.key: p for p in POOL}
    for policy in latest.values():
        cluster.apply(policy)
    check(cluster)
    for key in latest:
        cluster.delete(key)
        check(cluster)
    assert all(not dp.entries for dp in cluster.held.values())


def test_apply_in_one_namespace_recomputes_only_what_it_selects() -> None:
    cluster = world()
    cluster.apply(POOL[7])  # y/out: every pod of y
    builds = cluster.repo.full_resolutions
    before = {name: (dp.generation, dp.rule_updates) for name, dp in cluster.held.items()}
    # A policy for x/a only: nothing else is touched, nothing is resolved from scratch.
    cluster.apply(POOL[5])
    after = {name: (dp.generation, dp.rule_updates) for name, dp in cluster.held.items()}
    touched = {name for name in before if before[name] != after[name]}
    assert touched == {"x/a"}
    assert cluster.repo.full_resolutions == builds
    # Its 10.1.2.0/24 prefix is already y/out's: the y policies' selections do not change.
    assert all(cluster.held[n].selection_updates == 0 for n in cluster.held if n.startswith("y/"))
    # A namespace-wide policy of x touches the three pods of x and no other.
    before = after
    cluster.apply(POOL[0])
    after = {name: (dp.generation, dp.rule_updates) for name, dp in cluster.held.items()}
    assert {name for name in before if before[name] != after[name]} == {"x/a", "x/b", "x/c"}
    check(cluster)


def test_identity_change_reaches_only_rules_using_the_selector() -> None:
    cluster = world()
    cluster.apply(POOL[2])  # x/np: x/a allows pod=b of x
    cluster.apply(POOL[14])  # y/all-l3: y/c allows pod NotIn (a) (namespace y), denies pod=b
    updates = {name: dp.selection_updates for name, dp in cluster.held.items()}
    generations = {name: dp.generation for name, dp in cluster.held.items()}
    cluster.add_pod("x/b2", "x", {"pod": "b"}, PORTS_A)  # same labels as x/b: same identity
    cluster.sync()
    assert {n: dp.generation for n, dp in cluster.held.items() if n in generations} == generations
    cluster.add_pod("x/d", "x", {"pod": "b", "tier": "web"}, PORTS_A)  # a new identity with pod=b in x
    cluster.sync()
    changed = {n for n, dp in cluster.held.items() if n in generations and dp.generation != generations[n]}
    assert changed == {"x/a"}
    assert all(cluster.held[n].selection_updates == updates[n] for n in updates if n not in ("x/a", "y/c"))
    check(cluster)


def test_endpoints_with_the_same_subject_share_one_resolution() -> None:
    cluster = world()
    cluster.apply(POOL[0])
    builds = cluster.repo.full_resolutions
    cluster.add_pod("x/a2", "x", {"pod": "a"}, PORTS_A)
    cluster.sync()
    assert cluster.held["x/a2"] is cluster.held["x/a"] and cluster.repo.full_resolutions == builds
    cluster.add_pod("x/a3", "x", {"pod": "a"}, PORTS_B)  # other named ports: its own
    cluster.sync()
    assert cluster.held["x/a3"] is not cluster.held["x/a"] and cluster.repo.full_resolutions == builds + 1
    check(cluster)


def test_change_log_names_the_changed_keys() -> None:
    cluster = world()
    cluster.apply(POOL[0])
    dp = cluster.held["x/a"]
    generation, entries = dp.generation, dict(dp.entries)
    cluster.apply(POOL[2])
    changed = dp.changes_since(generation)
    assert changed is not None
    now = dict(dp.entries)
    assert changed == {k for k in set(entries) | set(now) if entries.get(k) != now.get(k)}
    assert dp.changes_since(dp.generation) == set()


# ----------------------------------------------------------------------------- selector cache indexes

PREFIXES = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "10.2.0.0/16", "192.0.2.1/32",
            "::/0", "2001:db8::/32", "2001:db8::1/128"]
INDEX_SELECTORS = [
    CIDRSelector("10.0.0.0/8"),
    CIDRSelector("10.0.0.0/8", ("10.1.0.0/16",)),
    CIDRSelector("0.0.0.0/0", ("10.1.2.0/24", "192.0.2.1/32")),
    CIDRSelector("10.1.2.3/32"),
    CIDRSelector("::/0"),
    CIDRSelector("2001:db8::/32", ("2001:db8::1/128",)),
    EntitySelector("world"),
    EntitySelector("world-ipv6"),
    EntitySelector("cluster"),
    LabelSelector(frozenset({Requirement("k8s:app", "In", frozenset({"a"}))})),
    LabelSelector(frozenset({Requirement("any:app", "Exists"), Requirement("k8s:io.kubernetes.pod.namespace", "In",
                                                                          frozenset({"x"}))})),
    LabelSelector(frozenset({Requirement("k8s:app", "NotIn", frozenset({"a"}))})),
    LabelSelector(frozenset({Requirement("reserved:world", "Exists")})),
    LabelSelector(),
    FQDNSelector(match_name="app.example.com"),
    WILDCARD,
]
IDENTITY_LABELS: list[LabelSet] = [
    *(cidr_labels(p) for p in PREFIXES),
    pod_labels("x", {"app": "a"}),
    pod_labels("x", {"app": "b"}),
    pod_labels("y", {"app": "a"}),
    fqdn_labels(FQDNSelector(match_name="app.example.com")),
    frozenset({Label("reserved", "world", "")}),
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("upsert"), st.integers(250, 262), st.integers(0, len(IDENTITY_LABELS) - 1)),
    st.tuples(st.just("remove"), st.integers(250, 262), st.just(0)),
    st.tuples(st.just("add_selector"), st.integers(0, len(INDEX_SELECTORS) - 1), st.just(0)),
    st.tuples(st.just("remove_selector"), st.integers(0, len(INDEX_SELECTORS) - 1), st.just(0)),
), max_size=40))
def test_selector_cache_indexes_equal_a_scan(ops: list[tuple[str, int, int]]) -> None:
    """CIDR identities and selectors (prefix index, sorted ranges), label and FQDN selectors
    (key index) and unindexed ones: every selection equals testing every identity."""
    cache = SelectorCache()
    refs: dict[int, int] = {}
    for op, n, m in ops:
        if op == "upsert":
            cache.update_identities({n: IDENTITY_LABELS[m]})
        elif op == "remove":
            cache.update_identities(remove=[n])
        elif op == "add_selector":
            cache.add_selector(INDEX_SELECTORS[n])
            refs[n] = refs.get(n, 0) + 1
        elif refs.get(n):
            cache.remove_selector(INDEX_SELECTORS[n])
            refs[n] -= 1
        known = cache.identities()
        for index, sel in enumerate(INDEX_SELECTORS):
            want = {i for i, lbls in known.items() if sel.matches(IdentityLabels(i, lbls))}
            assert cache.selections(sel) == want
            for i in known:
                assert (sel in cache.selectors_of(i)) is (i in want and refs.get(index, 0) > 0)
    assert set(cache.fqdn_selectors()) == ({INDEX_SELECTORS[14]} if refs.get(14) else set())
