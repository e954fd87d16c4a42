"""The weft agent's resident memory with 1 and with N (500) endpoints on a node.

    python bench/agent_memory.py [--quick] [--endpoints N] [--family dual|ipv4|ipv6] [--json FILE]

A fresh one-node lab; N container netns made here (``wb<pid>-ep-<i>``); endpoints added one by
one through the real path (the lab's runtime execs weft-cni, which calls the agent). VmRSS of the
agent process (/proc/<pid>/status) is read every 50 endpoints; at 1 and at N it is read again after
one reconcile pass, one GC pass, a status and an endpoint list (the agent's periodic work, so both
points have the same history), and those "steady" figures are the ones compared with the targets.
Targets (from the issue): under 150 MiB at 500 endpoints, and under 10 KiB per added endpoint
((RSS_N - RSS_1) / (N - 1)); Cilium's agent takes about 10.5 KiB per pod.
A node's default IPv4 block is a /24 (253 pods), so for more endpoints the lab gets a wider node
block (a /23 for 500) through ``Lab.up(pools=...)``.
--quick adds 100 endpoints and projects the RSS at 500 from the per-endpoint figure.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    NETNS_DIR,
    PREFIX,
    BenchError,
    Result,
    bench_session,
    dump_json,
    ensure_bpf,
    median,
    netns_add_many,
    netns_del_many,
    print_results,
    say,
    table,
)
from weft.ipam.pool import DEFAULT_CLUSTER_CIDR_V4, ClusterPool
from weft.lab.cluster import Lab, cni_args

TARGET_MIB_AT_500 = 150.0
TARGET_KIB_PER_EP = 10.0
CILIUM_KIB_PER_EP = 10.5
FULL = 500


def agent_pid(lab: Lab) -> int:
    """The agent's pid (nsenter execs the agent; should it have forked, take its child)."""
    pid = lab.load().nodes[0].agent_pid
    for _ in range(2):
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if comm != "nsenter":
            return pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not children:
            break
        pid = int(children[0])
    raise BenchError(f"cannot find the agent process under pid {lab.load().nodes[0].agent_pid}")


def status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            out[key] = int(value.split()[0])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 endpoints, RSS at 500 projected")
    ap.add_argument("--endpoints", type=int, default=None, help=f"endpoints to add (default {FULL})")
    ap.add_argument("--family", choices=("dual", "ipv4", "ipv6"), default="dual", help="lab IP family (dual)")
    ap.add_argument("--json", help="also write the figures to this file")
    opts = ap.parse_args(argv)
    total = opts.endpoints or (100 if opts.quick else FULL)
    if total < 2:
        raise SystemExit("--endpoints must be at least 2")
    v4_prefix = min(24, 32 - (total + 3).bit_length())

    with bench_session():
        lab = Lab(f"{PREFIX}m")
        names = [f"{PREFIX}-ep-{i}" for i in range(total)]
        samples: list[tuple[str, int, dict[str, int], float]] = []  # what, endpoints, /proc status, ADD ms
        api_ms: dict[str, float] = {}
        try:
            ensure_bpf()
            say(f"lab {lab.name}: up (1 node, {opts.family}); {total} container netns")
            lab.up(nodes=1, ip_family=opts.family, pools={4: ClusterPool.parse(DEFAULT_CLUSTER_CIDR_V4, v4_prefix)},
                   world=False)  # endpoints counted from zero: no kube-dns
            node = lab.load().nodes[0]
            client = lab.client(node, timeout=120)
            runtime = lab.runtime(node)
            pid = agent_pid(lab)
            netns_add_many(names)
            capacity = {k: v["capacity"] for k, v in client.call("status")["ipam"].items()}
            if any(c < total for c in capacity.values()):
                raise BenchError(f"the node's blocks hold {capacity} addresses, fewer than {total}")
            samples.append(("fresh", 0, status_kib(pid), 0.0))

            def steady(n: int) -> None:
                # What a node's agent does anyway: its periodic reconcile and GC passes, a status
                # query. Done by hand at both measuring points so both hold the same history.
                for method in ("reconcile", "gc", "status", "endpoint.list"):
                    t0 = time.perf_counter()
                    client.call(method)
                    api_ms[f"{method}@{n}"] = (time.perf_counter() - t0) * 1e3
                samples.append(("steady", n, status_kib(pid), 0.0))

            add_ms: list[float] = []
            t_start = time.monotonic()
            for i, name in enumerate(names, start=1):
                cid = uuid.uuid4().hex + uuid.uuid4().hex
                t0 = time.perf_counter()
                runtime.add(cid, str(NETNS_DIR / name), "eth0", args=cni_args("bench", f"ep-{i}", cid))
                add_ms.append((time.perf_counter() - t0) * 1e3)
                if i == 1 or i % 50 == 0 or i == total:
                    client.call("ping")  # the agent is idle again: the reply comes after the ADD's work
                    st = status_kib(pid)
                    samples.append(("after ADDs", i, st, median(add_ms)))
                    say(f"  {i:4d} endpoints: VmRSS {st['VmRSS'] / 1024:6.1f} MiB, ADD median {median(add_ms):6.1f} ms "
                        f"(last {len(add_ms)}), {time.monotonic() - t_start:5.1f} s")
                    add_ms = []
                    if i in (1, total):
                        steady(i)
                        rss = samples[-1][2]["VmRSS"] / 1024
                        say(f"  {i:4d} endpoints after reconcile+gc+status: VmRSS {rss:6.1f} MiB")
            eps = client.call("endpoint.list")
            if len(eps) != total:
                raise BenchError(f"the agent lists {len(eps)} endpoints, expected {total}")
        finally:
            say("cleaning up (lab, namespaces)")
            lab.down(quiet=True)
            netns_del_many(names)

    steady_points = [(n, st) for what, n, st, _ in samples if what == "steady"]
    (_, st1), (_, st_n) = steady_points[0], steady_points[-1]
    rss0 = samples[0][2]["VmRSS"]
    rss1, rss_n = st1["VmRSS"], st_n["VmRSS"]
    per_ep_kib = (rss_n - rss1) / (total - 1)
    rss_500_mib = (rss1 + per_ep_kib * (FULL - 1)) / 1024 if total != FULL else rss_n / 1024
    say("")
    say(table(["endpoints", "when", "VmRSS MiB", "RssAnon MiB", "VmHWM MiB", "threads", "ADD ms (median, since last)"],
              [[n, what, f"{st['VmRSS'] / 1024:.1f}", f"{st.get('RssAnon', 0) / 1024:.1f}",
                f"{st['VmHWM'] / 1024:.1f}", st.get("Threads", ""), f"{ms:.1f}" if ms else "-"]
               for what, n, st, ms in samples]))
    methods = ("reconcile", "gc", "status", "endpoint.list")
    say(f"agent API at 1 / {total} endpoints (ms): "
        + ", ".join(f"{m} {api_ms[f'{m}@1']:.0f} / {api_ms[f'{m}@{total}']:.0f}" for m in methods))
    say(f"fresh agent {rss0 / 1024:.1f} MiB; steady with 1 endpoint {rss1 / 1024:.1f} MiB, with {total} "
        f"{rss_n / 1024:.1f} MiB (peak {st_n['VmHWM'] / 1024:.1f} MiB); {per_ep_kib:.2f} KiB per added endpoint "
        f"(Cilium's agent: about {CILIUM_KIB_PER_EP} KiB per pod)")
    dump_json(opts.json, {"endpoints": total, "family": opts.family,
                          "samples": [{"when": what, "endpoints": n, **st, "add_ms_median": ms}
                                      for what, n, st, ms in samples],
                          "api_ms": api_ms, "kib_per_endpoint": per_ep_kib, "rss_at_500_mib": rss_500_mib})
    at = "projected" if total != FULL else "measured"
    results = [
        Result("agent_memory.rss_500", rss_500_mib / TARGET_MIB_AT_500, 1.0, False,
               f"{rss_500_mib:.1f} MiB at {FULL} endpoints ({at}), limit {TARGET_MIB_AT_500:g} MiB"),
        Result("agent_memory.per_endpoint", per_ep_kib / TARGET_KIB_PER_EP, 1.0, False,
               f"{per_ep_kib:.2f} KiB per added endpoint over {total - 1}, limit {TARGET_KIB_PER_EP:g} KiB"),
    ]
    print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
