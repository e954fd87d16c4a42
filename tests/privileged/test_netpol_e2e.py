"""The scenarios of the upstream Kubernetes network policy e2e suite, written as our own: namespaces
x, y, z (labelled ns=<name>) with pods a, b, c (labelled pod=<name>) serving 80 and 81 over TCP and
UDP. Each scenario applies its policies through the CLI and asserts the full reachability matrix
(every ordered pair of distinct pods) against an expected matrix written from Kubernetes
semantics, not from weft's own policy model."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from weft.lab.cluster import Lab, PodInfo
from weft.lab.probe import probe

from conftest import one_node_lab

WEFT = [sys.executable, "-m", "weft.cli.main"]
NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
KEYS = tuple(f"{ns}/{p}" for ns in NAMESPACES for p in PODS)

Pred = Callable[[str], bool]


def sel(pattern: str) -> Pred:
    """'x/a' one pod, 'x/*' a namespace, '*/a' a pod name in every namespace, '*' every pod."""
    ns, _, pod = pattern.partition("/") if pattern != "*" else ("*", "", "*")
    return lambda key: (ns in ("*", key.split("/")[0])) and (pod in ("*", key.split("/")[1]))


class Reachability:
    """Expected reachability between every ordered pair of distinct pods, built like upstream's
    model: start all-allowed or all-denied, then set specific edges."""

    def __init__(self, default: bool) -> None:
        self.expected: dict[tuple[str, str], bool] = {
            (s, d): default for s in KEYS for d in KEYS if s != d}

    def set(self, src: str, dst: str, value: bool) -> Reachability:
        fs, fd = sel(src), sel(dst)
        for s, d in self.expected:
            if fs(s) and fd(d):
                self.expected[(s, d)] = value
        return self


def table(expected: dict[tuple[str, str], bool], observed: dict[tuple[str, str], bool]) -> str:
    """Truth table: rows are sources, columns destinations; '.' allowed, 'X' blocked, '!' after a
    cell where observed differs from expected (the cell shows the observed value)."""
    lines = ["src\\dst " + " ".join(f"{d:>5}" for d in KEYS)]
    for s in KEYS:
        cells = []
        for d in KEYS:
            if s == d:
                cells.append(f"{'-':>5}")
                continue
            o = observed[(s, d)]
            mark = "." if o else "X"
            cells.append(f"{mark + ('!' if o != expected[(s, d)] else ''):>5}")
        lines.append(f"{s:>7} " + " ".join(cells))
    return "\n".join(lines)


def addr4(pod: PodInfo) -> str:
    return next(a for a in pod.addresses if ":" not in a)


def observe(pods: dict[str, PodInfo], proto: str, port: int) -> dict[tuple[str, str], bool]:
    pairs = [(s, d) for s in KEYS for d in KEYS if s != d]

    def one(pair: tuple[str, str]) -> bool:
        out = probe(pods[pair[0]].netns, proto, addr4(pods[pair[1]]), port, timeout=1.0).outcome
        assert out in ("connected", "refused", "timeout"), f"{pair} {proto}/{port}: {out}"
        return out != "timeout"

    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip(pairs, pool.map(one, pairs), strict=True))


def check(pods: dict[str, PodInfo], proto: str, port: int, reach: Reachability, what: str) -> None:
    observed = observe(pods, proto, port)
    wrong = [k for k, v in reach.expected.items() if observed[k] != v]
    assert not wrong, (f"{what}: {proto}/{port}: {len(wrong)} cells differ "
                       f"(expected -> observed: {[(f'{s}->{d}', reach.expected[(s, d)]) for s, d in wrong]})\n"
                       f"expected:\n{table(reach.expected, reach.expected)}\n"
                       f"observed ('!' = mismatch):\n{table(reach.expected, observed)}")


def weft(*args: str) -> None:
    proc = subprocess.run([*WEFT, *args], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"weft {' '.join(args)}: {proc.stdout}{proc.stderr}"


class Applied:
    """Policies applied from YAML for the duration of a with block, deleted after."""

    def __init__(self, lab: Lab, *docs: str) -> None:
        self.lab = lab
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "policies.yaml"
        self.path.write_text("---\n".join(docs))

    def __enter__(self) -> Applied:
        weft("apply", "-f", str(self.path), "--lab", self.lab.name)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            weft("delete", "-f", str(self.path), "--lab", self.lab.name)
        finally:
            self.dir.cleanup()


def netpol(name: str, ns: str, spec: str) -> str:
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return (f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
            f"metadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{body}\n")


@pytest.fixture(scope="module")
def netpol_lab() -> Iterator[Lab]:
    yield from one_node_lab("k")


@pytest.fixture(scope="module")
def pods(netpol_lab: Lab) -> dict[str, PodInfo]:
    for ns in NAMESPACES:
        netpol_lab.namespace_add(ns, {"ns": ns})
    serve = [f"{proto}:{port}/serve-{port}-{proto}" for proto in ("tcp", "udp") for port in (80, 81)]
    return {key: netpol_lab.pod_add(key, labels={"pod": key.split("/")[1]}, serve=serve) for key in KEYS}


@pytest.fixture(autouse=True)
def _baseline(netpol_lab: Lab, pods: dict[str, PodInfo]) -> None:
    """Every scenario starts from a lab with no policy: the full matrix is reachable."""
    check(pods, "tcp", 80, Reachability(True), "baseline before the scenario")


def test_default_deny_ingress(netpol_lab: Lab, pods: dict[str, PodInfo]) -> None:
    with Applied(netpol_lab, netpol("deny-ingress", "x", "podSelector: {}\npolicyTypes: [Ingress]")):
        check(pods, "tcp", 80, Reachability(True).set("*", "x/*", False), "default-deny ingress in x")


def test_deny_all_ingress_and_egress(netpol_lab: Lab, pods: dict[str, PodInfo]) -> None:
    with Applied(netpol_lab, netpol("deny-all", "x", "podSelector: {}\npolicyTypes: [Ingress, Egress]")):
        check(pods, "tcp", 80, Reachability(True).set("*", "x/*", False).set("x/*", "*", False),
              "deny all ingress and egress in x")


def test_allow_ingress_from_same_namespace(netpol_lab: Lab, pods: dict[str, PodInfo]) -> None:
    spec = "podSelector: {}\ningress:\n- from:\n  - podSelector: {}"
    with Applied(netpol_lab, netpol("allow-same-ns", "x", spec)):
        check(pods, "tcp", 80, Reachability(True).set("*", "x/*", False).set("x/*", "x/*", True),
              "allow ingress from the same namespace")


def test_allow_from_namespace_selector(netpol_lab: Lab, pods: dict[str, PodInfo]) -> None:
    spec = ("podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
            "  - namespaceSelector:\n      matchLabels: {ns: y}")
    with Applied(netpol_lab, netpol("allow-from-y", "x", spec)):
        check(pods, "tcp", 80, Reachability(True).set("*", "x/a", False).set("y/*", "x/a", True),
              "x/a allows ingress from namespace ns=y")


def test_pod_and_namespace_selector_in_one_peer_is_and(netpol_lab: Lab, pods: dict[str, PodInfo]) -> None:
    spec = ("podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
            "  - namespaceSelector:\n      matchLabels: {ns: y}\n    podSelector:\n      matchLabels: {pod: b}")
    with Applied(netpol_lab, netpol("allow-y-b", "x", spec)):
        check(pods, "tcp", 80, Reachability(True).set("*", "x/a", False).set("y/b", "x/a", True),
              "one peer with namespaceSelector ns=y AND podSelector pod=b")


def test_pod_and_namespace_selector_in_separate_peers_is_or(netpol_lab: Lab, pods: dict[str, PodInfo]) -> None:
    spec = ("podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
            "  - namespaceSelector:\n      matchLabels: {ns: y}\n  - podSelector:\n      matchLabels: {pod: b}")
    with Applied(netpol_lab, netpol("allow-y-or-b", "x", spec)):
        # A podSelector alone selects pods of the policy's own namespace: x/b, not y/b or z/b.
        check(pods, "tcp", 80,
              Reachability(True).set("*", "x/a", False).set("y/*", "x/a", True).set("x/b", "x/a", True),
              "separate peers namespaceSelector ns=y OR podSelector pod=b")


def test_allow_on_port_81_only(netpol_lab: Lab, pods: dict[str, PodInfo]) -> None:
    spec = "podSelector:\n  matchLabels: {pod: a}\ningress:\n- ports:\n  - port: 81\n    protocol: TCP"
    with Applied(netpol_lab, netpol("allow-81", "x", spec)):
        check(pods, "tcp", 80, Reachability(True).set("*", "x/a", False), "x/a allows only TCP 81: port 80")
        check(pods, "tcp", 81, Reachability(True), "x/a allows only TCP 81: port 81")


def test_allow_by_named_port(netpol_lab: Lab, pods: dict[str, PodInfo]) -> None:
    spec = ("podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector: {}\n"
            "  ports:\n  - port: serve-81-tcp\n    protocol: TCP")
    with Applied(netpol_lab, netpol("allow-named-81", "x", spec)):
        check(pods, "tcp", 80, Reachability(True).set("*", "x/a", False), "named port serve-81-tcp: port 80")
        check(pods, "tcp", 81, Reachability(True), "named port serve-81-tcp: port 81")


def test_egress_deny_all_then_allow_one_pod(netpol_lab: Lab, pods: dict[str, PodInfo]) -> None:
    deny = netpol("deny-egress", "x", "podSelector: {}\npolicyTypes: [Egress]")
    allow = netpol("allow-egress-y-a", "x",
                   "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to:\n"
                   "  - namespaceSelector:\n      matchLabels: {ns: y}\n    podSelector:\n      matchLabels: {pod: a}")
    with Applied(netpol_lab, deny):
        check(pods, "tcp", 80, Reachability(True).set("x/*", "*", False), "egress deny-all in x")
        with Applied(netpol_lab, allow):
            check(pods, "tcp", 80, Reachability(True).set("x/*", "*", False).set("x/*", "y/a", True),
                  "egress deny-all in x plus allow to y/a")


def test_policy_types_egress_only_leaves_ingress_open(netpol_lab: Lab, pods: dict[str, PodInfo]) -> None:
    # The rule lists ingress too, but policyTypes says Egress only: the ingress part is ignored.
    spec = ("podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Egress]\n"
            "ingress:\n- from:\n  - podSelector:\n      matchLabels: {pod: nobody}\n"
            "egress:\n- to:\n  - namespaceSelector:\n      matchLabels: {ns: y}")
    with Applied(netpol_lab, netpol("egress-only", "x", spec)):
        check(pods, "tcp", 80, Reachability(True).set("x/a", "*", False).set("x/a", "y/*", True),
              "policyTypes Egress only on x/a")


def test_multiple_policies_are_additive(netpol_lab: Lab, pods: dict[str, PodInfo]) -> None:
    one = netpol("allow-y-b", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
                 "  - namespaceSelector:\n      matchLabels: {ns: y}\n    podSelector:\n      matchLabels: {pod: b}")
    two = netpol("allow-z-c", "x", "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n"
                 "  - namespaceSelector:\n      matchLabels: {ns: z}\n    podSelector:\n      matchLabels: {pod: c}")
    with Applied(netpol_lab, one, two):
        check(pods, "tcp", 80,
              Reachability(True).set("*", "x/a", False).set("y/b", "x/a", True).set("z/c", "x/a", True),
              "two policies on x/a: allow y/b, allow z/c")


def test_protocol_specific_rule(netpol_lab: Lab, pods: dict[str, PodInfo]) -> None:
    spec = "podSelector:\n  matchLabels: {pod: a}\ningress:\n- ports:\n  - port: 80\n    protocol: UDP"
    with Applied(netpol_lab, netpol("allow-udp-80", "x", spec)):
        check(pods, "udp", 80, Reachability(True), "x/a allows UDP 80 only: UDP 80")
        check(pods, "tcp", 80, Reachability(True).set("*", "x/a", False), "x/a allows UDP 80 only: TCP 80")


def test_cilium_network_policy_namespace_and_pod(netpol_lab: Lab, pods: dict[str, PodInfo]) -> None:
    cnp = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: cnp-allow-y-b\n"
           "  namespace: x\nspec:\n  endpointSelector:\n    matchLabels: {pod: a}\n  ingress:\n"
           "  - fromEndpoints:\n    - matchLabels:\n        pod: b\n        k8s:io.kubernetes.pod.namespace: y\n")
    with Applied(netpol_lab, cnp):
        check(pods, "tcp", 80, Reachability(True).set("*", "x/a", False).set("y/b", "x/a", True),
              "CiliumNetworkPolicy: x/a from pod=b in namespace y")
