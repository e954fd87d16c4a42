/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The pod's gateway for IPv6: a neighbour solicitation from a pod is answered with a neighbour
 * advertisement carrying the host-side veth's MAC, rewritten in place (same length) and sent
 * back out of the veth. Duplicate address detection (source ::) is left alone.
 */
#ifndef WEFT_LIB_NDP_H
#define WEFT_LIB_NDP_H

#include "metrics.h"

#define NDP_NS 135
#define NDP_NA 136
#define NDP_OPT_TARGET_LL 2
/* Router | Solicited | Override: we answer as the pod's router. */
#define NDP_NA_FLAGS 0xE0000000

/* A solicitation or advertisement with one link-layer address option (the common form). */
struct ndp_msg {
	__u8 type;
	__u8 code;
	__u16 cksum;
	__u32 flags;
	__u8 target[16];
	__u8 opt_type;
	__u8 opt_len; /* in units of 8 bytes */
	__u8 opt_mac[ETH_ALEN];
};

struct ndp_pseudo {
	__u8 src[16];
	__u8 dst[16];
	__be32 len;
	__be32 next;
	struct ndp_msg msg;
};

/* Returns a tc verdict if the packet was a solicitation we answered, or -1 to go on. */
static __always_inline int handle_ndp_ns(struct __sk_buff *skb, const struct weft_ep_value *self)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + WEFT_ETH_HLEN;
	struct ndp_msg *ns = data + WEFT_ETH_HLEN + WEFT_IP6_HLEN;
	struct ndp_pseudo ph = {};
	__s64 sum;

	if ((void *)(ns + 1) > data_end)
		return -1;
	if (ip6->nexthdr != IPPROTO_ICMPV6 || ns->type != NDP_NS || ns->code != 0 || ip6->hop_limit != 255)
		return -1;
	if (bpf_ntohs(ip6->payload_len) != sizeof(struct ndp_msg))
		return -1;
	if (ip6->saddr.in6_u.u6_addr32[0] == 0 && ip6->saddr.in6_u.u6_addr32[1] == 0 &&
	    ip6->saddr.in6_u.u6_addr32[2] == 0 && ip6->saddr.in6_u.u6_addr32[3] == 0)
		return -1; /* DAD */

	__builtin_memcpy(ph.src, ns->target, 16);
	__builtin_memcpy(ph.dst, &ip6->saddr, 16);
	ph.len = bpf_htonl(sizeof(struct ndp_msg));
	ph.next = bpf_htonl(IPPROTO_ICMPV6);
	ph.msg.type = NDP_NA;
	ph.msg.flags = bpf_htonl(NDP_NA_FLAGS);
	__builtin_memcpy(ph.msg.target, ns->target, 16);
	ph.msg.opt_type = NDP_OPT_TARGET_LL;
	ph.msg.opt_len = 1;
	mac_copy(ph.msg.opt_mac, self->host_mac);
	sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	if (sum < 0)
		return -1;
	ph.msg.cksum = csum_fold32((__u64)sum);

	mac_copy(eth->h_dest, eth->h_source);
	mac_copy(eth->h_source, self->host_mac);
	__builtin_memcpy(&ip6->daddr, ph.dst, 16);
	__builtin_memcpy(&ip6->saddr, ph.src, 16);
	ip6->hop_limit = 255;
	__builtin_memcpy(ns, &ph.msg, sizeof(struct ndp_msg));
	metric_inc(WEFT_M_NDP_REPLY, skb->len);
	return bpf_redirect(skb->ifindex, 0);
}

#endif
