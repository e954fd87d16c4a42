"""A small cluster for policy tests: the upstream Kubernetes network-policy e2e layout.

Namespaces x, y, z labelled ns=<name>; pods a, b, c in each, labelled pod=<name>, serving
80 and 81 over TCP and UDP with named ports serve-<port>-<proto>. Each pod has its own identity.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from weft.policy import EndpointSubject, PolicyRepository, load_policies, trace
from weft.policy.resolve import NamedPorts
from weft.types.labels import LabelSet, pod_labels

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
NAMED_PORTS: NamedPorts = {
    "serve-80-tcp": (6, 80),
    "serve-81-tcp": (6, 81),
    "serve-80-udp": (17, 80),
    "serve-81-udp": (17, 81),
}


@dataclass
class World:
    identities: dict[int, LabelSet] = field(default_factory=dict)
    pods: dict[str, EndpointSubject] = field(default_factory=dict)
    named_ports: dict[int, NamedPorts] = field(default_factory=dict)

    @classmethod
    def default(cls) -> World:
        w = cls()
        ident = 256
        for ns in NAMESPACES:
            for pod in PODS:
                w.add_pod(ns, pod, ident, {"pod": pod}, {"ns": ns})
                ident += 1
        return w

    def add_pod(
        self,
        ns: str,
        name: str,
        ident: int,
        labels: dict[str, str],
        ns_labels: dict[str, str] | None = None,
        ports: NamedPorts | None = None,
    ) -> EndpointSubject:
        lbls = pod_labels(ns, labels, ns_labels)
        ports = dict(NAMED_PORTS if ports is None else ports)
        subject = EndpointSubject.of(ident, lbls, ns, ports)
        self.identities[ident] = lbls
        self.named_ports[ident] = ports
        self.pods[f"{ns}/{name}"] = subject
        return subject

    def repo(self, *texts: str) -> PolicyRepository:
        repo = PolicyRepository()
        for i, text in enumerate(texts):
            repo.apply(load_policies(textwrap.dedent(text), f"test{i}.yaml"))
        repo.sync_identities(self.identities)
        return repo

    def peer(self, name: str | int) -> EndpointSubject | int:
        return self.pods[name] if isinstance(name, str) else name

    def allowed(self, repo: PolicyRepository, src: str | int, dst: str | int, port: int, proto: str = "tcp") -> bool:
        result = trace(repo, self.peer(src), self.peer(dst), port, proto, named_ports=self.named_ports)
        return result.verdict == "allowed"

    def reachable(self, repo: PolicyRepository, port: int, proto: str = "tcp") -> set[tuple[str, str]]:
        """Every (src, dst) pod pair that may connect (self-traffic excluded)."""
        return {(s, d) for s in self.pods for d in self.pods if s != d and self.allowed(repo, s, d, port, proto)}

    def all_pairs(self) -> set[tuple[str, str]]:
        return {(s, d) for s in self.pods for d in self.pods if s != d}
