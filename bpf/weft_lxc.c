/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Programs attached to the host side of every pod's veth (tc clsact):
 *   from_container (ingress): what the pod sends. Answers ARP/NDP for the gateway, checks the
 *       source address belongs to the pod, and delivers to a local pod with bpf_redirect_peer
 *       (straight into the peer's netns: the node's IP stack never sees the packet).
 *       Anything else goes up the node's stack.
 *   to_container (egress): what the node's stack sends to the pod. Counted; ingress policy
 *       will hook in here and in the redirect path.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/arp.h"
#include "lib/ndp.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline struct weft_ep_value *lookup_ep(__u8 family, const void *addr)
{
	struct weft_ep_key key = {};

	key.family = family;
	if (family == WEFT_FAMILY_V4)
		__builtin_memcpy(key.addr, addr, 4);
	else
		__builtin_memcpy(key.addr, addr, 16);
	return bpf_map_lookup_elem(&weft_endpoints, &key);
}

/* Rewrite L2 for the destination pod and hand the packet to its netns. */
static __always_inline int deliver_local(struct __sk_buff *skb, const struct weft_ep_value *dst, __u32 metric)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
	mac_copy(eth->h_dest, dst->pod_mac);
	mac_copy(eth->h_source, dst->host_mac);
	metric_inc(metric, skb->len);
	return bpf_redirect_peer(dst->ifindex, 0);
}

static __always_inline int from_container_v4(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + WEFT_ETH_HLEN;
	struct weft_ep_value *src, *dst;
	__u32 check;

	if ((void *)(ip + 1) > data_end || ip->ihl < 5) {
		metric_inc(WEFT_M_DROP_INVALID, skb->len);
		return TC_ACT_SHOT;
	}
	if (ip->saddr == 0) { /* DHCP-style probes: not ours to judge */
		metric_inc(WEFT_M_OTHER, skb->len);
		return TC_ACT_OK;
	}
	src = lookup_ep(WEFT_FAMILY_V4, &ip->saddr);
	if (!src || src->ifindex != skb->ifindex) {
		metric_inc(WEFT_M_DROP_SPOOF, skb->len);
		return TC_ACT_SHOT;
	}
	dst = lookup_ep(WEFT_FAMILY_V4, &ip->daddr);
	if (!dst || !(dst->flags & WEFT_EP_F_LOCAL) || ip->ttl <= 1) {
		metric_inc(WEFT_M_TO_STACK_V4, skb->len);
		return TC_ACT_OK;
	}
	/* We route: decrement TTL and patch the header checksum incrementally (RFC 1624). */
	check = ip->check;
	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	ip->ttl--;
	return deliver_local(skb, dst, WEFT_M_FWD_PEER_V4);
}

static __always_inline int is_link_local6(const struct in6_addr *a)
{
	return (a->in6_u.u6_addr8[0] == 0xfe) && ((a->in6_u.u6_addr8[1] & 0xc0) == 0x80);
}

static __always_inline int from_container_v6(struct __sk_buff *skb, const struct weft_ep_value *self)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + WEFT_ETH_HLEN;
	struct weft_ep_value *src, *dst;
	int verdict;

	if ((void *)(ip6 + 1) > data_end) {
		metric_inc(WEFT_M_DROP_INVALID, skb->len);
		return TC_ACT_SHOT;
	}
	if (ip6->nexthdr == IPPROTO_ICMPV6 && self) {
		verdict = handle_ndp_ns(skb, self);
		if (verdict >= 0)
			return verdict;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		ip6 = data + WEFT_ETH_HLEN;
		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_SHOT;
	}
	/* Link-local and unspecified sources (router solicitations, MLD, DAD) stay on the link. */
	if (is_link_local6(&ip6->saddr) || (ip6->saddr.in6_u.u6_addr32[0] | ip6->saddr.in6_u.u6_addr32[1] |
					    ip6->saddr.in6_u.u6_addr32[2] | ip6->saddr.in6_u.u6_addr32[3]) == 0) {
		metric_inc(WEFT_M_OTHER, skb->len);
		return TC_ACT_OK;
	}
	src = lookup_ep(WEFT_FAMILY_V6, &ip6->saddr);
	if (!src || src->ifindex != skb->ifindex) {
		metric_inc(WEFT_M_DROP_SPOOF, skb->len);
		return TC_ACT_SHOT;
	}
	dst = lookup_ep(WEFT_FAMILY_V6, &ip6->daddr);
	if (!dst || !(dst->flags & WEFT_EP_F_LOCAL) || ip6->hop_limit <= 1) {
		metric_inc(WEFT_M_TO_STACK_V6, skb->len);
		return TC_ACT_OK;
	}
	ip6->hop_limit--;
	return deliver_local(skb, dst, WEFT_M_FWD_PEER_V6);
}

SEC("tc")
int from_container(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 ifindex = skb->ifindex;
	struct weft_ep_value *self;

	if ((void *)(eth + 1) > data_end) {
		metric_inc(WEFT_M_DROP_INVALID, skb->len);
		return TC_ACT_SHOT;
	}
	self = bpf_map_lookup_elem(&weft_lxc, &ifindex);
	switch (eth->h_proto) {
	case bpf_htons(ETH_P_ARP):
		if (!self) {
			metric_inc(WEFT_M_OTHER, skb->len);
			return TC_ACT_OK;
		}
		return handle_arp(skb, self);
	case bpf_htons(ETH_P_IP):
		return from_container_v4(skb);
	case bpf_htons(ETH_P_IPV6):
		return from_container_v6(skb, self);
	default:
		metric_inc(WEFT_M_OTHER, skb->len);
		return TC_ACT_OK;
	}
}

SEC("tc")
int to_container(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		metric_inc(WEFT_M_TO_POD_V4, skb->len);
	else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		metric_inc(WEFT_M_TO_POD_V6, skb->len);
	return TC_ACT_OK;
}
