"""Identities: Cilium's numbering, reuse for equal label sets, reference counting, persistence."""

from __future__ import annotations

import pytest

from weft.identity.allocator import CLUSTER_MIN, RESERVED, IdentityAllocator
from weft.types.labels import Label, pod_labels


def test_reserved_numbering_matches_cilium() -> None:
    assert RESERVED["host"] == 1 and RESERVED["world"] == 2 and RESERVED["unmanaged"] == 3
    assert RESERVED["health"] == 4 and RESERVED["init"] == 5 and RESERVED["remote-node"] == 6
    assert RESERVED["kube-apiserver"] == 7


def test_same_labels_same_identity_and_refcount() -> None:
    alloc = IdentityAllocator()
    a = alloc.acquire(pod_labels("default", {"app": "web"}))
    b = alloc.acquire(pod_labels("default", {"app": "web"}))
    c = alloc.acquire(pod_labels("other", {"app": "web"}))
    assert a == b == CLUSTER_MIN and c == CLUSTER_MIN + 1
    alloc.release(a)
    assert alloc.labels_of(a) is not None, "still referenced once"
    alloc.release(a)
    assert alloc.labels_of(a) is None


def test_persistence_round_trip() -> None:
    alloc = IdentityAllocator()
    labels = pod_labels("ns1", {"app": "db", "tier": "data"})
    ident = alloc.acquire(labels)
    again = IdentityAllocator.from_json(alloc.to_json())
    assert again.acquire(labels) == ident


@pytest.mark.parametrize(
    ("text", "label"),
    [("app=web", Label("k8s", "app", "web")), ("k8s:app=web", Label("k8s", "app", "web")),
     ("reserved:host", Label("reserved", "host", "")), ("any:io.kubernetes.pod.namespace=x",
                                                        Label("any", "io.kubernetes.pod.namespace", "x"))],
)
def test_label_parse(text: str, label: Label) -> None:
    assert Label.parse(text) == label


def test_namespace_label_present() -> None:
    assert "k8s:io.kubernetes.pod.namespace=prod" in {str(lbl) for lbl in pod_labels("prod", {})}
