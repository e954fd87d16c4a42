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
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from weft.datapath import abi, libbpf
from weft.datapath.maps import BpfHashMap, PerCpuArray
from weft.types.addresses import IPAddress

PROGRAMS = ("from_container", "to_container")
MAPS = ("weft_endpoints", "weft_lxc", "weft_metrics")
# clsact's two hook points (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS)).
TC_INGRESS = 0xFFFFFFF2
TC_EGRESS = 0xFFFFFFF3
# One fixed priority and handle: `replace` finds the filter by both, so a re-attach swaps the
# program in place (no moment without a filter) instead of adding a second one.
TC_PRIO = 1
TC_HANDLE = 1
ETH_P_ALL = 0x0003  # the filter must see ARP too, not only IP


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


def _value(entry: EndpointEntry) -> abi.EpValue:
    value = abi.EpValue(ifindex=entry.ifindex, ep_id=entry.ep_id, identity=entry.identity, flags=abi.EP_F_LOCAL)
    abi.set_mac(value.pod_mac, entry.pod_mac)
    abi.set_mac(value.host_mac, entry.host_mac)
    return value


def _entry(ip: IPAddress, value: abi.EpValue) -> EndpointEntry:
    return EndpointEntry(ip=ip, ifindex=int(value.ifindex), ep_id=int(value.ep_id), identity=int(value.identity),
                         pod_mac=abi.mac_str(value.pod_mac), host_mac=abi.mac_str(value.host_mac))


class NodeDatapath:
    """The node's datapath: one loaded object whose maps are pinned under ``pin_dir`` and whose
    programs are attached to every pod's host-side veth.

    Not thread-safe: the agent drives it from a single worker thread.
    """

    def __init__(self, pin_dir: Path, obj_path: Path) -> None:
        self.pin_dir = Path(pin_dir)
        self.obj_path = Path(obj_path)
        self._obj: libbpf.BpfObject | None = None
        self._endpoints: BpfHashMap[abi.EpKey, abi.EpValue] | None = None
        self._lxc: BpfHashMap[ctypes.c_uint32, abi.EpValue] | None = None
        self._metrics: PerCpuArray[abi.MetricValue] | None = None
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
            prog_fds = {name: obj.prog_fd(name) for name in obj.program_names()}
            missing = set(PROGRAMS) - set(prog_fds)
            if missing:
                raise FileNotFoundError(f"{self.obj_path} lacks programs {sorted(missing)}")
            self._pin_programs(prog_fds)
        except BaseException:
            obj.close()
            raise
        self._obj, self._endpoints, self._lxc, self._metrics = obj, endpoints, lxc, metrics
        self._prog_fds = prog_fds
        self._by_ifindex = {}
        for key, value in endpoints.items():
            self._by_ifindex.setdefault(int(value.ifindex), set()).add(key.ip())

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
    def attach(self, ifname: str) -> None:
        """In the CALLER's current netns: ensure a clsact qdisc on ``ifname`` and install
        from_container at ingress and to_container at egress with a fixed prio/handle, using
        replace so a re-attach after a restart swaps programs atomically without a gap."""
        self._need()
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                raise FileNotFoundError(f"interface {ifname} not found")
            index = found[0]
            try:
                ipr.tc("add", "clsact", index)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
            for parent, prog in ((TC_INGRESS, "from_container"), (TC_EGRESS, "to_container")):
                ipr.tc("replace-filter", "bpf", index, handle=TC_HANDLE, fd=self._prog_fds[prog], name=prog,
                       parent=parent, prio=TC_PRIO, direct_action=True, protocol=ETH_P_ALL)

    def detach(self, ifname: str) -> None:
        """Best effort: remove the clsact qdisc (and with it both filters); no error if the link
        or the qdisc is gone."""
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return
            with contextlib.suppress(NetlinkError):
                ipr.tc("del", "clsact", found[0])

    def attached_program_ids(self, ifname: str) -> dict[str, int]:
        """``{'ingress': prog_id, 'egress': prog_id}`` of the bpf filters found on the link (in
        the caller's netns); a direction without one is absent, so is everything if the link is."""
        out: dict[str, int] = {}
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return out
            for direction, parent in (("ingress", TC_INGRESS), ("egress", TC_EGRESS)):
                try:
                    filters = ipr.get_filters(index=found[0], parent=parent)
                except NetlinkError:
                    continue  # no clsact qdisc
                for msg in filters:
                    prog_id = _tc_bpf_prog_id(msg)
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
        return {
            "weft_endpoints": (len(endpoints), obj.map_max_entries("weft_endpoints")),
            "weft_lxc": (len(lxc), obj.map_max_entries("weft_lxc")),
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
        self._prog_fds = {}
        self._by_ifindex = {}


TCA_BPF_ID = 11


def _tc_bpf_prog_id(msg: object) -> int:
    """The program id of a tc bpf filter message. pyroute2 0.9 does not decode TCA_BPF_ID, so
    read the u32 from the raw attribute (header: u16 length, u16 type; then the value)."""
    options = msg.get_attr("TCA_OPTIONS")  # type: ignore[attr-defined]
    if options is None:
        return 0
    for nla in options["attrs"]:
        value = nla[1]
        if nla[0] == "TCA_BPF_ID":
            return int(value)
        if nla[0] == "UNKNOWN" and hasattr(value, "data"):
            raw = bytes(value.data[value.offset:value.offset + value.length])
            if len(raw) >= 8 and int.from_bytes(raw[2:4], "little") == TCA_BPF_ID:
                return int.from_bytes(raw[4:8], "little")
    return 0


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
