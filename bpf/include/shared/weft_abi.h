/* SPDX-License-Identifier: Apache-2.0 */
/*
 * weft datapath ABI: every struct and constant shared between the eBPF programs and the
 * Python control plane. The Python mirror lives in src/weft/datapath/abi.py and
 * tests/unit/test_abi.py holds it to the compiled object's BTF (sizes and member offsets).
 *
 * Rules: fixed-width types only, explicit padding (hash maps compare every byte of a key),
 * a _Static_assert on every size, and a version field on every record that crosses a ring.
 */
#ifndef WEFT_SHARED_ABI_H
#define WEFT_SHARED_ABI_H

#include <linux/types.h>

#define WEFT_ABI_VERSION 1

/* Address families as stored in keys (not AF_* values: those differ between platforms). */
#define WEFT_FAMILY_V4 4
#define WEFT_FAMILY_V6 6

/* Map capacities: the control plane reads these to report fill levels. */
#define WEFT_ENDPOINTS_MAX 65536
#define WEFT_LXC_MAX 16384
#define WEFT_METRICS_MAX 64
#define WEFT_POLICY_MAX 65536
#define WEFT_IPCACHE_MAX 65536
#define WEFT_CT_MAX 131072
#define WEFT_FQDN_MAX 65536
#define WEFT_TUNNEL_MAX 16384

/* Endpoint map key: one entry per pod address. IPv4 sits in addr[0..3], the rest zero. */
struct weft_ep_key {
	__u8 family;   /* WEFT_FAMILY_V4 or WEFT_FAMILY_V6 */
	__u8 pad[3];   /* must be zero */
	__u8 addr[16]; /* network byte order */
};
_Static_assert(sizeof(struct weft_ep_key) == 20, "weft_ep_key size");

#define WEFT_EP_F_LOCAL 0x1 /* delivered with bpf_redirect_peer to ifindex */
/* Some policy selects the endpoint in that direction: what no entry allows is dropped. */
#define WEFT_EP_F_INGRESS_ENFORCED 0x2
#define WEFT_EP_F_EGRESS_ENFORCED 0x4
/* The endpoint has deny entries: looked up even in a direction it does not enforce. */
#define WEFT_EP_F_HAS_DENY 0x8
/* The endpoint's egress policy has toFQDNs selectors: what no entry allows may still be allowed
 * through an address the DNS proxy learned for it (weft_fqdn). */
#define WEFT_EP_F_FQDN 0x10

struct weft_ep_value {
	__u32 ifindex;     /* host-side veth, in the node's netns */
	__u32 ep_id;       /* endpoint id assigned by the agent */
	__u32 identity;    /* security identity (numeric) */
	__u32 flags;       /* WEFT_EP_F_* */
	__u8 pod_mac[6];   /* MAC of the pod's interface (destination MAC on delivery) */
	__u8 host_mac[6];  /* MAC of the host-side veth (the pod's gateway MAC) */
};
_Static_assert(sizeof(struct weft_ep_value) == 28, "weft_ep_value size");

/*
 * The same value is also stored per host-side interface in the `weft_lxc` map (key: __u32
 * ifindex), so the datapath can answer ARP and neighbour solicitations from a pod whatever
 * source address the pod used (IPv6 probes come from its link-local address).
 */

/* Per-CPU counters, indexed by enum weft_metric; Python sums across CPUs. */
struct weft_metric_value {
	__u64 packets;
	__u64 bytes;
};
_Static_assert(sizeof(struct weft_metric_value) == 16, "weft_metric_value size");

enum weft_metric {
	WEFT_M_FWD_PEER_V4 = 0,   /* pod -> local pod via bpf_redirect_peer, IPv4 */
	WEFT_M_FWD_PEER_V6 = 1,   /* same, IPv6 */
	WEFT_M_TO_STACK_V4 = 2,   /* pod -> node stack (destination not a local endpoint), IPv4 */
	WEFT_M_TO_STACK_V6 = 3,
	WEFT_M_ARP_REPLY = 4,     /* ARP request from a pod answered by the datapath */
	WEFT_M_NDP_REPLY = 5,     /* neighbour solicitation from a pod answered with an advertisement */
	WEFT_M_TO_POD_V4 = 6,     /* node stack -> pod (tc egress of the host veth), IPv4 */
	WEFT_M_TO_POD_V6 = 7,
	WEFT_M_DROP_INVALID = 8,  /* malformed packet from a pod */
	WEFT_M_DROP_SPOOF = 9,    /* pod sent from an address that is not its own */
	WEFT_M_OTHER = 10,        /* non-IP, non-ARP frames passed to the stack */
	WEFT_M_DROP_POLICY_INGRESS = 11, /* no policy entry allows it into the destination */
	WEFT_M_DROP_POLICY_EGRESS = 12,  /* no policy entry allows it out of the source */
	WEFT_M_DROP_POLICY_DENY = 13,    /* an explicit deny rule matched (ingressDeny/egressDeny) */
	WEFT_M_DROP_CT_MISSING = 14,     /* a TCP packet that opens nothing and belongs to no tracked
					  * connection, where policy does not allow it */
	WEFT_M_CT_NEW = 15,              /* a connection's first packet (an entry was created) */
	WEFT_M_CT_REPLY = 16,            /* reply of a tracked connection: passes without policy */
	WEFT_M_CT_RELATED = 17,          /* ICMP error about a tracked connection: passes too */
	WEFT_M_REDIRECT_DNS_PROXY = 18,  /* a DNS packet handed to the node's DNS proxy */
	WEFT_M_DROP_PROXY_DOWN = 19,     /* policy redirects it to the DNS proxy, which has no socket */
	WEFT_M_FQDN_ALLOW = 20,          /* allowed through an address the DNS proxy learned */
	WEFT_M_EVENTS_LOST = 21,         /* a verdict event found weft_events full: not reported */
	WEFT_M_TO_OVERLAY_V4 = 22,       /* pod -> a pod of another node, encapsulated (VXLAN) */
	WEFT_M_TO_OVERLAY_V6 = 23,
	WEFT_M_FROM_OVERLAY_V4 = 24,     /* decapsulated and delivered to a local pod */
	WEFT_M_FROM_OVERLAY_V6 = 25,
	WEFT_M_DROP_OVERLAY = 26,        /* could not be encapsulated, or arrived without tunnel metadata */
	WEFT_M_ROUTED_V4 = 27,           /* pod -> a pod of another node, routed by the datapath (direct mode) */
	WEFT_M_ROUTED_V6 = 28,
	WEFT_M_FROM_NETDEV_V4 = 29,      /* from the underlay device, delivered to a local pod (direct mode) */
	WEFT_M_FROM_NETDEV_V6 = 30,
	WEFT_M__COUNT = 31,
};

#define WEFT_DIR_INGRESS 0
#define WEFT_DIR_EGRESS 1

/*
 * Policy entries, one LPM trie for the node. The prefix always covers ep_id, identity and
 * direction (72 bits); proto and the leading bits of dport follow, so "any protocol",
 * "TCP, any port", a single port and a port range (split into prefixes) are all one lookup.
 * identity 0 means any peer: the datapath looks up the peer's identity and 0, and a deny from
 * either wins.
 */
#define WEFT_POLICY_FIXED_BITS 72
struct weft_policy_key {
	__u32 prefixlen;
	__u32 ep_id;
	__u32 identity;
	__u8 direction;  /* WEFT_DIR_* */
	__u8 proto;      /* IP protocol; 0 = any */
	__be16 dport;    /* network order, so the prefix runs from the port's high bits; ICMP: type */
};
_Static_assert(sizeof(struct weft_policy_key) == 16, "weft_policy_key size");

struct weft_policy_value {
	__u8 deny;
	__u8 pad;
	__u16 proxy_port; /* host order; non-zero: allowed, but handed to the node's DNS proxy on this
			   * port (a rule with toPorts.rules.dns) instead of forwarded */
	__u32 cookie;     /* opaque to the datapath: which rule this came from */
};
_Static_assert(sizeof(struct weft_policy_value) == 8, "weft_policy_value size");

/* Address prefix -> identity, for peers that are not local endpoints (CIDR identities, the
 * node itself). What matches nothing is world. prefixlen counts the 32 bits of family+pad. */
struct weft_ipcache_key {
	__u32 prefixlen;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};
_Static_assert(sizeof(struct weft_ipcache_key) == 24, "weft_ipcache_key size");

struct weft_ipcache_value {
	__u32 identity;
	__u32 flags;
};
_Static_assert(sizeof(struct weft_ipcache_value) == 8, "weft_ipcache_value size");

/*
 * Pod prefix of another node -> how to reach it. Keyed like the ipcache (LPM on family +
 * address).
 * WEFT_ROUTE_VXLAN (overlay): a packet from a local pod to such an address is encapsulated by
 * the node's collect-metadata VXLAN device `ifindex`, sent to `addr` on the underlay, with the
 * source pod's security identity as the VNI; the receiving node enforces its ingress policy
 * with that identity (cluster identities are below 2^24, so they fit the 24-bit VNI).
 * WEFT_ROUTE_DIRECT (direct routing, pods addressed from the underlay): the packet is routed
 * by the datapath itself (FIB lookup, then bpf_redirect_neigh out of the underlay device);
 * `ifindex` and `addr` are unused. The receiving node knows the sender from its ipcache.
 */
#define WEFT_ROUTE_VXLAN 0
#define WEFT_ROUTE_DIRECT 1

struct weft_tunnel_value {
	__u32 ifindex;  /* the VXLAN device, in the node's netns */
	__u8 family;    /* family of addr (the underlay's), WEFT_FAMILY_V4 or WEFT_FAMILY_V6 */
	__u8 mode;      /* WEFT_ROUTE_* */
	__u8 pad[2];
	__u8 addr[16];  /* the remote node's underlay address, network byte order */
};
_Static_assert(sizeof(struct weft_tunnel_value) == 24, "weft_tunnel_value size");

/* Connection tracking: the tuple in the direction of the connection's first packet. ICMP echo
 * uses the identifier as sport (request) / dport (reply), so a reply is the reversed tuple. */
struct weft_ct_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};
_Static_assert(sizeof(struct weft_ct_key) == 40, "weft_ct_key size");

#define WEFT_CT_F_REPLY_SEEN 0x1
#define WEFT_CT_F_CLOSING 0x2 /* FIN or RST seen */

struct weft_ct_value {
	__u64 created_ns;
	__u64 last_seen_ns;
	__u64 packets;
	__u64 bytes;
	__u32 flags;
	/* TCP flags (WEFT_EV_REPORT_TCP_FLAGS only) seen so far in each direction: a packet showing
	 * one not seen before is reported as an event at the default aggregation level. */
	__u8 tx_flags_seen;
	__u8 rx_flags_seen;
	__u16 pad;
};
_Static_assert(sizeof(struct weft_ct_value) == 40, "weft_ct_value size");

/* skb->mark of a packet handed to the DNS proxy: the node's routing rules deliver packets with
 * this mark locally (fwmark WEFT_MARK_TO_PROXY/WEFT_MARK_MASK -> table WEFT_PROXY_ROUTE_TABLE,
 * "local default dev lo"), where the socket the datapath assigned receives them. */
#define WEFT_MARK_TO_PROXY 0x0a00
#define WEFT_MARK_MASK 0x0f00
#define WEFT_PROXY_ROUTE_TABLE 2005

/*
 * Addresses the DNS proxy learned for an endpoint (toFQDNs): {endpoint, address} -> up to
 * WEFT_FQDN_SLOTS FQDN selectors whose names resolved to it. Each selector has an identity of
 * its own (allocated by the agent, node-local) with ordinary policy entries; the datapath looks
 * those up for a packet no other entry allows. A slot past expires_ns (CLOCK_MONOTONIC, as
 * bpf_ktime_get_ns) no longer opens connections, but packets of a connection already tracked
 * still pass: the proxy removes the entry once no such connection is left.
 */
#define WEFT_FQDN_SLOTS 4
struct weft_fqdn_key {
	__u32 ep_id;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};
_Static_assert(sizeof(struct weft_fqdn_key) == 24, "weft_fqdn_key size");

struct weft_fqdn_slot {
	__u32 selector_identity; /* 0 = empty slot */
	__u32 pad;
	__u64 expires_ns;
};
_Static_assert(sizeof(struct weft_fqdn_slot) == 16, "weft_fqdn_slot size");

struct weft_fqdn_value {
	struct weft_fqdn_slot slots[WEFT_FQDN_SLOTS];
};
_Static_assert(sizeof(struct weft_fqdn_value) == 64, "weft_fqdn_value size");

/*
 * Verdict events: one record per reported packet in the `weft_events` ring buffer, read by the
 * agent (weft observe). Which packets are reported is the aggregation level in
 * `weft_event_cfg` (one entry, written by the agent at load):
 *   WEFT_EV_LEVEL_ALL     every packet that met a verdict
 *   WEFT_EV_LEVEL_MEDIUM  every drop; forwarded/redirected packets only when they open a
 *                         connection, are its first reply, or show a TCP flag of
 *                         WEFT_EV_REPORT_TCP_FLAGS not seen before in their direction (so a
 *                         connection's SYN, SYN-ACK, FIN and RST, never its bulk data)
 *   WEFT_EV_LEVEL_DROPS   drops only
 *   WEFT_EV_LEVEL_OFF     nothing
 * A record that finds the ring full is counted in WEFT_M_EVENTS_LOST, never dropped silently.
 */
#define WEFT_EVENT_VERSION 1
#define WEFT_EVENTS_RING_BYTES (1 << 23) /* default ring size (8 MiB: ~87,000 drop events, almost a second at 100,000/s while the agent waits for a CPU); the agent may size it otherwise */
#define WEFT_EV_LEVEL_ALL 0
#define WEFT_EV_LEVEL_MEDIUM 1
#define WEFT_EV_LEVEL_DROPS 2
#define WEFT_EV_LEVEL_OFF 3
#define WEFT_EV_REPORT_TCP_FLAGS 0x07 /* FIN, SYN, RST */

#define WEFT_VERDICT_FORWARDED 1
#define WEFT_VERDICT_DROPPED 2
#define WEFT_VERDICT_REDIRECTED 3 /* handed to the node's DNS proxy */

#define WEFT_EV_F_REPLY 0x1       /* the packet is a reply of a tracked connection */
#define WEFT_EV_F_CT_NEW 0x2      /* the packet opened a connection */
#define WEFT_EV_F_TO_ENDPOINT 0x4 /* observed in to_container (towards the pod), else from_container */
#define WEFT_EV_F_POLICY 0x8      /* a policy lookup in an enforced direction judged the packet */
#define WEFT_EV_F_REPORT 0x10     /* medium level: worth reporting (new connection or flag change) */
#define WEFT_EV_F_RELATED 0x20    /* an ICMP error about a tracked connection */

struct weft_event {
	__u8 version;     /* WEFT_EVENT_VERSION */
	__u8 verdict;     /* WEFT_VERDICT_* */
	__u8 reason;      /* enum weft_metric: the drop's reason, or the path a forwarded packet took */
	__u8 flags;       /* WEFT_EV_F_* */
	__u8 family;      /* WEFT_FAMILY_* */
	__u8 proto;       /* IP protocol */
	__u8 tcp_flags;   /* the TCP header's flags byte (FIN 0x01 ... CWR 0x80) */
	__u8 direction;   /* WEFT_DIR_* of the connection, seen from the endpoint of `ifindex` */
	__u8 saddr[16];   /* network byte order; IPv4 in [0..3] */
	__u8 daddr[16];
	__be16 sport;     /* ICMP echo: the identifier (request: sport, reply: dport) */
	__be16 dport;
	__u16 policy_port; /* host order: destination port, or the ICMP type */
	__u16 pad;
	__u32 ifindex;    /* host-side veth the packet was seen on */
	__u32 src_ep_id;  /* local endpoint ids, 0 = not a local endpoint */
	__u32 dst_ep_id;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 egress_cookie;  /* weft_policy_value.cookie of the entry that decided egress (0: none) */
	__u32 ingress_cookie; /* same for ingress */
	__u32 pkt_len;
	__u64 ts_ns;      /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
};
_Static_assert(sizeof(struct weft_event) == 88, "weft_event size");

struct weft_event_config {
	__u32 level; /* WEFT_EV_LEVEL_* */
	__u32 pad;
};
_Static_assert(sizeof(struct weft_event_config) == 8, "weft_event_config size");

#endif /* WEFT_SHARED_ABI_H */
