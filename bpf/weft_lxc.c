/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Programs attached to the host side of every pod's veth (tc clsact, direct action):
 *
 *   from_container (ingress: what the pod sends)
 *     - ARP requests and IPv6 neighbour solicitations are answered with the host veth's MAC:
 *       the datapath is the pod's gateway, the node's netns needs no gateway address.
 *     - IPv4/IPv6: the source address must be one of this interface's endpoint addresses
 *       (anti-spoofing); a destination that is a local endpoint is delivered with
 *       bpf_redirect_peer straight into that pod's netns, so the node's IP stack never sees the
 *       packet (no forwarding sysctl, no routes, no neighbour entries involved).
 *     - A packet that policy hands to the DNS proxy (a toPorts rule with DNS rules) gets the
 *       proxy's socket assigned and goes up the node's stack to it (lib/proxy.h).
 *     - Everything else continues into the node's stack.
 *     - A destination in another node's pod prefix (weft_tunnel) is encapsulated by the node's
 *       VXLAN device with the sender's identity as the VNI, or (direct mode) routed by the
 *       datapath with a FIB lookup and bpf_redirect_neigh (lib/overlay.h).
 *   to_container (egress: what the node's stack sends to the pod)
 *     - Counted; ingress policy hooks in here (see lib/policy.h).
 *   from_overlay (ingress of the node's collect-metadata VXLAN device)
 *     - Decapsulated packets for a local pod: its ingress policy, judged by the identity the
 *       tunnel key carries, then bpf_redirect_peer as for a same-node packet.
 *   from_netdev (ingress of the node's underlay device, direct-routing mode)
 *     - Packets routed to a local pod: its ingress policy (the ipcache's identity of the
 *       source), then bpf_redirect_peer.
 *
 * Each program reports its verdict for a packet with one ev_emit() at its end (lib/events.h):
 * the functions below note what they decide in a struct ev_trace.
 *
 * Maps are in lib/maps.h; every struct shared with Python is in include/shared/weft_abi.h.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/endpoints.h"
#include "lib/eth.h"
#include "lib/ipv4.h"
#include "lib/ipv6.h"
#include "lib/arp.h"
#include "lib/ndp.h"
#include "lib/flow.h"
#include "lib/identity.h"
#include "lib/conntrack.h"
#include "lib/policy.h"
#include "lib/proxy.h"
#include "lib/overlay.h"
#include "lib/events.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/*
 * Policy for a packet a pod sends: connection tracking first (replies and related ICMP pass),
 * then the source's egress policy and, when the destination is a pod of this node, its ingress
 * policy too (redirect_peer skips the destination veth's hooks, so it is enforced here).
 * A packet both sides allow opens (or refreshes) a tracked connection.
 */
static __always_inline int enforce_from_container(struct __sk_buff *skb, const struct weft_ep_value *src,
						  const struct weft_ep_value *dst, struct weft_flow *flow,
						  __u16 *proxy_port, struct ev_trace *t)
{
	enum ct_status status = ct_lookup(skb, flow, t);
	__u16 ignored_port = 0;
	__u32 dst_identity;
	int verdict;

	/* A reply leaving the pod belongs to a connection that came in. */
	t->direction = status == CT_REPLY ? WEFT_DIR_INGRESS : WEFT_DIR_EGRESS;
	if (status == CT_REPLY || status == CT_RELATED)
		return TC_ACT_OK;
	if (flow_is_icmp6_nd(flow))
		return TC_ACT_OK;
	dst_identity = dst ? dst->identity : ipcache_identity(flow->key.family, flow->key.daddr);
	t->dst_identity = dst_identity;
	verdict = policy_enforce(skb, src, dst_identity, WEFT_DIR_EGRESS, flow, status == CT_NEW, proxy_port, t);
	if (verdict != TC_ACT_OK)
		return verdict;
	/* A packet for the DNS proxy never reaches the destination pod: the proxy's own query
	 * does, and that one meets the pod's ingress policy on its way. */
	if (!*proxy_port && dst && (dst->flags & WEFT_EP_F_LOCAL)) {
		verdict = policy_enforce(skb, dst, src->identity, WEFT_DIR_INGRESS, flow, status == CT_NEW,
					 &ignored_port, t);
		if (verdict != TC_ACT_OK)
			return verdict;
	}
	if (status == CT_NEW)
		ct_create(skb, flow);
	return TC_ACT_OK;
}

/*
 * Hand the packet to a pod on this node: L2 addressed as if the pod's gateway (its host veth)
 * had sent it, then redirected into the pod's netns. Called after the L3 header was changed
 * (TTL/hop limit), so packet pointers are re-derived here.
 */
static __always_inline int deliver_local(struct __sk_buff *skb, const struct weft_ep_value *dst, __u32 metric,
					 struct ev_trace *t)
{
	struct ethhdr *eth;

	eth = eth_hdr(skb);
	if (!eth)
		return ev_drop(skb, t, WEFT_M_DROP_INVALID);
	mac_copy(eth->h_dest, dst->pod_mac);
	mac_copy(eth->h_source, dst->host_mac);
	metric_inc(metric, skb->len);
	ev_forward(t, metric);
	/* dst->ifindex is the destination's host veth; redirect_peer enters at its peer (the
	 * pod's eth0) ingress, skipping a pass through the node's backlog queue. */
	return bpf_redirect_peer(dst->ifindex, 0);
}

static __always_inline int from_container_v4(struct __sk_buff *skb, struct weft_flow *flow, struct ev_trace *t)
{
	const struct weft_ep_value *src, *dst;
	struct iphdr *ip = ipv4_hdr(skb);
	__u16 proxy_port = 0;
	int verdict;

	if (!ip)
		return ev_drop(skb, t, WEFT_M_DROP_INVALID);
	/* A source of 0.0.0.0 (DHCP discovery and the like) proves nothing about the pod and can
	 * be routed nowhere: let the stack judge it. */
	if (ip->saddr == 0) {
		metric_inc(WEFT_M_OTHER, skb->len);
		return TC_ACT_OK;
	}
	/* The tuple first, so that a spoofed packet's drop event says what it was. */
	if (flow_v4(skb, ip, flow) < 0)
		return ev_drop(skb, t, WEFT_M_DROP_INVALID);
	src = ep_lookup_v4(ip->saddr);
	if (!ep_on_ifindex(src, skb->ifindex))
		return ev_drop(skb, t, WEFT_M_DROP_SPOOF);
	dst = ep_lookup_v4(ip->daddr);
	t->src_ep_id = src->ep_id;
	t->src_identity = src->identity;
	t->dst_ep_id = dst ? dst->ep_id : 0;
	t->dst_identity = dst ? dst->identity : 0;
	verdict = enforce_from_container(skb, src, dst, flow, &proxy_port, t);
	if (verdict != TC_ACT_OK)
		return verdict;
	if (proxy_port)
		return proxy_redirect(skb, flow, proxy_port, t);
	/* Policy code may not move packet data, but the pointer is re-derived to be sure. */
	ip = ipv4_hdr(skb);
	if (!ip)
		return ev_drop(skb, t, WEFT_M_DROP_INVALID);
	/* A pod of another node: through the overlay, carrying the sender's identity. */
	if ((!dst || !(dst->flags & WEFT_EP_F_LOCAL)) && ip->ttl > 1) {
		const struct weft_tunnel_value *tun = tunnel_lookup(WEFT_FAMILY_V4, flow->key.daddr);

		if (tun) {
			if (ipv4_dec_ttl(skb, ip) < 0)
				return ev_drop(skb, t, WEFT_M_DROP_INVALID);
			if (tun->mode == WEFT_ROUTE_VXLAN)
				return overlay_redirect(skb, tun, src->identity, WEFT_M_TO_OVERLAY_V4, t);
			verdict = route_direct(skb, flow, WEFT_M_ROUTED_V4, t);
			if (verdict >= 0)
				return verdict;
			/* No route: the stack gets it (TTL already spent, as a router would have). */
			metric_inc(WEFT_M_TO_STACK_V4, skb->len);
			ev_forward(t, WEFT_M_TO_STACK_V4);
			return TC_ACT_OK;
		}
	}
	/* With TTL 1 the packet must die here with an ICMP time-exceeded: only the stack sends
	 * those, so it gets the packet. */
	if (!dst || !(dst->flags & WEFT_EP_F_LOCAL) || ip->ttl <= 1) {
		metric_inc(WEFT_M_TO_STACK_V4, skb->len);
		ev_forward(t, WEFT_M_TO_STACK_V4);
		return TC_ACT_OK;
	}
	if (ipv4_dec_ttl(skb, ip) < 0)
		return ev_drop(skb, t, WEFT_M_DROP_INVALID);
	return deliver_local(skb, dst, WEFT_M_FWD_PEER_V4, t);
}

static __always_inline int from_container_v6(struct __sk_buff *skb, struct weft_flow *flow, struct ev_trace *t)
{
	const struct weft_ep_value *src, *dst;
	struct ipv6hdr *ip6 = ipv6_hdr(skb);
	__u16 proxy_port = 0;
	int verdict;

	if (!ip6)
		return ev_drop(skb, t, WEFT_M_DROP_INVALID);
	if (ip6->nexthdr == IPPROTO_ICMPV6) {
		verdict = ndp_respond(skb);
		if (verdict >= 0)
			return verdict;
		/* Not answered. ndp_respond resizes the packet only on paths that answer, but
		 * re-deriving the pointer keeps this code correct whatever it does in future. */
		ip6 = ipv6_hdr(skb);
		if (!ip6)
			return ev_drop(skb, t, WEFT_M_DROP_INVALID);
	}
	/* Link-local (router solicitations, MLD, NUD from fe80::) and unspecified sources (DAD)
	 * never leave the link: they carry no identity to check and go to the stack. */
	if (ipv6_addr_is_link_local(&ip6->saddr) || ipv6_addr_is_unspec(&ip6->saddr)) {
		metric_inc(WEFT_M_OTHER, skb->len);
		return TC_ACT_OK;
	}
	if (flow_v6(skb, ip6, flow) < 0)
		return ev_drop(skb, t, WEFT_M_DROP_INVALID);
	src = ep_lookup_v6(&ip6->saddr);
	if (!ep_on_ifindex(src, skb->ifindex))
		return ev_drop(skb, t, WEFT_M_DROP_SPOOF);
	dst = ep_lookup_v6(&ip6->daddr);
	t->src_ep_id = src->ep_id;
	t->src_identity = src->identity;
	t->dst_ep_id = dst ? dst->ep_id : 0;
	t->dst_identity = dst ? dst->identity : 0;
	verdict = enforce_from_container(skb, src, dst, flow, &proxy_port, t);
	if (verdict != TC_ACT_OK)
		return verdict;
	if (proxy_port)
		return proxy_redirect(skb, flow, proxy_port, t);
	ip6 = ipv6_hdr(skb);
	if (!ip6)
		return ev_drop(skb, t, WEFT_M_DROP_INVALID);
	if ((!dst || !(dst->flags & WEFT_EP_F_LOCAL)) && ip6->hop_limit > 1) {
		const struct weft_tunnel_value *tun = tunnel_lookup(WEFT_FAMILY_V6, flow->key.daddr);

		if (tun) {
			ip6->hop_limit--;
			if (tun->mode == WEFT_ROUTE_VXLAN)
				return overlay_redirect(skb, tun, src->identity, WEFT_M_TO_OVERLAY_V6, t);
			verdict = route_direct(skb, flow, WEFT_M_ROUTED_V6, t);
			if (verdict >= 0)
				return verdict;
			metric_inc(WEFT_M_TO_STACK_V6, skb->len);
			ev_forward(t, WEFT_M_TO_STACK_V6);
			return TC_ACT_OK;
		}
	}
	if (!dst || !(dst->flags & WEFT_EP_F_LOCAL) || ip6->hop_limit <= 1) {
		metric_inc(WEFT_M_TO_STACK_V6, skb->len);
		ev_forward(t, WEFT_M_TO_STACK_V6);
		return TC_ACT_OK;
	}
	/* No header checksum in IPv6, and the hop limit is not in any upper-layer pseudo-header. */
	ip6->hop_limit--;
	return deliver_local(skb, dst, WEFT_M_FWD_PEER_V6, t);
}

SEC("tc")
int from_container(struct __sk_buff *skb)
{
	struct ethhdr *eth = eth_hdr(skb);
	struct weft_flow flow = {};
	struct ev_trace trace = {};
	int verdict;

	if (!eth) {
		metric_inc(WEFT_M_DROP_INVALID, skb->len);
		return TC_ACT_SHOT;
	}
	switch (eth->h_proto) {
	case bpf_htons(ETH_P_ARP):
		return arp_respond(skb);
	case bpf_htons(ETH_P_IP):
		verdict = from_container_v4(skb, &flow, &trace);
		break;
	case bpf_htons(ETH_P_IPV6):
		verdict = from_container_v6(skb, &flow, &trace);
		break;
	default:
		metric_inc(WEFT_M_OTHER, skb->len);
		return TC_ACT_OK;
	}
	ev_emit(skb, &flow, &trace);
	return verdict;
}

/*
 * Ingress policy of local endpoint `dst` for a packet from a peer of identity `src_identity`
 * (whose identity is computed only when needed: 0 = look it up in the ipcache).
 */
static __always_inline int enforce_ingress(struct __sk_buff *skb, const struct weft_ep_value *dst, __u32 src_identity,
					   __u32 metric, struct weft_flow *flow, struct ev_trace *t)
{
	__u16 ignored_port = 0;
	enum ct_status status;
	int verdict;

	t->flags |= WEFT_EV_F_TO_ENDPOINT;
	t->dst_ep_id = dst->ep_id;
	t->dst_identity = dst->identity;
	t->verdict = WEFT_VERDICT_FORWARDED;
	t->reason = metric;
	status = ct_lookup(skb, flow, t);
	/* A reply entering the pod belongs to a connection the pod opened. */
	t->direction = status == CT_REPLY ? WEFT_DIR_EGRESS : WEFT_DIR_INGRESS;
	if (src_identity)
		t->src_identity = src_identity;
	if (status == CT_REPLY || status == CT_RELATED || flow_is_icmp6_nd(flow))
		return TC_ACT_OK;
	if (!src_identity)
		t->src_identity = ipcache_identity(flow->key.family, flow->key.saddr);
	verdict = policy_enforce(skb, dst, t->src_identity, WEFT_DIR_INGRESS, flow, status == CT_NEW, &ignored_port, t);
	if (verdict != TC_ACT_OK)
		return verdict;
	if (status == CT_NEW)
		ct_create(skb, flow);
	return TC_ACT_OK;
}

/*
 * Ingress policy for what the node's stack sends to a pod (the node itself, or peers routed
 * through it). The destination is the endpoint behind this interface; the peer's identity
 * comes from the ipcache (host, CIDR identities) or is world.
 */
static __always_inline int enforce_to_container(struct __sk_buff *skb, struct weft_flow *flow, struct ev_trace *t)
{
	const struct weft_ep_value *dst;

	dst = ep_of_ifindex(skb->ifindex);
	if (!dst)
		return TC_ACT_OK; /* not (yet) an endpoint: nothing to enforce, nothing to report */
	return enforce_ingress(skb, dst, 0, flow->key.family == WEFT_FAMILY_V4 ? WEFT_M_TO_POD_V4 : WEFT_M_TO_POD_V6,
			       flow, t);
}

SEC("tc")
int to_container(struct __sk_buff *skb)
{
	struct ethhdr *eth = eth_hdr(skb);
	struct weft_flow flow = {};
	struct ev_trace trace = {};
	struct ipv6hdr *ip6;
	struct iphdr *ip;
	__u32 metric;
	int verdict;

	if (!eth)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		metric = WEFT_M_TO_POD_V4;
		ip = ipv4_hdr(skb);
		if (!ip || flow_v4(skb, ip, &flow) < 0) {
			metric_inc(WEFT_M_DROP_INVALID, skb->len);
			return TC_ACT_SHOT;
		}
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		metric = WEFT_M_TO_POD_V6;
		ip6 = ipv6_hdr(skb);
		if (!ip6 || flow_v6(skb, ip6, &flow) < 0) {
			metric_inc(WEFT_M_DROP_INVALID, skb->len);
			return TC_ACT_SHOT;
		}
		/* The datapath's own neighbour advertisements and the node's link-local traffic
		 * (NDP, MLD) keep the link working; they carry no identity. */
		if (ipv6_addr_is_link_local((struct in6_addr *)flow.key.saddr) ||
		    ipv6_addr_is_unspec((struct in6_addr *)flow.key.saddr) || flow_is_icmp6_nd(&flow)) {
			metric_inc(metric, skb->len);
			return TC_ACT_OK;
		}
	} else {
		return TC_ACT_OK; /* ARP and the like: link housekeeping, not policy's concern */
	}
	verdict = enforce_to_container(skb, &flow, &trace);
	ev_emit(skb, &flow, &trace);
	if (verdict != TC_ACT_OK)
		return verdict;
	metric_inc(metric, skb->len);
	return TC_ACT_OK;
}

/*
 * A packet from another node for a local pod (from_overlay, from_netdev): the pod's ingress
 * policy, judged by `src_identity` (0: the ipcache's word for the source address), then
 * bpf_redirect_peer as for a same-node packet. Anything else (the node's own addresses)
 * continues into the node's stack.
 */
static __always_inline int from_node_v4(struct __sk_buff *skb, __u32 src_identity, __u32 metric,
					struct weft_flow *flow, struct ev_trace *t)
{
	const struct weft_ep_value *dst;
	struct iphdr *ip = ipv4_hdr(skb);
	int verdict;

	if (!ip || flow_v4(skb, ip, flow) < 0)
		return ev_drop(skb, t, WEFT_M_DROP_INVALID);
	dst = ep_lookup_v4(ip->daddr);
	if (!dst || !(dst->flags & WEFT_EP_F_LOCAL) || ip->ttl <= 1)
		return TC_ACT_OK;
	verdict = enforce_ingress(skb, dst, src_identity, metric, flow, t);
	if (verdict != TC_ACT_OK)
		return verdict;
	ip = ipv4_hdr(skb);
	if (!ip || ipv4_dec_ttl(skb, ip) < 0)
		return ev_drop(skb, t, WEFT_M_DROP_INVALID);
	return deliver_local(skb, dst, metric, t);
}

static __always_inline int from_node_v6(struct __sk_buff *skb, __u32 src_identity, __u32 metric,
					struct weft_flow *flow, struct ev_trace *t)
{
	const struct weft_ep_value *dst;
	struct ipv6hdr *ip6 = ipv6_hdr(skb);
	int verdict;

	if (!ip6 || flow_v6(skb, ip6, flow) < 0)
		return ev_drop(skb, t, WEFT_M_DROP_INVALID);
	dst = ep_lookup_v6(&ip6->daddr);
	if (!dst || !(dst->flags & WEFT_EP_F_LOCAL) || ip6->hop_limit <= 1)
		return TC_ACT_OK;
	verdict = enforce_ingress(skb, dst, src_identity, metric, flow, t);
	if (verdict != TC_ACT_OK)
		return verdict;
	ip6 = ipv6_hdr(skb);
	if (!ip6)
		return ev_drop(skb, t, WEFT_M_DROP_INVALID);
	ip6->hop_limit--;
	return deliver_local(skb, dst, metric, t);
}

SEC("tc")
int from_overlay(struct __sk_buff *skb)
{
	struct ethhdr *eth = eth_hdr(skb);
	struct weft_flow flow = {};
	struct ev_trace trace = {};
	__u32 src_identity;
	int verdict;

	if (!eth)
		return TC_ACT_OK;
	src_identity = overlay_source_identity(skb);
	switch (eth->h_proto) {
	case bpf_htons(ETH_P_IP):
		if (!src_identity) {
			metric_inc(WEFT_M_DROP_OVERLAY, skb->len);
			return TC_ACT_SHOT;
		}
		verdict = from_node_v4(skb, src_identity, WEFT_M_FROM_OVERLAY_V4, &flow, &trace);
		break;
	case bpf_htons(ETH_P_IPV6):
		if (!src_identity) {
			metric_inc(WEFT_M_DROP_OVERLAY, skb->len);
			return TC_ACT_SHOT;
		}
		verdict = from_node_v6(skb, src_identity, WEFT_M_FROM_OVERLAY_V6, &flow, &trace);
		break;
	default:
		return TC_ACT_OK; /* ARP and the like: the overlay device's own business */
	}
	/* Packets for the node itself carry no endpoint: nothing to report. */
	if (trace.dst_ep_id || trace.verdict == WEFT_VERDICT_DROPPED)
		ev_emit(skb, &flow, &trace);
	return verdict;
}

/*
 * tc ingress of the node's underlay device in direct-routing mode: packets other nodes routed
 * to a local pod are delivered by the datapath (ingress policy with the ipcache's identity of
 * the source), not forwarded by the node's stack.
 */
SEC("tc")
int from_netdev(struct __sk_buff *skb)
{
	struct ethhdr *eth = eth_hdr(skb);
	struct weft_flow flow = {};
	struct ev_trace trace = {};
	int verdict;

	if (!eth)
		return TC_ACT_OK;
	switch (eth->h_proto) {
	case bpf_htons(ETH_P_IP):
		verdict = from_node_v4(skb, 0, WEFT_M_FROM_NETDEV_V4, &flow, &trace);
		break;
	case bpf_htons(ETH_P_IPV6):
		verdict = from_node_v6(skb, 0, WEFT_M_FROM_NETDEV_V6, &flow, &trace);
		break;
	default:
		return TC_ACT_OK;
	}
	if (trace.dst_ep_id || trace.verdict == WEFT_VERDICT_DROPPED)
		ev_emit(skb, &flow, &trace);
	return verdict;
}
