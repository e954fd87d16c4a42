"""Flow observability: events/s from the kernel to ``weft observe -o json`` without loss, the
throughput cost of observability, aggregated traffic observed without loss, the flow ring's memory.

    python bench/observe.py [--quick] [--rates 25000,50000,100000] [--seconds S] [--rounds R]
                            [--capacity-packets N] [--json FILE]

One lab node (no world), two pods: default/client and default/sink; a CiliumNetworkPolicy lets
the client reach the sink on TCP 5201 (iperf3) and UDP 9000 only, so UDP to 9999 is dropped at the
sink's ingress: every such datagram is one drop event (every drop is reported at every event level).

1. Drop events/s: ``bench/udpgen`` (C, paced sendmmsg) sends datagrams to the sink's UDP 9999 at
   each rate of ``--rates`` for S seconds while ``weft observe --follow -o json --type drop
   --to-pod default/sink`` runs; per rate: drops the datapath counted (the baseline: what happened),
   flows printed by weft observe, and losses reported anywhere (kernel ring full, agent, a
   follower behind the flow ring). Target: no loss at any rate up to 100,000 events/s per node.
   Two sweeps (``--paths``): through the lab's relay (as users run it), and straight from the
   node's Observer (``--node``: the per-node figure, as ``hubble observe`` against one agent).
2. Throughput: iperf3 TCP client -> sink, one stream, with the node's flow events at the default
   level (``medium``, an observer following) vs ``off``, rounds alternating. Target: on/off >= 0.95.
3. Aggregated traffic: udpgen at full speed (several flows and processes) to the allowed UDP 9000
   for S seconds: packets/s the datapath forwarded and events lost (target: none; the packet rate
   is reported next to the issue's 1,000,000 packets/s).
   This is real traffic through veths, limited by the generator on this VM; the next figure is
   the datapath's own capacity.
3b. Datapath capacity with observability on (bench/observe_capacity.py): the real compiled
   ``from_container`` run by BPF_PROG_TEST_RUN on an allowed flow's UDP packet, 1,000,000 runs
   (1 flow, then 8 flows), events at the default level on the default ring: packets/s per CPU
   from the kernel's timing, events the ring got, events lost (must be 0). No NIC, no veth, one
   CPU: the per-packet cost of the program, not of the path around it.
4. Memory of a full flow ring: 4,095 enriched flows (from real event records of the kind the lab
   produces) held in a :class:`weft.observe.ring.FlowRing`, measured with tracemalloc in this
   process. Target: under 32 MiB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import observe_capacity
from bench.common import (
    PREFIX,
    REPO,
    BenchError,
    Processes,
    Result,
    bench_env,
    bench_session,
    build_tool,
    dump_json,
    ensure_bpf,
    in_netns,
    median,
    print_results,
    say,
    spread,
    table,
    tmp_dir,
    wait_for,
    wait_listening,
)
from weft.lab.cluster import Lab, LabState, NodeInfo

IPERF_PORT = 5201
ALLOWED_UDP = 9000
DENIED_UDP = 9999
EVENT_RATE_TARGET = 100_000
THROUGHPUT_TARGET = 0.95
RING_TARGET_MIB = 32.0
AGGREGATED_PPS_GOAL = 1_000_000
WEFT = str(REPO / ".venv" / "bin" / "weft")

POLICY = f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: sink-ingress
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: sink
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client
    toPorts:
    - ports:
      - port: "{IPERF_PORT}"
        protocol: TCP
      - port: "{ALLOWED_UDP}"
        protocol: UDP
"""

UDP_SINK = f"""
import signal, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {ALLOWED_UDP}))
print("ready", flush=True)
signal.pause()
"""


def build_udpgen() -> Path:
    return build_tool("udpgen")


@dataclass
class Follower:
    """``weft observe --follow -o json`` as a user runs it: flows and lost events counted as printed."""

    argv: list[str]
    flows: int = 0
    lost: int = 0
    lost_by_source: dict[str, int] = field(default_factory=dict)
    lost_lines: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=1 << 20,
                                     env=bench_env())
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        # -o json prints each flow as one JSON object per line, and lost events as {"lost_events":
        # ...}. Every line is counted; only lost-event lines are parsed (parsing 100,000 lines a
        # second would take this process a CPU the pipeline under test needs): a flow line must
        # be a JSON object that names its verdict.
        for line in self.proc.stdout:
            if b'"lost_events"' in line:
                try:
                    item = json.loads(line)
                except ValueError:
                    continue
                lost = item["lost_events"]
                with self.lock:
                    self.lost += int(lost.get("num_events_lost", 0))
                    source = str(lost.get("source", "?"))
                    self.lost_by_source[source] = self.lost_by_source.get(source, 0) + int(
                        lost.get("num_events_lost", 0))
                    self.lost_lines.append(line.decode().strip())
            elif line.startswith(b"{") and line.rstrip().endswith(b"}") and b'"verdict":' in line:
                with self.lock:
                    self.flows += 1

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.flows, self.lost

    def losses(self) -> dict[str, int]:
        """Lost events in the stream by source (PERF_EVENT_RING_BUFFER: the kernel ring;
        HUBBLE_RING_BUFFER: this follower fell behind the node's flow ring; ...)."""
        with self.lock:
            return dict(self.lost_by_source)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def settle(counts: Any, expected: int, quiet_s: float = 2.0, timeout: float = 120.0) -> int:
    """Wait until ``counts()`` reaches ``expected`` or stops growing for ``quiet_s``; its last value."""
    deadline = time.monotonic() + timeout
    last, last_change = counts(), time.monotonic()
    while time.monotonic() < deadline:
        now_value = counts()
        if now_value >= expected:
            return int(now_value)
        if now_value != last:
            last, last_change = now_value, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            return int(now_value)
        time.sleep(0.05)
    return int(counts())


class Node:
    def __init__(self, lab: Lab, node: NodeInfo) -> None:
        self.lab, self.node = lab, node

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = self.lab.client(self.node).call("status")
        return out

    def counter(self, name: str) -> int:
        return int(self.status()["counters"].get(name, {}).get("packets", 0))

    def losses(self) -> dict[str, int]:
        lost = self.status()["flows"]["lost"]
        return {str(k): int(v) for k, v in lost.items()}

    def set_flows(self, state: LabState, **flows: Any) -> None:
        """Change the node's ``flows`` settings and restart its agent (the datapath keeps running)."""
        path = Path(self.node.config_path)
        config = json.loads(path.read_text())
        config["flows"] = {**config.get("flows", {}), **flows}
        path.write_text(json.dumps(config, indent=1))
        self.lab.stop_agent(state, self.node.name)
        self.lab.start_agent(state, self.node.name)
        wait_for("the agent back", lambda: self.status()["flows"]["event_level"] == config["flows"].get(
            "event_level", "medium"), timeout=30)


def udpgen(gen: Path, netns: str, host: str, port: int, rate: float, seconds: float, flows: int = 1) -> dict[str, Any]:
    proc = subprocess.run(in_netns(netns, [str(gen), host, str(port), f"{rate:g}", f"{seconds:g}", str(flows)]),
                          capture_output=True, text=True, timeout=seconds + 60, check=False, env=bench_env())
    if proc.returncode != 0:
        raise BenchError(f"udpgen: {proc.stderr.strip()}")
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def iperf_gbps(netns: str, host: str, seconds: float) -> float:
    argv = in_netns(netns, ["iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-O", "1", "-J"])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False, env=bench_env())
    try:
        data: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        raise BenchError(f"iperf3: rc={proc.returncode}: {proc.stderr.strip()}") from None
    if "error" in data:
        raise BenchError(f"iperf3: {data['error']}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


def ring_memory_mib(capacity: int = 4095) -> tuple[float, int]:
    """A full flow ring of enriched flows (a policy drop's two flows and forwarded TCP flows, with
    pod labels and policy names as in the lab), measured with tracemalloc: MiB, flows held."""
    from weft.datapath import abi
    from weft.observe import flow as flows
    from weft.observe.ring import FlowRing

    labels = tuple(f"k8s:{k}={v}" for k, v in (("app", "sink"), ("io.kubernetes.pod.namespace", "default"),
                                               ("tier", "backend"), ("version", "v1")))
    views = {i: flows.EndpointView(ep_id=i, identity=256 + i, namespace="default", pod_name=f"pod-{i:04d}-5d8f7c9b6d",
                                   labels=labels) for i in range(1, 65)}
    enrich = flows.Enrichment(node_name="node-1", endpoints_by_id=views, interfaces={i: f"lxc{i:08x}" for i in views},
                              rules_by_cookie=lambda _c: ("cnp default/sink-ingress ingress[0]",))
    ring = FlowRing(capacity)
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    i = 0
    while ring.total < capacity * 2:  # fill it twice over: the ring holds its capacity, no more
        ev = abi.Event()
        ev.version = abi.EVENT_VERSION
        ev.family = abi.FAMILY_V4
        ev.src_ep_id, ev.dst_ep_id = 1 + i % 64, 1 + (i * 7) % 64
        ev.src_identity, ev.dst_identity = 256 + ev.src_ep_id, 256 + ev.dst_ep_id
        ev.proto = 6
        ev.tcp_flags = 0x02
        ev.ifindex = ev.dst_ep_id
        ev.ingress_cookie = 1
        if i % 2:
            ev.verdict, ev.reason = abi.VERDICT_DROPPED, int(abi.Metric.DROP_POLICY_INGRESS)
        else:
            ev.verdict, ev.reason = abi.VERDICT_FORWARDED, int(abi.Metric.FWD_PEER_V4)
            ev.flags = abi.EV_F_POLICY | abi.EV_F_CT_NEW | abi.EV_F_TO_ENDPOINT
        ring.extend(flows.to_responses(flows.decode(bytes(ev)), time.time_ns(), enrich))
        i += 1
    used = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(base, "filename"))
    tracemalloc.stop()
    return used / (1 << 20), len(ring)


def drop_sweep(follower: Follower, sweep: list[dict[str, Any]], node: Node, gen: Path, netns: str, sink_ip: str,
               rates: list[int], seconds: float) -> None:
    """Drops at each rate while ``follower`` prints them: a row per rate into ``sweep``."""

    def follower_sees_drops() -> bool:
        # A few drops each time: the follower starts with --last 0, so drops before it runs are not shown.
        udpgen(gen, netns, sink_ip, DENIED_UDP, 100, 0.05)
        return follower.counts()[0] > 0

    wait_for("weft observe printing drops", follower_sees_drops, timeout=30, interval=0.5)
    settle(lambda: follower.counts()[0], 1 << 60, quiet_s=1.0)
    for rate in rates:
        drops0 = node.counter("drop_policy_ingress")
        lost0 = node.losses()
        seen0, flost0 = follower.counts()
        by_source0 = follower.losses()
        sent = udpgen(gen, netns, sink_ip, DENIED_UDP, rate, seconds)
        drops = node.counter("drop_policy_ingress") - drops0
        seen = settle(lambda: follower.counts()[0], seen0 + drops) - seen0
        lost_after = node.losses()
        lost = {k: v - lost0.get(k, 0) for k, v in lost_after.items() if v != lost0.get(k, 0)}
        flost = follower.counts()[1] - flost0
        by_source = {k: v - by_source0.get(k, 0) for k, v in follower.losses().items() if v != by_source0.get(k, 0)}
        row = {"rate": rate, "sent": int(sent["sent"]), "achieved": float(sent["rate"]), "drops": drops,
               "seen": seen, "lost_agent": lost, "lost_in_stream": flost,
               "lost_in_stream_by_source": by_source,
               "complete": seen == drops and not lost and flost == 0}
        sweep.append(row)
        say(f"  {rate:>7}/s asked, {sent['rate']:>9.0f}/s sent: {drops} drops in the datapath, {seen} "
            f"printed by weft observe, lost: {lost or 0} (agent) {flost} (stream"
            + (f": {by_source})" if by_source else ")"))
    if not follower.alive():
        raise BenchError("weft observe exited: " + (follower.proc.stderr.read().decode() if follower.proc and
                                                    follower.proc.stderr else ""))


def lossless(sweep: list[dict[str, Any]], seconds: float, what: str) -> Result:
    """The highest rate reached with every lower rate complete too: the rate asked when udpgen's
    pacing reached 99% of it (it sends in batches: 99,994/s for 100,000/s asked), else the rate sent."""
    lossless_up_to = 0.0
    for r in sorted(sweep, key=lambda r: r["rate"]):
        if not r["complete"]:
            break
        reached = r["rate"] if r["achieved"] >= 0.99 * r["rate"] else r["achieved"]
        lossless_up_to = max(lossless_up_to, reached)
    first_loss = next((r for r in sorted(sweep, key=lambda r: r["rate"]) if not r["complete"]), None)
    name = "observe.events_lossless" + ("" if what == "relay" else f"_{what}")
    return Result(name, lossless_up_to / EVENT_RATE_TARGET, 1.0, True,
                  f"{what}: every drop printed by weft observe up to {lossless_up_to:.0f}/s"
                  + (f"; first loss at {first_loss['achieved']:.0f}/s" if first_loss else "")
                  + f" ({seconds:g} s per rate)")


def capacity_result(rows: list[observe_capacity.Row]) -> Result:
    """The datapath's packets/s per CPU with observability on (the slowest allowed-UDP case), as
    a fraction of the issue's 1,000,000 packets/s; 0 unless every run of every such case was
    forwarded, one event per flow reached the ring and none was lost."""
    on = observe_capacity.forwarding(rows)
    best = observe_capacity.headline(rows)
    clean = all(observe_capacity.forwarded_cleanly(r) for r in on)
    drops = next((r for r in rows if r.case.startswith("denied")), None)
    return Result("observe.datapath_capacity", best.kernel_pps / AGGREGATED_PPS_GOAL if clean else 0.0, 1.0, True,
                  f"BPF_PROG_TEST_RUN of from_container, {best.packets:,} runs per case (no NIC, no veth, one CPU), "
                  f"events medium, ring {best.ring_bytes >> 20} MiB: "
                  + ", ".join(f"{r.flows} flow{'s' if r.flows > 1 else ''} {r.kernel_pps / 1e6:.2f} Mpps/CPU "
                              f"({r.events} events, {r.events_lost} lost)" for r in on)
                  + f"; vs events off {observe_capacity.on_off_ratio(rows):.3f}"
                  + (f"; drop path, an event per packet: {drops.kernel_pps / 1e6:.2f} M/s, {drops.events:,} events, "
                     f"{drops.events_lost} lost" if drops else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rates and rounds, 1 s each")
    ap.add_argument("--rates", help="drop events/s to try (default 10000,25000,50000,100000,150000)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per measurement (default 3)")
    ap.add_argument("--rounds", type=int, default=None, help="throughput rounds per mode (default 5)")
    ap.add_argument("--paths", default="relay,direct",
                    help="sweeps: relay (weft observe through the lab's relay), direct (--node: the node's Observer)")
    ap.add_argument("--capacity-packets", type=int, default=None,
                    help="runs per case of the datapath capacity figure (default 1,000,000; --quick 100,000; 0: skip)")
    ap.add_argument("--json", help="also write the figures to this file")
    opts = ap.parse_args(argv)
    seconds = opts.seconds or (1.0 if opts.quick else 3.0)
    rounds = opts.rounds or (2 if opts.quick else 5)
    rates = [int(r) for r in (opts.rates or ("25000,100000" if opts.quick else "10000,25000,50000,100000,150000"))
             .split(",")]

    mib, held = ring_memory_mib()
    say(f"flow ring: {held} flows held in {mib:.2f} MiB (tracemalloc)")
    capacity_packets = opts.capacity_packets if opts.capacity_packets is not None else (
        100_000 if opts.quick else 1_000_000)
    capacity: list[observe_capacity.Row] = []
    if capacity_packets:
        say(f"datapath capacity: from_container by BPF_PROG_TEST_RUN, {capacity_packets} runs per case, one CPU")
        with bench_session():
            capacity = observe_capacity.measure(capacity_packets)
        say(observe_capacity.describe(capacity))

    paths = [p.strip() for p in opts.paths.split(",") if p.strip()]
    if not paths or set(paths) - {"relay", "direct"}:
        ap.error("--paths: relay, direct or both")
    sweeps: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
    tput: dict[str, list[float]] = {"on": [], "off": []}
    aggregated: dict[str, Any] = {}
    with bench_session():
        lab = Lab(f"{PREFIX}o")
        procs = Processes()
        tmp = tmp_dir("observe")
        follower: Follower | None = None
        try:
            gen = build_udpgen()
            ensure_bpf()
            say(f"lab {lab.name}: up (1 node, IPv4), pods default/client and default/sink, policy sink-ingress")
            lab.up(nodes=1, ip_family="ipv4", world=False)
            state = lab.load()
            node = Node(lab, state.nodes[0])
            client = lab.pod_add("default/client", node_name=node.node.name, labels={"app": "client"})
            sink = lab.pod_add("default/sink", node_name=node.node.name, labels={"app": "sink"})
            sink_ip = next(ip for ip in sink.addresses if ":" not in ip)
            result = lab.client(node.node).call("policy.apply", {"files": [{"name": "sink.yaml", "text": POLICY}]})
            say(f"policy: {result.get('summary', result)}")
            iperf = procs.start(in_netns(sink.netns, ["iperf3", "-s", "-p", str(IPERF_PORT)]), log=tmp / "iperf3.log")
            wait_listening(sink.netns, IPERF_PORT, iperf)
            procs.start(in_netns(sink.netns, [sys.executable, "-c", UDP_SINK]), ready_line="ready")

            # 1. drop events/s to weft observe, through the relay and from the node directly
            for path, sweep in sweeps.items():
                follower = Follower([WEFT, "observe", "--lab", lab.name, "--follow", "-o", "json", "--type", "drop",
                                     "--to-pod", "default/sink", "--last", "0"]
                                    + (["--node", node.node.name] if path == "direct" else []))
                follower.start()
                say(f"drop events -> weft observe ({'the node directly' if path == 'direct' else 'through the relay'})")
                drop_sweep(follower, sweep, node, gen, client.netns, sink_ip, rates, seconds)
                follower.stop()
                follower = None
            # 3. aggregated traffic at full speed
            lost0 = node.losses()
            fwd0 = node.counter("fwd_peer_v4")
            events0 = int(node.status()["flows"]["events"])
            gens = [subprocess.Popen(in_netns(client.netns, [str(gen), sink_ip, str(ALLOWED_UDP), "0", f"{seconds:g}",
                                                             "4"]), stdout=subprocess.PIPE, text=True, env=bench_env())
                    for _ in range(2)]
            outs = [json.loads(g.communicate(timeout=seconds + 60)[0]) for g in gens]
            sent_pps = sum(float(o["rate"]) for o in outs)
            fwd = node.counter("fwd_peer_v4") - fwd0
            events = settle(lambda: int(node.status()["flows"]["events"]), 1 << 60, quiet_s=1.0) - events0
            lost_after = node.losses()
            agg_lost = {k: v - lost0.get(k, 0) for k, v in lost_after.items() if v != lost0.get(k, 0)}
            aggregated = {"sent_pps": sent_pps, "forwarded": fwd, "forwarded_pps": fwd / seconds, "events": events,
                          "lost": agg_lost}
            say(f"aggregated: {sent_pps:.0f} packets/s sent, {fwd / seconds:.0f}/s forwarded by the datapath, "
                f"{events} events, lost {agg_lost or 0}")

            # 2. throughput, observability on (medium + a follower) vs off
            for r in range(rounds):
                for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                    node.set_flows(state, event_level="medium" if mode == "on" else "off")
                    if mode == "on":
                        follower = Follower([WEFT, "observe", "--lab", lab.name, "--follow", "-o", "json"])
                        follower.start()
                    try:
                        tput[mode].append(iperf_gbps(client.netns, sink_ip, seconds))
                    finally:
                        if follower is not None:
                            follower.stop()
                            follower = None
                say(f"  round {r + 1}/{rounds}: on {tput['on'][-1]:.2f} / off {tput['off'][-1]:.2f} Gbit/s")
        finally:
            if follower is not None:
                follower.stop()
            procs.stop_all()
            lab.down(quiet=True)
            shutil.rmtree(tmp, ignore_errors=True)

    say("")
    for path, sweep in sweeps.items():
        say(f"{path}:")
        say(table(["asked/s", "sent/s", "drops (datapath)", "printed by weft observe", "lost (agent)",
                   "lost (stream)"],
                  [[r["rate"], f"{r['achieved']:.0f}", r["drops"], r["seen"], r["lost_agent"] or 0,
                    r["lost_in_stream"]] for r in sweep]))
    on, off = median(tput["on"]), median(tput["off"])
    say(f"throughput: on {on:.2f} Gbit/s ({spread(tput['on'])}), off {off:.2f} Gbit/s ({spread(tput['off'])})")
    results = [
        *(lossless(sweep, seconds, path) for path, sweep in sweeps.items()),
        Result("observe.throughput", on / off, THROUGHPUT_TARGET, True,
               f"iperf3 1 stream, events medium + follower {on:.2f} vs off {off:.2f} Gbit/s, {rounds} rounds"),
        Result("observe.aggregated_lossless", 1.0 if aggregated and not aggregated["lost"] else 0.0, 1.0, True,
               f"real traffic (udpgen, 2 processes x 4 flows, over veth): {aggregated.get('forwarded_pps', 0):.0f} "
               f"packets/s forwarded (goal {AGGREGATED_PPS_GOAL:,}), {aggregated.get('events', 0)} events, "
               f"lost {aggregated.get('lost') or 0}"),
        *([capacity_result(capacity)] if capacity else []),
        Result("observe.ring_memory_mib", mib, RING_TARGET_MIB, False, f"{held} flows in {mib:.2f} MiB"),
    ]
    dump_json(opts.json, {"seconds": seconds, "sweeps": sweeps, "throughput_gbps": tput, "aggregated": aggregated,
                          "capacity": [asdict(r) for r in capacity], "ring_mib": mib})
    print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
