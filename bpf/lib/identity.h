/* SPDX-License-Identifier: Apache-2.0 */
/* The security identity of a peer address: a local endpoint's own, else the ipcache's, else world. */
#ifndef WEFT_LIB_IDENTITY_H
#define WEFT_LIB_IDENTITY_H

#include "maps.h"

#define WEFT_ID_HOST 1
#define WEFT_ID_WORLD 2

/* The longest-prefix key of one address, for weft_ipcache and weft_tunnel (key zeroed first:
 * LPM keys are compared bit by bit, padding included). */
static __always_inline void lpm_address_key(struct weft_ipcache_key *key, __u8 family, const __u8 *addr)
{
	key->prefixlen = 32 + (family == WEFT_FAMILY_V4 ? 32 : 128);
	key->family = family;
	if (family == WEFT_FAMILY_V4)
		__builtin_memcpy(key->addr, addr, 4);
	else
		__builtin_memcpy(key->addr, addr, 16);
}

static __always_inline __u32 ipcache_identity(__u8 family, const __u8 *addr)
{
	struct weft_ipcache_key key = {};
	struct weft_ipcache_value *v;

	lpm_address_key(&key, family, addr);
	v = bpf_map_lookup_elem(&weft_ipcache, &key);
	return v ? v->identity : WEFT_ID_WORLD;
}

#endif
