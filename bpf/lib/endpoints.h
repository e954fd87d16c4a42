/* SPDX-License-Identifier: Apache-2.0 */
/* Endpoint lookups by address and by host-side interface. */
#ifndef WEFT_LIB_ENDPOINTS_H
#define WEFT_LIB_ENDPOINTS_H

#include "maps.h"

/* Keys are compared byte for byte, so the padding and the unused tail of addr must be zero:
 * the key is built zeroed on the stack and only the address bytes are copied in. */
static __always_inline struct weft_ep_value *ep_lookup_v4(__be32 addr)
{
	struct weft_ep_key key = {};

	key.family = WEFT_FAMILY_V4;
	__builtin_memcpy(key.addr, &addr, 4);
	return bpf_map_lookup_elem(&weft_endpoints, &key);
}

static __always_inline struct weft_ep_value *ep_lookup_v6(const struct in6_addr *addr)
{
	struct weft_ep_key key = {};

	key.family = WEFT_FAMILY_V6;
	__builtin_memcpy(key.addr, addr, 16);
	return bpf_map_lookup_elem(&weft_endpoints, &key);
}

/* The endpoint behind the interface the packet came in on (NULL if the agent has not
 * registered it yet). */
static __always_inline struct weft_ep_value *ep_of_ifindex(__u32 ifindex)
{
	return bpf_map_lookup_elem(&weft_lxc, &ifindex);
}

/* True if `ep` exists and sits behind `ifindex`: the address belongs to the sending pod. */
static __always_inline int ep_on_ifindex(const struct weft_ep_value *ep, __u32 ifindex)
{
	return ep && ep->ifindex == ifindex;
}

#endif
