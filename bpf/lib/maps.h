/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Every map of the datapath, declared in one place. All are pinned by name
 * (LIBBPF_PIN_BY_NAME) under the node's pin directory, so a restarted agent reopens the same
 * maps and the programs keep their state while no agent runs. The agent is the only writer of
 * every map but weft_fqdn, which the DNS proxy writes.
 *
 * Changing a map's type, key/value size or max_entries makes libbpf refuse to reuse the pin
 * of an older build ("couldn't reuse pinned map"): such a change needs a migration.
 */
#ifndef WEFT_LIB_MAPS_H
#define WEFT_LIB_MAPS_H

#include "common.h"

/* Pod address -> endpoint: the source check (anti-spoofing) and local delivery target. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct weft_ep_key);
	__type(value, struct weft_ep_value);
	__uint(max_entries, WEFT_ENDPOINTS_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_endpoints SEC(".maps");

/* Host-side interface (ifindex) -> the endpoint behind it. Needed because a pod's neighbour
 * solicitations often come from its link-local address, which is in no endpoint entry, and the
 * answer still needs that interface's MAC. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct weft_ep_value);
	__uint(max_entries, WEFT_LXC_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lxc SEC(".maps");

/* Packet and byte counters by enum weft_metric. Per-CPU: no atomics on the hot path. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct weft_metric_value);
	__uint(max_entries, WEFT_METRICS_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_metrics SEC(".maps");

/* Policy entries of every endpoint of the node (see struct weft_policy_key). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct weft_policy_key);
	__type(value, struct weft_policy_value);
	__uint(max_entries, WEFT_POLICY_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_policy SEC(".maps");

/* Prefix -> identity for peers that are not local endpoints. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct weft_ipcache_key);
	__type(value, struct weft_ipcache_value);
	__uint(max_entries, WEFT_IPCACHE_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_ipcache SEC(".maps");

/* Tracked connections. LRU: under pressure the least recently used go first, never a new one
 * failing to be tracked. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct weft_ct_key);
	__type(value, struct weft_ct_value);
	__uint(max_entries, WEFT_CT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_ct SEC(".maps");

/* Addresses the DNS proxy learned per endpoint (see struct weft_fqdn_key). Written by the DNS
 * proxy, not the agent: it keeps working while the agent is away. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct weft_fqdn_key);
	__type(value, struct weft_fqdn_value);
	__uint(max_entries, WEFT_FQDN_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_fqdn SEC(".maps");

/* Other nodes' pod prefixes -> their underlay address (struct weft_tunnel_value). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct weft_ipcache_key);
	__type(value, struct weft_tunnel_value);
	__uint(max_entries, WEFT_TUNNEL_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_tunnel SEC(".maps");

/* Verdict events for the agent (struct weft_event records, see lib/events.h). The agent may
 * resize it before load (node config), replacing a pin of another size. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, WEFT_EVENTS_RING_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_events SEC(".maps");

/* One entry: which packets become events (struct weft_event_config). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct weft_event_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_event_cfg SEC(".maps");

#endif
