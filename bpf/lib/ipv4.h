/* SPDX-License-Identifier: Apache-2.0 */
/* IPv4 header access and the TTL decrement of a routed packet. */
#ifndef WEFT_LIB_IPV4_H
#define WEFT_LIB_IPV4_H

#include "common.h"

#define WEFT_IP4_CSUM_OFF (WEFT_ETH_HLEN + __builtin_offsetof(struct iphdr, check))

/* The IPv4 header after the Ethernet header, or NULL if the packet is too short for the fixed
 * header or claims a header length below the minimum. Options are allowed (and skipped by
 * nothing: weft only reads the fixed part). */
static __always_inline struct iphdr *ipv4_hdr(struct __sk_buff *skb)
{
	struct iphdr *ip = PKT_DATA(skb) + WEFT_ETH_HLEN;

	if ((void *)(ip + 1) > PKT_END(skb) || ip->ihl < 5 || ip->version != 4)
		return NULL;
	return ip;
}

/*
 * We route the packet, so its TTL drops by one. The checksum is patched by the kernel helper
 * (an incremental update over the 16-bit word holding TTL and protocol) rather than recomputed.
 * The helper may move packet data: `ip` must not be used after this call.
 * Returns 0 or a negative error.
 */
static __always_inline int ipv4_dec_ttl(struct __sk_buff *skb, struct iphdr *ip)
{
	__u16 *word = (__u16 *)&ip->ttl; /* ttl and protocol, adjacent in the header */
	__u16 old = *word, new;

	ip->ttl--;
	new = *word;
	return (int)bpf_l3_csum_replace(skb, WEFT_IP4_CSUM_OFF, old, new, sizeof(__u16));
}

#endif
