/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Handing a pod's DNS packet to the node's DNS proxy, transparently: the packet keeps its
 * original destination (the proxy reads it back with IP_RECVORIGDSTADDR / getsockname), the
 * proxy's socket is assigned to it here, and the mark makes the node's routing deliver it
 * locally (fwmark rule -> "local default dev lo" table) instead of forwarding it.
 *
 * UDP: every packet is assigned the proxy's socket (reply sockets the proxy binds to original
 * destinations must never receive queries). TCP: the SYN is assigned the proxy's listener; the
 * rest of the connection is found by the stack's own lookup of the accepted socket, whose local
 * address is the original destination.
 */
#ifndef WEFT_LIB_PROXY_H
#define WEFT_LIB_PROXY_H

#include "common.h"
#include "metrics.h"
#include "flow.h"
#include "events.h"

#ifndef BPF_F_CURRENT_NETNS
#define BPF_F_CURRENT_NETNS (-1L)
#endif

static __always_inline int proxy_redirect(struct __sk_buff *skb, const struct weft_flow *flow, __u16 proxy_port,
					  struct ev_trace *t)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	__u32 tuple_len;
	long err;

	skb->mark = (skb->mark & ~WEFT_MARK_MASK) | WEFT_MARK_TO_PROXY;
	t->verdict = WEFT_VERDICT_REDIRECTED;
	t->reason = WEFT_M_REDIRECT_DNS_PROXY;
	if (flow->key.proto == IPPROTO_TCP && !(flow->tcp_flags & TCP_FLAG_SYN && !(flow->tcp_flags & TCP_FLAG_ACK))) {
		metric_inc(WEFT_M_REDIRECT_DNS_PROXY, skb->len);
		return TC_ACT_OK;
	}
	if (flow->key.family == WEFT_FAMILY_V4) {
		__builtin_memcpy(&tuple.ipv4.saddr, flow->key.saddr, 4);
		__builtin_memcpy(&tuple.ipv4.daddr, flow->key.daddr, 4);
		tuple.ipv4.sport = flow->key.sport;
		tuple.ipv4.dport = bpf_htons(proxy_port);
		tuple_len = sizeof(tuple.ipv4);
	} else {
		__builtin_memcpy(tuple.ipv6.saddr, flow->key.saddr, 16);
		__builtin_memcpy(tuple.ipv6.daddr, flow->key.daddr, 16);
		tuple.ipv6.sport = flow->key.sport;
		tuple.ipv6.dport = bpf_htons(proxy_port);
		tuple_len = sizeof(tuple.ipv6);
	}
	if (flow->key.proto == IPPROTO_TCP)
		sk = bpf_skc_lookup_tcp(skb, &tuple, tuple_len, BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_sk_lookup_udp(skb, &tuple, tuple_len, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return ev_drop(skb, t, WEFT_M_DROP_PROXY_DOWN);
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return ev_drop(skb, t, WEFT_M_DROP_PROXY_DOWN);
	metric_inc(WEFT_M_REDIRECT_DNS_PROXY, skb->len);
	return TC_ACT_OK;
}

#endif
