"""Labels as Cilium writes them: ``source:key=value``.

A pod's security-relevant labels are its Kubernetes labels (source ``k8s``) plus the namespace
label ``k8s:io.kubernetes.pod.namespace``, which is how policies select a namespace.
"""

from __future__ import annotations

from dataclasses import dataclass

NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
# How Cilium puts the labels of a pod's namespace on the pod's identity, so that namespace
# selectors (NetworkPolicy namespaceSelector) are label selectors like any other.
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."


@dataclass(frozen=True, order=True)
class Label:
    source: str
    key: str
    value: str

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value}"

    @classmethod
    def parse(cls, text: str, default_source: str = "k8s") -> Label:
        """Parse ``[source:]key[=value]``; the source is the part before the first colon,
        unless the key itself has no colon (then ``default_source`` applies)."""
        key_part, _, value = text.partition("=")
        source, sep, key = key_part.partition(":")
        if not sep:
            source, key = default_source, key_part
        if not key:
            raise ValueError(f"label {text!r} has an empty key")
        return cls(source, key, value)


LabelSet = frozenset[Label]


def pod_labels(namespace: str, labels: dict[str, str], namespace_labels: dict[str, str] | None = None) -> LabelSet:
    """The security-relevant label set of a pod: its labels, its namespace, and the labels of
    its namespace (every namespace carries ``kubernetes.io/metadata.name``, as Kubernetes sets it)."""
    out = {Label("k8s", k, v) for k, v in labels.items()}
    out.add(Label("k8s", NAMESPACE_LABEL, namespace))
    ns_labels = {"kubernetes.io/metadata.name": namespace, **(namespace_labels or {})}
    out.update(Label("k8s", NAMESPACE_LABELS_PREFIX + k, v) for k, v in ns_labels.items())
    return frozenset(out)


def format_labels(labels: LabelSet) -> list[str]:
    return sorted(str(label) for label in labels)
