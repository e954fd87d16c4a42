/* SPDX-License-Identifier: Apache-2.0 */
/* IPv6 header access. Extension headers are not walked (yet): weft reads only the fixed
 * header. A neighbour solicitation behind an extension header is therefore not recognised and
 * goes to the node's stack; stacks send NDP with ICMPv6 as the first next header. */
#ifndef WEFT_LIB_IPV6_H
#define WEFT_LIB_IPV6_H

#include "common.h"

static __always_inline struct ipv6hdr *ipv6_hdr(struct __sk_buff *skb)
{
	struct ipv6hdr *ip6 = PKT_DATA(skb) + WEFT_ETH_HLEN;

	if ((void *)(ip6 + 1) > PKT_END(skb) || ip6->version != 6)
		return NULL;
	return ip6;
}

static __always_inline int ipv6_addr_is_unspec(const struct in6_addr *a)
{
	return (a->in6_u.u6_addr32[0] | a->in6_u.u6_addr32[1] | a->in6_u.u6_addr32[2] | a->in6_u.u6_addr32[3]) == 0;
}

/* fe80::/10 */
static __always_inline int ipv6_addr_is_link_local(const struct in6_addr *a)
{
	return a->in6_u.u6_addr8[0] == 0xfe && (a->in6_u.u6_addr8[1] & 0xc0) == 0x80;
}

/* ff00::/8 */
static __always_inline int ipv6_addr_is_multicast(const struct in6_addr *a)
{
	return a->in6_u.u6_addr8[0] == 0xff;
}

#endif
