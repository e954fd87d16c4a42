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

/* Endpoint map key: one entry per pod address. IPv4 sits in addr[0..3], the rest zero. */
struct weft_ep_key {
	__u8 family;   /* WEFT_FAMILY_V4 or WEFT_FAMILY_V6 */
	__u8 pad[3];   /* must be zero */
	__u8 addr[16]; /* network byte order */
};
_Static_assert(sizeof(struct weft_ep_key) == 20, "weft_ep_key size");

#define WEFT_EP_F_LOCAL 0x1 /* delivered with bpf_redirect_peer to ifindex */

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
	WEFT_M__COUNT = 11,
};

#endif /* WEFT_SHARED_ABI_H */
