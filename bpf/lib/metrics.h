/* SPDX-License-Identifier: Apache-2.0 */
/* Packet/byte counters; the control plane sums the per-CPU slots. */
#ifndef WEFT_LIB_METRICS_H
#define WEFT_LIB_METRICS_H

#include "maps.h"

static __always_inline void metric_inc(__u32 idx, __u32 bytes)
{
	struct weft_metric_value *v = bpf_map_lookup_elem(&weft_metrics, &idx);

	/* Each CPU owns its slot and a tc program is not preempted by itself on that CPU, so a
	 * plain read-modify-write is exact. */
	if (v) {
		v->packets += 1;
		v->bytes += bytes;
	}
}

#endif
