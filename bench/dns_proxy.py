"""DNS through weft's DNS proxy vs straight to the same DNS server (issue 4's benchmark).

    python bench/dns_proxy.py [--quick] [--rounds N] [--json FILE]

One lab node with its world. A DNS server pod (dnsmasq answering 200 names of its own, no
forwarding: fast enough not to be the bottleneck) and two client pods on the node:
``direct`` (no policy: its queries go pod to pod through the datapath) and ``proxied`` (a
CiliumNetworkPolicy with a DNS rule ``matchPattern: "*"`` on the server's port 53 and a toFQDNs
selector matching every name: each answer goes through the proxy, which learns its address
into the datapath before it releases it). dnsperf (Debian's) is the load generator, run in the
client pods; rounds alternate direct and proxied.

Figures: added latency p50/p99 at 1,000 queries/s (from dnsperf's per-query latencies), the
most queries/s through the proxy (several concurrent clients, none lost), the proxy's resident
memory (peak) under that load, and lookup-to-connect: fresh pods each resolve names of the
world and connect at once; no SYN may be dropped (the node's drop counters stay still).
Targets: added p99 <= 1 ms at 1,000 q/s; >= 20,000 q/s per node through the proxy; proxy
memory < 100 MiB; no SYN dropped after a lookup.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    PREFIX,
    BenchError,
    Result,
    bench_env,
    bench_session,
    dump_json,
    ensure_bpf,
    median,
    print_results,
    say,
    table,
    wait_for,
)
from weft.lab.cluster import Lab, PodInfo
from weft.lab.probe import probe

NAMES = 200
SERVER_NET = "198.18"  # benchmark addresses (RFC 2544), never contacted: answers only


def server_argv(pod: PodInfo) -> list[str]:
    records = [f"--host-record=n{i}.bench.example,{SERVER_NET}.{i // 250}.{i % 250 + 1}" for i in range(NAMES)]
    listen = ",".join(pod.addresses)
    return ["/usr/sbin/dnsmasq", "--no-daemon", "--port=53", f"--listen-address={listen}", "--bind-interfaces",
            "--no-resolv", "--no-hosts", "--cache-size=0", "--log-facility=/dev/null", "--local-ttl=300",
            "--dns-forward-max=10000", *records]


POLICY = textwrap.dedent("""\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata:
      name: dnsbench
      namespace: default
    spec:
      endpointSelector:
        matchLabels:
          app: dnsbench-proxied
      egress:
      - toEndpoints:
        - matchLabels:
            app: dnsbench-server
        toPorts:
        - ports:
          - port: "53"
            protocol: ANY
          rules:
            dns:
            - matchPattern: "*"
      - toEndpoints:
        - matchLabels:
            "k8s:io.kubernetes.pod.namespace": kube-system
            "k8s:k8s-app": kube-dns
        toPorts:
        - ports:
          - port: "53"
            protocol: ANY
          rules:
            dns:
            - matchPattern: "*"
      - toFQDNs:
        - matchPattern: "*"
    """)


def dnsperf(lab: Lab, pod: PodInfo, server: str, query_file: Path, seconds: float, rate: int | None,
            clients: int, verbose: bool) -> tuple[float, int, list[float]]:
    """(queries/s, lost, per-query latencies in s) of one dnsperf run from ``pod``."""
    argv = ["dnsperf", "-s", server, "-d", str(query_file), "-l", f"{seconds:g}", "-c", str(clients),
            "-q", "1000", "-t", "2"]
    if rate:
        argv += ["-Q", str(rate)]
    if verbose:
        argv.append("-v")
    out = subprocess.run(lab.exec_argv(pod.key, argv), capture_output=True, text=True, timeout=seconds + 60,
                         check=False, env=bench_env())
    if out.returncode != 0:
        raise BenchError(f"dnsperf in {pod.key}: {out.stderr.strip() or out.stdout[-500:]}")
    qps, lost, latencies = 0.0, 0, []
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("Queries per second:"):
            qps = float(line.split()[-1])
        elif line.startswith("Queries lost:"):
            lost = int(line.split()[2])
        elif line.startswith("> "):
            latencies.append(float(line.split()[-1]))
    return qps, lost, latencies


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def proxy_memory_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds of 3 s")
    ap.add_argument("--rounds", type=int, default=None, help="latency rounds per path (default 5)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per dnsperf run (default 5)")
    ap.add_argument("--json", help="also write the figures to this file")
    opts = ap.parse_args(argv)
    rounds = opts.rounds or (3 if opts.quick else 5)
    seconds = opts.seconds or (3.0 if opts.quick else 5.0)
    figures: dict[str, object] = {}
    with bench_session():
        lab = Lab(f"{PREFIX}d")
        server_proc: subprocess.Popen[bytes] | None = None
        try:
            ensure_bpf()
            say(f"lab {lab.name}: up (1 node, dual stack, with its world)")
            state = lab.up(nodes=1, ip_family="dual")
            node = state.nodes[0]
            client = lab.client(node)
            server = lab.pod_add("default/dnsbench-server", labels={"app": "dnsbench-server"})
            server_proc = subprocess.Popen(lab.exec_argv(server.key, server_argv(server)), stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True, env=bench_env(WEFT_LAB=lab.name))
            server_v4 = next(a for a in server.addresses if ":" not in a)
            direct = lab.pod_add("default/dnsbench-direct", labels={"app": "dnsbench-direct"})
            proxied = lab.pod_add("default/dnsbench-proxied", labels={"app": "dnsbench-proxied"})
            client.call("policy.apply", {"files": [{"name": "dnsbench.yaml", "text": POLICY}]})
            query_file = lab.base / "queries.txt"
            query_file.write_text("".join(f"n{i}.bench.example A\n" for i in range(NAMES)))
            wait_for("the bench DNS server", lambda: dnsperf(lab, direct, server_v4, query_file, 0.5, 100, 1,
                                                             False)[0] > 0, timeout=20)
            proxy_pid = lab.load().nodes[0].proxy_pid
            # Warm both paths (the proxy learns every name once).
            for pod in (direct, proxied):
                dnsperf(lab, pod, server_v4, query_file, 1.0, 1000, 1, False)

            # 1. Latency at 1,000 queries/s, interleaved rounds.
            lat: dict[str, list[tuple[float, float]]] = {"direct": [], "proxied": []}
            for r in range(rounds):
                for name, pod in (("direct", direct), ("proxied", proxied)):
                    qps, lost, latencies = dnsperf(lab, pod, server_v4, query_file, seconds, 1000, 1, True)
                    if not latencies:
                        raise BenchError(f"dnsperf -v gave no per-query latencies ({name})")
                    p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
                    lat[name].append((p50, p99))
                    say(f"  round {r + 1} {name:7s}: {qps:7.0f} q/s, lost {lost}, p50 {p50:.3f} ms, p99 {p99:.3f} ms")
            added_p50 = median([p[0] - d[0] for p, d in zip(lat["proxied"], lat["direct"], strict=True)])
            added_p99 = median([p[1] - d[1] for p, d in zip(lat["proxied"], lat["direct"], strict=True)])

            # 2. Most queries/s through the proxy: concurrent clients, unthrottled.
            peak: dict[str, list[tuple[float, int]]] = {"direct": [], "proxied": []}
            hwm_before = proxy_memory_kib(proxy_pid)
            for _ in range(max(2, rounds // 2)):
                for name, pod in (("direct", direct), ("proxied", proxied)):
                    qps, lost, _ = dnsperf(lab, pod, server_v4, query_file, seconds, None, 8, False)
                    peak[name].append((qps, lost))
                    say(f"  max rate {name:7s}: {qps:7.0f} q/s, lost {lost}")
            mem = proxy_memory_kib(proxy_pid)
            proxied_qps = median([q for q, _ in peak["proxied"]])
            direct_qps = median([q for q, _ in peak["direct"]])
            lost_total = sum(lost for _, lost in peak["proxied"])

            # 3. Lookup to connect: fresh pods (nothing learned) resolve and connect at once.
            before = client.call("status")["counters"]
            attempts = failures = 0
            for i in range(3 if opts.quick else 10):
                pod = lab.pod_add(f"default/dnsbench-fresh{i}", labels={"app": "dnsbench-proxied"})
                for name_ in ("app1.myblobstorage.com", "app2.myblobstorage.com", "other.example",
                              "multi.myblobstorage.com"):
                    attempts += 1
                    failures += probe(pod.netns, "tcp", name_, 80, timeout=2.0, family=4).outcome != "connected"
                lab.pod_del(pod.key)
            after = client.call("status")["counters"]
            syn_drops = sum(after[k]["packets"] - before[k]["packets"]
                            for k in ("drop_policy_egress", "drop_ct_missing", "drop_policy_deny"))
            say(table(["path", "p50 ms (median of rounds)", "p99 ms", "max q/s (median)"],
                      [["direct", f"{median([x[0] for x in lat['direct']]):.3f}",
                        f"{median([x[1] for x in lat['direct']]):.3f}", f"{direct_qps:.0f}"],
                       ["proxied", f"{median([x[0] for x in lat['proxied']]):.3f}",
                        f"{median([x[1] for x in lat['proxied']]):.3f}", f"{proxied_qps:.0f}"]]))
            say(f"proxy memory: VmRSS {mem['VmRSS'] / 1024:.1f} MiB, peak {mem['VmHWM'] / 1024:.1f} MiB "
                f"(before the max-rate runs {hwm_before['VmHWM'] / 1024:.1f} MiB)")
            say(f"lookup-to-connect: {attempts - failures}/{attempts} connected, {syn_drops} packets dropped by policy")
            figures = {"latency_ms": lat, "added_p50_ms": added_p50, "added_p99_ms": added_p99,
                       "max_qps": peak, "proxy_kib": mem, "lookup_connect": [attempts, failures, syn_drops]}
        finally:
            if server_proc is not None and server_proc.poll() is None:
                os.killpg(server_proc.pid, signal.SIGKILL)
            say("cleaning up (lab)")
            lab.down(quiet=True)
    dump_json(opts.json, figures)
    results = [
        Result("dns_proxy.added_p99_ms", added_p99, 1.0, False,
               f"added latency at 1,000 q/s: p50 {added_p50:.3f} ms, p99 {added_p99:.3f} ms (median of {rounds} "
               "paired rounds, proxied minus direct), limit 1 ms"),
        Result("dns_proxy.qps", proxied_qps / 20000, 1.0, True,
               f"{proxied_qps:.0f} q/s through the proxy ({lost_total} lost), {direct_qps:.0f} q/s direct "
               f"({proxied_qps / direct_qps:.2f}x), target 20,000 q/s"),
        Result("dns_proxy.memory", mem["VmHWM"] / 1024 / 100, 1.0, False,
               f"proxy peak RSS {mem['VmHWM'] / 1024:.1f} MiB under load, limit 100 MiB"),
        Result("dns_proxy.lookup_connect", float(failures + syn_drops), 0.0, False,
               f"{attempts} fresh lookups then connects: {failures} failed, {syn_drops} SYNs dropped"),
    ]
    print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
