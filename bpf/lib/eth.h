/* SPDX-License-Identifier: Apache-2.0 */
/* Ethernet parsing and L2 rewrites. */
#ifndef WEFT_LIB_ETH_H
#define WEFT_LIB_ETH_H

#include "common.h"

/* The Ethernet header, or NULL if the frame is shorter than one. */
static __always_inline struct ethhdr *eth_hdr(struct __sk_buff *skb)
{
	struct ethhdr *eth = PKT_DATA(skb);

	if ((void *)(eth + 1) > PKT_END(skb))
		return NULL;
	return eth;
}

/* Address a reply to the sender of the frame, from `our_mac`. */
static __always_inline void eth_reply(struct ethhdr *eth, const __u8 *our_mac)
{
	mac_copy(eth->h_dest, eth->h_source);
	mac_copy(eth->h_source, our_mac);
}

#endif
