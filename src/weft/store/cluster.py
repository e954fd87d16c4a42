"""Typed layers over any ``Store``: nodes, endpoints, identities, policies (pure over the interface).

Key layout (under a root, ``weft/`` by default):
  nodes/<name>                  Node JSON, put with the node's lease
  endpoints/<ip>                Endpoint JSON, put with the owning node's lease
  identities/id/<id>            canonical labels (JSON list)    } both created in one create-only txn:
  identities/labels/<labels>    the id (decimal)                } neither can exist without the other
  identities/refs/<id>/<node>   a node uses the id; with the node's lease, so a dead node's refs vanish
  policies/<name>               the policy document (JSON)
An identity no node references is deleted by ``Identities.collect_garbage`` in a txn that checks the
refs prefix is still empty, so an allocator that just took a reference never loses its identity.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from weft.identity.allocator import CLUSTER_MAX, CLUSTER_MIN
from weft.store.kv import Compare, Delete, KeyValue, Put, Store, StoreError, check_key
from weft.store.records import Endpoint, Node, check_name, decode_json, encode_json
from weft.types.labels import Label


class IdentitiesExhausted(StoreError):
    pass


class AllocationConflict(StoreError):
    """Allocation kept losing races (should not happen outside pathological contention)."""


def canonical_labels(labels: Iterable[Label | str]) -> tuple[str, ...]:
    """Sorted, unique label strings: the form both sides of the identity mapping use."""
    out = sorted({str(label) for label in labels})
    if not out:
        raise ValueError("an identity needs at least one label")
    for label in out:
        if "\x00" in label or "," in label:  # "," joins the labels in the labels->id key
            raise ValueError(f"label {label!r} is not a valid label string")
    return tuple(out)


@dataclass(frozen=True)
class Keys:
    root: str = "weft/"

    def __post_init__(self) -> None:
        check_key(self.root)
        if not self.root.endswith("/"):
            raise ValueError(f"key root {self.root!r} must end with '/'")

    @property
    def nodes(self) -> str:
        return f"{self.root}nodes/"

    @property
    def endpoints(self) -> str:
        return f"{self.root}endpoints/"

    @property
    def identities(self) -> str:
        return f"{self.root}identities/"

    @property
    def ids(self) -> str:
        return f"{self.root}identities/id/"

    @property
    def labels(self) -> str:
        return f"{self.root}identities/labels/"

    @property
    def refs(self) -> str:
        return f"{self.root}identities/refs/"

    @property
    def policies(self) -> str:
        return f"{self.root}policies/"


class Nodes:
    def __init__(self, store: Store, keys: Keys | None = None) -> None:
        self.store, self.keys = store, keys or Keys()

    def register(self, node: Node, lease: int) -> int:
        """Publish ``node`` tied to ``lease`` (the agent keeps it alive: its heartbeat)."""
        return self.store.put(self.keys.nodes + node.name, node.encode(), lease)

    def get(self, name: str) -> Node | None:
        check_name("node name", name)
        kv = self.store.get(self.keys.nodes + name)
        return Node.decode(kv.key, kv.value) if kv else None

    def list(self) -> tuple[list[Node], int]:
        kvs, rev = self.store.list_prefix(self.keys.nodes)
        return [Node.decode(kv.key, kv.value) for kv in kvs], rev

    def remove(self, name: str) -> int:
        """A node leaves: delete its node key, its endpoints and its identity references.

        Returns how many keys went. Endpoints are deleted only if unchanged since read, so one that moved
        to another node meanwhile stays. Identities the node alone used are then unreferenced: GC them.
        """
        check_name("node name", name)
        removed = self.store.delete(self.keys.nodes + name)
        kvs, _ = self.store.list_prefix(self.keys.endpoints)
        for kv in kvs:
            if Endpoint.decode(kv.key, kv.value).node == name and self.store.txn(
                    [Compare(kv.key, mod_revision=kv.mod_revision)], [Delete(kv.key)]).succeeded:
                removed += 1
        refs, _ = self.store.list_prefix(self.keys.refs)
        for kv in refs:
            if kv.key.rsplit("/", 1)[1] == name:
                removed += self.store.delete(kv.key)
        return removed


class Endpoints:
    def __init__(self, store: Store, keys: Keys | None = None) -> None:
        self.store, self.keys = store, keys or Keys()

    def _key(self, ip: str) -> str:
        try:
            return self.keys.endpoints + str(ipaddress.ip_address(ip))
        except ValueError as e:
            raise ValueError(f"endpoint key: {ip!r} is not an IP address") from e

    def publish(self, endpoint: Endpoint, lease: int = 0) -> int:
        return self.store.put(self._key(endpoint.ip), endpoint.encode(), lease)

    def withdraw(self, ip: str) -> bool:
        return self.store.delete(self._key(ip)) > 0

    def get(self, ip: str) -> Endpoint | None:
        kv = self.store.get(self._key(ip))
        return Endpoint.decode(kv.key, kv.value) if kv else None

    def list(self, node: str | None = None) -> tuple[list[Endpoint], int]:
        kvs, rev = self.store.list_prefix(self.keys.endpoints)
        eps = [Endpoint.decode(kv.key, kv.value) for kv in kvs]
        return [ep for ep in eps if node is None or ep.node == node], rev


class Identities:
    """Cluster-wide label set -> identity (256-65535), race-free via create-only transactions."""

    MAX_ATTEMPTS = 200

    def __init__(self, store: Store, keys: Keys | None = None, first: int = CLUSTER_MIN, last: int = CLUSTER_MAX
                 ) -> None:
        if not CLUSTER_MIN <= first <= last <= CLUSTER_MAX:
            raise ValueError(f"identity range {first}-{last} is outside the cluster range {CLUSTER_MIN}-{CLUSTER_MAX}")
        self.store, self.keys = store, keys or Keys()
        self.first, self.last = first, last

    def _labels_key(self, labels: tuple[str, ...]) -> str:
        return self.keys.labels + ",".join(labels)

    def _ref_key(self, ident: int, node: str) -> str:
        return f"{self.keys.refs}{ident}/{node}"

    def allocate(self, labels: Iterable[Label | str], node: str, lease: int = 0) -> int:
        """The identity of ``labels``, taking (or keeping) a reference for ``node``.

        A node holds one reference per identity however many of its endpoints use it (the agent counts
        its own users and releases when the last goes).

        First the existing id for the labels (the reference is added only if both mapping keys still
        agree, so a concurrent GC cannot strand it); else the lowest free id, claimed with a txn that
        creates both mapping keys only if neither exists. Losing a race just retries with fresh reads.
        """
        canon = canonical_labels(labels)
        check_name("node name", node)
        labels_key = self._labels_key(canon)
        labels_value = json.dumps(list(canon)).encode()
        for _ in range(self.MAX_ATTEMPTS):
            existing = self.store.get(labels_key)
            if existing is not None:
                ident = int(existing.value)
                id_key = f"{self.keys.ids}{ident}"
                if self.store.txn([Compare(labels_key, mod_revision=existing.mod_revision),
                                   Compare(id_key, value=labels_value)],
                                  [Put(self._ref_key(ident, node), b"", lease)]).succeeded:
                    return ident
                continue
            ident = self._free_id()
            id_key = f"{self.keys.ids}{ident}"
            if self.store.txn([Compare.absent(labels_key), Compare.absent(id_key)],
                              [Put(id_key, labels_value), Put(labels_key, str(ident).encode()),
                               Put(self._ref_key(ident, node), b"", lease)]).succeeded:
                return ident
        raise AllocationConflict(f"identity for {list(canon)}: lost {self.MAX_ATTEMPTS} races in a row")

    def _free_id(self) -> int:
        kvs, _ = self.store.list_prefix(self.keys.ids)
        used = {int(kv.key.rsplit("/", 1)[1]) for kv in kvs}
        for ident in range(self.first, self.last + 1):
            if ident not in used:
                return ident
        raise IdentitiesExhausted(f"every cluster identity {self.first}-{self.last} is in use")

    def release(self, ident: int, node: str) -> bool:
        """Drop ``node``'s reference; the identity itself goes at the next ``collect_garbage``."""
        check_name("node name", node)
        return self.store.delete(self._ref_key(ident, node)) > 0

    def lookup(self, labels: Iterable[Label | str]) -> int | None:
        kv = self.store.get(self._labels_key(canonical_labels(labels)))
        return int(kv.value) if kv else None

    def labels_of(self, ident: int) -> tuple[str, ...] | None:
        kv = self.store.get(f"{self.keys.ids}{ident}")
        if kv is None:
            return None
        data = json.loads(kv.value)
        if not isinstance(data, list):
            raise StoreError(f"store key {kv.key!r}: expected a JSON list of labels")
        return tuple(str(x) for x in data)

    def all(self) -> tuple[dict[int, tuple[str, ...]], int]:
        kvs, rev = self.store.list_prefix(self.keys.ids)
        return {int(kv.key.rsplit("/", 1)[1]): tuple(json.loads(kv.value)) for kv in kvs}, rev

    def references(self, ident: int) -> list[str]:
        kvs, _ = self.store.list_prefix(f"{self.keys.refs}{ident}/")
        return [kv.key.rsplit("/", 1)[1] for kv in kvs]

    def collect_garbage(self) -> list[int]:
        """Delete identities no node references; returns the ids freed. Safe to run from any agent."""
        kvs, _ = self.store.list_prefix(self.keys.ids)
        freed = []
        for kv in kvs:
            ident = int(kv.key.rsplit("/", 1)[1])
            labels_key = self._labels_key(tuple(json.loads(kv.value)))
            if self.store.txn([Compare.absent(f"{self.keys.refs}{ident}/", prefix=True),
                               Compare(kv.key, mod_revision=kv.mod_revision)],
                              [Delete(kv.key), Delete(labels_key)]).succeeded:
                freed.append(ident)
        return freed


class Policies:
    def __init__(self, store: Store, keys: Keys | None = None) -> None:
        self.store, self.keys = store, keys or Keys()

    def put(self, name: str, document: dict[str, Any]) -> int:
        check_name("policy name", name)
        if not isinstance(document, dict):
            raise ValueError(f"policy {name}: document must be a JSON object, got {type(document).__name__}")
        return self.store.put(self.keys.policies + name, encode_json(document))

    def get(self, name: str) -> dict[str, Any] | None:
        check_name("policy name", name)
        kv = self.store.get(self.keys.policies + name)
        return decode_json(kv.key, kv.value) if kv else None

    def delete(self, name: str) -> bool:
        check_name("policy name", name)
        return self.store.delete(self.keys.policies + name) > 0

    def list(self) -> tuple[dict[str, dict[str, Any]], int]:
        kvs, rev = self.store.list_prefix(self.keys.policies)
        return {_name(kv): decode_json(kv.key, kv.value) for kv in kvs}, rev


def _name(kv: KeyValue) -> str:
    return kv.key.rsplit("/", 1)[1]
