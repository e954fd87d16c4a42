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
TC_INGRESS = 0xFFFFFFF2
TC_EGRESS = 0xFFFFFFF3
TC_PRIO = 1
TC_HANDLE = 1


def default_object_path() -> Path:
    override = os.environ.get("WEFT_BPF_OBJECT")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[3] / "build" / "bpf" / "weft_lxc.o"


@dataclass(frozen=True)
class EndpointEntry:
    ip: IPAddress
    ifindex: int
    ep_id: int
    identity: int
    pod_mac: str
    host_mac: str


def _value(entry: EndpointEntry) -> abi.EpValue:
    value = abi.EpValue(ifindex=entry.ifindex, ep_id=entry.ep_id, identity=entry.identity, flags=abi.EP_F_LOCAL)
    abi.set_mac(value.pod_mac, entry.pod_mac)
    abi.set_mac(value.host_mac, entry.host_mac)
    return value


class NodeDatapath:
    def __init__(self, pin_dir: Path, obj_path: Path) -> None:
        self.pin_dir = Path(pin_dir)
        self.obj_path = Path(obj_path)
        self._obj: libbpf.BpfObject | None = None
        self._endpoints: BpfHashMap[abi.EpKey, abi.EpValue] | None = None
        self._lxc: BpfHashMap[ctypes.c_uint32, abi.EpValue] | None = None
        self._metrics: PerCpuArray[abi.MetricValue] | None = None
        self._prog_fds: dict[str, int] = {}

    # ------------------------------------------------------------------ load
    def load(self) -> None:
        """Open the object, point every map at its pin (reusing pinned maps), load, pin programs."""
        if self._obj is not None:
            return
        if not self.obj_path.exists():
            raise FileNotFoundError(f"datapath object {self.obj_path} is missing; run `make bpf`")
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        obj = libbpf.BpfObject(str(self.obj_path))
        try:
            for name in obj.map_names():
                obj.set_pin_path(name, str(self.pin_dir / name))
            obj.load()
        except BaseException:
            obj.close()
            raise
        self._obj = obj
        self._endpoints = BpfHashMap(obj.map_fd("weft_endpoints"), abi.EpKey, abi.EpValue)
        self._lxc = BpfHashMap(obj.map_fd("weft_lxc"), ctypes.c_uint32, abi.EpValue)
        self._metrics = PerCpuArray(obj.map_fd("weft_metrics"), abi.MetricValue, obj.map_max_entries("weft_metrics"))
        progs_dir = self.pin_dir / "progs"
        progs_dir.mkdir(exist_ok=True)
        for name in PROGRAMS:
            fd = obj.prog_fd(name)
            self._prog_fds[name] = fd
            pin = progs_dir / name
            # Replace the old pin: a reader sees the old or the new program, never none for long.
            tmp = progs_dir / f"{name}_new"  # bpffs rejects names with dots
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            libbpf.obj_pin(fd, str(tmp))
            os.replace(tmp, pin)

    def _need(self) -> libbpf.BpfObject:
        if self._obj is None:
            raise RuntimeError("datapath not loaded; call load() first")
        return self._obj

    # ------------------------------------------------------------------ attach
    def attach(self, ifname: str) -> None:
        """Install from_container at tc ingress and to_container at egress of ``ifname`` (in the
        caller's netns), replacing what is there."""
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
                       parent=parent, prio=TC_PRIO, direct_action=True, protocol=0x0003)

    def detach(self, ifname: str) -> None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return
            with contextlib.suppress(NetlinkError):
                ipr.tc("del", "clsact", found[0])

    def attached_program_ids(self, ifname: str) -> dict[str, int]:
        out: dict[str, int] = {}
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return out
            for direction, parent in (("ingress", TC_INGRESS), ("egress", TC_EGRESS)):
                try:
                    filters = ipr.get_filters(index=found[0], parent=parent)
                except NetlinkError:
                    continue
                for msg in filters:
                    prog_id = _tc_bpf_prog_id(msg)
                    if prog_id:
                        out[direction] = prog_id
        return out

    def program_fd(self, name: str) -> int:
        self._need()
        return self._prog_fds[name]

    def program_ids(self) -> dict[str, int]:
        return {name: libbpf.prog_info(fd)[0] for name, fd in self._prog_fds.items()}

    # ------------------------------------------------------------------ endpoints
    def upsert_endpoint(self, entry: EndpointEntry) -> None:
        self._need()
        assert self._endpoints is not None and self._lxc is not None
        value = _value(entry)
        # Interface first: when a pod's address becomes reachable, its gateway already answers.
        self._lxc[ctypes.c_uint32(entry.ifindex)] = value
        self._endpoints[abi.EpKey.of(entry.ip)] = value

    def delete_endpoint(self, ip: IPAddress) -> None:
        self._need()
        assert self._endpoints is not None and self._lxc is not None
        key = abi.EpKey.of(ip)
        old = self._endpoints.get(key)
        self._endpoints.delete(key)
        if old is not None and not any(v.ifindex == old.ifindex for _k, v in self._endpoints.items()):
            self._lxc.delete(ctypes.c_uint32(old.ifindex))

    def delete_interface(self, ifindex: int) -> None:
        self._need()
        assert self._lxc is not None
        self._lxc.delete(ctypes.c_uint32(ifindex))

    def interfaces(self) -> dict[int, int]:
        """ifindex -> endpoint id, from the interface map."""
        self._need()
        assert self._lxc is not None
        return {int(k.value): int(v.ep_id) for k, v in self._lxc.items()}

    def endpoints(self) -> dict[IPAddress, EndpointEntry]:
        self._need()
        assert self._endpoints is not None
        out: dict[IPAddress, EndpointEntry] = {}
        for key, v in self._endpoints.items():
            ip = key.ip()
            out[ip] = EndpointEntry(ip=ip, ifindex=v.ifindex, ep_id=v.ep_id, identity=v.identity,
                                    pod_mac=abi.mac_str(bytes(v.pod_mac)), host_mac=abi.mac_str(bytes(v.host_mac)))
        return out

    # ------------------------------------------------------------------ reads
    def counters(self) -> dict[str, tuple[int, int]]:
        self._need()
        assert self._metrics is not None
        return _counters(self._metrics)

    def map_fill(self) -> dict[str, tuple[int, int]]:
        obj = self._need()
        assert self._endpoints is not None and self._lxc is not None
        return {
            "weft_endpoints": (len(self._endpoints), obj.map_max_entries("weft_endpoints")),
            "weft_lxc": (len(self._lxc), obj.map_max_entries("weft_lxc")),
            "weft_metrics": (obj.map_max_entries("weft_metrics"), obj.map_max_entries("weft_metrics")),
        }

    def programs(self) -> list[dict[str, object]]:
        if self._obj is None:
            return []
        return [{"name": name, "id": libbpf.prog_info(fd)[0], "pinned": str(self.pin_dir / "progs" / name)}
                for name, fd in self._prog_fds.items()]

    def close(self) -> None:
        if self._obj is not None:
            self._obj.close()
        self._obj = None
        self._endpoints = self._lxc = None
        self._metrics = None
        self._prog_fds = {}


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
        out[metric.name.lower()] = (summed.get("packets", 0), summed.get("bytes", 0))
    return out


def read_counters(pin_dir: Path) -> dict[str, tuple[int, int]]:
    """Counters read through the pinned map, without loading the object (for the CLI)."""
    fd = libbpf.obj_get(str(Path(pin_dir) / "weft_metrics"))
    metrics = PerCpuArray(fd, abi.MetricValue, abi.METRICS_MAX, owns_fd=True)
    try:
        return _counters(metrics)
    finally:
        metrics.close()


def unpin_all(pin_dir: Path) -> None:
    shutil.rmtree(pin_dir, ignore_errors=True)
