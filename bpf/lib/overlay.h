/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The overlay between nodes: a packet from a local pod to a pod of another node is handed to
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

#ifndef BPF_F_TUNINFO_IPV6
#define BPF_F_TUNINFO_IPV6 (1ULL << 0)
#endif

#define WEFT_VNI_MAX 0xffffff   /* a VXLAN network identifier has 24 bits */
#define WEFT_OVERLAY_TTL 64

static __always_inline const struct weft_tunnel_value *tunnel_lookup(__u8 family, const __u8 *addr)
{
	struct weft_ipcache_key key = {};

	key.prefixlen = 32 + (family == WEFT_FAMILY_V4 ? 32 : 128);
	key.family = family;
	if (family == WEFT_FAMILY_V4)
		__builtin_memcpy(key.addr, addr, 4);
	else
		__builtin_memcpy(key.addr, addr, 16);
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
