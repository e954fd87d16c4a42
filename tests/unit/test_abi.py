"""The Python mirror (weft.datapath.abi) against the compiled objects' BTF: every struct's size,
every member's offset and size, and the enum values. A header change without a mirror change
fails here."""

from __future__ import annotations

import ctypes
import json
import re
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
}


class Btf:
    def __init__(self, obj: Path) -> None:
        if not obj.exists() or obj.stat().st_mtime < HEADER.stat().st_mtime:
            subprocess.run(["make", "-s", "bpf"], cwd=ROOT, check=True)
        raw = subprocess.run(["bpftool", "btf", "dump", "file", str(obj), "-j"], capture_output=True, text=True,
                             check=True).stdout
        self.types: dict[int, dict[str, Any]] = {t["id"]: t for t in json.loads(raw)["types"]}

    def named(self, kind: str, name: str) -> dict[str, Any]:
        for t in self.types.values():
            if t["kind"] == kind and t.get("name") == name:
                return t
        raise KeyError(f"{kind} {name} not in BTF")

    def size_of(self, type_id: int) -> int:
        t = self.types[type_id]
        if t["kind"] in ("TYPEDEF", "CONST", "VOLATILE"):
            return self.size_of(t["type_id"])
        if t["kind"] == "ARRAY":
            return int(t["nr_elems"]) * self.size_of(t["type_id"])
        return int(t["size"])


@pytest.fixture(scope="module", params=[PROGRAM_OBJECT, ABI_OBJECT], ids=["programs", "abi-check"])
def btf(request: pytest.FixtureRequest) -> Btf:
    return Btf(request.param)


@pytest.mark.parametrize("c_name", sorted(STRUCTS))
def test_struct_layout_matches(btf: Btf, c_name: str) -> None:
    mirror = STRUCTS[c_name]
    c_struct = btf.named("STRUCT", c_name)
    assert ctypes.sizeof(mirror) == c_struct["size"], f"sizeof(struct {c_name})"
    c_members = [(m["name"], m["bits_offset"] // 8, btf.size_of(m["type_id"])) for m in c_struct["members"]]
    py_members = [(name, getattr(mirror, name).offset, getattr(mirror, name).size) for name, *_ in mirror._fields_]
    assert py_members == c_members, f"members of struct {c_name}: (name, offset, size)"


def test_metric_enum_matches() -> None:
    enum = Btf(ABI_OBJECT).named("ENUM", "weft_metric")
    c_values = {v["name"].removeprefix("WEFT_M_"): v["val"] for v in enum["values"]}
    count = c_values.pop("_COUNT")
    assert {m.name: int(m) for m in abi.Metric} == c_values
    assert count == abi.METRIC_COUNT


@pytest.mark.parametrize(
    ("macro", "value"),
    [("WEFT_ABI_VERSION", abi.ABI_VERSION), ("WEFT_FAMILY_V4", abi.FAMILY_V4), ("WEFT_FAMILY_V6", abi.FAMILY_V6),
     ("WEFT_ENDPOINTS_MAX", abi.ENDPOINTS_MAX), ("WEFT_LXC_MAX", abi.LXC_MAX),
     ("WEFT_METRICS_MAX", abi.METRICS_MAX), ("WEFT_EP_F_LOCAL", abi.EP_F_LOCAL)],
)
def test_constants_match_header(macro: str, value: int) -> None:
    match = re.search(rf"#define\s+{macro}\s+(0x[0-9a-fA-F]+|\d+)", HEADER.read_text())
    assert match, f"{macro} not defined in {HEADER.name}"
    assert int(match.group(1), 0) == value


def test_map_sizes_in_object_match_constants() -> None:
    btf = Btf(PROGRAM_OBJECT)
    # max_entries of a BTF-defined map is encoded as the element count of an array type.
    for var, expected in (("weft_endpoints", abi.ENDPOINTS_MAX), ("weft_lxc", abi.LXC_MAX),
                          ("weft_metrics", abi.METRICS_MAX)):
        map_struct = btf.types[btf.named("VAR", var)["type_id"]]
        member = next(m for m in map_struct["members"] if m["name"] == "max_entries")
        pointee = btf.types[btf.types[member["type_id"]]["type_id"]]
        assert pointee["nr_elems"] == expected, var
