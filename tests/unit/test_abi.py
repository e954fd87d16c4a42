"""The Python mirror (weft.datapath.abi) against the compiled objects' BTF: every struct's size,
every member's name, offset and size, the enum values, the header's constants and the maps'
key/value types and sizes. A header change without a mirror change fails here (the last test
proves that by compiling a mutated copy of the header).

Two objects are read: the programs' object (the structs the programs really use) and
weft_abi_check.o, which exists so that BTF also describes what the programs only use as
constants (enum weft_metric). No root needed.
"""

from __future__ import annotations

import ctypes
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from weft.datapath import abi

ROOT = Path(__file__).resolve().parents[2]
PROGRAM_OBJECT = ROOT / "build" / "bpf" / "weft_lxc.o"
ABI_OBJECT = ROOT / "build" / "bpf" / "weft_abi_check.o"
HEADER = ROOT / "bpf" / "include" / "shared" / "weft_abi.h"

STRUCTS: dict[str, type[ctypes.Structure]] = {
    "weft_ep_key": abi.EpKey,
    "weft_ep_value": abi.EpValue,
    "weft_metric_value": abi.MetricValue,
    "weft_policy_key": abi.PolicyKey,
    "weft_policy_value": abi.PolicyValue,
    "weft_ipcache_key": abi.IpcacheKey,
    "weft_ipcache_value": abi.IpcacheValue,
    "weft_tunnel_value": abi.TunnelValue,
    "weft_ct_key": abi.CtKey,
    "weft_ct_value": abi.CtValue,
    "weft_fqdn_key": abi.FqdnKey,
    "weft_fqdn_slot": abi.FqdnSlot,
    "weft_fqdn_value": abi.FqdnValue,
    "weft_event": abi.Event,
    "weft_event_config": abi.EventConfig,
}
# Records that cross a ring buffer: no map names their type, so the programs' BTF (which has only
# the types of maps and functions) lacks them; weft_abi_check.o describes them.
RING_RECORDS = {"weft_event"}
# map name -> (C key type name, C value type name, max_entries constant in the mirror)
MAPS: dict[str, tuple[str, str, int]] = {
    "weft_endpoints": ("weft_ep_key", "weft_ep_value", abi.ENDPOINTS_MAX),
    "weft_lxc": ("__u32", "weft_ep_value", abi.LXC_MAX),
    "weft_metrics": ("__u32", "weft_metric_value", abi.METRICS_MAX),
    "weft_policy": ("weft_policy_key", "weft_policy_value", abi.POLICY_MAX),
    "weft_ipcache": ("weft_ipcache_key", "weft_ipcache_value", abi.IPCACHE_MAX),
    "weft_ct": ("weft_ct_key", "weft_ct_value", abi.CT_MAX),
    "weft_fqdn": ("weft_fqdn_key", "weft_fqdn_value", abi.FQDN_MAX),
    "weft_tunnel": ("weft_ipcache_key", "weft_tunnel_value", abi.TUNNEL_MAX),
    "weft_event_cfg": ("__u32", "weft_event_config", 1),
}


@functools.cache
def build_objects() -> None:
    """`make bpf` once per session (a no-op when the objects are up to date)."""
    if shutil.which("clang") is None or shutil.which("bpftool") is None:
        pytest.fail("clang and bpftool are needed (make apt)")
    subprocess.run(["make", "-s", "bpf"], cwd=ROOT, check=True)


class Btf:
    """The BTF of one object file, from `bpftool btf dump file X format raw -j`."""

    def __init__(self, obj: Path) -> None:
        raw = subprocess.run(["bpftool", "btf", "dump", "file", str(obj), "format", "raw", "-j"],
                             capture_output=True, text=True, check=True).stdout
        self.types: dict[int, dict[str, Any]] = {t["id"]: t for t in json.loads(raw)["types"]}

    def named(self, kind: str, name: str) -> dict[str, Any]:
        for t in self.types.values():
            if t["kind"] == kind and t.get("name") == name:
                return t
        raise KeyError(f"{kind} {name} not in BTF")

    def resolve(self, type_id: int) -> dict[str, Any]:
        """Through typedefs and qualifiers to the underlying type, keeping the first name seen."""
        t = self.types[type_id]
        while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT"):
            t = self.types[t["type_id"]]
        return t

    def size_of(self, type_id: int) -> int:
        t = self.resolve(type_id)
        if t["kind"] == "ARRAY":
            return int(t["nr_elems"]) * self.size_of(t["type_id"])
        return int(t["size"])

    def layout(self, c_name: str) -> tuple[int, list[tuple[str, int, int]]]:
        """(sizeof, [(member, byte offset, byte size)]) of a struct."""
        s = self.named("STRUCT", c_name)
        return int(s["size"]), [(m["name"], m["bits_offset"] // 8, self.size_of(m["type_id"])) for m in s["members"]]


def mirror_layout(mirror: type[ctypes.Structure]) -> tuple[int, list[tuple[str, int, int]]]:
    return ctypes.sizeof(mirror), [(name, getattr(mirror, name).offset, getattr(mirror, name).size)
                                   for name, *_ in mirror._fields_]


def layout_mismatches(btf: Btf) -> list[str]:
    out = []
    for c_name, mirror in STRUCTS.items():
        c, py = btf.layout(c_name), mirror_layout(mirror)
        if c != py:
            out.append(f"struct {c_name}: C {c} != Python {mirror.__name__} {py}")
    return out


@functools.cache
def btf_of(obj: Path) -> Btf:
    build_objects()
    return Btf(obj)


@pytest.fixture(scope="module", params=[PROGRAM_OBJECT, ABI_OBJECT], ids=["programs", "abi-check"])
def btf(request: pytest.FixtureRequest) -> Btf:
    return btf_of(request.param)


# Every struct against both objects, except ring records against the programs' object: a record
# the programs only write through a ring-buffer pointer is in weft_abi_check.o's BTF only.
LAYOUT_CASES = [(obj, c_name) for c_name in sorted(STRUCTS) for obj in ("abi-check", "programs")
                if not (obj == "programs" and c_name in RING_RECORDS)]


@pytest.mark.parametrize(("obj", "c_name"), LAYOUT_CASES)
def test_struct_layout_matches(obj: str, c_name: str) -> None:
    btf = btf_of(PROGRAM_OBJECT if obj == "programs" else ABI_OBJECT)
    mirror = STRUCTS[c_name]
    c_size, c_members = btf.layout(c_name)
    py_size, py_members = mirror_layout(mirror)
    assert py_size == c_size, f"sizeof(struct {c_name})"
    assert py_members == c_members, f"members of struct {c_name}: (name, offset, size)"


def test_metric_enum_matches() -> None:
    enum = btf_of(ABI_OBJECT).named("ENUM", "weft_metric")
    c_values = {v["name"].removeprefix("WEFT_M_"): v["val"] for v in enum["values"]}
    count = c_values.pop("_COUNT")
    assert {m.name: int(m) for m in abi.Metric} == c_values
    assert count == abi.METRIC_COUNT == len(abi.Metric)
    assert count <= abi.METRICS_MAX, "every metric has a slot in weft_metrics"


@pytest.mark.parametrize(
    ("macro", "value"),
    [("WEFT_ABI_VERSION", abi.ABI_VERSION), ("WEFT_FAMILY_V4", abi.FAMILY_V4), ("WEFT_FAMILY_V6", abi.FAMILY_V6),
     ("WEFT_ENDPOINTS_MAX", abi.ENDPOINTS_MAX), ("WEFT_LXC_MAX", abi.LXC_MAX),
     ("WEFT_METRICS_MAX", abi.METRICS_MAX), ("WEFT_EP_F_LOCAL", abi.EP_F_LOCAL),
     ("WEFT_EP_F_INGRESS_ENFORCED", abi.EP_F_INGRESS_ENFORCED), ("WEFT_EP_F_EGRESS_ENFORCED", abi.EP_F_EGRESS_ENFORCED),
     ("WEFT_EP_F_HAS_DENY", abi.EP_F_HAS_DENY), ("WEFT_POLICY_MAX", abi.POLICY_MAX),
     ("WEFT_IPCACHE_MAX", abi.IPCACHE_MAX), ("WEFT_TUNNEL_MAX", abi.TUNNEL_MAX),
     ("WEFT_ROUTE_VXLAN", abi.ROUTE_VXLAN), ("WEFT_ROUTE_DIRECT", abi.ROUTE_DIRECT), ("WEFT_CT_MAX", abi.CT_MAX),
     ("WEFT_DIR_INGRESS", abi.DIR_INGRESS),
     ("WEFT_DIR_EGRESS", abi.DIR_EGRESS), ("WEFT_POLICY_FIXED_BITS", abi.POLICY_FIXED_BITS),
     ("WEFT_CT_F_REPLY_SEEN", abi.CT_F_REPLY_SEEN), ("WEFT_CT_F_CLOSING", abi.CT_F_CLOSING),
     ("WEFT_EVENT_VERSION", abi.EVENT_VERSION), ("WEFT_EV_LEVEL_ALL", abi.EV_LEVEL_ALL),
     ("WEFT_EV_LEVEL_MEDIUM", abi.EV_LEVEL_MEDIUM), ("WEFT_EV_LEVEL_DROPS", abi.EV_LEVEL_DROPS),
     ("WEFT_EV_LEVEL_OFF", abi.EV_LEVEL_OFF), ("WEFT_EV_REPORT_TCP_FLAGS", abi.EV_REPORT_TCP_FLAGS),
     ("WEFT_VERDICT_FORWARDED", abi.VERDICT_FORWARDED), ("WEFT_VERDICT_DROPPED", abi.VERDICT_DROPPED),
     ("WEFT_VERDICT_REDIRECTED", abi.VERDICT_REDIRECTED), ("WEFT_EV_F_REPLY", abi.EV_F_REPLY),
     ("WEFT_EV_F_CT_NEW", abi.EV_F_CT_NEW), ("WEFT_EV_F_TO_ENDPOINT", abi.EV_F_TO_ENDPOINT),
     ("WEFT_EV_F_POLICY", abi.EV_F_POLICY), ("WEFT_EV_F_REPORT", abi.EV_F_REPORT),
     ("WEFT_EV_F_RELATED", abi.EV_F_RELATED)],
)
def test_constants_match_header(macro: str, value: int) -> None:
    # Macros leave no trace in BTF: read them from the header.
    match = re.search(rf"#define\s+{macro}\s+(0x[0-9a-fA-F]+|\d+)", HEADER.read_text())
    assert match, f"{macro} not defined in {HEADER.name}"
    assert int(match.group(1), 0) == value


@pytest.mark.parametrize("map_name", sorted(MAPS))
def test_maps_in_object_use_the_abi_types(map_name: str) -> None:
    """A BTF-defined map is a struct whose members are pointers: key/value point at the types,
    max_entries at an array whose element count is the value."""
    btf = btf_of(PROGRAM_OBJECT)
    key_name, value_name, max_entries = MAPS[map_name]
    members = {m["name"]: m["type_id"] for m in btf.types[btf.named("VAR", map_name)["type_id"]]["members"]}

    def pointee(member: str) -> dict[str, Any]:
        return btf.types[btf.types[members[member]]["type_id"]]

    assert pointee("key").get("name") == key_name
    assert pointee("value").get("name") == value_name
    assert pointee("max_entries")["nr_elems"] == max_entries
    assert "pinning" in members, "maps are pinned by name so state survives reloads"


def test_events_ring_in_object() -> None:
    """The ring buffer has no key or value type: its size (max_entries, bytes) is what counts."""
    btf = btf_of(PROGRAM_OBJECT)
    members = {m["name"]: m["type_id"] for m in btf.types[btf.named("VAR", "weft_events")["type_id"]]["members"]}
    assert btf.types[btf.types[members["max_entries"]]["type_id"]]["nr_elems"] == abi.EVENTS_RING_BYTES
    assert "pinning" in members
    ring_size = re.search(r"#define\s+WEFT_EVENTS_RING_BYTES\s+\(1 << (\d+)\)", HEADER.read_text())
    assert ring_size and 1 << int(ring_size.group(1)) == abi.EVENTS_RING_BYTES


def test_a_header_change_without_the_mirror_is_caught(tmp_path: Path) -> None:
    """Compile weft_abi_check.c against a copy of the header where one field grew, and check the
    comparison above reports it (so the tests cannot pass vacuously)."""
    build_objects()
    include = tmp_path / "include" / "shared"
    include.mkdir(parents=True)
    text = HEADER.read_text()
    mutated = text.replace("__u32 identity;", "__u64 identity;", 1).replace(
        '_Static_assert(sizeof(struct weft_ep_value) == 28, "weft_ep_value size");', "")
    assert mutated != text, "the mutation no longer applies: update this test"
    (include / "weft_abi.h").write_text(mutated)
    obj = tmp_path / "abi.o"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I{tmp_path / 'include'}", f"-I{ROOT / 'bpf'}",
                    "-c", str(ROOT / "bpf" / "weft_abi_check.c"), "-o", str(obj)], check=True)
    problems = layout_mismatches(Btf(obj))
    assert problems and "weft_ep_value" in problems[0]
    assert layout_mismatches(btf_of(ABI_OBJECT)) == []
