"""Loading the node's datapath object, pinning, tc attachment and endpoint map writes.

Maps are pinned by name under the node's pin directory and reused on every load, so state
survives agent restarts; programs are pinned under ``<pin_dir>/progs``. Programs are attached
with tc clsact (ingress: from_container, egress: to_container) with a fixed priority and handle,
and re-attached with a replace, so an agent restart swaps programs atomically without a gap.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import shutil
import socket
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pyroute2.netlink.exceptions import NetlinkError

from weft.datapath import abi, libbpf
from weft.datapath.maps import BpfHashMap, PerCpuArray
from weft.datapath.netlink import link_index, node_ipr
from weft.types.addresses import IPAddress, IPNetwork

T = TypeVar("T")
V = TypeVar("V", bound=ctypes.Structure)

PROGRAMS = ("from_container", "to_container", "from_overlay", "from_netdev")
MAPS = ("weft_endpoints", "weft_lxc", "weft_metrics", "weft_policy", "weft_ipcache", "weft_ct", "weft_fqdn",
        "weft_tunnel", "weft_events", "weft_event_cfg")
# One fixed priority and handle: `replace` finds the filter by both, so a re-attach swaps the
# program in place (no moment without a filter) instead of adding a second one.
TC_PRIO = 1
TC_HANDLE = 1


def default_object_path() -> Path:
    """``$WEFT_BPF_OBJECT`` if set, else ``<repo>/build/bpf/weft_lxc.o`` (built by ``make bpf``)."""
    override = os.environ.get("WEFT_BPF_OBJECT")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[3] / "build" / "bpf" / "weft_lxc.o"


@dataclass(frozen=True)
class EndpointEntry:
    """One pod address as the datapath knows it (an entry of ``weft_endpoints``)."""

    ip: IPAddress
    ifindex: int  # host-side veth, in the node's netns
    ep_id: int
    identity: int
    pod_mac: str  # "aa:bb:cc:dd:ee:ff"
    host_mac: str
    # abi.EP_F_INGRESS_ENFORCED | EP_F_EGRESS_ENFORCED | EP_F_HAS_DENY, as policy decides
    policy_flags: int = 0


@dataclass(frozen=True, order=True)
class PolicyMapKey:
    """One policy entry of an endpoint (the endpoint id is the map key's first field)."""

    direction: int  # abi.DIR_INGRESS / DIR_EGRESS
    identity: int  # peer identity, 0 = any
    proto: int  # 0 = any
    port: int
    port_prefix_len: int  # 0..16


@dataclass(frozen=True)
class PolicyMapValue:
    deny: bool
    cookie: int = 0
    proxy_port: int = 0  # non-zero: allowed, handed to the DNS proxy on this port


@dataclass(frozen=True)
class ConntrackEntry:
    family: int
    proto: int
    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    packets: int
    bytes: int
    flags: int
    age_ns: int


@dataclass(frozen=True)
class NodeRoute:
    """How another node's pod prefix is reached: encapsulated by the VXLAN device ``ifindex``
    towards the node's underlay ``address`` (``mode`` ROUTE_VXLAN), or routed by the datapath
    (ROUTE_DIRECT: the FIB decides; ``ifindex`` and ``address`` are informative)."""

    ifindex: int
    address: IPAddress
    mode: int = abi.ROUTE_VXLAN


def _value(entry: EndpointEntry) -> abi.EpValue:
    value = abi.EpValue(ifindex=entry.ifindex, ep_id=entry.ep_id, identity=entry.identity,
                        flags=abi.EP_F_LOCAL | entry.policy_flags)
    abi.set_mac(value.pod_mac, entry.pod_mac)
    abi.set_mac(value.host_mac, entry.host_mac)
    return value


def _entry(ip: IPAddress, value: abi.EpValue) -> EndpointEntry:
    return EndpointEntry(ip=ip, ifindex=int(value.ifindex), ep_id=int(value.ep_id), identity=int(value.identity),
                         pod_mac=abi.mac_str(value.pod_mac), host_mac=abi.mac_str(value.host_mac),
                         policy_flags=int(value.flags) & ~abi.EP_F_LOCAL)


class NodeDatapath:
    """The node's datapath: one loaded object whose maps are pinned under ``pin_dir`` and whose
    programs are attached to every pod's host-side veth.

    Not thread-safe: the agent drives it from a single worker thread.
    """

    def __init__(self, pin_dir: Path, obj_path: Path, events_ring_bytes: int | None = None,
                 event_level: int = abi.EV_LEVEL_MEDIUM) -> None:
        """``events_ring_bytes``: size of the verdict event ring (None: the object's default);
        ``event_level``: which packets become events (abi.EV_LEVEL_*)."""
        self.pin_dir = Path(pin_dir)
        self.obj_path = Path(obj_path)
        self.events_ring_bytes = events_ring_bytes
        self.event_level = event_level
        self._obj: libbpf.BpfObject | None = None
        self._endpoints: BpfHashMap[abi.EpKey, abi.EpValue] | None = None
        self._lxc: BpfHashMap[ctypes.c_uint32, abi.EpValue] | None = None
        self._metrics: PerCpuArray[abi.MetricValue] | None = None
        self._policy: BpfHashMap[abi.PolicyKey, abi.PolicyValue] | None = None
        self._ipcache: BpfHashMap[abi.IpcacheKey, abi.IpcacheValue] | None = None
        self._ct: BpfHashMap[abi.CtKey, abi.CtValue] | None = None
        self._fqdn: BpfHashMap[abi.FqdnKey, abi.FqdnValue] | None = None
        self._tunnel: BpfHashMap[abi.IpcacheKey, abi.TunnelValue] | None = None
        # ep_id -> its policy entries as written; rebuilt from the map on load, so a sync writes
        # only what changed.
        self._policy_cache: dict[int, dict[PolicyMapKey, PolicyMapValue]] = {}
        self._prog_fds: dict[str, int] = {}
        # ifindex -> addresses in weft_endpoints behind it, so that deleting an address knows
        # whether its interface entry (weft_lxc) is still needed without walking the map. We
        # are the only writer; the index is rebuilt from the map on every load.
        self._by_ifindex: dict[int, set[IPAddress]] = {}

    # ------------------------------------------------------------------ load
    def load(self) -> None:
        """Open the object, point every map at pin_dir/<map name> (reusing a pinned map that
        exists, so state survives agent restarts), load, and pin each program at
        pin_dir/progs/<prog name> (replacing an older pin). Idempotent."""
        if self._obj is not None:
            return
        if not self.obj_path.exists():
            raise FileNotFoundError(f"datapath object {self.obj_path} is missing; run `make bpf`")
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        obj = libbpf.BpfObject(str(self.obj_path))
        try:
            for name in obj.map_names():
                obj.set_pin_path(name, str(self.pin_dir / name))
            if self.events_ring_bytes is not None:
                obj.set_map_max_entries("weft_events", self.events_ring_bytes)
            self._drop_resized_events_pin(obj.map_max_entries("weft_events"))
            try:
                obj.load()
            except libbpf.BpfError as exc:
                pinned = [n for n in MAPS if (self.pin_dir / n).exists()]
                if pinned and exc.errno == errno.EINVAL:
                    # libbpf refuses to reuse a pin whose type/sizes differ from the object's.
                    raise libbpf.BpfError(exc.func, exc.errno or errno.EINVAL,
                                          f"{self.obj_path}; pinned maps {pinned} in {self.pin_dir} may be "
                                          "from an incompatible build (see libbpf's message above)") from exc
                raise
            endpoints = BpfHashMap(obj.map_fd("weft_endpoints"), abi.EpKey, abi.EpValue)
            lxc = BpfHashMap(obj.map_fd("weft_lxc"), ctypes.c_uint32, abi.EpValue)
            metrics = PerCpuArray(obj.map_fd("weft_metrics"), abi.MetricValue, obj.map_max_entries("weft_metrics"))
            policy = BpfHashMap(obj.map_fd("weft_policy"), abi.PolicyKey, abi.PolicyValue)
            ipcache = BpfHashMap(obj.map_fd("weft_ipcache"), abi.IpcacheKey, abi.IpcacheValue)
            ct = BpfHashMap(obj.map_fd("weft_ct"), abi.CtKey, abi.CtValue)
            fqdn = BpfHashMap(obj.map_fd("weft_fqdn"), abi.FqdnKey, abi.FqdnValue)
            # Before any program is attached by this load: which packets become events.
            libbpf.map_update(obj.map_fd("weft_event_cfg"), ctypes.c_uint32(0),
                              abi.EventConfig(level=self.event_level))
            prog_fds = {name: obj.prog_fd(name) for name in obj.program_names()}
            missing = set(PROGRAMS) - set(prog_fds)
            if missing:
                raise FileNotFoundError(f"{self.obj_path} lacks programs {sorted(missing)}")
            self._pin_programs(prog_fds)
        except BaseException:
            obj.close()
            raise
        self._obj, self._endpoints, self._lxc, self._metrics = obj, endpoints, lxc, metrics
        self._policy, self._ipcache, self._ct = policy, ipcache, ct
        self._fqdn = fqdn
        self._policy_cache = {}
        for pkey, pvalue in policy.items():
            mk = PolicyMapKey(int(pkey.direction), int(pkey.identity), int(pkey.proto), pkey.port(),
                              max(0, int(pkey.prefixlen) - abi.POLICY_FIXED_BITS - 8) if pkey.proto else 0)
            self._policy_cache.setdefault(int(pkey.ep_id), {})[mk] = PolicyMapValue(
                bool(pvalue.deny), int(pvalue.cookie), int(pvalue.proxy_port))
        self._prog_fds = prog_fds
        self._by_ifindex = {}
        for key, value in endpoints.items():
            self._by_ifindex.setdefault(int(value.ifindex), set()).add(key.ip())

    def _drop_resized_events_pin(self, want_bytes: int) -> None:
        """A pinned event ring of another size cannot be reused (libbpf refuses it): it holds
        only events not read yet, so it is replaced; the programs are re-attached with the new
        ring by the agent's reconcile."""
        pin = self.pin_dir / "weft_events"
        if not pin.exists():
            return
        fd = libbpf.obj_get(str(pin))
        try:
            have = int(libbpf.map_get_info(fd).max_entries)
        finally:
            os.close(fd)
        if have != want_bytes:
            pin.unlink()

    def events_fd(self) -> int:
        """The fd of the verdict event ring (owned by this object; do not close)."""
        return self._need().map_fd("weft_events")

    def events_ring_size(self) -> int:
        return self._need().map_max_entries("weft_events")

    def _pin_programs(self, prog_fds: dict[str, int]) -> None:
        progs_dir = self.pin_dir / "progs"
        progs_dir.mkdir(exist_ok=True)
        for name, fd in prog_fds.items():
            # Pin under a temporary name, then rename over the old pin: whoever opens the pin
            # gets the old or the new program, never nothing.
            tmp = progs_dir / f"{name}_new"  # bpffs names cannot contain dots
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            libbpf.obj_pin(fd, str(tmp))
            os.replace(tmp, progs_dir / name)

    def _need(self) -> libbpf.BpfObject:
        if self._obj is None:
            raise RuntimeError("datapath not loaded; call load() first")
        return self._obj

    @property
    def loaded(self) -> bool:
        return self._obj is not None

    # ------------------------------------------------------------------ attach
    def attach(self, ifname: str, ifindex: int | None = None) -> None:
        """In the CALLER's current netns: ensure a clsact qdisc on ``ifname`` and install
        from_container at ingress and to_container at egress with a fixed prio/handle, using
        replace so a re-attach after a restart swaps programs atomically without a gap."""
        self._attach(ifname, ifindex, (("from_container", False), ("to_container", True)))

    def attach_overlay(self, ifname: str, ifindex: int | None = None) -> None:
        """In the caller's netns: from_overlay at the ingress of the node's collect-metadata
        VXLAN device (what other nodes' pods send to this node's), replacing in place."""
        self._attach(ifname, ifindex, (("from_overlay", False),))

    def attach_netdev(self, ifname: str, ifindex: int | None = None) -> None:
        """In the caller's netns: from_netdev at the ingress of the node's underlay device
        (direct routing: what other nodes route to this node's pods), replacing in place."""
        self._attach(ifname, ifindex, (("from_netdev", False),))

    def _attach(self, ifname: str, ifindex: int | None, programs: tuple[tuple[str, bool], ...]) -> None:
        """Each (program, at egress?) on the link's clsact hook, with our fixed handle/priority."""
        self._need()
        if ifindex is None:
            ifindex = link_index(ifname)
            if ifindex is None:
                raise FileNotFoundError(f"interface {ifname} not found")
        libbpf.tc_hook_create(ifindex)
        for prog, egress in programs:
            libbpf.tc_attach(ifindex, self._prog_fds[prog], egress, TC_HANDLE, TC_PRIO)

    def detach(self, ifname: str) -> None:
        """Best effort: remove the clsact qdisc (and with it both filters); no error if the link
        or the qdisc is gone."""
        index = link_index(ifname)
        if index is None:
            return
        with contextlib.suppress(NetlinkError):
            node_ipr().tc("del", "clsact", index)

    def attached_program_ids(self, ifname: str, ifindex: int | None = None) -> dict[str, int]:
        """``{'ingress': prog_id, 'egress': prog_id}`` of our filters (our handle and priority)
        on the link, in the caller's netns; a direction without one is absent, so is everything
        if the link is."""
        if ifindex is None:
            ifindex = link_index(ifname)
            if ifindex is None:
                return {}
        out: dict[str, int] = {}
        for direction, egress in (("ingress", False), ("egress", True)):
            prog_id = libbpf.tc_query(ifindex, egress, TC_HANDLE, TC_PRIO)
            if prog_id:
                out[direction] = prog_id
        return out

    def program_fd(self, name: str) -> int:
        """The fd of a loaded program (owned by this object; do not close)."""
        self._need()
        return self._prog_fds[name]

    def program_ids(self) -> dict[str, int]:
        """Program name -> kernel program id, of the programs this instance loaded."""
        self._need()
        return {name: libbpf.prog_info(fd)[0] for name, fd in self._prog_fds.items()}

    # ------------------------------------------------------------------ endpoints
    def _maps(self) -> tuple[BpfHashMap[abi.EpKey, abi.EpValue], BpfHashMap[ctypes.c_uint32, abi.EpValue]]:
        self._need()
        assert self._endpoints is not None and self._lxc is not None
        return self._endpoints, self._lxc

    def upsert_endpoint(self, entry: EndpointEntry) -> None:
        """Add or overwrite the entry of one pod address (and of its interface)."""
        endpoints, lxc = self._maps()
        value = _value(entry)
        key = abi.EpKey.of(entry.ip)
        old = endpoints.get(key)
        # Interface first: when a pod's address becomes reachable, its gateway already answers.
        lxc[ctypes.c_uint32(entry.ifindex)] = value
        endpoints[key] = value
        if old is not None and int(old.ifindex) != entry.ifindex:
            self._forget(entry.ip, int(old.ifindex))
        self._by_ifindex.setdefault(entry.ifindex, set()).add(entry.ip)

    def delete_endpoint(self, ip: IPAddress) -> None:
        """Remove one pod address; no error if absent. The interface entry goes with the last
        address behind it."""
        endpoints, _ = self._maps()
        key = abi.EpKey.of(ip)
        old = endpoints.get(key)
        endpoints.delete(key)
        if old is not None:
            self._forget(ip, int(old.ifindex))

    def _forget(self, ip: IPAddress, ifindex: int) -> None:
        _, lxc = self._maps()
        remaining = self._by_ifindex.get(ifindex, set())
        remaining.discard(ip)
        if not remaining:
            self._by_ifindex.pop(ifindex, None)
            lxc.delete(ctypes.c_uint32(ifindex))

    def delete_interface(self, ifindex: int) -> None:
        """Remove an interface's entry (its addresses' entries stay)."""
        _, lxc = self._maps()
        lxc.delete(ctypes.c_uint32(ifindex))

    def interfaces(self) -> dict[int, int]:
        """ifindex -> endpoint id, from the interface map."""
        _, lxc = self._maps()
        return {int(k.value): int(v.ep_id) for k, v in lxc.items()}

    def endpoints(self) -> dict[IPAddress, EndpointEntry]:
        """Every entry of the endpoint map, read from the kernel."""
        endpoints, _ = self._maps()
        out: dict[IPAddress, EndpointEntry] = {}
        for key, value in endpoints.items():
            ip = key.ip()
            out[ip] = _entry(ip, value)
        return out

    # ------------------------------------------------------------------ policy
    def _policy_maps(self) -> tuple[BpfHashMap[abi.PolicyKey, abi.PolicyValue],
                                    BpfHashMap[abi.IpcacheKey, abi.IpcacheValue],
                                    BpfHashMap[abi.CtKey, abi.CtValue]]:
        self._need()
        assert self._policy is not None and self._ipcache is not None and self._ct is not None
        return self._policy, self._ipcache, self._ct

    def policy_entries(self, ep_id: int) -> dict[PolicyMapKey, PolicyMapValue]:
        self._need()
        return dict(self._policy_cache.get(ep_id, {}))

    def apply_endpoint_policy(self, addresses: list[EndpointEntry], flags: int,
                              desired: dict[PolicyMapKey, PolicyMapValue],
                              changed_keys: Collection[PolicyMapKey] | None = None) -> dict[str, int]:
        """Bring one endpoint's policy entries and enforcement flags to ``desired``, writing only
        what changed, in an order with no window where a denied packet passes or an allowed one
        is dropped: deny entries first, then allows, then the enforcement flags (so default deny
        starts only once its allows are in place), then stale allows, then stale denies.
        ``addresses`` are the endpoint's entries (same ep_id); their flags are rewritten.
        ``changed_keys``: the only keys that may differ from what was last written for this
        endpoint (a caller that tracks changes), so ten thousand unchanged entries are not
        compared again; None compares every key."""
        policy, _, _ = self._policy_maps()
        if not addresses:
            return {"written": 0, "deleted": 0}
        ep_id = addresses[0].ep_id
        current = self._policy_cache.setdefault(ep_id, {})
        has_deny = any(v.deny for v in desired.values())
        old_flags = addresses[0].policy_flags

        def write_flags(value: int) -> None:
            for entry in addresses:
                self.upsert_endpoint(EndpointEntry(entry.ip, entry.ifindex, entry.ep_id, entry.identity,
                                                   entry.pod_mac, entry.host_mac, value))

        if has_deny and not old_flags & abi.EP_F_HAS_DENY:
            write_flags(old_flags | abi.EP_F_HAS_DENY)  # harmless until deny entries exist
        if changed_keys is None:
            changed = {k: v for k, v in desired.items() if current.get(k) != v}
            stale = [k for k in current if k not in desired]
        else:
            changed = {k: desired[k] for k in changed_keys if k in desired and current.get(k) != desired[k]}
            stale = [k for k in changed_keys if k not in desired and k in current]
        for key in changed:
            if key.proto == 0 and (key.port or key.port_prefix_len):
                raise ValueError(f"{key}: a port needs a protocol")
            if not 0 <= key.port_prefix_len <= 16 or key.port & ~((0xFFFF << (16 - key.port_prefix_len)) & 0xFFFF):
                raise ValueError(f"{key}: port {key.port} has bits beyond its /{key.port_prefix_len} prefix")
        written = 0
        for want_deny in (True, False):
            for key, value in sorted(changed.items()):
                if value.deny == want_deny:
                    policy[self._policy_key(ep_id, key)] = abi.PolicyValue(deny=int(value.deny), cookie=value.cookie,
                                                                                    proxy_port=value.proxy_port)
                    current[key] = value
                    written += 1
        enforce = flags & (abi.EP_F_INGRESS_ENFORCED | abi.EP_F_EGRESS_ENFORCED | abi.EP_F_FQDN)
        stale_deny = any(current[k].deny for k in stale)
        # HAS_DENY stays on while any deny entry, new or stale, is in the map.
        write_flags(enforce | (abi.EP_F_HAS_DENY if has_deny or stale_deny else 0))
        deleted = 0
        for want_deny in (False, True):
            for key in sorted(stale):
                if key in current and current[key].deny == want_deny:
                    policy.delete(self._policy_key(ep_id, key))
                    del current[key]
                    deleted += 1
        if stale_deny and not has_deny:
            write_flags(enforce)
        if not current:
            self._policy_cache.pop(ep_id, None)
        return {"written": written, "deleted": deleted}

    def delete_endpoint_policy(self, ep_id: int) -> None:
        policy, _, _ = self._policy_maps()
        for key in list(self._policy_cache.get(ep_id, {})):
            policy.delete(self._policy_key(ep_id, key))
        self._policy_cache.pop(ep_id, None)
        self.delete_fqdn_entries(ep_id)

    def delete_fqdn_entries(self, ep_id: int) -> int:
        """Drop the addresses the DNS proxy learned for a gone endpoint. The proxy owns
        weft_fqdn, but a proxy that is down must not let a later endpoint reusing the id inherit
        them: the agent removes them with the endpoint."""
        self._need()
        assert self._fqdn is not None
        gone = [key for key in self._fqdn if int(key.ep_id) == ep_id]
        for key in gone:
            self._fqdn.delete(key)
        return len(gone)

    def policy_endpoint_ids(self) -> set[int]:
        self._need()
        return set(self._policy_cache)

    @staticmethod
    def _policy_key(ep_id: int, key: PolicyMapKey) -> abi.PolicyKey:
        return abi.PolicyKey.of(ep_id, key.direction, key.identity, key.proto, key.port, key.port_prefix_len)

    def ipcache(self) -> dict[IPNetwork, int]:
        _, ipcache, _ = self._policy_maps()
        return {_lpm_network(key): int(value.identity) for key, value in ipcache.items()}

    def sync_ipcache(self, desired: dict[IPNetwork, int]) -> dict[str, int]:
        """Prefix -> identity for peers that are not local endpoints; only changes are written."""
        _, ipcache, _ = self._policy_maps()
        return _sync_lpm(ipcache, self.ipcache(), desired, lambda identity: abi.IpcacheValue(identity=identity))

    def update_ipcache(self, upsert: Mapping[IPNetwork, int], remove: Iterable[IPNetwork] = ()) -> None:
        """Write ``upsert`` and delete ``remove`` (absent ones are no error): for a caller that
        knows what it wrote, so that a change of a few prefixes does not read back the whole
        map as :meth:`sync_ipcache` does."""
        _, ipcache, _ = self._policy_maps()
        for net, identity in upsert.items():
            ipcache[abi.IpcacheKey.of(net)] = abi.IpcacheValue(identity=identity)
        for net in remove:
            ipcache.delete(abi.IpcacheKey.of(net))

    def _tunnel_map(self) -> BpfHashMap[abi.IpcacheKey, abi.TunnelValue]:
        obj = self._need()
        if self._tunnel is None:
            self._tunnel = BpfHashMap(obj.map_fd("weft_tunnel"), abi.IpcacheKey, abi.TunnelValue)
        return self._tunnel

    def tunnels(self) -> dict[IPNetwork, NodeRoute]:
        """Other nodes' pod prefixes -> how they are reached (weft_tunnel)."""
        return {_lpm_network(key): NodeRoute(int(value.ifindex), value.address(), int(value.mode))
                for key, value in self._tunnel_map().items()}

    def sync_tunnels(self, desired: Mapping[IPNetwork, NodeRoute]) -> dict[str, int]:
        """Bring weft_tunnel to ``desired`` (another node's pod prefix -> its route), writing
        only what changed; a node that left loses its prefixes here."""
        return _sync_lpm(self._tunnel_map(), self.tunnels(), desired,
                         lambda route: abi.TunnelValue.of(route.ifindex, route.address, route.mode))

    def conntrack(self) -> list[ConntrackEntry]:
        _, _, ct = self._policy_maps()
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        out = []
        for key, value in ct.items():
            size = 4 if key.family == abi.FAMILY_V4 else 16
            out.append(ConntrackEntry(
                family=int(key.family), proto=int(key.proto),
                src=ipaddress.ip_address(bytes(key.saddr)[:size]), dst=ipaddress.ip_address(bytes(key.daddr)[:size]),
                sport=socket.ntohs(int(key.sport)), dport=socket.ntohs(int(key.dport)), packets=int(value.packets),
                bytes=int(value.bytes), flags=int(value.flags), age_ns=max(0, now - int(value.created_ns))))
        return out

    # ------------------------------------------------------------------ reads
    def counters(self) -> dict[str, tuple[int, int]]:
        """Metric name (``fwd_peer_v4``, ...) -> (packets, bytes), summed over CPUs."""
        self._need()
        assert self._metrics is not None
        return _counters(self._metrics)

    def map_fill(self) -> dict[str, tuple[int, int]]:
        """Map name -> (entries, max_entries); a per-CPU array always counts as full."""
        obj = self._need()
        endpoints, lxc = self._maps()
        _, ipcache, ct = self._policy_maps()
        return {
            "weft_endpoints": (len(endpoints), obj.map_max_entries("weft_endpoints")),
            "weft_lxc": (len(lxc), obj.map_max_entries("weft_lxc")),
            "weft_policy": (sum(len(v) for v in self._policy_cache.values()), obj.map_max_entries("weft_policy")),
            "weft_ipcache": (len(ipcache), obj.map_max_entries("weft_ipcache")),
            "weft_ct": (len(ct), obj.map_max_entries("weft_ct")),
            "weft_fqdn": (len(self._fqdn) if self._fqdn is not None else 0, obj.map_max_entries("weft_fqdn")),
            "weft_metrics": (obj.map_max_entries("weft_metrics"), obj.map_max_entries("weft_metrics")),
        }

    def programs(self) -> list[dict[str, object]]:
        """``[{"name":, "id":, "pinned": path}]`` of the loaded programs; empty before load()."""
        if self._obj is None:
            return []
        return [{"name": name, "id": libbpf.prog_info(fd)[0], "pinned": str(self.pin_dir / "progs" / name)}
                for name, fd in self._prog_fds.items()]

    def close(self) -> None:
        """Release this process's handles. Pins and attached programs stay in the kernel, so
        the datapath keeps forwarding."""
        if self._obj is not None:
            self._obj.close()
        self._obj = None
        self._endpoints = self._lxc = None
        self._metrics = None
        self._policy = self._ipcache = None
        self._ct = None
        self._fqdn = None
        self._tunnel = None
        self._policy_cache = {}
        self._prog_fds = {}
        self._by_ifindex = {}


def _lpm_network(key: abi.IpcacheKey) -> IPNetwork:
    """The prefix an LPM key (weft_ipcache, weft_tunnel) stands for."""
    raw = bytes(key.addr)
    plen = int(key.prefixlen) - 32
    return ipaddress.IPv4Network((raw[:4], plen)) if key.family == abi.FAMILY_V4 else ipaddress.IPv6Network((raw, plen))


def _sync_lpm(bpf_map: BpfHashMap[abi.IpcacheKey, V], current: Mapping[IPNetwork, T], desired: Mapping[IPNetwork, T],
              value_of: Callable[[T], V]) -> dict[str, int]:
    """Write the prefixes whose value differs from ``current``, delete those not desired."""
    written = deleted = 0
    for net, want in desired.items():
        if current.get(net) != want:
            bpf_map[abi.IpcacheKey.of(net)] = value_of(want)
            written += 1
    for net in current:
        if net not in desired:
            bpf_map.delete(abi.IpcacheKey.of(net))
            deleted += 1
    return {"written": written, "deleted": deleted}


def _counters(metrics: PerCpuArray[abi.MetricValue]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for metric in abi.Metric:
        summed = metrics.sum(int(metric))
        out[metric.counter_name] = (summed["packets"], summed["bytes"])
    return out


def read_counters(pin_dir: Path) -> dict[str, tuple[int, int]]:
    """Read-only, by pinned path, without loading the object (for the CLI)."""
    metrics = PerCpuArray.open_pinned(str(Path(pin_dir) / "weft_metrics"), abi.MetricValue)
    try:
        return _counters(metrics)
    finally:
        metrics.close()


def read_endpoints(pin_dir: Path) -> dict[IPAddress, EndpointEntry]:
    """Read-only dump of the endpoint map by pinned path (for the CLI)."""
    endpoints = BpfHashMap.open_pinned(str(Path(pin_dir) / "weft_endpoints"), abi.EpKey, abi.EpValue)
    try:
        return {key.ip(): _entry(key.ip(), value) for key, value in endpoints.items()}
    finally:
        endpoints.close()


def unpin_all(pin_dir: Path) -> None:
    """Remove every pin under pin_dir (lab teardown). Programs still attached to an interface
    stay loaded until the interface or its filter goes."""
    shutil.rmtree(pin_dir, ignore_errors=True)
