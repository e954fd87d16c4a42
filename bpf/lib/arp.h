/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The pod's gateway for IPv4: every ARP request a pod sends (for any address but its own) is
 * answered with the host-side veth's MAC, so all of the pod's traffic reaches the datapath.
 */
#ifndef WEFT_LIB_ARP_H
#define WEFT_LIB_ARP_H

#include "metrics.h"

struct arp_eth {
	struct arphdr hdr;
	__u8 sha[ETH_ALEN];
	__u8 sip[4];
	__u8 tha[ETH_ALEN];
	__u8 tip[4];
} __attribute__((packed));

static __always_inline int handle_arp(struct __sk_buff *skb, const struct weft_ep_value *self)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct arp_eth *arp = data + WEFT_ETH_HLEN;
	__u8 sender_ip[4], target_ip[4];

	if ((void *)(arp + 1) > data_end) {
		metric_inc(WEFT_M_DROP_INVALID, skb->len);
		return TC_ACT_SHOT;
	}
	if (arp->hdr.ar_op != bpf_htons(ARPOP_REQUEST) || arp->hdr.ar_hrd != bpf_htons(ARPHRD_ETHER) ||
	    arp->hdr.ar_pro != bpf_htons(ETH_P_IP) || arp->hdr.ar_hln != ETH_ALEN || arp->hdr.ar_pln != 4) {
		metric_inc(WEFT_M_OTHER, skb->len);
		return TC_ACT_OK;
	}
	__builtin_memcpy(sender_ip, arp->sip, 4);
	__builtin_memcpy(target_ip, arp->tip, 4);
	/* A gratuitous ARP announces the pod's own address: nothing to answer. */
	if (*(__u32 *)sender_ip == *(__u32 *)target_ip) {
		metric_inc(WEFT_M_OTHER, skb->len);
		return TC_ACT_OK;
	}
	arp->hdr.ar_op = bpf_htons(ARPOP_REPLY);
	mac_copy(arp->tha, arp->sha);
	__builtin_memcpy(arp->tip, sender_ip, 4);
	mac_copy(arp->sha, self->host_mac);
	__builtin_memcpy(arp->sip, target_ip, 4);
	mac_copy(eth->h_dest, eth->h_source);
	mac_copy(eth->h_source, self->host_mac);
	metric_inc(WEFT_M_ARP_REPLY, skb->len);
	/* Back out of the host veth: the pod receives the reply. */
	return bpf_redirect(skb->ifindex, 0);
}

#endif
