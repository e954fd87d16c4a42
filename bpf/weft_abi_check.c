/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Never loaded: compiled so that its BTF describes every type of the shared ABI, including
 * the enums that the programs only use as constants (and so never reach their own BTF).
 * tests/unit/test_abi.py compares src/weft/datapath/abi.py with this BTF and with the
 * programs' object.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "shared/weft_abi.h"

struct weft_ep_key weft_abi_ep_key;
struct weft_ep_value weft_abi_ep_value;
struct weft_metric_value weft_abi_metric_value;
enum weft_metric weft_abi_metric;
struct weft_policy_key weft_abi_policy_key;
struct weft_policy_value weft_abi_policy_value;
struct weft_ipcache_key weft_abi_ipcache_key;
struct weft_ipcache_value weft_abi_ipcache_value;
struct weft_tunnel_value weft_abi_tunnel_value;
struct weft_ct_key weft_abi_ct_key;
struct weft_ct_value weft_abi_ct_value;
struct weft_fqdn_key weft_abi_fqdn_key;
struct weft_fqdn_slot weft_abi_fqdn_slot;
struct weft_fqdn_value weft_abi_fqdn_value;
struct weft_event weft_abi_event;
struct weft_event_config weft_abi_event_config;

char LICENSE[] SEC("license") = "Dual BSD/GPL";
