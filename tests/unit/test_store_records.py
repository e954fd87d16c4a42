"""The store's pure pieces: key ranges, transaction guards, typed records and their codecs, label sets."""

from __future__ import annotations

import pytest

from weft.store import Compare, StoreError
from weft.store.cluster import Identities, Keys, canonical_labels
from weft.store.kv import prefix_end
from weft.store.records import Endpoint, Node
from weft.types.labels import Label


def test_prefix_end_is_the_first_key_after_the_prefix() -> None:
    assert prefix_end("weft/nodes/") == "weft/nodes0"
    assert prefix_end("a") == "b"
    keys = ["weft/nodes/", "weft/nodes/a", "weft/nodes/\u00ff"]
    assert all("weft/nodes/" <= k < prefix_end("weft/nodes/") for k in keys)
    assert prefix_end("weft/nodes/") <= "weft/nodes0"
    with pytest.raises(ValueError, match="non-empty"):
        prefix_end("")


def test_compare_needs_exactly_one_target() -> None:
    assert Compare.absent("k").create_revision == 0
    with pytest.raises(ValueError, match="exactly one"):
        Compare("k")
    with pytest.raises(ValueError, match="exactly one"):
        Compare("k", create_revision=0, value=b"")
    with pytest.raises(ValueError, match="NUL"):
        Compare.absent("a\x00b")


def test_node_roundtrip_and_validation() -> None:
    node = Node("n1", ("192.168.0.1", "fd00::1"), ("10.1.0.0/24", "fd10::/64"))
    assert Node.decode("k", node.encode()) == node
    with pytest.raises(ValueError, match=r"address '300.1.1.1'"):
        Node("n1", ("300.1.1.1",), ())
    with pytest.raises(ValueError, match=r"pod CIDR '10.1.0.1/24'"):
        Node("n1", (), ("10.1.0.1/24",))
    with pytest.raises(ValueError, match="node name 'a/b'"):
        Node("a/b", (), ())


def test_endpoint_roundtrip_and_validation() -> None:
    ep = Endpoint("10.1.0.5", 256, "n1", "default", "web-1")
    assert Endpoint.decode("k", ep.encode()) == ep
    with pytest.raises(ValueError, match="identity must be a positive integer"):
        Endpoint("10.1.0.5", 0, "n1", "default", "web-1")
    with pytest.raises(ValueError, match="'nope' is not an IP"):
        Endpoint("nope", 256, "n1", "default", "web-1")


def test_corrupt_records_name_their_key() -> None:
    with pytest.raises(StoreError, match=r"weft/nodes/n1.*not JSON"):
        Node.decode("weft/nodes/n1", b"{")
    with pytest.raises(StoreError, match=r"weft/endpoints/10.0.0.1.*bad endpoint record"):
        Endpoint.decode("weft/endpoints/10.0.0.1", b'{"ip": "10.0.0.1"}')
    with pytest.raises(StoreError, match="expected a JSON object"):
        Node.decode("weft/nodes/n1", b"[]")


def test_canonical_labels_are_sorted_unique_strings() -> None:
    a = canonical_labels([Label.parse("k8s:app=web"), "k8s:tier=front", "k8s:app=web"])
    b = canonical_labels(["k8s:tier=front", "k8s:app=web"])
    assert a == b == ("k8s:app=web", "k8s:tier=front")
    with pytest.raises(ValueError, match="at least one label"):
        canonical_labels([])
    with pytest.raises(ValueError, match="'k8s:a=b,c'"):
        canonical_labels(["k8s:a=b,c"])


def test_keys_and_identity_range_are_checked() -> None:
    assert Keys("x/").refs == "x/identities/refs/"
    with pytest.raises(ValueError, match="must end with '/'"):
        Keys("x")
    with pytest.raises(ValueError, match="outside the cluster range"):
        Identities(object(), first=1)  # type: ignore[arg-type]
