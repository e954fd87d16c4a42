"""Numeric security identities with Cilium's numbering.

Reserved identities name what is not a pod (host, world, ...); every distinct label set of pods
gets a cluster identity in 256..65535, reference-counted so an unused one is freed; identities
for CIDRs and learned addresses are node-local, from 2**24.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class IdentityAllocator:
    """Label set -> identity with reference counts. State is plain data so the agent can persist it."""

    by_labels: dict[LabelSet, int] = field(default_factory=dict)
    refs: dict[int, int] = field(default_factory=dict)

    def acquire(self, labels: LabelSet, local: bool = False) -> int:
        """The identity of ``labels``, allocated if new: a cluster identity, or with ``local``
        a node-local one (toFQDNs selectors) from FQDN_MIN."""
        ident = self.by_labels.get(labels)
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
