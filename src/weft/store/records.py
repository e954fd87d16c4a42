"""Typed records kept in the store (nodes, endpoints) and their strict JSON codecs.

Decoding names the key that held bad data, so a corrupt entry is reported where it is.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from weft.store.kv import StoreError


def check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or not name.isprintable() or len(name) > 253:
        raise ValueError(f"{what} {name!r}: must be 1-253 printable characters without '/'")


def decode_json(key: str, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"store key {key!r}: not JSON ({e})") from e
    if not isinstance(data, dict):
        raise StoreError(f"store key {key!r}: expected a JSON object, got {type(data).__name__}")
    return data


def encode_json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    addresses: tuple[str, ...]  # the node's underlay addresses, IPv4 and/or IPv6
    pod_cidrs: tuple[str, ...]

    def __post_init__(self) -> None:
        check_name("node name", self.name)
        for addr in self.addresses:
            try:
                ipaddress.ip_address(addr)
            except ValueError as e:
                raise ValueError(f"node {self.name}: address {addr!r} is not an IP address") from e
        for cidr in self.pod_cidrs:
            try:
                ipaddress.ip_network(cidr)
            except ValueError as e:
                raise ValueError(f"node {self.name}: pod CIDR {cidr!r} is not a network (host bits set?)") from e

    def encode(self) -> bytes:
        return encode_json({"name": self.name, "addresses": list(self.addresses), "pod_cidrs": list(self.pod_cidrs)})

    @classmethod
    def decode(cls, key: str, raw: bytes) -> Node:
        data = decode_json(key, raw)
        try:
            return cls(str(data["name"]), tuple(map(str, data["addresses"])), tuple(map(str, data["pod_cidrs"])))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"store key {key!r}: bad node record: {e}") from e


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str
    identity: int
    node: str
    namespace: str
    pod: str

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.ip)
        except ValueError as e:
            raise ValueError(f"endpoint {self.namespace}/{self.pod}: {self.ip!r} is not an IP address") from e
        if not isinstance(self.identity, int) or self.identity <= 0:
            raise ValueError(f"endpoint {self.ip}: identity must be a positive integer, got {self.identity!r}")
        check_name(f"endpoint {self.ip}: node", self.node)
        check_name(f"endpoint {self.ip}: namespace", self.namespace)
        check_name(f"endpoint {self.ip}: pod", self.pod)

    def encode(self) -> bytes:
        return encode_json({"ip": self.ip, "identity": self.identity, "node": self.node,
                            "namespace": self.namespace, "pod": self.pod})

    @classmethod
    def decode(cls, key: str, raw: bytes) -> Endpoint:
        data = decode_json(key, raw)
        try:
            return cls(str(data["ip"]), int(data["identity"]), str(data["node"]), str(data["namespace"]),
                       str(data["pod"]))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"store key {key!r}: bad endpoint record: {e}") from e
