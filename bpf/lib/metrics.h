/* SPDX-License-Identifier: Apache-2.0 */
#ifndef WEFT_LIB_METRICS_H
#define WEFT_LIB_METRICS_H

#include "maps.h"

/* Per-CPU, so no atomics are needed on the hot path. */
static __always_inline void metric_inc(__u32 idx, __u32 bytes)
{
	struct weft_metric_value *v = bpf_map_lookup_elem(&weft_metrics, &idx);

	if (v) {
		v->packets += 1;
		v->bytes += bytes;
	}
}

#endif
