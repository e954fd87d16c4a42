/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracking. A flow is NEW (no entry either way), ESTABLISHED (its own entry),
 * REPLY (the reversed tuple has an entry) or RELATED (an ICMP error about a tracked flow).
 * Replies and related packets pass without a policy lookup: the connection was allowed when
 * it was opened. The forward direction is checked against policy on every packet, so a policy
 * change that removes an allow takes effect on established connections too (as in Cilium).
 */
#ifndef WEFT_LIB_CONNTRACK_H
#define WEFT_LIB_CONNTRACK_H

#include "maps.h"
#include "metrics.h"
#include "flow.h"

enum ct_status {
	CT_NEW = 0,
	CT_ESTABLISHED = 1,
	CT_REPLY = 2,
	CT_RELATED = 3,
};

static __always_inline void ct_reverse(const struct weft_ct_key *in, struct weft_ct_key *out)
{
	__builtin_memcpy(out->saddr, in->daddr, 16);
	__builtin_memcpy(out->daddr, in->saddr, 16);
	out->sport = in->dport;
	out->dport = in->sport;
	out->proto = in->proto;
	out->family = in->family;
}

static __always_inline void ct_touch(struct weft_ct_value *v, const struct weft_flow *flow, __u32 len, __u32 flags)
{
	v->last_seen_ns = bpf_ktime_get_ns();
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, len);
	if (flow->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		flags |= WEFT_CT_F_CLOSING;
	if (flags && (v->flags & flags) != flags)
		v->flags |= flags;
}

static __always_inline enum ct_status ct_lookup(struct __sk_buff *skb, const struct weft_flow *flow)
{
	struct weft_ct_key rev = {};
	struct weft_ct_value *v;

	v = bpf_map_lookup_elem(&weft_ct, &flow->key);
	if (v) {
		ct_touch(v, flow, skb->len, 0);
		return CT_ESTABLISHED;
	}
	ct_reverse(&flow->key, &rev);
	v = bpf_map_lookup_elem(&weft_ct, &rev);
	if (v) {
		ct_touch(v, flow, skb->len, WEFT_CT_F_REPLY_SEEN);
		metric_inc(WEFT_M_CT_REPLY, skb->len);
		return CT_REPLY;
	}
	if (flow->icmp_error) {
		/* The error's inner packet went out in a connection's forward or reply direction. */
		if (bpf_map_lookup_elem(&weft_ct, &flow->inner)) {
			metric_inc(WEFT_M_CT_RELATED, skb->len);
			return CT_RELATED;
		}
		ct_reverse(&flow->inner, &rev);
		if (bpf_map_lookup_elem(&weft_ct, &rev)) {
			metric_inc(WEFT_M_CT_RELATED, skb->len);
			return CT_RELATED;
		}
	}
	return CT_NEW;
}

static __always_inline void ct_create(struct __sk_buff *skb, const struct weft_flow *flow)
{
	struct weft_ct_value v = {};

	/* ICMP errors open nothing. */
	if (flow->icmp_error)
		return;
	v.created_ns = bpf_ktime_get_ns();
	v.last_seen_ns = v.created_ns;
	v.packets = 1;
	v.bytes = skb->len;
	bpf_map_update_elem(&weft_ct, &flow->key, &v, BPF_NOEXIST);
	metric_inc(WEFT_M_CT_NEW, skb->len);
}

#endif
