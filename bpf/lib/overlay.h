/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Reaching pods of other nodes. Overlay mode: a packet from a local pod to a pod of another node is handed to
 * the node's collect-metadata VXLAN device with a tunnel key (the remote node's underlay
 * address, the source pod's security identity as the VNI); the device encapsulates it. On the
 * receiving node, from_overlay (weft_lxc.c) reads the identity back from the tunnel key, so its
 * ingress policy judges the packet by who sent it, not by an address that may have been reused.
 */
#ifndef WEFT_LIB_OVERLAY_H
#define WEFT_LIB_OVERLAY_H

#include "common.h"
#include "maps.h"
#include "metrics.h"
#include "events.h"
#include "identity.h"

#ifndef BPF_F_TUNINFO_IPV6
#define BPF_F_TUNINFO_IPV6 (1ULL << 0)
#endif

#define WEFT_VNI_MAX 0xffffff   /* a VXLAN network identifier has 24 bits */
#define WEFT_OVERLAY_TTL 64

static __always_inline const struct weft_tunnel_value *tunnel_lookup(__u8 family, const __u8 *addr)
{
	struct weft_ipcache_key key = {};

	lpm_address_key(&key, family, addr);
	return bpf_map_lookup_elem(&weft_tunnel, &key);
}

/* Encapsulate towards `tun` carrying `identity`; the packet's own headers are final already. */
static __always_inline int overlay_redirect(struct __sk_buff *skb, const struct weft_tunnel_value *tun,
					    __u32 identity, __u32 metric, struct ev_trace *t)
{
	struct bpf_tunnel_key key = {};
	__u64 flags = 0;

	/* Node-local identities (CIDR and FQDN selectors, from 2^24) mean nothing to another node
	 * and never belong to a pod. */
	if (identity > WEFT_VNI_MAX)
		return ev_drop(skb, t, WEFT_M_DROP_OVERLAY);
	key.tunnel_id = identity;
	key.tunnel_ttl = WEFT_OVERLAY_TTL;
	if (tun->family == WEFT_FAMILY_V4) {
		/* The helper takes the IPv4 address in host order. */
		key.remote_ipv4 = bpf_ntohl(*(const __be32 *)tun->addr);
	} else {
		__builtin_memcpy(key.remote_ipv6, tun->addr, 16);
		flags = BPF_F_TUNINFO_IPV6;
	}
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), flags) < 0)
		return ev_drop(skb, t, WEFT_M_DROP_OVERLAY);
	metric_inc(metric, skb->len);
	ev_forward(t, metric);
	return bpf_redirect(tun->ifindex, 0);
}

/*
 * Direct routing: the FIB says which underlay device and next hop; the packet leaves through
 * it with bpf_redirect_neigh (the kernel resolves the next hop's MAC), never entering the
 * node's forwarding path. The FIB lookup runs as for a packet arriving on the pod's host veth,
 * so the node must have forwarding on (as any router). Returns -1 when the FIB has no answer:
 * the caller hands the packet to the stack, which reports the problem (ICMP unreachable).
 */
static __always_inline int route_direct(struct __sk_buff *skb, const struct weft_flow *flow, __u32 metric,
					struct ev_trace *t)
{
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	long ret;

	fib.ifindex = skb->ifindex;
	if (flow->key.family == WEFT_FAMILY_V4) {
		fib.family = 2; /* AF_INET */
		__builtin_memcpy(&fib.ipv4_src, flow->key.saddr, 4);
		__builtin_memcpy(&fib.ipv4_dst, flow->key.daddr, 4);
	} else {
		fib.family = 10; /* AF_INET6 */
		__builtin_memcpy(fib.ipv6_src, flow->key.saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, flow->key.daddr, 16);
	}
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH)
		return -1;
	/* The lookup left the next hop (the gateway, or the destination when on-link) in *_dst. */
	nh.nh_family = fib.family;
	if (fib.family == 2)
		nh.ipv4_nh = fib.ipv4_dst;
	else
		__builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, 16);
	metric_inc(metric, skb->len);
	ev_forward(t, metric);
	return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}

/* The sender's identity from a decapsulated packet's tunnel key; 0 when there is none. */
static __always_inline __u32 overlay_source_identity(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};

	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0 &&
	    bpf_skb_get_tunnel_key(skb, &key, sizeof(key), BPF_F_TUNINFO_IPV6) < 0)
		return 0;
	return key.tunnel_id;
}

#endif
