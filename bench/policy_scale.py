"""Per-packet cost as L3/L4 rules grow: weft vs iptables (linear FORWARD chain) vs an nftables verdict map;
policy computation time, apply-to-enforced latency and agent memory with 1,000 endpoints and 10,000 rules.

    python bench/policy_scale.py [--quick] [--rounds R] [--seconds S] [--endpoints E] [--changes C]
                                 [--iptables nft|legacy] [--json FILE]

One lab, set up once: a one-node lab with pods default/client (app=client) and default/server (app=server),
then E more endpoints (default 1,000, --quick 100; added one by one through the real CNI path, namespace
"bench", timed), so every figure below is taken with E+2 endpoints (and the lab's kube-dns) on the node.
For N in 10, 1,000, 10,000 rules (--quick: 10 and 1,000):
  weft: one CiliumNetworkPolicy per 500 rules (scale-0, scale-1, ...), all selecting app=server; rule i: fromCIDR
        <172.16.0.0+i>/32 toPorts (1000 + i % 50000)/TCP (N distinct CIDR identities -> N ipcache and N policy
        entries), plus one rule allowing app=client on the measured ports. The previous size's policies are
        deleted first, so "policy computation" at N is loading N rules from none: the policy.apply calls (each
        parses, computes and writes the datapath before it returns), summed.
  iptables: plain veth routing (as in pod_traffic.py: node netns with forwarding, two pod netns) with N rules in
        the node's FORWARD chain that do not match the traffic (-s <ip>/32 -p tcp --dport P -j ACCEPT), then a
        rule accepting the traffic and policy DROP (iptables-restore; backend: --iptables, default the
        system's iptables, nf_tables on Debian 12).
  nft: the same topology with an nftables forward chain: one verdict map (ipv4_addr . inet_service : verdict)
        of N elements, then the accept rule, policy drop.
  Per round, the three paths are measured back to back (order rotated each round): iperf3, one TCP stream
  (-t S, first second omitted), then a new-connection rate (Python connect/close loop against a Python
  accept/close server for S seconds; the same script on every path). Medians over rounds; ratios are of
  medians measured in this run.
Then, with 10,000 rules (--quick loads them after its last size) and all those endpoints: C changes (default
  100), each one small extra policy allowing client -> server on a probe port: latency from the start of
  policy.apply until a prober in the client pod (fresh TCP connects, 5 ms each, retried without pause) gets
  through; the policy is deleted again and the probe seen failing before the next change. p99 by nearest rank.
  Memory: agent VmRSS (and peak) after that.
Targets (from the issue): weft TCP at 10,000 rules >= 0.95x weft at 10 rules, >= 5x iptables and >= 1.0x the
nft verdict map at 10,000 rules; apply-to-enforced p99 <= 100 ms; agent memory <= 300 MiB.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.agent_memory import agent_pid, status_kib
from bench.common import (
    NETNS_DIR,
    PREFIX,
    BenchError,
    Processes,
    Result,
    bench_env,
    bench_session,
    dump_json,
    ensure_bpf,
    in_netns,
    median,
    netns_add_many,
    netns_del,
    netns_del_many,
    print_results,
    run,
    say,
    spread,
    table,
    tmp_dir,
    wait_listening,
)
from bench.pod_traffic import PLAIN_V4, build_plain
from weft.ipam.pool import DEFAULT_CLUSTER_CIDR_V4, ClusterPool
from weft.lab.cluster import Lab, cni_args

IPERF_PORT = 5201
CC_PORT = 5202
PROBE_PORT = 5203
SIZES_FULL = (10, 1000, 10000)
SIZES_QUICK = (10, 1000)
CP_RULES = 10000
CHUNK = 500

CC_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4096)
while True:
    c, _ = s.accept(); c.close()
"""
CC_CLIENT = r"""
import json, socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n = 0; t0 = time.monotonic(); end = t0 + secs
while time.monotonic() < end:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.connect((host, port)); s.close(); n += 1
print(json.dumps({"conns": n, "rate": n / (time.monotonic() - t0)}))
"""
# Reads a line per probe: "allow" -> connect until one succeeds, print its CLOCK_MONOTONIC time;
# "deny" -> connect until one fails, print "denied".
PROBER = r"""
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
def once(timeout):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.settimeout(timeout)
    try:
        s.connect((host, port)); return True
    except OSError:
        return False
    finally:
        s.close()
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "allow":
        deadline = time.monotonic() + 30
        while not once(0.005) and time.monotonic() < deadline:
            pass
        print(time.monotonic() if time.monotonic() < deadline else "timeout", flush=True)
    else:
        deadline = time.monotonic() + 30
        while once(0.2) and time.monotonic() < deadline:
            time.sleep(0.01)  # a poll interval: a connect that succeeds returns at once
        print("denied" if time.monotonic() < deadline else "timeout", flush=True)
"""


def cidr(i: int) -> str:
    n = (172 << 24 | 16 << 16) + i
    return f"{n >> 24}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def rule_port(i: int) -> int:
    return 1000 + i % 50000


def weft_policies(n: int) -> list[dict[str, str]]:
    """The N rules as policy files of at most CHUNK rules each (CNPs scale-0, scale-1, ... all selecting
    app=server; scale-0 also allows the client on the measured ports): the agent API reads a request as
    one line of at most 64 KiB (asyncio's default stream limit), so 10,000 rules do not fit in one call."""
    files = []
    for c in range(max(1, math.ceil(n / CHUNK))):
        lines = ["apiVersion: cilium.io/v2", "kind: CiliumNetworkPolicy", "metadata:", f"  name: scale-{c}",
                 "  namespace: default", "spec:", "  endpointSelector:", "    matchLabels:", "      app: server",
                 "  ingress:"]
        if c == 0:
            lines.append(f'  - {{fromEndpoints: [{{matchLabels: {{app: client}}}}], toPorts: [{{ports: [{{port: '
                         f'"{IPERF_PORT}", protocol: TCP}}, {{port: "{CC_PORT}", protocol: TCP}}]}}]}}')
        for i in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            lines.append(f'  - {{fromCIDR: [{cidr(i)}/32], toPorts: [{{ports: [{{port: "{rule_port(i)}", '
                         f'protocol: TCP}}]}}]}}')
        files.append({"name": f"scale-{c}.yaml", "text": "\n".join(lines) + "\n"})
    return files


PROBE_POLICY = f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: probe
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: server
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client
    toPorts:
    - ports:
      - port: "{PROBE_PORT}"
        protocol: TCP
"""


def iptables_rules(n: int) -> str:
    out = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]", "-F FORWARD"]
    out += [f"-A FORWARD -s {cidr(i)}/32 -p tcp --dport {rule_port(i)} -j ACCEPT" for i in range(n)]
    out += [f"-A FORWARD -s {PLAIN_V4['a']}/32 -d {PLAIN_V4['b']}/32 -j ACCEPT",
            f"-A FORWARD -s {PLAIN_V4['b']}/32 -d {PLAIN_V4['a']}/32 -j ACCEPT", "COMMIT"]
    return "\n".join(out) + "\n"


def nft_ruleset(n: int) -> str:
    elems = ", ".join(f"{cidr(i)} . {rule_port(i)} : accept" for i in range(n))
    elements = f"elements = {{ {elems} }}" if n else ""
    return (f"table inet {PREFIX}\ndelete table inet {PREFIX}\n"
            f"table inet {PREFIX} {{\n"
            f"  map allow {{ type ipv4_addr . inet_service : verdict; {elements} }}\n"
            f"  chain forward {{ type filter hook forward priority 0; policy drop;\n"
            f"    meta l4proto tcp ip saddr . tcp dport vmap @allow\n"
            f"    ip saddr {PLAIN_V4['a']} ip daddr {PLAIN_V4['b']} accept\n"
            f"    ip saddr {PLAIN_V4['b']} ip daddr {PLAIN_V4['a']} accept\n  }}\n}}\n")


@dataclass
class Path3:
    name: str
    client_ns: str
    server_ns: str
    dst: str
    tcp: dict[int, list[float]] = field(default_factory=dict)
    cc: dict[int, list[float]] = field(default_factory=dict)


def iperf_gbps(p: Path3, seconds: float) -> float:
    argv = in_netns(p.client_ns, ["iperf3", "-c", p.dst, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-O", "1",
                                  "-J"])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False, env=bench_env())
    try:
        data: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        raise BenchError(f"iperf3 on {p.name}: rc={proc.returncode}: {proc.stderr.strip()}") from None
    if proc.returncode != 0 or "error" in data:
        raise BenchError(f"iperf3 on {p.name}: {data.get('error', proc.stderr.strip())}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


def cc_rate(p: Path3, seconds: float) -> float:
    argv = in_netns(p.client_ns, [sys.executable, "-c", CC_CLIENT, p.dst, str(CC_PORT), f"{seconds:g}"])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False, env=bench_env())
    if proc.returncode != 0:
        raise BenchError(f"connect loop on {p.name}: {proc.stderr.strip()[-500:]}")
    return float(json.loads(proc.stdout)["rate"])


def add_endpoints(lab: Lab, node: Any, names: list[str]) -> list[float]:
    """E endpoints through the real CNI path (the lab's runtime execs weft-cni, which calls the agent);
    returns each ADD's milliseconds."""
    netns_add_many(names)
    runtime = lab.runtime(node)
    add_ms: list[float] = []
    t_start = time.monotonic()
    for i, name in enumerate(names, start=1):
        cid = uuid.uuid4().hex + uuid.uuid4().hex
        t0 = time.perf_counter()
        runtime.add(cid, str(NETNS_DIR / name), "eth0", args=cni_args("bench", f"ep-{i}", cid))
        add_ms.append((time.perf_counter() - t0) * 1e3)
        if i % 100 == 0 or i == len(names):
            say(f"  {i:5d} endpoints, {time.monotonic() - t_start:6.1f} s, ADD median of the last 100 "
                f"{median(add_ms[-100:]):.0f} ms")
    return add_ms


class Prober:
    """A prober process in the client pod: "allow" -> connect until one succeeds (its time is read back),
    "deny" -> connect until one fails."""

    def __init__(self, procs: Processes, netns: str, dst: str, port: int) -> None:
        # stdin/stdout pipes (Processes.start gives no stdin); stopped with the other processes
        self.proc = subprocess.Popen(
            in_netns(netns, [sys.executable, "-u", "-c", PROBER, dst, str(port)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True, env=bench_env())
        procs.procs.append(self.proc)
        if self._read() != "ready":
            raise BenchError("prober did not start")

    def _read(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def send(self, what: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()

    def wait_denied(self) -> None:
        self.send("deny")
        if self._read() != "denied":
            raise BenchError("the probe is not denied")

    def allowed_at(self) -> float:
        got = self._read()
        if got == "timeout":
            raise BenchError("the probe never got through after the change")
        return float(got)


def measure_changes(client: Any, prober: Prober, changes: int) -> tuple[list[float], list[float], list[float]]:
    """apply-to-enforced ms, the apply call's ms and the delete call's ms, per change."""
    lat: list[float] = []
    apply_call: list[float] = []
    delete_call: list[float] = []
    probe_file = [{"name": "probe.yaml", "text": PROBE_POLICY}]
    prober.wait_denied()
    for i in range(changes):
        prober.send("allow")
        t0 = time.monotonic()
        client.call("policy.apply", {"files": probe_file})
        apply_call.append((time.monotonic() - t0) * 1e3)
        lat.append((prober.allowed_at() - t0) * 1e3)
        t1 = time.monotonic()
        client.call("policy.delete", {"files": probe_file})
        delete_call.append((time.monotonic() - t1) * 1e3)
        prober.wait_denied()
        if (i + 1) % 20 == 0:
            say(f"  {i + 1}/{changes} changes: apply-to-enforced median so far {median(lat):.1f} ms, "
                f"max {max(lat):.1f} ms")
    return lat, apply_call, delete_call


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="10 and 1,000 rules, 2 rounds of 2 s, 100 endpoints, 20 changes")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per size (default 5)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per measurement (default 3)")
    ap.add_argument("--endpoints", type=int, default=None, help="extra endpoints (default 1000)")
    ap.add_argument("--changes", type=int, default=None, help="policy changes timed (default 100)")
    ap.add_argument("--iptables", choices=("nft", "legacy"), default="nft", help="iptables backend (nft)")
    ap.add_argument("--json", help="also write the figures to this file")
    opts = ap.parse_args(argv)
    rounds = opts.rounds or (2 if opts.quick else 5)
    seconds = opts.seconds or (2.0 if opts.quick else 3.0)
    sizes = SIZES_QUICK if opts.quick else SIZES_FULL
    extra_eps = opts.endpoints if opts.endpoints is not None else (100 if opts.quick else 1000)
    changes = opts.changes or (20 if opts.quick else 100)
    ipt_restore = "iptables-restore" if opts.iptables == "nft" else "iptables-legacy-restore"
    v4_prefix = min(24, 32 - (extra_eps + 2 + 3).bit_length())

    apply_ms: dict[int, list[float]] = {}
    cp: dict[str, Any] = {}
    with bench_session():
        lab = Lab(f"{PREFIX}s")
        ipt_ns = (f"{PREFIX}-inode", f"{PREFIX}-ia", f"{PREFIX}-ib")
        nft_ns = (f"{PREFIX}-nnode", f"{PREFIX}-na", f"{PREFIX}-nb")
        ep_names = [f"{PREFIX}-ep-{i}" for i in range(extra_eps)]
        procs = Processes()
        tmp = tmp_dir("pscale")
        try:
            ensure_bpf()
            say(f"lab {lab.name}: up (1 node, IPv4, node block /{v4_prefix}); client and server pods, "
                f"{extra_eps} more endpoints")
            lab.up(nodes=1, ip_family="ipv4", pools={4: ClusterPool.parse(DEFAULT_CLUSTER_CIDR_V4, v4_prefix)})
            node = lab.load().nodes[0]
            client = lab.client(node, timeout=300)
            pc = lab.pod_add("default/client", node_name=node.name, labels={"app": "client"})
            ps = lab.pod_add("default/server", node_name=node.name, labels={"app": "server"})
            lab_eps = len(client.call("endpoint.list"))  # client, server and the lab's own (kube-dns)
            t0 = time.monotonic()
            cp["add_ms"] = add_endpoints(lab, node, ep_names)
            cp["endpoints_added_s"] = time.monotonic() - t0
            cp["endpoints"] = len(client.call("endpoint.list"))
            if cp["endpoints"] != lab_eps + extra_eps:
                raise BenchError(f"the agent lists {cp['endpoints']} endpoints, expected {lab_eps + extra_eps}")
            build_plain(*ipt_ns)
            build_plain(*nft_ns)
            paths = [Path3("weft", pc.netns, ps.netns, ps.addresses[0]),
                     Path3("iptables", ipt_ns[1], ipt_ns[2], PLAIN_V4["b"]),
                     Path3("nft", nft_ns[1], nft_ns[2], PLAIN_V4["b"])]
            for p in paths:
                srv = procs.start(in_netns(p.server_ns, ["iperf3", "-s", "-p", str(IPERF_PORT)]),
                                  log=tmp / f"iperf3-{p.name}.log")
                wait_listening(p.server_ns, IPERF_PORT, srv)
                srv = procs.start(in_netns(p.server_ns, [sys.executable, "-c", CC_SERVER, str(CC_PORT)]),
                                  log=tmp / f"cc-{p.name}.log")
                wait_listening(p.server_ns, CC_PORT, srv)

            previous: list[dict[str, str]] = []

            def load(n: int) -> None:
                """Replace the previous size's policies by N rules; time the applies."""
                nonlocal previous
                for f in previous:
                    client.call("policy.delete", {"files": [f]})
                files = weft_policies(n)
                apply_ms[n] = []
                for f in files:
                    t0 = time.perf_counter()
                    client.call("policy.apply", {"files": [f]})
                    apply_ms[n].append((time.perf_counter() - t0) * 1e3)
                previous = files
                say(f"{n} rules: weft policy computation (policy.apply of {len(files)} files) "
                    f"{sum(apply_ms[n]):.0f} ms")

            for n in sizes:
                load(n)
                run(*in_netns(ipt_ns[0], [ipt_restore]), input_text=iptables_rules(n), timeout=300)
                run(*in_netns(nft_ns[0], ["nft", "-f", "-"]), input_text=nft_ruleset(n), timeout=300)
                for p in paths:
                    p.tcp[n], p.cc[n] = [], []
                for r in range(rounds):
                    order = paths[r % 3:] + paths[:r % 3]
                    for p in order:
                        p.tcp[n].append(iperf_gbps(p, seconds))
                    for p in order:
                        p.cc[n].append(cc_rate(p, seconds))
                    say(f"  {n} rules, round {r + 1}/{rounds}: TCP " +
                        " / ".join(f"{p.name} {p.tcp[n][-1]:.2f}" for p in paths) + " Gbit/s; conns " +
                        " / ".join(f"{p.name} {p.cc[n][-1]:.0f}" for p in paths) + " /s")

            if sizes[-1] != CP_RULES:
                load(CP_RULES)  # --quick: the control-plane figures are still for the issue's 10,000 rules
            say(f"{changes} timed changes with {cp['endpoints']} endpoints and {CP_RULES} rules")
            srv = procs.start(in_netns(ps.netns, [sys.executable, "-c", CC_SERVER, str(PROBE_PORT)]),
                              log=tmp / "probe-server.log")
            wait_listening(ps.netns, PROBE_PORT, srv)
            prober = Prober(procs, pc.netns, ps.addresses[0], PROBE_PORT)
            lat, apply_call, delete_call = measure_changes(client, prober, changes)
            cp["apply_to_enforced_ms"] = lat
            cp["change_apply_call_ms"] = apply_call
            cp["change_delete_call_ms"] = delete_call
            cp["agent_status_kib"] = status_kib(agent_pid(lab))
        finally:
            procs.stop_all()
            lab.down(quiet=True)
            netns_del_many(ep_names)
            for ns in (*ipt_ns, *nft_ns):
                netns_del(ns)
            shutil.rmtree(tmp, ignore_errors=True)

    say("")
    w, ipt, nft = paths
    rows = []
    for n in sizes:
        for metric, unit, key in (("TCP 1 stream", "Gbit/s", "tcp"), ("new conns", "/s", "cc")):
            digits = 2 if key == "tcp" else 0
            vals = [getattr(p, key)[n] for p in paths]
            mw, mi, mn = (median(v) for v in vals)
            rows.append([f"{n:>5} rules", f"{metric} ({unit})", f"{mw:.{digits}f}", spread(vals[0]),
                         f"{mi:.{digits}f}", spread(vals[1]), f"{mn:.{digits}f}", spread(vals[2]),
                         f"{mw / mi:.2f}", f"{mw / mn:.2f}"])
    say(table(["rules", "metric", "weft", "range", f"iptables-{opts.iptables}", "range", "nft vmap", "range",
               "weft/ipt", "weft/nft"], rows))
    small, big = sizes[0], sizes[-1]
    say("weft vs itself: " + ", ".join(
        f"{n} rules TCP {median(w.tcp[n]) / median(w.tcp[small]):.2f}x, "
        f"conns {median(w.cc[n]) / median(w.cc[small]):.2f}x" for n in sizes) + f" (of {small} rules)")
    say(f"{cp['endpoints']} endpoints added in {cp['endpoints_added_s']:.0f} s (ADD median "
        f"{median(cp['add_ms']):.0f} ms, p99 {nearest_rank(cp['add_ms'], 0.99):.0f} ms)")
    say("weft policy computation, loading N rules from none with the endpoints above (policy.apply calls of 500 "
        "rules, summed): " + ", ".join(f"{n} rules {sum(ms):.0f} ms" for n, ms in apply_ms.items()))
    lat = cp["apply_to_enforced_ms"]
    p99, p50 = nearest_rank(lat, 0.99), median(lat)
    rss_mib = cp["agent_status_kib"]["VmRSS"] / 1024
    say(f"one change with {cp['endpoints']} endpoints and {CP_RULES} rules: apply-to-enforced p50 {p50:.1f} ms, "
        f"p99 {p99:.1f} ms, max {max(lat):.1f} ms (n={len(lat)}); policy.apply call median "
        f"{median(cp['change_apply_call_ms']):.1f} ms, policy.delete call median "
        f"{median(cp['change_delete_call_ms']):.1f} ms")
    say(f"agent VmRSS {rss_mib:.1f} MiB (peak {cp['agent_status_kib']['VmHWM'] / 1024:.1f} MiB)")

    tw_big, tw_small = median(w.tcp[big]), median(w.tcp[small])
    ti, tn = median(ipt.tcp[big]), median(nft.tcp[big])
    tag = f"{rounds} rounds x {seconds:g} s" + (" (--quick: largest size 1,000, not 10,000)" if big != 10000 else "")
    results = [
        Result("policy_scale.weft_10k_vs_10", tw_big / tw_small, 0.95, True,
               f"weft TCP {tw_big:.2f} Gbit/s at {big} rules vs {tw_small:.2f} at {small}, {tag}"),
        Result("policy_scale.vs_iptables_10k", tw_big / ti, 5.0, True,
               f"weft {tw_big:.2f} vs iptables-{opts.iptables} {ti:.2f} Gbit/s at {big} rules, {tag}"),
        Result("policy_scale.vs_nft_10k", tw_big / tn, 1.0, True,
               f"weft {tw_big:.2f} vs nft vmap {tn:.2f} Gbit/s at {big} rules, {tag}"),
        Result("policy_scale.apply_p99_ms", p99 / 100.0, 1.0, False,
               f"p99 {p99:.1f} ms (p50 {p50:.1f}) over {len(lat)} changes, {cp['endpoints']} endpoints, "
               f"{CP_RULES} rules; computation of {CP_RULES} rules {sum(apply_ms[CP_RULES]):.0f} ms"),
        Result("policy_scale.memory", rss_mib, 300.0, False,
               f"agent VmRSS {rss_mib:.1f} MiB with {cp['endpoints']} endpoints and {CP_RULES} rules"),
    ]
    dump_json(opts.json, {"rounds": rounds, "seconds": seconds, "sizes": list(sizes),
                          "tcp_gbps": {p.name: p.tcp for p in paths}, "conn_rate": {p.name: p.cc for p in paths},
                          "apply_ms": apply_ms, "control_plane": cp})
    print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
