"""Python mirror of ``bpf/include/shared/weft_abi.h``.

tests/unit/test_abi.py compares every structure here with the compiled object's BTF (size,
member offsets and sizes) and the enum values, so the two cannot drift apart silently.
"""

from __future__ import annotations

import ctypes
import ipaddress
from enum import IntEnum

from weft.types.addresses import IPAddress

ABI_VERSION = 1
FAMILY_V4 = 4
FAMILY_V6 = 6
ENDPOINTS_MAX = 65536
LXC_MAX = 16384
METRICS_MAX = 64
EP_F_LOCAL = 0x1


class EpKey(ctypes.Structure):
    """``struct weft_ep_key { __u8 family; __u8 pad[3]; __u8 addr[16]; }``"""

    _fields_ = [("family", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3), ("addr", ctypes.c_uint8 * 16)]

    @classmethod
    def of(cls, ip: IPAddress) -> EpKey:
        key = cls()
        key.family = FAMILY_V4 if ip.version == 4 else FAMILY_V6
        packed = ip.packed
        ctypes.memmove(key.addr, packed, len(packed))
        return key

    def ip(self) -> IPAddress:
        raw = bytes(self.addr)
        return ipaddress.IPv4Address(raw[:4]) if self.family == FAMILY_V4 else ipaddress.IPv6Address(raw)


class EpValue(ctypes.Structure):
    """``struct weft_ep_value { __u32 ifindex; __u32 ep_id; __u32 identity; __u32 flags;
    __u8 pod_mac[6]; __u8 host_mac[6]; }``"""

    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("ep_id", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pod_mac", ctypes.c_uint8 * 6),
        ("host_mac", ctypes.c_uint8 * 6),
    ]


class MetricValue(ctypes.Structure):
    """``struct weft_metric_value { __u64 packets; __u64 bytes; }``"""

    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class Metric(IntEnum):
    """``enum weft_metric``"""

    FWD_PEER_V4 = 0
    FWD_PEER_V6 = 1
    TO_STACK_V4 = 2
    TO_STACK_V6 = 3
    ARP_REPLY = 4
    NDP_REPLY = 5
    TO_POD_V4 = 6
    TO_POD_V6 = 7
    DROP_INVALID = 8
    DROP_SPOOF = 9
    OTHER = 10


METRIC_COUNT = 11


def mac_bytes(mac: str) -> bytes:
    raw = bytes(int(part, 16) for part in mac.split(":"))
    if len(raw) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    return raw


def mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def set_mac(field: ctypes.Array, mac: str) -> None:  # type: ignore[type-arg]
    ctypes.memmove(field, mac_bytes(mac), 6)
