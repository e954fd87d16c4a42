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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from weft.identity.allocator import IdentityAllocator
from weft.ipam.pool import BlockAllocator
from weft.types.addresses import IPAddress, IPNetwork

log = logging.getLogger("weft.agent.state")
STATE_VERSION = 1
EP_CREATING = "creating"
EP_READY = "ready"


@dataclass(slots=True)
class EndpointRecord:
    # slots: hundreds of records live for the agent's lifetime; no per-record __dict__.
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
    _json: str | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name != "_json":
            object.__setattr__(self, "_json", None)  # the cached serialisation is stale

    def json_text(self) -> str:
        """This record as JSON, cached until a field changes: a save re-serialises only the
        records that changed, not every endpoint of the node."""
        cached: str | None = getattr(self, "_json", None)
        if cached is None:
            cached = json.dumps({f.name: getattr(self, f.name) for f in fields(self) if f.name != "_json"},
                                separators=(",", ":"))
            object.__setattr__(self, "_json", cached)
        return cached

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
    policies: list[dict[str, Any]] = field(default_factory=list)  # documents, as applied
    next_ep_id: int = 1
    _pod_cache: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict, repr=False, compare=False)
    # id(document) -> (document, its JSON): ten thousand rules are not re-serialised on every save.
    _policy_cache: dict[int, tuple[dict[str, Any], str]] = field(default_factory=dict, repr=False, compare=False)

    def to_text(self) -> str:
        """The state document. IP allocations are not written separately: every allocated
        address is in the record of the endpoint that holds it (written before the kernel is
        touched), and loading rebuilds the allocators from the records. Endpoint and pod entries
        come from per-entry caches, so a save's cost is not paid again for unchanged entries."""
        compact = (",", ":")
        endpoints = ",".join(f"{json.dumps(k)}:{r.json_text()}" for k, r in self.endpoints.items())
        pods = ",".join(f"{json.dumps(k)}:{self._pod_text(k, v)}" for k, v in self.pods.items())
        ipam = {str(v): {"block": str(a.block), "last": str(a.last) if a.last is not None else None}
                for v, a in sorted(self.ipam.items())}
        return (f'{{"version":{STATE_VERSION},"endpoints":{{{endpoints}}},'
                f'"ipam":{json.dumps(ipam, separators=compact)},'
                f'"identities":{json.dumps(self.identities.to_json(), separators=compact)},'
                f'"pods":{{{pods}}},"namespaces":{json.dumps(self.namespaces, separators=compact)},'
                f'"policies":[{self._policies_text()}],'
                f'"next_ep_id":{self.next_ep_id}}}')

    def _pod_text(self, key: str, meta: dict[str, Any]) -> str:
        # Pod entries are replaced, never changed in place: cache by the dict's identity.
        cached = self._pod_cache.get(key)
        if cached is None or cached[0] is not meta:
            cached = (meta, json.dumps(meta, separators=(",", ":")))
            self._pod_cache[key] = cached
        return cached[1]

    def _policies_text(self) -> str:
        # Policy documents are replaced, never changed in place (the policy controller keeps an
        # unchanged policy's document object): cache by the dict's identity, holding the dict so
        # its id cannot be reused while cached.
        cache: dict[int, tuple[dict[str, Any], str]] = {}
        for doc in self.policies:
            cached = self._policy_cache.get(id(doc))
            if cached is None or cached[0] is not doc:
                cached = (doc, json.dumps(doc, separators=(",", ":")))
            cache[id(doc)] = cached
        self._policy_cache = cache
        return ",".join(cache[id(doc)][1] for doc in self.policies)

    def to_json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.to_text())
        return parsed

    @classmethod
    def from_json(cls, data: dict[str, Any], blocks: dict[int, IPNetwork]) -> AgentState:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"state version {data.get('version')!r} is not {STATE_VERSION}")
        state = cls(
            endpoints={k: EndpointRecord(**v) for k, v in data.get("endpoints", {}).items()},
            identities=IdentityAllocator.from_json(data.get("identities", [])),
            pods=dict(data.get("pods", {})),
            namespaces=dict(data.get("namespaces", {})),
            policies=list(data.get("policies", [])),
            next_ep_id=int(data.get("next_ep_id", 1)),
        )
        saved_ipam = data.get("ipam", {})
        for version, block in blocks.items():
            saved = saved_ipam.get(str(version))
            last = ipaddress.ip_address(saved["last"]) if saved and saved.get("last") else None
            if last is not None and last not in block:
                last = None  # the node's block changed
            allocations: dict[IPAddress, str] = {}
            for record in state.endpoints.values():
                for ip in record.ips():
                    # An address outside the (possibly changed) block is not allocated here:
                    # its endpoint is reconciled away.
                    if ip.version == version and ip in block and ip != block.network_address:
                        allocations[ip] = record.key
            state.ipam[version] = BlockAllocator(block, allocations, last)
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
        data = state.to_text().encode()
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)
