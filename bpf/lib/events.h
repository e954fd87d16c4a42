/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Verdict events (struct weft_event in the weft_events ring buffer) for the agent's flow
 * observer. A program gathers what it learns about a packet in a struct ev_trace on its stack
 * while it decides (endpoints, identities, the deciding policy entries, conntrack state) and
 * calls ev_emit() once, at its end, with the verdict it returns. ev_emit applies the
 * aggregation level (see weft_abi.h): at the default level an established connection's packets
 * cost one array lookup and nothing else.
 */
#ifndef WEFT_LIB_EVENTS_H
#define WEFT_LIB_EVENTS_H

#include "maps.h"
#include "metrics.h"
#include "flow.h"
#include "identity.h"

struct ev_trace {
	__u32 src_ep_id;
	__u32 dst_ep_id;
	__u32 src_identity; /* 0: not known yet; looked up only if an event is written */
	__u32 dst_identity;
	__u32 egress_cookie;
	__u32 ingress_cookie;
	__u8 verdict;   /* WEFT_VERDICT_*; 0: nothing to report (ARP, NDP, link-local...) */
	__u8 reason;    /* enum weft_metric */
	__u8 flags;     /* WEFT_EV_F_* */
	__u8 direction; /* WEFT_DIR_* */
};

/* Count a drop with its reason (the metric) and note it for the event. */
static __always_inline int ev_drop(struct __sk_buff *skb, struct ev_trace *t, __u32 metric)
{
	metric_inc(metric, skb->len);
	t->verdict = WEFT_VERDICT_DROPPED;
	t->reason = metric;
	return TC_ACT_SHOT;
}

static __always_inline void ev_forward(struct ev_trace *t, __u32 metric)
{
	t->verdict = WEFT_VERDICT_FORWARDED;
	t->reason = metric;
}

static __always_inline __u32 ev_level(void)
{
	__u32 zero = 0;
	struct weft_event_config *cfg = bpf_map_lookup_elem(&weft_event_cfg, &zero);

	return cfg ? cfg->level : WEFT_EV_LEVEL_MEDIUM;
}

static __always_inline void ev_emit(struct __sk_buff *skb, const struct weft_flow *flow, struct ev_trace *t)
{
	struct weft_event *e;
	__u32 level;

	/* Neighbour discovery is link housekeeping, not a flow. */
	if (!t->verdict || flow_is_icmp6_nd(flow))
		return;
	level = ev_level();
	if (level == WEFT_EV_LEVEL_OFF)
		return;
	if (t->verdict != WEFT_VERDICT_DROPPED &&
	    (level == WEFT_EV_LEVEL_DROPS || (level == WEFT_EV_LEVEL_MEDIUM && !(t->flags & WEFT_EV_F_REPORT))))
		return;
	e = bpf_ringbuf_reserve(&weft_events, sizeof(*e), 0);
	if (!e) {
		metric_inc(WEFT_M_EVENTS_LOST, 0);
		return;
	}
	e->version = WEFT_EVENT_VERSION;
	e->verdict = t->verdict;
	e->reason = t->reason;
	e->flags = t->flags;
	e->family = flow->key.family;
	e->proto = flow->key.proto;
	e->tcp_flags = flow->tcp_flags;
	e->direction = t->direction;
	__builtin_memcpy(e->saddr, flow->key.saddr, 16);
	__builtin_memcpy(e->daddr, flow->key.daddr, 16);
	e->sport = flow->key.sport;
	e->dport = flow->key.dport;
	e->policy_port = flow->policy_port;
	e->pad = 0;
	e->ifindex = skb->ifindex;
	e->src_ep_id = t->src_ep_id;
	e->dst_ep_id = t->dst_ep_id;
	/* Peers that are not local endpoints: their identity only now, when it is reported. */
	e->src_identity = t->src_identity ? t->src_identity
		: (flow->key.family ? ipcache_identity(flow->key.family, flow->key.saddr) : 0);
	e->dst_identity = t->dst_identity ? t->dst_identity
		: (flow->key.family ? ipcache_identity(flow->key.family, flow->key.daddr) : 0);
	e->egress_cookie = t->egress_cookie;
	e->ingress_cookie = t->ingress_cookie;
	e->pkt_len = skb->len;
	e->ts_ns = bpf_ktime_get_ns();
	bpf_ringbuf_submit(e, 0);
}

#endif
