"""The proxy's view of the node's pinned datapath maps (it never loads programs).

Reads: ``weft_endpoints`` and ``weft_ipcache`` (the identity of a query's original destination, and
whether a learned address is a local pod), ``weft_ct`` (is a connection to a learned address still
alive). Writes: ``weft_fqdn`` only, of which the proxy is the one writer.
"""

from __future__ import annotations

import ctypes
import ipaddress
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from weft.datapath import abi
from weft.datapath.maps import BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LPM_TRIE, BPF_MAP_TYPE_LRU_HASH, BpfHashMap
from weft.types.addresses import IPAddress

WORLD_IDENTITY = 2  # what matches no endpoint and no ipcache prefix (Cilium's reserved:world)
# A connection counts as alive while tracked, not closing, and seen within this long (ns).
CT_ALIVE_TCP_NS = 6 * 3600 * 10**9
CT_ALIVE_OTHER_NS = 60 * 10**9
IDENTITY_CACHE_S = 1.0  # identities change with the agent's ipcache; a second of staleness is fine
IDENTITY_CACHE_MAX = 4096

Slots = dict[int, int]  # selector identity -> expires_ns (CLOCK_MONOTONIC)


@dataclass(frozen=True)
class PeerInfo:
    identity: int
    local_endpoint: bool


def ct_alive(key: abi.CtKey, value: abi.CtValue, now_ns: int) -> bool:
    if value.flags & abi.CT_F_CLOSING:
        return False
    horizon = CT_ALIVE_TCP_NS if key.proto == 6 else CT_ALIVE_OTHER_NS
    return now_ns - int(value.last_seen_ns) <= horizon


def slots_of(value: abi.FqdnValue) -> Slots:
    return {int(s.selector_identity): int(s.expires_ns) for s in value.slots if s.selector_identity}


def value_of(slots: Slots) -> abi.FqdnValue:
    if len(slots) > abi.FQDN_SLOTS:
        raise ValueError(f"{len(slots)} selector slots, the datapath holds {abi.FQDN_SLOTS}")
    value = abi.FqdnValue()
    for i, (identity, expires) in enumerate(sorted(slots.items())):
        value.slots[i].selector_identity = identity
        value.slots[i].expires_ns = expires
    return value


class ProxyMaps:
    """The pinned maps under ``pin_dir``; :meth:`open` raises if the datapath is not loaded yet."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self.endpoints: BpfHashMap[abi.EpKey, abi.EpValue] | None = None
        self.ipcache: BpfHashMap[abi.IpcacheKey, abi.IpcacheValue] | None = None
        self.ct: BpfHashMap[abi.CtKey, abi.CtValue] | None = None
        self.fqdn: BpfHashMap[abi.FqdnKey, abi.FqdnValue] | None = None
        self._peers: dict[str, tuple[float, PeerInfo]] = {}

    @property
    def is_open(self) -> bool:
        return self.fqdn is not None

    def open(self) -> None:
        if self.is_open:
            return
        opened: list[BpfHashMap[ctypes.Structure, ctypes.Structure]] = []
        try:
            endpoints = BpfHashMap.open_pinned(str(self.pin_dir / "weft_endpoints"), abi.EpKey, abi.EpValue)
            opened.append(endpoints)  # type: ignore[arg-type]
            ipcache = BpfHashMap.open_pinned(str(self.pin_dir / "weft_ipcache"), abi.IpcacheKey, abi.IpcacheValue,
                                             map_type=BPF_MAP_TYPE_LPM_TRIE)
            opened.append(ipcache)  # type: ignore[arg-type]
            ct = BpfHashMap.open_pinned(str(self.pin_dir / "weft_ct"), abi.CtKey, abi.CtValue,
                                        map_type=BPF_MAP_TYPE_LRU_HASH)
            opened.append(ct)  # type: ignore[arg-type]
            fqdn = BpfHashMap.open_pinned(str(self.pin_dir / "weft_fqdn"), abi.FqdnKey, abi.FqdnValue,
                                          map_type=BPF_MAP_TYPE_HASH)
        except BaseException:
            for m in opened:
                m.close()
            raise
        self.endpoints, self.ipcache, self.ct, self.fqdn = endpoints, ipcache, ct, fqdn

    def close(self) -> None:
        for m in (self.endpoints, self.ipcache, self.ct, self.fqdn):
            if m is not None:
                m.close()
        self.endpoints = self.ipcache = self.ct = self.fqdn = None

    def _need_fqdn(self) -> BpfHashMap[abi.FqdnKey, abi.FqdnValue]:
        if self.fqdn is None:
            raise RuntimeError(f"datapath maps under {self.pin_dir} are not open")
        return self.fqdn

    # ------------------------------------------------------------------ identities
    def peer(self, address: str) -> PeerInfo:
        """Identity of ``address`` as the datapath sees it: a local endpoint's, else the longest
        ipcache prefix's, else world. Cached for a second."""
        now = time.monotonic()
        hit = self._peers.get(address)
        if hit is not None and hit[0] > now:
            return hit[1]
        info = self._lookup_peer(ipaddress.ip_address(address))
        if len(self._peers) >= IDENTITY_CACHE_MAX:
            self._peers.clear()
        self._peers[address] = (now + IDENTITY_CACHE_S, info)
        return info

    def _lookup_peer(self, ip: IPAddress) -> PeerInfo:
        if self.endpoints is None or self.ipcache is None:
            return PeerInfo(WORLD_IDENTITY, False)
        ep = self.endpoints.get(abi.EpKey.of(ip))
        if ep is not None:
            return PeerInfo(int(ep.identity), True)
        network = ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")
        hit = self.ipcache.get(abi.IpcacheKey.of(network))
        return PeerInfo(int(hit.identity) if hit is not None else WORLD_IDENTITY, False)

    def forget_peers(self) -> None:
        self._peers.clear()

    # ------------------------------------------------------------------ weft_fqdn
    def read_slots(self, ep_id: int, ip: IPAddress) -> Slots:
        value = self._need_fqdn().get(abi.FqdnKey.of(ep_id, ip))
        return slots_of(value) if value is not None else {}

    def write_slots(self, ep_id: int, ip: IPAddress, slots: Slots) -> None:
        """Set the entry to ``slots`` (deleted when empty)."""
        fqdn = self._need_fqdn()
        key = abi.FqdnKey.of(ep_id, ip)
        if slots:
            fqdn[key] = value_of(slots)
        else:
            fqdn.delete(key)

    def fqdn_entries(self) -> Iterator[tuple[int, IPAddress, Slots]]:
        for key, value in self._need_fqdn().items():
            yield int(key.ep_id), key.ip(), slots_of(value)

    # ------------------------------------------------------------------ conntrack
    def ct_items(self) -> Iterator[tuple[abi.CtKey, abi.CtValue]]:
        if self.ct is None:
            return iter(())
        return self.ct.items()


def ct_pair(key: abi.CtKey) -> tuple[bytes, bytes]:
    """(source, destination) of a tracked connection as family byte + 16 address bytes, the form
    :func:`packed` gives, so a walk of the table compares bytes and builds no objects."""
    family = bytes((int(key.family),))
    return family + bytes(key.saddr), family + bytes(key.daddr)


def packed(ip: IPAddress) -> bytes:
    family = abi.FAMILY_V4 if ip.version == 4 else abi.FAMILY_V6
    return bytes((family,)) + ip.packed.ljust(16, b"\0")


def unpacked(raw: bytes) -> IPAddress:
    return ipaddress.IPv4Address(raw[1:5]) if raw[0] == abi.FAMILY_V4 else ipaddress.IPv6Address(raw[1:17])
