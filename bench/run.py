"""Run weft's benchmarks one after another and print a summary table with targets and PASS/MISS.

    python bench/run.py [--quick] [--only cni_rate,pod_traffic,agent_memory,policy_scale] [--strict]

Each benchmark runs as its own process (its output is streamed as it comes); the summary is built
from their ``# <name>: <figures>`` and ``RESULT <name> ratio=<x> target=<op><y> PASS|MISS`` lines.
Exit status: 1 if a benchmark failed to produce its results (or, with --strict, missed a target),
else 0. A MISS is a finding, not an error.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DETAIL_RE, Result, parse_result, say, table

HERE = Path(__file__).resolve().parent
BENCHMARKS: dict[str, list[str]] = {
    "cni_rate": ["cni_rate"],
    "pod_traffic": ["pod_traffic.tcp", "pod_traffic.rr"],
    "agent_memory": ["agent_memory.rss_500", "agent_memory.per_endpoint"],
    "policy_scale": ["policy_scale.weft_10k_vs_10", "policy_scale.vs_iptables_10k", "policy_scale.vs_nft_10k",
                     "policy_scale.apply_p99_ms", "policy_scale.memory"],
    "dns_proxy": ["dns_proxy.added_p99_ms", "dns_proxy.qps", "dns_proxy.memory", "dns_proxy.lookup_connect"],
    "observe": ["observe.events_lossless", "observe.throughput", "observe.aggregated_lossless",
                "observe.ring_memory_mib"],
    "multinode": ["multinode.overlay_tcp", "multinode.overlay_rr", "multinode.direct_tcp", "multinode.direct_rr",
                  "multinode.identity_p99_ms", "multinode.identity_policy"],
}
TARGET_TEXT = {
    "cni_rate": "ADD+DEL pairs/s >= 1.0x bridge+host-local",
    "pod_traffic.tcp": "TCP 1 stream >= 1.0x plain veth routing",
    "pod_traffic.rr": "1-byte req/resp >= 1.0x plain veth routing",
    "agent_memory.rss_500": "agent RSS at 500 endpoints < 150 MiB",
    "agent_memory.per_endpoint": "< 10 KiB per added endpoint",
    "policy_scale.weft_10k_vs_10": "weft TCP at 10,000 rules >= 0.95x weft at 10 rules",
    "policy_scale.vs_iptables_10k": "weft TCP at 10,000 rules >= 5x iptables FORWARD chain",
    "policy_scale.vs_nft_10k": "weft TCP at 10,000 rules >= 1.0x nftables verdict map",
    "policy_scale.apply_p99_ms": "apply-to-enforced p99 < 100 ms (1,000 endpoints, 10,000 rules)",
    "policy_scale.memory": "agent memory < 300 MiB (1,000 endpoints, 10,000 rules)",
    "dns_proxy.added_p99_ms": "DNS proxy adds <= 1 ms p99 at 1,000 q/s",
    "dns_proxy.qps": ">= 20,000 q/s per node through the DNS proxy",
    "dns_proxy.memory": "DNS proxy memory < 100 MiB under load",
    "dns_proxy.lookup_connect": "no SYN dropped right after a lookup",
    "observe.events_lossless": "every drop event reaches weft observe up to 100,000 events/s",
    "observe.throughput": "TCP with observability on >= 0.95x off",
    "observe.aggregated_lossless": "aggregated traffic observed without a lost event",
    "observe.ring_memory_mib": "a full flow ring (4,095 flows) < 32 MiB",
    "multinode.overlay_tcp": "cross-node TCP 1 stream, overlay >= 0.9x kernel VXLAN",
    "multinode.overlay_rr": "cross-node 1-byte req/resp, overlay >= 0.9x kernel VXLAN",
    "multinode.direct_tcp": "cross-node TCP 1 stream, direct >= 1.0x plain routing",
    "multinode.direct_rr": "cross-node 1-byte req/resp, direct >= 1.0x plain routing",
    "multinode.identity_p99_ms": "new pod's identity enforced on another node, p99 < 1 s (etcd)",
    "multinode.identity_policy": "every checked new pod connects through a policy allowing only its labels",
}


def run_one(name: str, extra: list[str]) -> tuple[int, list[Result], dict[str, str], float]:
    argv = [sys.executable, str(HERE / f"{name}.py"), *extra]
    say(f"=== {name}: {' '.join(argv[1:])}")
    t0 = time.monotonic()
    results: list[Result] = []
    details: dict[str, str] = {}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def forward(signum: int, _frame: Any) -> None:
        # Let the benchmark clean up (it turns the first stop signal into an exception), then stop too.
        # Ctrl-C already reached it through the process group.
        if signum != signal.SIGINT:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=120)
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            res = parse_result(line)
            if res is not None:
                results.append(res)
            m = DETAIL_RE.match(line.strip())
            if m:
                details[m.group(1)] = m.group(2)
        rc = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return rc, results, details, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ", ".join(BENCHMARKS))
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    opts = ap.parse_args(argv)
    chosen = [n.strip() for n in opts.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    extra = ["--quick"] if opts.quick else []

    rows: list[list[str]] = []
    failed = missed = False
    for name in chosen:
        rc, results, details, secs = run_one(name, extra)
        got = {r.name: r for r in results}
        for key in BENCHMARKS[name] + [r.name for r in results if r.name not in BENCHMARKS[name]]:
            res = got.get(key)
            if res is None:
                failed = True
                rows.append([key, TARGET_TEXT.get(key, ""), f"(no result: exit {rc})", "-", "-", "ERROR"])
                continue
            op = ">=" if res.higher_is_better else "<="
            missed |= not res.passed
            rows.append([key, TARGET_TEXT.get(key, ""), details.get(key, ""), f"{res.ratio:.3f}",
                         f"{op}{res.target:g}", "PASS" if res.passed else "MISS"])
        if rc != 0:
            failed = True
        say(f"=== {name}: exit {rc} after {secs:.0f} s\n")
    say("SUMMARY" + (" (--quick: fewer rounds, noisier)" if opts.quick else ""))
    say(table(["benchmark", "target", "measured", "ratio", "target", "verdict"], rows))
    return 1 if failed or (opts.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
