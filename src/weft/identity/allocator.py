"""Numeric security identities with Cilium's numbering.

Reserved identities name what is not a pod (host, world, ...); every distinct label set of pods
gets a cluster identity in 256..65535, reference-counted so an unused one is freed; identities
for CIDRs and learned addresses are node-local, from 2**24.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from weft.types.labels import Label, LabelSet

RESERVED: dict[str, int] = {
    "unknown": 0,
    "host": 1,
    "world": 2,
    "unmanaged": 3,
    "health": 4,
    "init": 5,
    "remote-node": 6,
    "kube-apiserver": 7,
    "ingress": 8,
}
CLUSTER_MIN = 256
CLUSTER_MAX = 65535
LOCAL_MIN = 1 << 24
# toFQDNs selector identities: node-local, apart from the CIDR identities that count up from
# LOCAL_MIN, so neither numbering can run into the other.
FQDN_MIN = LOCAL_MIN + (1 << 22)
FQDN_MAX = LOCAL_MIN + (1 << 23) - 1


class IdentityExhausted(Exception):
    pass


class ClusterNumbering(Protocol):
    """Where cluster identities come from when the node is part of a cluster: the cluster store
    hands out one number per label set to every node (see ``weft.store.cluster.Identities``)."""

    def allocate(self, labels: LabelSet) -> int: ...

    def release(self, ident: int) -> None: ...


@dataclass
class IdentityAllocator:
    """Label set -> identity with reference counts. State is plain data so the agent can persist it."""

    by_labels: dict[LabelSet, int] = field(default_factory=dict)
    refs: dict[int, int] = field(default_factory=dict)
    # Cluster identities from the cluster store instead of this node's own numbering (not saved:
    # the agent sets it when it joins a cluster).
    cluster: ClusterNumbering | None = field(default=None, repr=False, compare=False)

    def acquire(self, labels: LabelSet, local: bool = False) -> int:
        """The identity of ``labels``, allocated if new: a cluster identity, or with ``local``
        a node-local one (toFQDNs selectors) from FQDN_MIN."""
        ident = self.by_labels.get(labels)
        if ident is None and not local and self.cluster is not None:
            ident = self.cluster.allocate(labels)
            if ident in self.by_labels.values():
                # Only if the store lost what this node holds: the agent renumbers on rejoin.
                raise IdentityExhausted(f"the cluster store gave identity {ident} to {sorted(map(str, labels))}, "
                                        "which this node holds for other labels")
            self.by_labels[labels] = ident
        if ident is None:
            used = set(self.by_labels.values())
            first, last = (FQDN_MIN, FQDN_MAX) if local else (CLUSTER_MIN, CLUSTER_MAX)
            ident = next((i for i in range(first, last + 1) if i not in used), None)
            if ident is None:
                raise IdentityExhausted(f"all {'local' if local else 'cluster'} identities {first}-{last} are in use")
            self.by_labels[labels] = ident
        self.refs[ident] = self.refs.get(ident, 0) + 1
        return ident

    def release(self, ident: int) -> None:
        count = self.refs.get(ident, 0) - 1
        if count > 0:
            self.refs[ident] = count
            return
        self.refs.pop(ident, None)
        for labels, value in list(self.by_labels.items()):
            if value == ident:
                del self.by_labels[labels]
        if self.cluster is not None and CLUSTER_MIN <= ident <= CLUSTER_MAX:
            self.cluster.release(ident)

    def renumber(self, labels: LabelSet, new: int) -> int:
        """Give ``labels`` the number ``new`` (the cluster's), keeping its references; returns
        the old number."""
        old = self.by_labels[labels]
        self.by_labels[labels] = new
        count = self.refs.pop(old, 0)
        if count:
            self.refs[new] = count
        return old

    def labels_of(self, ident: int) -> LabelSet | None:
        for labels, value in self.by_labels.items():
            if value == ident:
                return labels
        for name, value in RESERVED.items():
            if value == ident:
                return frozenset({Label("reserved", name, "")})
        return None

    def to_json(self) -> list[dict[str, object]]:
        return [
            {"id": ident, "labels": sorted(str(lbl) for lbl in labels), "refs": self.refs.get(ident, 0)}
            for labels, ident in sorted(self.by_labels.items(), key=lambda kv: kv[1])
        ]

    @classmethod
    def from_json(cls, data: list[dict[str, object]]) -> IdentityAllocator:
        alloc = cls()
        for row in data:
            labels_raw = row["labels"]
            assert isinstance(labels_raw, list)
            labels = frozenset(Label.parse(str(t)) for t in labels_raw)
            ident = int(str(row["id"]))
            alloc.by_labels[labels] = ident
            refs = int(str(row.get("refs", 0)))
            if refs:
                alloc.refs[ident] = refs
        return alloc
