/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Programs attached to the host side of every pod's veth (tc clsact, direct action):
 *
 *   from_container (ingress: what the pod sends)
 *     - ARP requests and IPv6 neighbour solicitations are answered with the host veth's MAC:
 *       the datapath is the pod's gateway, the node's netns needs no gateway address.
 *     - IPv4/IPv6: the source address must be one of this interface's endpoint addresses
 *       (anti-spoofing); a destination that is a local endpoint is delivered with
 *       bpf_redirect_peer straight into that pod's netns, so the node's IP stack never sees the
 *       packet (no forwarding sysctl, no routes, no neighbour entries involved).
 *     - Everything else continues into the node's stack.
 *   to_container (egress: what the node's stack sends to the pod)
 *     - Counted; ingress policy hooks in here (see lib/policy.h).
 *
 * Maps are in lib/maps.h; every struct shared with Python is in include/shared/weft_abi.h.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/endpoints.h"
#include "lib/eth.h"
#include "lib/ipv4.h"
#include "lib/ipv6.h"
#include "lib/arp.h"
#include "lib/ndp.h"
#include "lib/policy.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/*
 * Hand the packet to a pod on this node: L2 addressed as if the pod's gateway (its host veth)
 * had sent it, then redirected into the pod's netns. Called after the L3 header was changed
 * (TTL/hop limit), so packet pointers are re-derived here.
 */
static __always_inline int deliver_local(struct __sk_buff *skb, const struct weft_ep_value *src,
					 const struct weft_ep_value *dst, __u32 metric)
{
	struct ethhdr *eth;
	int verdict;

	verdict = policy_ingress(skb, src, dst);
	if (verdict != TC_ACT_OK)
		return verdict;
	eth = eth_hdr(skb);
	if (!eth) {
		metric_inc(WEFT_M_DROP_INVALID, skb->len);
		return TC_ACT_SHOT;
	}
	mac_copy(eth->h_dest, dst->pod_mac);
	mac_copy(eth->h_source, dst->host_mac);
	metric_inc(metric, skb->len);
	/* dst->ifindex is the destination's host veth; redirect_peer enters at its peer (the
	 * pod's eth0) ingress, skipping a pass through the node's backlog queue. */
	return bpf_redirect_peer(dst->ifindex, 0);
}

static __always_inline int from_container_v4(struct __sk_buff *skb)
{
	const struct weft_ep_value *src, *dst;
	struct iphdr *ip = ipv4_hdr(skb);
	int verdict;

	if (!ip) {
		metric_inc(WEFT_M_DROP_INVALID, skb->len);
		return TC_ACT_SHOT;
	}
	/* A source of 0.0.0.0 (DHCP discovery and the like) proves nothing about the pod and can
	 * be routed nowhere: let the stack judge it. */
	if (ip->saddr == 0) {
		metric_inc(WEFT_M_OTHER, skb->len);
		return TC_ACT_OK;
	}
	src = ep_lookup_v4(ip->saddr);
	if (!ep_on_ifindex(src, skb->ifindex)) {
		metric_inc(WEFT_M_DROP_SPOOF, skb->len);
		return TC_ACT_SHOT;
	}
	verdict = policy_egress(skb, src);
	if (verdict != TC_ACT_OK)
		return verdict;
	dst = ep_lookup_v4(ip->daddr);
	/* With TTL 1 the packet must die here with an ICMP time-exceeded: only the stack sends
	 * those, so it gets the packet. */
	if (!dst || !(dst->flags & WEFT_EP_F_LOCAL) || ip->ttl <= 1) {
		metric_inc(WEFT_M_TO_STACK_V4, skb->len);
		return TC_ACT_OK;
	}
	if (ipv4_dec_ttl(skb, ip) < 0) {
		metric_inc(WEFT_M_DROP_INVALID, skb->len);
		return TC_ACT_SHOT;
	}
	return deliver_local(skb, src, dst, WEFT_M_FWD_PEER_V4);
}

static __always_inline int from_container_v6(struct __sk_buff *skb)
{
	const struct weft_ep_value *src, *dst;
	struct ipv6hdr *ip6 = ipv6_hdr(skb);
	int verdict;

	if (!ip6) {
		metric_inc(WEFT_M_DROP_INVALID, skb->len);
		return TC_ACT_SHOT;
	}
	if (ip6->nexthdr == IPPROTO_ICMPV6) {
		verdict = ndp_respond(skb);
		if (verdict >= 0)
			return verdict;
		/* Not answered. ndp_respond resizes the packet only on paths that answer, but
		 * re-deriving the pointer keeps this code correct whatever it does in future. */
		ip6 = ipv6_hdr(skb);
		if (!ip6) {
			metric_inc(WEFT_M_DROP_INVALID, skb->len);
			return TC_ACT_SHOT;
		}
	}
	/* Link-local (router solicitations, MLD, NUD from fe80::) and unspecified sources (DAD)
	 * never leave the link: they carry no identity to check and go to the stack. */
	if (ipv6_addr_is_link_local(&ip6->saddr) || ipv6_addr_is_unspec(&ip6->saddr)) {
		metric_inc(WEFT_M_OTHER, skb->len);
		return TC_ACT_OK;
	}
	src = ep_lookup_v6(&ip6->saddr);
	if (!ep_on_ifindex(src, skb->ifindex)) {
		metric_inc(WEFT_M_DROP_SPOOF, skb->len);
		return TC_ACT_SHOT;
	}
	verdict = policy_egress(skb, src);
	if (verdict != TC_ACT_OK)
		return verdict;
	dst = ep_lookup_v6(&ip6->daddr);
	if (!dst || !(dst->flags & WEFT_EP_F_LOCAL) || ip6->hop_limit <= 1) {
		metric_inc(WEFT_M_TO_STACK_V6, skb->len);
		return TC_ACT_OK;
	}
	/* No header checksum in IPv6, and the hop limit is not in any upper-layer pseudo-header. */
	ip6->hop_limit--;
	return deliver_local(skb, src, dst, WEFT_M_FWD_PEER_V6);
}

SEC("tc")
int from_container(struct __sk_buff *skb)
{
	struct ethhdr *eth = eth_hdr(skb);

	if (!eth) {
		metric_inc(WEFT_M_DROP_INVALID, skb->len);
		return TC_ACT_SHOT;
	}
	switch (eth->h_proto) {
	case bpf_htons(ETH_P_ARP):
		return arp_respond(skb);
	case bpf_htons(ETH_P_IP):
		return from_container_v4(skb);
	case bpf_htons(ETH_P_IPV6):
		return from_container_v6(skb);
	default:
		metric_inc(WEFT_M_OTHER, skb->len);
		return TC_ACT_OK;
	}
}

SEC("tc")
int to_container(struct __sk_buff *skb)
{
	struct ethhdr *eth = eth_hdr(skb);
	__u32 metric;
	int verdict;

	if (!eth)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		metric = WEFT_M_TO_POD_V4;
	else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		metric = WEFT_M_TO_POD_V6;
	else
		return TC_ACT_OK; /* ARP and the like: link housekeeping, not policy's concern */
	/* The destination endpoint is weft_lxc[skb->ifindex]; it is not looked up until policy
	 * needs it, to keep this path free of map lookups. */
	verdict = policy_ingress(skb, NULL, NULL);
	if (verdict != TC_ACT_OK)
		return verdict;
	metric_inc(metric, skb->len);
	return TC_ACT_OK;
}
