/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Policy enforcement. An endpoint enforces a direction only when its WEFT_EP_F_*_ENFORCED flag
 * is set (some policy selects it there); then a packet passes only if an entry allows it and
 * no entry denies it. Two longest-prefix lookups per direction: the peer's identity and
 * "any peer" (0); a deny from either wins, as deny rules always do.
 */
#ifndef WEFT_LIB_POLICY_H
#define WEFT_LIB_POLICY_H

#include "maps.h"
#include "metrics.h"
#include "flow.h"
#include "events.h"

enum policy_verdict {
	POLICY_ALLOW = 0,
	POLICY_NO_MATCH = 1, /* default deny: nothing allows it */
	POLICY_DENY = 2,     /* an explicit deny rule matched */
};

/* *cookie: the deciding entry's cookie (which rules it came from), for the verdict event. */
static __always_inline enum policy_verdict policy_lookup(__u32 ep_id, __u32 identity, __u8 direction,
							 const struct weft_flow *flow, __u16 *proxy_port, __u32 *cookie)
{
	struct weft_policy_key key = {};
	struct weft_policy_value *peer, *any;

	key.prefixlen = 96;
	key.ep_id = ep_id;
	key.identity = identity;
	key.direction = direction;
	key.proto = flow->key.proto;
	key.dport = bpf_htons(flow->policy_port);
	peer = bpf_map_lookup_elem(&weft_policy, &key);
	key.identity = 0;
	any = bpf_map_lookup_elem(&weft_policy, &key);
	if ((peer && peer->deny) || (any && any->deny)) {
		*cookie = (peer && peer->deny) ? peer->cookie : any->cookie;
		return POLICY_DENY;
	}
	/* A DNS rule on the port sends the packet to the proxy whichever entry carries it, as
	 * Cilium's redirects take precedence over plain allows that cover the same traffic. */
	if (peer && peer->proxy_port)
		*proxy_port = peer->proxy_port;
	else if (any && any->proxy_port)
		*proxy_port = any->proxy_port;
	if (peer)
		*cookie = peer->cookie;
	else if (any)
		*cookie = any->cookie;
	return (peer || any) ? POLICY_ALLOW : POLICY_NO_MATCH;
}

/*
 * toFQDNs: the addresses the DNS proxy learned for this endpoint, each with the FQDN selectors
 * (identities of their own) whose names resolved to it. A slot opens new connections until it
 * expires; packets of a connection already tracked pass while the proxy keeps the entry.
 */
static __always_inline enum policy_verdict fqdn_lookup(__u32 ep_id, const struct weft_flow *flow, int ct_new,
						       __u32 *cookie)
{
	struct weft_fqdn_key key = {};
	struct weft_fqdn_value *v;
	__u16 ignored_port = 0;
	__u64 now;
	int i;

	key.ep_id = ep_id;
	key.family = flow->key.family;
	__builtin_memcpy(key.addr, flow->key.daddr, 16);
	v = bpf_map_lookup_elem(&weft_fqdn, &key);
	if (!v)
		return POLICY_NO_MATCH;
	now = bpf_ktime_get_ns();
#pragma unroll
	for (i = 0; i < WEFT_FQDN_SLOTS; i++) {
		__u32 sel = v->slots[i].selector_identity;

		if (!sel || (ct_new && v->slots[i].expires_ns < now))
			continue;
		if (policy_lookup(ep_id, sel, WEFT_DIR_EGRESS, flow, &ignored_port, cookie) == POLICY_ALLOW)
			return POLICY_ALLOW;
	}
	return POLICY_NO_MATCH;
}

/* The verdict of `ep` (a local endpoint) for a packet in `direction` to or from `peer_identity`.
 * Returns TC_ACT_OK, or TC_ACT_SHOT after counting the drop with its reason. *proxy_port is set
 * when an allowing entry asks for the packet to go to the DNS proxy. `t` learns the deciding
 * entry's cookie and, on a drop, its reason and direction. */
static __always_inline int policy_enforce(struct __sk_buff *skb, const struct weft_ep_value *ep, __u32 peer_identity,
					  __u8 direction, const struct weft_flow *flow, int ct_status_new,
					  __u16 *proxy_port, struct ev_trace *t)
{
	__u32 flag = direction == WEFT_DIR_INGRESS ? WEFT_EP_F_INGRESS_ENFORCED : WEFT_EP_F_EGRESS_ENFORCED;
	__u32 *cookie = direction == WEFT_DIR_INGRESS ? &t->ingress_cookie : &t->egress_cookie;
	enum policy_verdict verdict;

	if (!(ep->flags & flag)) {
		/* Not selected by any allow policy in this direction: allowed, but an explicit deny
		 * still applies (deny rules select endpoints too). Endpoints without deny entries
		 * skip the lookups: no policy, no per-packet cost. */
		if (!(ep->flags & WEFT_EP_F_HAS_DENY) ||
		    policy_lookup(ep->ep_id, peer_identity, direction, flow, proxy_port, cookie) != POLICY_DENY)
			return TC_ACT_OK;
		t->direction = direction;
		return ev_drop(skb, t, WEFT_M_DROP_POLICY_DENY);
	}
	t->flags |= WEFT_EV_F_POLICY;
	verdict = policy_lookup(ep->ep_id, peer_identity, direction, flow, proxy_port, cookie);
	if (verdict == POLICY_ALLOW)
		return TC_ACT_OK;
	if (verdict == POLICY_NO_MATCH && direction == WEFT_DIR_EGRESS && (ep->flags & WEFT_EP_F_FQDN) &&
	    fqdn_lookup(ep->ep_id, flow, ct_status_new, cookie) == POLICY_ALLOW) {
		metric_inc(WEFT_M_FQDN_ALLOW, skb->len);
		return TC_ACT_OK;
	}
	t->direction = direction;
	if (verdict == POLICY_DENY)
		return ev_drop(skb, t, WEFT_M_DROP_POLICY_DENY);
	if (ct_status_new && flow->key.proto == IPPROTO_TCP && !(flow->tcp_flags & TCP_FLAG_SYN))
		return ev_drop(skb, t, WEFT_M_DROP_CT_MISSING);
	return ev_drop(skb, t, direction == WEFT_DIR_INGRESS ? WEFT_M_DROP_POLICY_INGRESS : WEFT_M_DROP_POLICY_EGRESS);
}

#endif
