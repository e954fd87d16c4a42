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
#include "events.h"

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

/* Refresh an entry; returns whether the packet is worth an event at the default level: the
 * connection's first reply, or a TCP flag (WEFT_EV_REPORT_TCP_FLAGS) new in its direction. */
static __always_inline int ct_touch(struct weft_ct_value *v, const struct weft_flow *flow, __u32 len, __u32 flags)
{
	__u8 seen_now = flow->tcp_flags & WEFT_EV_REPORT_TCP_FLAGS;
	int report = 0;

	v->last_seen_ns = bpf_ktime_get_ns();
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, len);
	if (flags & WEFT_CT_F_REPLY_SEEN) {
		report = !(v->flags & WEFT_CT_F_REPLY_SEEN);
		if ((v->rx_flags_seen | seen_now) != v->rx_flags_seen) {
			v->rx_flags_seen |= seen_now; /* a racing CPU at worst reports it twice */
			report = 1;
		}
	} else if ((v->tx_flags_seen | seen_now) != v->tx_flags_seen) {
		v->tx_flags_seen |= seen_now;
		report = 1;
	}
	if (flow->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		flags |= WEFT_CT_F_CLOSING;
	if (flags && (v->flags & flags) != flags)
		v->flags |= flags;
	return report;
}

/* The packet's connection state; `t` learns whether it is a reply and whether it is worth an
 * event (a new connection is: the caller decides whether it opens one). */
static __always_inline enum ct_status ct_lookup(struct __sk_buff *skb, const struct weft_flow *flow,
						struct ev_trace *t)
{
	struct weft_ct_key rev = {};
	struct weft_ct_value *v;

	v = bpf_map_lookup_elem(&weft_ct, &flow->key);
	if (v) {
		if (ct_touch(v, flow, skb->len, 0))
			t->flags |= WEFT_EV_F_REPORT;
		return CT_ESTABLISHED;
	}
	ct_reverse(&flow->key, &rev);
	v = bpf_map_lookup_elem(&weft_ct, &rev);
	if (v) {
		t->flags |= WEFT_EV_F_REPLY;
		if (ct_touch(v, flow, skb->len, WEFT_CT_F_REPLY_SEEN))
			t->flags |= WEFT_EV_F_REPORT;
		metric_inc(WEFT_M_CT_REPLY, skb->len);
		return CT_REPLY;
	}
	if (flow->icmp_error) {
		/* The error's inner packet went out in a connection's forward or reply direction.
		 * Errors are rare and say something about the connection: always reported. */
		if (bpf_map_lookup_elem(&weft_ct, &flow->inner)) {
			t->flags |= WEFT_EV_F_RELATED | WEFT_EV_F_REPORT;
			metric_inc(WEFT_M_CT_RELATED, skb->len);
			return CT_RELATED;
		}
		ct_reverse(&flow->inner, &rev);
		if (bpf_map_lookup_elem(&weft_ct, &rev)) {
			t->flags |= WEFT_EV_F_RELATED | WEFT_EV_F_REPORT;
			metric_inc(WEFT_M_CT_RELATED, skb->len);
			return CT_RELATED;
		}
	}
	/* No connection yet: reported (one that opens nothing is reported every time). */
	t->flags |= WEFT_EV_F_CT_NEW | WEFT_EV_F_REPORT;
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
	v.tx_flags_seen = flow->tcp_flags & WEFT_EV_REPORT_TCP_FLAGS;
	bpf_map_update_elem(&weft_ct, &flow->key, &v, BPF_NOEXIST);
	metric_inc(WEFT_M_CT_NEW, skb->len);
}

#endif
