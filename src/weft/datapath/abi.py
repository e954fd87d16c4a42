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
import socket
from enum import IntEnum

from weft.types.addresses import IPAddress

ABI_VERSION = 1  # WEFT_ABI_VERSION
FAMILY_V4 = 4  # WEFT_FAMILY_V4: the family byte of a key (not AF_INET)
FAMILY_V6 = 6  # WEFT_FAMILY_V6
ENDPOINTS_MAX = 65536  # WEFT_ENDPOINTS_MAX: max_entries of weft_endpoints
LXC_MAX = 16384  # WEFT_LXC_MAX: max_entries of weft_lxc
METRICS_MAX = 64  # WEFT_METRICS_MAX: max_entries of weft_metrics
EP_F_LOCAL = 0x1  # WEFT_EP_F_LOCAL: deliver with bpf_redirect_peer to ifindex
EP_F_INGRESS_ENFORCED = 0x2  # WEFT_EP_F_INGRESS_ENFORCED
EP_F_EGRESS_ENFORCED = 0x4  # WEFT_EP_F_EGRESS_ENFORCED
EP_F_HAS_DENY = 0x8  # WEFT_EP_F_HAS_DENY
POLICY_MAX = 65536  # WEFT_POLICY_MAX
IPCACHE_MAX = 65536  # WEFT_IPCACHE_MAX
CT_MAX = 131072  # WEFT_CT_MAX
FQDN_MAX = 65536  # WEFT_FQDN_MAX
TUNNEL_MAX = 16384  # WEFT_TUNNEL_MAX
ROUTE_VXLAN = 0  # WEFT_ROUTE_VXLAN: weft_tunnel entry encapsulated by the VXLAN device
ROUTE_DIRECT = 1  # WEFT_ROUTE_DIRECT: routed by the datapath (FIB lookup, redirect_neigh)
FQDN_SLOTS = 4  # WEFT_FQDN_SLOTS
EP_F_FQDN = 0x10  # WEFT_EP_F_FQDN: egress may be allowed through weft_fqdn
MARK_TO_PROXY = 0x0A00  # WEFT_MARK_TO_PROXY: skb->mark of packets handed to the DNS proxy
MARK_MASK = 0x0F00  # WEFT_MARK_MASK
PROXY_ROUTE_TABLE = 2005  # WEFT_PROXY_ROUTE_TABLE: "local default dev lo" for marked packets
DIR_INGRESS = 0  # WEFT_DIR_INGRESS
DIR_EGRESS = 1  # WEFT_DIR_EGRESS
POLICY_FIXED_BITS = 72  # WEFT_POLICY_FIXED_BITS
CT_F_REPLY_SEEN = 0x1  # WEFT_CT_F_REPLY_SEEN
CT_F_CLOSING = 0x2  # WEFT_CT_F_CLOSING


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
    DROP_POLICY_INGRESS = 11  # no policy entry allows it into the destination
    DROP_POLICY_EGRESS = 12  # no policy entry allows it out of the source
    DROP_POLICY_DENY = 13  # an explicit deny rule matched
    DROP_CT_MISSING = 14  # TCP non-SYN of no tracked connection, not allowed by policy
    CT_NEW = 15  # a connection's first packet
    CT_REPLY = 16  # reply of a tracked connection (passes without policy)
    CT_RELATED = 17  # ICMP error about a tracked connection
    REDIRECT_DNS_PROXY = 18  # a DNS packet handed to the node's DNS proxy
    DROP_PROXY_DOWN = 19  # policy redirects it to the DNS proxy, which has no socket
    FQDN_ALLOW = 20  # allowed through an address the DNS proxy learned
    EVENTS_LOST = 21  # a verdict event found weft_events full (not reported, but counted)
    TO_OVERLAY_V4 = 22  # pod -> a pod of another node, encapsulated (VXLAN)
    TO_OVERLAY_V6 = 23
    FROM_OVERLAY_V4 = 24  # decapsulated and delivered to a local pod
    FROM_OVERLAY_V6 = 25
    DROP_OVERLAY = 26  # could not be encapsulated, or arrived without tunnel metadata
    ROUTED_V4 = 27  # pod -> a pod of another node, routed by the datapath (direct mode)
    ROUTED_V6 = 28
    FROM_NETDEV_V4 = 29  # from the underlay device, delivered to a local pod (direct mode)
    FROM_NETDEV_V6 = 30

    @property
    def counter_name(self) -> str:
        """The name used in counters(): ``fwd_peer_v4``."""
        return self.name.lower()


METRIC_COUNT = 31  # WEFT_M__COUNT

# Why a packet was dropped, in words (Hubble's drop_reason_desc style), by metric.
DROP_REASONS: dict[Metric, str] = {
    Metric.DROP_INVALID: "INVALID_PACKET_DROPPED",
    Metric.DROP_SPOOF: "INVALID_SOURCE_IP",
    Metric.DROP_POLICY_INGRESS: "POLICY_DENIED",
    Metric.DROP_POLICY_EGRESS: "POLICY_DENIED",
    Metric.DROP_POLICY_DENY: "POLICY_DENY",
    Metric.DROP_CT_MISSING: "CT_NO_MAP_FOUND",
    Metric.DROP_PROXY_DOWN: "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL",
    Metric.DROP_OVERLAY: "NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT",
}


class PolicyKey(ctypes.Structure):
    """``struct weft_policy_key { __u32 prefixlen; __u32 ep_id; __u32 identity; __u8 direction;
    __u8 proto; __be16 dport; }`` (an LPM key; dport in network order)."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("ep_id", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("direction", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("dport", ctypes.c_uint16),
    ]

    @classmethod
    def of(cls, ep_id: int, direction: int, identity: int, proto: int, port: int, port_prefix_len: int) -> PolicyKey:
        if proto == 0 and (port or port_prefix_len):
            raise ValueError("a port needs a protocol")
        prefix = POLICY_FIXED_BITS + (8 + port_prefix_len if proto else 0)
        # Keep only the fixed leading bits: LPM keys must not carry bits past their prefix.
        mask = (0xFFFF << (16 - port_prefix_len)) & 0xFFFF if port_prefix_len else 0
        return cls(prefixlen=prefix, ep_id=ep_id, identity=identity, direction=direction, proto=proto,
                   dport=int.from_bytes((port & mask).to_bytes(2, "big"), "little"))

    def port(self) -> int:
        return int.from_bytes(int(self.dport).to_bytes(2, "little"), "big")


class PolicyValue(ctypes.Structure):
    """``struct weft_policy_value { __u8 deny; __u8 pad; __u16 proxy_port; __u32 cookie; }``
    (proxy_port in host order; non-zero: hand the packet to the DNS proxy on that port)."""

    _fields_ = [("deny", ctypes.c_uint8), ("pad", ctypes.c_uint8), ("proxy_port", ctypes.c_uint16),
                ("cookie", ctypes.c_uint32)]


class IpcacheKey(ctypes.Structure):
    """``struct weft_ipcache_key { __u32 prefixlen; __u8 family; __u8 pad[3]; __u8 addr[16]; }``
    (prefixlen counts the 32 bits of family and pad, then the address's)."""

    _fields_ = [("prefixlen", ctypes.c_uint32), ("family", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3),
                ("addr", ctypes.c_uint8 * 16)]

    @classmethod
    def of(cls, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> IpcacheKey:
        key = cls(prefixlen=32 + network.prefixlen, family=FAMILY_V4 if network.version == 4 else FAMILY_V6)
        packed = network.network_address.packed
        ctypes.memmove(key.addr, packed, len(packed))
        return key


class IpcacheValue(ctypes.Structure):
    """``struct weft_ipcache_value { __u32 identity; __u32 flags; }``"""

    _fields_ = [("identity", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class TunnelValue(ctypes.Structure):
    """``struct weft_tunnel_value { __u32 ifindex; __u8 family; __u8 mode; __u8 pad[2]; __u8 addr[16]; }``
    (weft_tunnel: another node's pod prefix -> its underlay address, keyed by :class:`IpcacheKey`)."""

    _fields_ = [("ifindex", ctypes.c_uint32), ("family", ctypes.c_uint8), ("mode", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 2), ("addr", ctypes.c_uint8 * 16)]

    @classmethod
    def of(cls, ifindex: int, address: ipaddress.IPv4Address | ipaddress.IPv6Address,
           mode: int = 0) -> TunnelValue:
        value = cls(ifindex=ifindex, family=FAMILY_V4 if address.version == 4 else FAMILY_V6, mode=mode)
        ctypes.memmove(value.addr, address.packed, len(address.packed))
        return value

    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        raw = bytes(self.addr)
        return ipaddress.IPv4Address(raw[:4]) if self.family == FAMILY_V4 else ipaddress.IPv6Address(raw)


class CtKey(ctypes.Structure):
    """``struct weft_ct_key { __u8 saddr[16]; __u8 daddr[16]; __be16 sport; __be16 dport; __u8 proto;
    __u8 family; __u8 pad[2]; }``"""

    _fields_ = [
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class CtValue(ctypes.Structure):
    """``struct weft_ct_value { __u64 created_ns; __u64 last_seen_ns; __u64 packets; __u64 bytes;
    __u32 flags; __u8 tx_flags_seen; __u8 rx_flags_seen; __u16 pad; }`` (flags seen: the TCP
    flags of EV_REPORT_TCP_FLAGS seen per direction, for event aggregation)"""

    _fields_ = [
        ("created_ns", ctypes.c_uint64),
        ("last_seen_ns", ctypes.c_uint64),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("tx_flags_seen", ctypes.c_uint8),
        ("rx_flags_seen", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    ]

class FqdnKey(ctypes.Structure):
    """``struct weft_fqdn_key { __u32 ep_id; __u8 family; __u8 pad[3]; __u8 addr[16]; }``"""

    _fields_ = [("ep_id", ctypes.c_uint32), ("family", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3),
                ("addr", ctypes.c_uint8 * 16)]

    @classmethod
    def of(cls, ep_id: int, ip: IPAddress) -> FqdnKey:
        key = cls(ep_id=ep_id, family=FAMILY_V4 if ip.version == 4 else FAMILY_V6)
        packed = ip.packed
        ctypes.memmove(key.addr, packed, len(packed))
        return key

    def ip(self) -> IPAddress:
        raw = bytes(self.addr)
        return ipaddress.IPv4Address(raw[:4]) if self.family == FAMILY_V4 else ipaddress.IPv6Address(raw)


class FqdnSlot(ctypes.Structure):
    """``struct weft_fqdn_slot { __u32 selector_identity; __u32 pad; __u64 expires_ns; }``
    (selector_identity 0 = empty; expires_ns on CLOCK_MONOTONIC, i.e. ``time.monotonic_ns()``)."""

    _fields_ = [("selector_identity", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("expires_ns", ctypes.c_uint64)]


class FqdnValue(ctypes.Structure):
    """``struct weft_fqdn_value { struct weft_fqdn_slot slots[WEFT_FQDN_SLOTS]; }``"""

    _fields_ = [("slots", FqdnSlot * FQDN_SLOTS)]


# Verdict events (struct weft_event in the weft_events ring buffer).
EVENT_VERSION = 1  # WEFT_EVENT_VERSION
EVENTS_RING_BYTES = 1 << 23  # WEFT_EVENTS_RING_BYTES: the ring's default size (8 MiB)
EV_LEVEL_ALL = 0  # WEFT_EV_LEVEL_ALL: every packet that met a verdict
EV_LEVEL_MEDIUM = 1  # WEFT_EV_LEVEL_MEDIUM: drops; connection opens, first replies, new SYN/FIN/RST
EV_LEVEL_DROPS = 2  # WEFT_EV_LEVEL_DROPS
EV_LEVEL_OFF = 3  # WEFT_EV_LEVEL_OFF
EV_REPORT_TCP_FLAGS = 0x07  # WEFT_EV_REPORT_TCP_FLAGS: FIN, SYN, RST
VERDICT_FORWARDED = 1  # WEFT_VERDICT_FORWARDED
VERDICT_DROPPED = 2  # WEFT_VERDICT_DROPPED
VERDICT_REDIRECTED = 3  # WEFT_VERDICT_REDIRECTED: handed to the DNS proxy
EV_F_REPLY = 0x1  # WEFT_EV_F_REPLY
EV_F_CT_NEW = 0x2  # WEFT_EV_F_CT_NEW
EV_F_TO_ENDPOINT = 0x4  # WEFT_EV_F_TO_ENDPOINT: seen in to_container
EV_F_POLICY = 0x8  # WEFT_EV_F_POLICY: judged by a policy lookup in an enforced direction
EV_F_REPORT = 0x10  # WEFT_EV_F_REPORT
EV_F_RELATED = 0x20  # WEFT_EV_F_RELATED


class Event(ctypes.Structure):
    """One record of ``weft_events`` (``struct weft_event``, 88 bytes; see weft_abi.h)::

        __u8 version, verdict, reason, flags, family, proto, tcp_flags, direction;
        __u8 saddr[16], daddr[16]; __be16 sport, dport; __u16 policy_port, pad;
        __u32 ifindex, src_ep_id, dst_ep_id, src_identity, dst_identity;
        __u32 egress_cookie, ingress_cookie, pkt_len; __u64 ts_ns;

    ``reason`` is a :class:`Metric`; ``ts_ns`` is CLOCK_MONOTONIC.
    """

    _fields_ = [
        ("version", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("tcp_flags", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("policy_port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("ifindex", ctypes.c_uint32),
        ("src_ep_id", ctypes.c_uint32),
        ("dst_ep_id", ctypes.c_uint32),
        ("src_identity", ctypes.c_uint32),
        ("dst_identity", ctypes.c_uint32),
        ("egress_cookie", ctypes.c_uint32),
        ("ingress_cookie", ctypes.c_uint32),
        ("pkt_len", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
    ]

    def _addr(self, raw: bytes) -> IPAddress:
        return ipaddress.IPv4Address(raw[:4]) if self.family == FAMILY_V4 else ipaddress.IPv6Address(raw)

    def source(self) -> IPAddress:
        return self._addr(bytes(self.saddr))

    def destination(self) -> IPAddress:
        return self._addr(bytes(self.daddr))

    def _addr_text(self, raw: bytes) -> str:
        # inet_ntop: the same text as str(ipaddress...) at a third of the cost (once per event).
        if self.family == FAMILY_V4:
            return socket.inet_ntop(socket.AF_INET, raw[:4])
        return socket.inet_ntop(socket.AF_INET6, raw)

    def source_text(self) -> str:
        return self._addr_text(bytes(self.saddr))

    def destination_text(self) -> str:
        return self._addr_text(bytes(self.daddr))

    def ports(self) -> tuple[int, int]:
        """(source, destination) port in host order."""
        return socket.ntohs(self.sport), socket.ntohs(self.dport)


class EventConfig(ctypes.Structure):
    """``struct weft_event_config { __u32 level; __u32 pad; }`` (the one entry of weft_event_cfg)."""

    _fields_ = [("level", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


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
