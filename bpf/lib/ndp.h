/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The pod's gateway for IPv6: a neighbour solicitation (RFC 4861 4.3) from a pod, for any
 * target but the pod's own addresses, is answered with a neighbour advertisement (4.4) that
 * carries the host-side veth's MAC, built over the solicitation and sent back out of the veth.
 * Duplicate address detection (source ::) is left alone.
 */
#ifndef WEFT_LIB_NDP_H
#define WEFT_LIB_NDP_H

#include "endpoints.h"
#include "eth.h"
#include "ipv6.h"
#include "metrics.h"

#define NDP_NS 135
#define NDP_NA 136
#define NDP_OPT_TARGET_LL 2
/* Router | Solicited | Override: we answer as the pod's router, in reply to its question, and
 * our answer must replace whatever the pod had cached. */
#define NDP_NA_FLAGS 0xE0000000
/* Length of the advertisement we send: 24 bytes of message + one 8-byte target link-layer
 * address option. */
#define NDP_NA_LEN 32
#define NDP_NA_FRAME_LEN (WEFT_ETH_HLEN + WEFT_IP6_HLEN + NDP_NA_LEN)

/* The fixed part of a solicitation (options follow). */
struct ndp_ns {
	__u8 type;
	__u8 code;
	__u16 cksum;
	__u32 reserved;
	struct in6_addr target;
};

/* The advertisement we write. */
struct ndp_na {
	__u8 type;
	__u8 code;
	__u16 cksum;
	__be32 flags;
	struct in6_addr target;
	__u8 opt_type;
	__u8 opt_len; /* in units of 8 bytes */
	__u8 opt_mac[ETH_ALEN];
};
_Static_assert(sizeof(struct ndp_na) == NDP_NA_LEN, "ndp_na size");

/* The ICMPv6 checksum covers a pseudo-header (RFC 8200 8.1) followed by the message; laid out
 * contiguously so one bpf_csum_diff call sums it all (its length is a multiple of 4). */
struct ndp_na_pseudo {
	struct in6_addr src;
	struct in6_addr dst;
	__be32 len;
	__be32 next;
	struct ndp_na msg;
};

/*
 * Returns a tc verdict if the packet was a solicitation we answered, or -1 to let the caller
 * go on with it (not a solicitation, or one we leave to the stack).
 */
static __always_inline int ndp_respond(struct __sk_buff *skb)
{
	struct ethhdr *eth = PKT_DATA(skb);
	struct ipv6hdr *ip6 = PKT_DATA(skb) + WEFT_ETH_HLEN;
	struct ndp_ns *ns = PKT_DATA(skb) + WEFT_ETH_HLEN + WEFT_IP6_HLEN;
	const struct weft_ep_value *own, *gw;
	struct ndp_na_pseudo ph = {};
	__u8 pod_mac[ETH_ALEN];
	struct ndp_na *na;
	__s64 sum;

	if ((void *)(ns + 1) > PKT_END(skb))
		return -1;
	/* RFC 4861 7.1.1: a valid solicitation has hop limit 255 (it cannot have been routed)
	 * and code 0; anything else goes to the stack, which discards it. */
	if (ip6->nexthdr != IPPROTO_ICMPV6 || ns->type != NDP_NS || ns->code != 0 || ip6->hop_limit != 255 ||
	    bpf_ntohs(ip6->payload_len) < sizeof(struct ndp_ns))
		return -1;
	if (ipv6_addr_is_unspec(&ip6->saddr) || ipv6_addr_is_multicast(&ns->target))
		return -1;
	/* A solicitation for one of the pod's own addresses is not the gateway's to answer. */
	own = ep_lookup_v6(&ns->target);
	if (ep_on_ifindex(own, skb->ifindex))
		return -1;
	/* Answer with the MAC of the interface's endpoint; if the interface is not registered
	 * (yet), with that of the sender's endpoint, if the sender really is behind it. */
	gw = ep_of_ifindex(skb->ifindex);
	if (!gw) {
		gw = ep_lookup_v6(&ip6->saddr);
		if (!ep_on_ifindex(gw, skb->ifindex))
			return -1;
	}

	/* Build the advertisement on the stack first: resizing the packet below invalidates every
	 * packet pointer, so what we need from the solicitation is copied out now. */
	mac_copy(pod_mac, eth->h_source);
	ph.src = ns->target;
	ph.dst = ip6->saddr;
	ph.len = bpf_htonl(NDP_NA_LEN);
	ph.next = bpf_htonl(IPPROTO_ICMPV6);
	ph.msg.type = NDP_NA;
	ph.msg.flags = bpf_htonl(NDP_NA_FLAGS);
	ph.msg.target = ns->target;
	ph.msg.opt_type = NDP_OPT_TARGET_LL;
	ph.msg.opt_len = 1;
	mac_copy(ph.msg.opt_mac, gw->host_mac);
	sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	if (sum < 0)
		return -1;
	ph.msg.cksum = csum_fold32((__u64)sum);

	/* A solicitation is 24 bytes plus options (usually one 8-byte source link-layer option,
	 * so the same 32 bytes as our answer, but it may have none or more): make the frame
	 * exactly as long as the advertisement. */
	if (skb->len != NDP_NA_FRAME_LEN && bpf_skb_change_tail(skb, NDP_NA_FRAME_LEN, 0) < 0) {
		metric_inc(WEFT_M_DROP_INVALID, skb->len);
		return TC_ACT_SHOT;
	}
	eth = PKT_DATA(skb);
	ip6 = PKT_DATA(skb) + WEFT_ETH_HLEN;
	na = PKT_DATA(skb) + WEFT_ETH_HLEN + WEFT_IP6_HLEN;
	if ((void *)(na + 1) > PKT_END(skb)) {
		metric_inc(WEFT_M_DROP_INVALID, skb->len);
		return TC_ACT_SHOT;
	}
	mac_copy(eth->h_dest, pod_mac);
	mac_copy(eth->h_source, gw->host_mac);
	ip6->payload_len = bpf_htons(NDP_NA_LEN);
	ip6->hop_limit = 255;
	ip6->saddr = ph.src;
	ip6->daddr = ph.dst;
	__builtin_memcpy(na, &ph.msg, sizeof(ph.msg));
	metric_inc(WEFT_M_NDP_REPLY, skb->len);
	return bpf_redirect(skb->ifindex, 0);
}

#endif
