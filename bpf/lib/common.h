/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Includes, constants and small helpers every weft program uses. UAPI headers only (no
 * vmlinux.h): the programs touch nothing but packet bytes and their own maps, so they need no
 * kernel-internal types and build the same against any kernel's UAPI.
 */
#ifndef WEFT_LIB_COMMON_H
#define WEFT_LIB_COMMON_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_arp.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmpv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "shared/weft_abi.h"

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

/* Our own names for the fixed header lengths: ETH_HLEN is fine, but the v6 one has no UAPI
 * macro and both are used in pointer arithmetic that the verifier must see as constants. */
#define WEFT_ETH_HLEN 14
#define WEFT_IP6_HLEN 40

/* Bounds of the packet as the program sees it. Every helper that may move packet data
 * (bpf_skb_change_tail, bpf_l3_csum_replace, ...) invalidates pointers derived from these,
 * so code re-reads them after such a call instead of caching pointers across it. */
#define PKT_DATA(skb) ((void *)(long)(skb)->data)
#define PKT_END(skb) ((void *)(long)(skb)->data_end)

static __always_inline void mac_copy(__u8 *dst, const __u8 *src)
{
	__builtin_memcpy(dst, src, ETH_ALEN);
}

/* Fold a 32-bit one's-complement partial sum (as returned by bpf_csum_diff) to 16 bits and
 * complement it: the value to store in an Internet checksum field. */
static __always_inline __u16 csum_fold32(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

#endif
