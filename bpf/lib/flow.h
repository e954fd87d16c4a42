/* SPDX-License-Identifier: Apache-2.0 */
/*
 * A packet's flow: its tuple (the conntrack key as seen), the port policy matches on, TCP
 * flags, and for ICMP errors the tuple of the packet the error is about.
 */
#ifndef WEFT_LIB_FLOW_H
#define WEFT_LIB_FLOW_H

#include "common.h"

#ifndef IPPROTO_SCTP
#define IPPROTO_SCTP 132
#endif

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

struct weft_flow {
	struct weft_ct_key key;
	struct weft_ct_key inner; /* valid if icmp_error */
	__u16 policy_port;        /* host order: destination port, or the ICMP type */
	__u8 tcp_flags;
	__u8 icmp_error;
};

/* Ports (or the ICMP echo identifier) of an L4 header at `l4`. Returns 0, or -1 if the header
 * is cut short (the caller decides what that means). */
static __always_inline int flow_ports(struct __sk_buff *skb, void *l4, __u8 proto, struct weft_ct_key *key,
				      __u16 *policy_port, __u8 *tcp_flags, __u8 *icmp_type)
{
	void *end = PKT_END(skb);

	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP) {
		__be16 *ports = l4;

		if ((void *)(ports + 2) > end)
			return -1;
		key->sport = ports[0];
		key->dport = ports[1];
		*policy_port = bpf_ntohs(ports[1]);
		if (proto == IPPROTO_TCP) {
			__u8 *flags = l4 + 13;

			if ((void *)(flags + 1) > end)
				return -1;
			*tcp_flags = *flags;
		}
		return 0;
	}
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		__u8 *icmp = l4;
		__be16 *id = l4 + 4;

		if ((void *)(id + 1) > end)
			return -1;
		*icmp_type = icmp[0];
		*policy_port = icmp[0];
		/* Echo request: id as sport; echo reply: id as dport. The reply's tuple is then the
		 * request's reversed, like any other protocol's. */
		if ((proto == IPPROTO_ICMP && icmp[0] == 8) || (proto == IPPROTO_ICMPV6 && icmp[0] == 128))
			key->sport = *id;
		else if ((proto == IPPROTO_ICMP && icmp[0] == 0) || (proto == IPPROTO_ICMPV6 && icmp[0] == 129))
			key->dport = *id;
		return 0;
	}
	return 0;
}

static __always_inline int icmp_is_error(__u8 proto, __u8 type)
{
	if (proto == IPPROTO_ICMP)
		return type == 3 || type == 4 || type == 5 || type == 11 || type == 12;
	return proto == IPPROTO_ICMPV6 && type >= 1 && type <= 4;
}

/* Fill `flow` from the IPv4 packet at `ip`. Returns 0 or -1 (truncated L4 header). */
static __always_inline int flow_v4(struct __sk_buff *skb, struct iphdr *ip, struct weft_flow *flow)
{
	void *l4 = (void *)ip + ((ip->ihl & 0xf) * 4);
	__u8 icmp_type = 0;
	__u16 unused_port;
	__u8 unused_flags;

	flow->key.family = WEFT_FAMILY_V4;
	flow->key.proto = ip->protocol;
	__builtin_memcpy(flow->key.saddr, &ip->saddr, 4);
	__builtin_memcpy(flow->key.daddr, &ip->daddr, 4);
	/* Non-first fragments carry no L4 header: they are tracked by addresses only. */
	if (ip->frag_off & bpf_htons(0x1fff))
		return 0;
	if (flow_ports(skb, l4, ip->protocol, &flow->key, &flow->policy_port, &flow->tcp_flags, &icmp_type) < 0)
		return -1;
	if (ip->protocol == IPPROTO_ICMP && icmp_is_error(IPPROTO_ICMP, icmp_type)) {
		struct iphdr *inner = l4 + 8;
		void *inner_l4;

		if ((void *)(inner + 1) > PKT_END(skb) || inner->ihl < 5)
			return 0;
		inner_l4 = (void *)inner + ((inner->ihl & 0xf) * 4);
		flow->icmp_error = 1;
		flow->inner.family = WEFT_FAMILY_V4;
		flow->inner.proto = inner->protocol;
		__builtin_memcpy(flow->inner.saddr, &inner->saddr, 4);
		__builtin_memcpy(flow->inner.daddr, &inner->daddr, 4);
		if (flow_ports(skb, inner_l4, inner->protocol, &flow->inner, &unused_port, &unused_flags,
			       &icmp_type) < 0)
			flow->icmp_error = 0; /* not enough of the original packet to tell */
	}
	return 0;
}

static __always_inline int flow_v6(struct __sk_buff *skb, struct ipv6hdr *ip6, struct weft_flow *flow)
{
	void *l4 = (void *)(ip6 + 1);
	__u8 icmp_type = 0;
	__u16 unused_port;
	__u8 unused_flags;

	flow->key.family = WEFT_FAMILY_V6;
	flow->key.proto = ip6->nexthdr;
	__builtin_memcpy(flow->key.saddr, &ip6->saddr, 16);
	__builtin_memcpy(flow->key.daddr, &ip6->daddr, 16);
	if (flow_ports(skb, l4, ip6->nexthdr, &flow->key, &flow->policy_port, &flow->tcp_flags, &icmp_type) < 0)
		return -1;
	if (ip6->nexthdr == IPPROTO_ICMPV6 && icmp_is_error(IPPROTO_ICMPV6, icmp_type)) {
		struct ipv6hdr *inner = l4 + 8;

		if ((void *)(inner + 1) > PKT_END(skb))
			return 0;
		flow->icmp_error = 1;
		flow->inner.family = WEFT_FAMILY_V6;
		flow->inner.proto = inner->nexthdr;
		__builtin_memcpy(flow->inner.saddr, &inner->saddr, 16);
		__builtin_memcpy(flow->inner.daddr, &inner->daddr, 16);
		if (flow_ports(skb, (void *)(inner + 1), inner->nexthdr, &flow->inner, &unused_port, &unused_flags,
			       &icmp_type) < 0)
			flow->icmp_error = 0;
	}
	return 0;
}

/* ICMPv6 neighbour discovery and router messages: link housekeeping, never policy's business. */
static __always_inline int flow_is_icmp6_nd(const struct weft_flow *flow)
{
	return flow->key.proto == IPPROTO_ICMPV6 && flow->policy_port >= 133 && flow->policy_port <= 137;
}

#endif
