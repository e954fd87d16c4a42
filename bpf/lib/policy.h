/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Where network policy plugs in. Today every packet is allowed; the hooks exist so that the
 * enforcement points are fixed now:
 *  - policy_egress: in from_container, for every IP packet a pod sends, after the source check.
 *  - policy_ingress: for every packet delivered to a pod. That is twice: in to_container (what
 *    the node's stack sends) and in from_container before bpf_redirect_peer, because a
 *    redirect to the peer skips the destination veth's tc egress, so to_container never sees
 *    pod-to-pod traffic on the same node.
 * Both return TC_ACT_OK to allow or TC_ACT_SHOT to drop.
 */
#ifndef WEFT_LIB_POLICY_H
#define WEFT_LIB_POLICY_H

#include "common.h"

static __always_inline int policy_egress(struct __sk_buff *skb, const struct weft_ep_value *src)
{
	return TC_ACT_OK;
}

/* `src` is NULL when the sender is not a local endpoint (the node, or a remote pod); `dst` is
 * NULL in to_container, which has not looked it up yet. */
static __always_inline int policy_ingress(struct __sk_buff *skb, const struct weft_ep_value *src,
					  const struct weft_ep_value *dst)
{
	return TC_ACT_OK;
}

#endif
