/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The pod's gateway for IPv4. A pod has a /32 address and routes everything via a gateway
 * address that exists nowhere: every ARP request the pod sends (for any address but its own)
 * is answered with the host-side veth's MAC, so all of the pod's traffic is addressed to the
 * host veth and reaches from_container. No address or proxy_arp is needed in the node's netns.
 */
#ifndef WEFT_LIB_ARP_H
#define WEFT_LIB_ARP_H

#include "endpoints.h"
#include "eth.h"
#include "metrics.h"

/* An Ethernet/IPv4 ARP packet (struct arphdr stops before the addresses). */
struct arp_eth {
	struct arphdr hdr;
	__u8 sha[ETH_ALEN];
	__u8 sip[4];
	__u8 tha[ETH_ALEN];
	__u8 tip[4];
} __attribute__((packed));

/*
 * Returns a tc verdict. The reply is written over the request (same length) and sent back out
 * of the interface it came in on, so the pod receives it as if the gateway had answered.
 */
static __always_inline int arp_respond(struct __sk_buff *skb)
{
	struct ethhdr *eth = PKT_DATA(skb);
	struct arp_eth *arp = PKT_DATA(skb) + WEFT_ETH_HLEN;
	const struct weft_ep_value *own, *gw;
	__be32 sip, tip;

	if ((void *)(arp + 1) > PKT_END(skb)) {
		metric_inc(WEFT_M_DROP_INVALID, skb->len);
		return TC_ACT_SHOT;
	}
	/* Replies (the pod answering the node) and non-Ethernet/IPv4 ARP are the stack's business. */
	if (arp->hdr.ar_op != bpf_htons(ARPOP_REQUEST) || arp->hdr.ar_hrd != bpf_htons(ARPHRD_ETHER) ||
	    arp->hdr.ar_pro != bpf_htons(ETH_P_IP) || arp->hdr.ar_hln != ETH_ALEN || arp->hdr.ar_pln != 4)
		goto pass;
	__builtin_memcpy(&sip, arp->sip, 4);
	__builtin_memcpy(&tip, arp->tip, 4);
	/* Sender 0.0.0.0 is an address probe (RFC 5227) and sender == target an announcement:
	 * answering either would make the pod believe its address is taken. */
	if (sip == 0 || sip == tip)
		goto pass;
	/* The pod asking for one of its own addresses is a conflict check too. */
	own = ep_lookup_v4(tip);
	if (ep_on_ifindex(own, skb->ifindex))
		goto pass;
	/* The host MAC to answer with comes from the endpoint registered for this interface. */
	gw = ep_of_ifindex(skb->ifindex);
	if (!gw) {
		/* Interface not registered (yet): fall back to the sender's endpoint entry, which
		 * carries the same host MAC, but only if the sender really is behind this interface. */
		gw = ep_lookup_v4(sip);
		if (!ep_on_ifindex(gw, skb->ifindex))
			goto pass;
	}

	arp->hdr.ar_op = bpf_htons(ARPOP_REPLY);
	mac_copy(arp->tha, arp->sha);
	__builtin_memcpy(arp->tip, &sip, 4);
	mac_copy(arp->sha, gw->host_mac);
	__builtin_memcpy(arp->sip, &tip, 4);
	eth_reply(eth, gw->host_mac);
	metric_inc(WEFT_M_ARP_REPLY, skb->len);
	/* From tc ingress, a redirect without BPF_F_INGRESS transmits out of the same veth: the
	 * pod receives the reply. */
	return bpf_redirect(skb->ifindex, 0);
pass:
	metric_inc(WEFT_M_OTHER, skb->len);
	return TC_ACT_OK;
}

#endif
