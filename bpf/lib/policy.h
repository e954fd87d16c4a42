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

enum policy_verdict {
	POLICY_ALLOW = 0,
	POLICY_NO_MATCH = 1, /* default deny: nothing allows it */
	POLICY_DENY = 2,     /* an explicit deny rule matched */
};

static __always_inline enum policy_verdict policy_lookup(__u32 ep_id, __u32 identity, __u8 direction,
							 const struct weft_flow *flow)
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
	if ((peer && peer->deny) || (any && any->deny))
		return POLICY_DENY;
	return (peer || any) ? POLICY_ALLOW : POLICY_NO_MATCH;
}

/* The verdict of `ep` (a local endpoint) for a packet in `direction` to or from `peer_identity`.
 * Returns TC_ACT_OK, or TC_ACT_SHOT after counting the drop with its reason. */
static __always_inline int policy_enforce(struct __sk_buff *skb, const struct weft_ep_value *ep, __u32 peer_identity,
					  __u8 direction, const struct weft_flow *flow, int ct_status_new)
{
	__u32 flag = direction == WEFT_DIR_INGRESS ? WEFT_EP_F_INGRESS_ENFORCED : WEFT_EP_F_EGRESS_ENFORCED;
	enum policy_verdict verdict;

	if (!(ep->flags & flag)) {
		/* Not selected by any allow policy in this direction: allowed, but an explicit deny
		 * still applies (deny rules select endpoints too). Endpoints without deny entries
		 * skip the lookups: no policy, no per-packet cost. */
		if (!(ep->flags & WEFT_EP_F_HAS_DENY) ||
		    policy_lookup(ep->ep_id, peer_identity, direction, flow) != POLICY_DENY)
			return TC_ACT_OK;
		metric_inc(WEFT_M_DROP_POLICY_DENY, skb->len);
		return TC_ACT_SHOT;
	}
	verdict = policy_lookup(ep->ep_id, peer_identity, direction, flow);
	if (verdict == POLICY_ALLOW)
		return TC_ACT_OK;
	if (verdict == POLICY_DENY)
		metric_inc(WEFT_M_DROP_POLICY_DENY, skb->len);
	else if (ct_status_new && flow->key.proto == IPPROTO_TCP && !(flow->tcp_flags & TCP_FLAG_SYN))
		metric_inc(WEFT_M_DROP_CT_MISSING, skb->len);
	else
		metric_inc(direction == WEFT_DIR_INGRESS ? WEFT_M_DROP_POLICY_INGRESS : WEFT_M_DROP_POLICY_EGRESS,
			   skb->len);
	return TC_ACT_SHOT;
}

#endif
