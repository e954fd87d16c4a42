"""Cluster-pool IPAM (overlay): cluster pod CIDRs carved into one block per node.

Defaults follow Azure CNI overlay: ``10.244.0.0/16`` with a /24 per node and
``fd12:3456:789a::/64`` with an /80 per node.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum

from weft.types.addresses import IPAddress, IPNetwork

DEFAULT_CLUSTER_CIDR_V4 = "10.244.0.0/16"
DEFAULT_NODE_MASK_V4 = 24
DEFAULT_CLUSTER_CIDR_V6 = "fd12:3456:789a::/64"
DEFAULT_NODE_MASK_V6 = 80


class IPFamilies(StrEnum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"
    DUAL = "dual"

    @property
    def versions(self) -> tuple[int, ...]:
        return {"ipv4": (4,), "ipv6": (6,), "dual": (4, 6)}[self.value]


class IPAMError(Exception):
    """Bad IPAM input or a state the request cannot be served in."""


class PoolExhausted(IPAMError):
    """No free address is left in a node's block."""


@dataclass(frozen=True)
class ClusterPool:
    """One family's cluster CIDR and the prefix length of each node's block."""

    cidr: IPNetwork
    node_mask: int

    def __post_init__(self) -> None:
        if not self.cidr.prefixlen <= self.node_mask <= self.cidr.max_prefixlen - 2:
            raise IPAMError(
                f"node mask /{self.node_mask} does not fit cluster CIDR {self.cidr} "
                f"(needs /{self.cidr.prefixlen}../{self.cidr.max_prefixlen - 2})"
            )

    @classmethod
    def parse(cls, cidr: str, node_mask: int) -> ClusterPool:
        try:
            network = ipaddress.ip_network(cidr, strict=True)
        except ValueError as exc:
            raise IPAMError(f"cluster CIDR {cidr!r}: {exc}") from exc
        return cls(network, node_mask)

    @property
    def block_count(self) -> int:
        return 1 << (self.node_mask - self.cidr.prefixlen)

    def node_block(self, index: int) -> IPNetwork:
        """The ``index``-th node block. Index 0 is skipped by convention so that node N
        gets block N and ``10.244.0.0/24`` stays unused, as overlay IPAM leaves it."""
        if not 0 <= index < self.block_count:
            raise PoolExhausted(
                f"cluster CIDR {self.cidr} has {self.block_count} /{self.node_mask} blocks; "
                f"block {index} does not exist"
            )
        size = 1 << (self.cidr.max_prefixlen - self.node_mask)
        base = int(self.cidr.network_address) + index * size
        return ipaddress.ip_network((base, self.node_mask))


def default_pools() -> dict[int, ClusterPool]:
    return {
        4: ClusterPool.parse(DEFAULT_CLUSTER_CIDR_V4, DEFAULT_NODE_MASK_V4),
        6: ClusterPool.parse(DEFAULT_CLUSTER_CIDR_V6, DEFAULT_NODE_MASK_V6),
    }


def gateway_of(block: IPNetwork) -> IPAddress:
    """The node's router address in its block: the first host address, reserved."""
    return block.network_address + 1


class BlockAllocator:
    """Allocates single addresses from one node block.

    Reserved: the network address, the gateway (first address) and, for IPv4, the broadcast
    address. Allocation continues after the last address handed out (as host-local does), so a
    just-released address is not reused at once: a late packet for an old pod does not reach
    a new one. ``owner`` is an opaque string (the agent uses ``containerID/ifname``).
    """

    def __init__(self, block: IPNetwork, allocations: dict[IPAddress, str] | None = None,
                 last: IPAddress | None = None) -> None:
        self.block = block
        self.gateway = gateway_of(block)
        self._by_ip: dict[IPAddress, str] = {}
        self._last = last
        for ip, owner in (allocations or {}).items():
            self._check_member(ip)
            self._by_ip[ip] = owner

    def _check_member(self, ip: IPAddress) -> None:
        if ip not in self.block:
            raise IPAMError(f"{ip} is not in this node's block {self.block}")
        if ip in self._reserved():
            raise IPAMError(f"{ip} is reserved in {self.block}")

    def _reserved(self) -> set[IPAddress]:
        reserved: set[IPAddress] = {self.block.network_address, self.gateway}
        if self.block.version == 4:
            reserved.add(self.block.broadcast_address)
        return reserved

    @property
    def capacity(self) -> int:
        return self.block.num_addresses - len(self._reserved())

    @property
    def used(self) -> int:
        return len(self._by_ip)

    @property
    def last(self) -> IPAddress | None:
        return self._last

    def allocations(self) -> dict[IPAddress, str]:
        return dict(self._by_ip)

    def owner_of(self, ip: IPAddress) -> str | None:
        return self._by_ip.get(ip)

    def addresses_of(self, owner: str) -> list[IPAddress]:
        return [ip for ip, o in self._by_ip.items() if o == owner]

    def allocate(self, owner: str) -> IPAddress:
        """Return the owner's address if it has one (ADD is idempotent), else the next free one."""
        existing = self.addresses_of(owner)
        if existing:
            return existing[0]
        if self.used >= self.capacity:
            raise PoolExhausted(
                f"no free IPv{self.block.version} address in node block {self.block} "
                f"({self.used} of {self.capacity} in use)"
            )
        first = int(self.block.network_address) + 1
        last = int(self.block.broadcast_address) - (1 if self.block.version == 4 else 0)
        span = last - first + 1
        start = int(self._last) + 1 if self._last is not None else first
        reserved = self._reserved()
        for step in range(span):
            candidate_int = first + (start - first + step) % span
            candidate = ipaddress.ip_address(candidate_int)
            if candidate in reserved or candidate in self._by_ip:
                continue
            self._by_ip[candidate] = owner
            self._last = candidate
            return candidate
        raise PoolExhausted(f"no free address in {self.block}")  # unreachable: capacity check above

    def release(self, ip: IPAddress) -> bool:
        return self._by_ip.pop(ip, None) is not None

    def release_owner(self, owner: str) -> list[IPAddress]:
        freed = self.addresses_of(owner)
        for ip in freed:
            del self._by_ip[ip]
        return freed

    def owners(self) -> set[str]:
        return set(self._by_ip.values())
