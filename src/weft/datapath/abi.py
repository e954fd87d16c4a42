"""Python mirror of ``bpf/include/shared/weft_abi.h``: the structs and constants shared between
the eBPF programs and the control plane.

tests/unit/test_abi.py compares every structure here with the compiled objects' BTF (size,
member offsets and sizes), the enum values with ``enum weft_metric`` and the constants with the
header's ``#define``s, so the two cannot drift apart silently. Change both together.
"""

from __future__ import annotations

import ctypes
import ipaddress
import re
from enum import IntEnum

from weft.types.addresses import IPAddress

ABI_VERSION = 1  # WEFT_ABI_VERSION
FAMILY_V4 = 4  # WEFT_FAMILY_V4: the family byte of a key (not AF_INET)
FAMILY_V6 = 6  # WEFT_FAMILY_V6
ENDPOINTS_MAX = 65536  # WEFT_ENDPOINTS_MAX: max_entries of weft_endpoints
LXC_MAX = 16384  # WEFT_LXC_MAX: max_entries of weft_lxc
METRICS_MAX = 64  # WEFT_METRICS_MAX: max_entries of weft_metrics
EP_F_LOCAL = 0x1  # WEFT_EP_F_LOCAL: deliver with bpf_redirect_peer to ifindex


class EpKey(ctypes.Structure):
    """Key of ``weft_endpoints``::

        struct weft_ep_key {
            __u8 family;    /* WEFT_FAMILY_V4 or WEFT_FAMILY_V6 */
            __u8 pad[3];    /* must be zero */
            __u8 addr[16];  /* network byte order; IPv4 in addr[0..3], the rest zero */
        };

    The kernel compares keys byte for byte, so padding and unused bytes must stay zero: build
    keys with :meth:`of`, which starts from a zeroed structure.
    """

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
        if self.family == FAMILY_V4:
            return ipaddress.IPv4Address(raw[:4])
        if self.family == FAMILY_V6:
            return ipaddress.IPv6Address(raw)
        raise ValueError(f"endpoint key with unknown family {self.family}")


class EpValue(ctypes.Structure):
    """Value of ``weft_endpoints`` and ``weft_lxc``::

        struct weft_ep_value {
            __u32 ifindex;     /* host-side veth, in the node's netns */
            __u32 ep_id;       /* endpoint id assigned by the agent */
            __u32 identity;    /* security identity (numeric) */
            __u32 flags;       /* WEFT_EP_F_* */
            __u8 pod_mac[6];   /* MAC of the pod's interface (destination MAC on delivery) */
            __u8 host_mac[6];  /* MAC of the host-side veth (the pod's gateway MAC) */
        };
    """

    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("ep_id", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pod_mac", ctypes.c_uint8 * 6),
        ("host_mac", ctypes.c_uint8 * 6),
    ]


class MetricValue(ctypes.Structure):
    """One CPU's slot of ``weft_metrics``::

        struct weft_metric_value {
            __u64 packets;
            __u64 bytes;
        };
    """

    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class Metric(IntEnum):
    """``enum weft_metric`` (index into ``weft_metrics``), without the ``WEFT_M_`` prefix."""

    FWD_PEER_V4 = 0  # pod -> local pod via bpf_redirect_peer, IPv4
    FWD_PEER_V6 = 1
    TO_STACK_V4 = 2  # pod -> node stack (destination not a local endpoint)
    TO_STACK_V6 = 3
    ARP_REPLY = 4  # ARP request from a pod answered by the datapath
    NDP_REPLY = 5  # neighbour solicitation answered with an advertisement
    TO_POD_V4 = 6  # node stack -> pod (tc egress of the host veth)
    TO_POD_V6 = 7
    DROP_INVALID = 8  # malformed packet from a pod
    DROP_SPOOF = 9  # pod sent from an address that is not its own
    OTHER = 10  # non-IP, non-ARP frames (and ARP/link-local traffic) passed to the stack

    @property
    def counter_name(self) -> str:
        """The name used in counters(): ``fwd_peer_v4``."""
        return self.name.lower()


METRIC_COUNT = 11  # WEFT_M__COUNT

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def mac_bytes(mac: str) -> bytes:
    """``"aa:bb:cc:dd:ee:ff"`` -> 6 bytes."""
    if not _MAC_RE.match(mac):
        raise ValueError(f"{mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return bytes(int(part, 16) for part in mac.split(":"))


def mac_str(raw: bytes | ctypes.Array[ctypes.c_uint8]) -> str:
    """6 bytes (or a ``__u8[6]`` field) -> ``"aa:bb:cc:dd:ee:ff"`` (lower case)."""
    return ":".join(f"{b:02x}" for b in bytes(raw))


def set_mac(field: ctypes.Array[ctypes.c_uint8], mac: str) -> None:
    """Write a MAC string into a ``__u8[6]`` field of a structure."""
    ctypes.memmove(field, mac_bytes(mac), 6)
