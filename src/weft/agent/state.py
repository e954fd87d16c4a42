"""The agent's persistent state: endpoints, IP allocations, identities, pod metadata.

One JSON document, replaced atomically (write to a temporary file, fsync, rename, fsync the
directory), so a crash at any instant leaves either the old or the new state on disk, never
a torn one. Every change that allocates something is persisted before the kernel is touched.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weft.identity.allocator import IdentityAllocator
from weft.ipam.pool import BlockAllocator
from weft.types.addresses import IPAddress, IPNetwork

log = logging.getLogger("weft.agent.state")
STATE_VERSION = 1
EP_CREATING = "creating"
EP_READY = "ready"


@dataclass
class EndpointRecord:
    container_id: str
    ifname: str
    netns: str
    network: str
    ep_id: int
    host_ifname: str
    addresses: list[str]
    pod_namespace: str = ""
    pod_name: str = ""
    identity: int = 0
    state: str = EP_CREATING
    host_mac: str = ""
    pod_mac: str = ""
    host_ifindex: int = 0

    @property
    def key(self) -> str:
        return endpoint_key(self.container_id, self.ifname)

    def ips(self) -> list[IPAddress]:
        return [ipaddress.ip_address(a) for a in self.addresses]


def endpoint_key(container_id: str, ifname: str) -> str:
    return f"{container_id}/{ifname}"


@dataclass
class AgentState:
    endpoints: dict[str, EndpointRecord] = field(default_factory=dict)
    ipam: dict[int, BlockAllocator] = field(default_factory=dict)
    identities: IdentityAllocator = field(default_factory=IdentityAllocator)
    # "namespace/name" -> {"labels": {...}, "ports": [{"name", "protocol", "port"}]}
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    next_ep_id: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            # vars(), not asdict(): records hold only scalars and lists of str, and asdict's deep
            # copy of every record was most of a save's cost with hundreds of endpoints.
            "endpoints": {k: vars(v) for k, v in sorted(self.endpoints.items())},
            "ipam": {
                str(v): {
                    "block": str(a.block),
                    "last": str(a.last) if a.last is not None else None,
                    "allocations": {str(ip): owner for ip, owner in sorted(a.allocations().items())},
                }
                for v, a in sorted(self.ipam.items())
            },
            "identities": self.identities.to_json(),
            "pods": self.pods,
            "namespaces": self.namespaces,
            "next_ep_id": self.next_ep_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], blocks: dict[int, IPNetwork]) -> AgentState:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"state version {data.get('version')!r} is not {STATE_VERSION}")
        state = cls(
            endpoints={k: EndpointRecord(**v) for k, v in data.get("endpoints", {}).items()},
            identities=IdentityAllocator.from_json(data.get("identities", [])),
            pods=dict(data.get("pods", {})),
            namespaces=dict(data.get("namespaces", {})),
            next_ep_id=int(data.get("next_ep_id", 1)),
        )
        saved_ipam = data.get("ipam", {})
        for version, block in blocks.items():
            saved = saved_ipam.get(str(version))
            if saved and saved["block"] == str(block):
                allocations = {ipaddress.ip_address(ip): o for ip, o in saved["allocations"].items()}
                last = ipaddress.ip_address(saved["last"]) if saved.get("last") else None
                state.ipam[version] = BlockAllocator(block, allocations, last)
            else:
                # A changed block keeps nothing: endpoints of the old block are reconciled away.
                state.ipam[version] = BlockAllocator(block)
        return state


class StateStore:
    """Crash-safe load/save of :class:`AgentState` at ``<state_dir>/state.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / "state.json"

    def load(self, blocks: dict[int, IPNetwork]) -> AgentState:
        if not self.path.exists():
            return AgentState.from_json({"version": STATE_VERSION}, blocks)
        try:
            return AgentState.from_json(json.loads(self.path.read_text()), blocks)
        except (ValueError, KeyError, TypeError) as exc:
            # Only a crash of the whole machine can leave this (see save); after one, no pod of
            # the old state survives anyway. Keep the file for inspection and start empty: the
            # reconciler removes whatever the kernel still holds.
            kept = self.path.with_name(f"state.json.corrupt-{int(time.time())}")
            os.replace(self.path, kept)
            log.error("state %s unreadable (%s); kept as %s, starting empty", self.path, exc, kept)
            return AgentState.from_json({"version": STATE_VERSION}, blocks)

    def save(self, state: AgentState) -> None:
        """Replace the state atomically: a reader (or an agent restarted after a crash) sees the
        old document or the new one, never a mix. No fsync: it protects against a crash of the
        machine, after which no pod, veth or pinned map of the old state exists either, and it
        would cost more than the rest of a CNI ADD."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        data = json.dumps(state.to_json(), separators=(",", ":")).encode()
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)
