"""Pod-to-pod TCP throughput and request/response rate: through weft vs plain veth routing.

    python bench/pod_traffic.py [--quick] [--rounds R] [--seconds S] [--ipv6] [--json FILE]

weft: two lab pods on one node, wired by the real weft-cni and agent (BPF datapath).
plain: a topology built here with no BPF: a node netns with forwarding on, two pod netns joined
to it by veths, a /32 (/128) route per pod on the node, each pod's default route through a
gateway address of the node. The same MTU (1500) and veth defaults on both.

Per round and per metric, the two paths run back to back, alternating which goes first:
iperf3, one TCP stream (-t S, first second omitted) and `rr` (bench/rr.c, built here with gcc:
1-byte ping-pong on one TCP connection for S seconds; client and server pinned to one CPU by
default, see --rr-cpu: on this 2-vCPU VM a cross-CPU ping-pong is dominated by vCPU wake-ups and
swings 3x from round to round, unpinned it is bimodal). Figures are medians over rounds; ratios
are weft/plain (target >= 1.0 each). IPv4; --ipv6 adds the same over IPv6.
Single runs swing: the note in shared/notes/baselines.md puts A/A noise at +-15% (rr) and +-30%
(throughput) at 7 rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    PREFIX,
    BenchError,
    Processes,
    Result,
    bench_env,
    bench_session,
    build_rr,
    dump_json,
    ensure_bpf,
    in_netns,
    median,
    netns_add,
    netns_del,
    paired_ratio,
    print_results,
    run,
    say,
    spread,
    sysctl,
    table,
    tmp_dir,
    wait_listening,
)
from weft.lab.cluster import Lab

IPERF_PORT = 5201
RR_PORT = 5301
TARGET = 1.0

PLAIN_V4 = {"gw": "10.199.0.1", "a": "10.199.0.2", "b": "10.199.0.3"}
PLAIN_V6 = {"gw": "fe80::1", "a": "fd99:199::2", "b": "fd99:199::3"}


@dataclass
class TrafficPath:
    """One way from client pod to server pod."""

    name: str
    client_ns: str
    server_ns: str
    dst: dict[int, str]  # IP version -> server address
    tcp_gbps: dict[int, list[float]] = field(default_factory=lambda: {4: [], 6: []})
    rr_rate: dict[int, list[float]] = field(default_factory=lambda: {4: [], 6: []})
    rr_p50: dict[int, list[float]] = field(default_factory=lambda: {4: [], 6: []})


def build_plain(node: str, pod_a: str, pod_b: str) -> None:
    """Node netns routing between two pod netns, plain kernel, no BPF, no route out."""
    for ns in (node, pod_a, pod_b):
        netns_add(ns)
    sysctl(node, "net.ipv4.ip_forward", "1")
    sysctl(node, "net.ipv6.conf.all.forwarding", "1")
    # The IPv4 gateway lives on the node's lo; the node answers ARP for it on any interface.
    run("ip", "-n", node, "addr", "add", f"{PLAIN_V4['gw']}/32", "dev", "lo")
    for pod, host_if, key in ((pod_a, "hva", "a"), (pod_b, "hvb", "b")):
        run("ip", "-n", node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", pod)
        sysctl(pod, "net.ipv6.conf.all.accept_dad", "0")
        sysctl(pod, "net.ipv6.conf.default.accept_dad", "0")
        run("ip", "-n", node, "addr", "add", f"{PLAIN_V6['gw']}/64", "dev", host_if, "nodad")
        run("ip", "-n", node, "link", "set", host_if, "up")
        run("ip", "-n", pod, "addr", "add", f"{PLAIN_V4[key]}/32", "dev", "eth0")
        run("ip", "-n", pod, "addr", "add", f"{PLAIN_V6[key]}/128", "dev", "eth0", "nodad")
        run("ip", "-n", pod, "link", "set", "eth0", "up")
        run("ip", "-n", pod, "route", "add", f"{PLAIN_V4['gw']}/32", "dev", "eth0", "scope", "link")
        run("ip", "-n", pod, "route", "add", "default", "via", PLAIN_V4["gw"], "dev", "eth0")
        run("ip", "-n", pod, "-6", "route", "add", "default", "via", PLAIN_V6["gw"], "dev", "eth0")
        run("ip", "-n", node, "route", "add", f"{PLAIN_V4[key]}/32", "dev", host_if, "scope", "link")
        run("ip", "-n", node, "-6", "route", "add", f"{PLAIN_V6[key]}/128", "dev", host_if)


def iperf_gbps(path: TrafficPath, version: int, seconds: float) -> float:
    argv = in_netns(path.client_ns, ["iperf3", "-c", path.dst[version], "-p", str(IPERF_PORT), "-t", f"{seconds:g}",
                                     "-O", "1", "-J"])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False,
                          env=bench_env())
    try:
        data: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        raise BenchError(f"iperf3 on {path.name}: rc={proc.returncode}: {proc.stderr.strip()}") from None
    if proc.returncode != 0 or "error" in data:
        raise BenchError(f"iperf3 on {path.name} (IPv{version}): {data.get('error', proc.stderr.strip())}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


def rr_cpus(mode: str) -> tuple[list[str], list[str]]:
    """taskset prefixes for the rr client and server. "same": both on the last CPU, so a transaction
    runs start to end on one CPU and measures the path's CPU cost; "cross": client and server on
    different CPUs (adds the vCPU wake-up latency, which dominates and swings on a VM); "none"."""
    last = (os.cpu_count() or 1) - 1
    if mode == "same":
        return ["taskset", "-c", str(last)], ["taskset", "-c", str(last)]
    if mode == "cross" and last > 0:
        return ["taskset", "-c", "0"], ["taskset", "-c", str(last)]
    return [], []


def rr_once(rr: Path, path: TrafficPath, version: int, seconds: float, pin: list[str]) -> dict[str, Any]:
    argv = pin + in_netns(path.client_ns, [str(rr), "client", path.dst[version], str(RR_PORT), f"{seconds:g}"])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False,
                          env=bench_env())
    if proc.returncode != 0:
        raise BenchError(f"rr on {path.name} (IPv{version}): {proc.stderr.strip()}")
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def alternate_rounds(weft: TrafficPath, base: TrafficPath, versions: list[int], rounds: int, seconds: float,
                     rr: Path, client_pin: list[str], label: str, base_name: str) -> None:
    """``rounds`` rounds of iperf3 then rr on both paths back to back, which one goes first
    alternating per round (so drift on a noisy machine hits both alike); figures appended to
    each path's lists."""
    for r in range(rounds):
        order = (weft, base) if r % 2 == 0 else (base, weft)
        for v in versions:
            for p in order:
                p.tcp_gbps[v].append(iperf_gbps(p, v, seconds))
            for p in order:
                out = rr_once(rr, p, v, seconds, client_pin)
                p.rr_rate[v].append(float(out["rate"]))
                p.rr_p50[v].append(float(out["p50_us"]))
            say(f"  {label}round {r + 1}/{rounds} IPv{v}: TCP weft {weft.tcp_gbps[v][-1]:.2f} / {base_name} "
                f"{base.tcp_gbps[v][-1]:.2f} Gbit/s; rr weft {weft.rr_rate[v][-1]:.0f} / {base_name} "
                f"{base.rr_rate[v][-1]:.0f} /s")


def check_reachable(path: TrafficPath, version: int) -> None:
    ping = ["ping", "-c", "1", "-W", "2"] + (["-6"] if version == 6 else [])
    if subprocess.run(in_netns(path.client_ns, [*ping, path.dst[version]]), capture_output=True,
                      check=False, timeout=30).returncode != 0:
        raise BenchError(f"{path.name}: {path.dst[version]} (IPv{version}) does not answer ping from the client pod")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds of 2 s")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per measurement (default 5)")
    ap.add_argument("--ipv6", action="store_true", help="measure IPv6 as well")
    ap.add_argument("--rr-cpu", choices=("same", "cross", "none"), default="same",
                    help="pin the rr client and server to the same CPU (default), different CPUs, or not at all")
    ap.add_argument("--json", help="also write the figures to this file")
    opts = ap.parse_args(argv)
    client_pin, server_pin = rr_cpus(opts.rr_cpu)
    rounds = opts.rounds or (3 if opts.quick else 7)
    seconds = opts.seconds or (2.0 if opts.quick else 5.0)
    versions = (4, 6) if opts.ipv6 else (4,)

    with bench_session():
        lab = Lab(f"{PREFIX}t")
        plain_node, plain_a, plain_b = f"{PREFIX}-pnode", f"{PREFIX}-pa", f"{PREFIX}-pb"
        procs = Processes()
        tmp = tmp_dir("traffic")
        counters: dict[str, int] = {}
        try:
            rr = build_rr()
            ensure_bpf()
            say(f"lab {lab.name}: up (1 node, dual stack), two pods")
            lab.up(nodes=1, ip_family="dual", world=False)
            node = lab.load().nodes[0]
            pa = lab.pod_add("bench/client", node_name=node.name)
            pb = lab.pod_add("bench/server", node_name=node.name)
            by_version = {(4 if ":" not in ip else 6): ip for ip in pb.addresses}
            weft = TrafficPath("weft", pa.netns, pb.netns, by_version)
            build_plain(plain_node, plain_a, plain_b)
            plain = TrafficPath("plain", plain_a, plain_b, {4: PLAIN_V4["b"], 6: PLAIN_V6["b"]})
            for p in (weft, plain):
                for v in versions:
                    check_reachable(p, v)
                iperf = procs.start(in_netns(p.server_ns, ["iperf3", "-s", "-p", str(IPERF_PORT)]),
                                    log=tmp / f"iperf3-{p.name}.log")
                wait_listening(p.server_ns, IPERF_PORT, iperf)
                procs.start(server_pin + in_netns(p.server_ns, [str(rr), "server", str(RR_PORT)]), ready_line="ready")
            status = lab.client(node).call("status")
            before = {k: int(v["packets"]) for k, v in status.get("counters", {}).items()}

            say(f"{rounds} rounds, {seconds:g} s per measurement, IPv{'+IPv'.join(map(str, versions))}; "
                f"iperf3 unpinned, rr client/server CPUs: {opts.rr_cpu} {' '.join(client_pin[2:] + server_pin[2:])}")
            alternate_rounds(weft, plain, versions, rounds, seconds, rr, client_pin, "", "plain")
            status = lab.client(node).call("status")
            after = {k: int(v["packets"]) for k, v in status.get("counters", {}).items()}
            counters = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        finally:
            procs.stop_all()
            lab.down(quiet=True)
            for ns in (plain_a, plain_b, plain_node):
                netns_del(ns)
            shutil.rmtree(tmp, ignore_errors=True)

    say("")
    rows = []
    results: list[Result] = []
    for v in versions:
        tw, tp = median(weft.tcp_gbps[v]), median(plain.tcp_gbps[v])
        rw, rp = median(weft.rr_rate[v]), median(plain.rr_rate[v])
        t_pair = paired_ratio(weft.tcp_gbps[v], plain.tcp_gbps[v])
        r_pair = paired_ratio(weft.rr_rate[v], plain.rr_rate[v])
        rows.append([f"TCP 1 stream IPv{v}", f"{tw:.2f} Gbit/s", spread(weft.tcp_gbps[v]), f"{tp:.2f} Gbit/s",
                     spread(plain.tcp_gbps[v]), f"{tw / tp:.3f}", f"{t_pair:.3f}"])
        rows.append([f"req/resp 1 B IPv{v}", f"{rw:.0f}/s", spread(weft.rr_rate[v]), f"{rp:.0f}/s",
                     spread(plain.rr_rate[v]), f"{rw / rp:.3f}", f"{r_pair:.3f}"])
        rows.append([f"  rr p50 latency IPv{v}", f"{median(weft.rr_p50[v]):.1f} us", spread(weft.rr_p50[v]),
                     f"{median(plain.rr_p50[v]):.1f} us", spread(plain.rr_p50[v]), "", ""])
        sfx = "" if v == 4 else "6"
        results.append(Result(f"pod_traffic.tcp{sfx}", tw / tp, TARGET, True,
                              f"IPv{v} weft {tw:.2f} Gbit/s vs plain {tp:.2f} Gbit/s, {rounds} rounds x {seconds:g} s"))
        results.append(Result(f"pod_traffic.rr{sfx}", rw / rp, TARGET, True,
                              f"IPv{v} weft {rw:.0f}/s vs plain {rp:.0f}/s, {rounds} rounds x {seconds:g} s"))
    say(table(["metric", "weft (median)", "range", "plain (median)", "range", "weft/plain", "paired"], rows))
    say("weft/plain: ratio of the medians (the RESULT); paired: median of the per-round ratios (noise check)")
    if counters:
        say("weft datapath counters during the rounds: " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    else:
        say("warning: the agent reported no datapath counter change during the rounds")
    dump_json(opts.json, {
        "rounds": rounds, "seconds": seconds,
        "weft": {"tcp_gbps": weft.tcp_gbps, "rr_rate": weft.rr_rate, "rr_p50_us": weft.rr_p50},
        "plain": {"tcp_gbps": plain.tcp_gbps, "rr_rate": plain.rr_rate, "rr_p50_us": plain.rr_p50},
        "counters": counters,
    })
    print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
