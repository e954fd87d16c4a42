"""CNI ADD+DEL pairs per second: weft-cni (through a lab node's agent) vs the reference plugins.

    python bench/cni_rate.py [--quick] [--rounds R] [--pairs N] [--family ipv4|dual] [--json FILE]

weft: the lab's weft-cni launcher, exec'd by the lab's libcni-like runtime inside the node's netns,
forwarding to the node's weft-agent. Reference: Debian's /usr/lib/cni/bridge + host-local
(isGateway true, ipMasq false, its own subnet, dataDir in a tmp dir), exec'd by the same runtime
code inside a private netns that plays the host. Both get the same CNI_ARGS (containerd's), the
same N pre-created container netns and the same result cache handling. A round is N sequential
pairs (ADD then DEL of one container) per plugin; rounds alternate which plugin goes first; the
figure is the median over rounds of pairs/s, and the ratio is weft/reference (target >= 1.0).

A profile follows: the exec floor of each plugin (VERSION), and weft's agent alone (cni.add /
cni.del straight on its socket, the same params the plugin sends), so the pair time splits into
plugin start-up and agent work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    netns_add,
    netns_add_many,
    netns_del,
    netns_del_many,
    paired_ratio,
    run,
    say,
    spread,
    sysctl,
    table,
    tmp_dir,
)
from weft.agent.client import AgentClient
from weft.lab.cluster import Lab, cni_args
from weft.lab.runtime import CniRuntime

REF_BIN = Path("/usr/lib/cni")
TARGET = 1.0


@dataclass
class Side:
    name: str
    runtime: CniRuntime
    pairs_per_s: list[float] = field(default_factory=list)
    add_ms: list[float] = field(default_factory=list)
    del_ms: list[float] = field(default_factory=list)


def ref_conflist(bridge: str, family: str, ipam_dir: Path) -> dict[str, Any]:
    ranges: list[list[dict[str, str]]] = [[{"subnet": "10.77.0.0/16"}]]
    if family == "dual":
        ranges.append([{"subnet": "fd77:77::/64"}])
    return {
        "cniVersion": "1.0.0",
        "name": "wbref",
        "plugins": [{
            "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": ranges, "dataDir": str(ipam_dir)},
        }],
    }


def one_round(side: Side, netns_names: Sequence[str]) -> None:
    """N sequential ADD+DEL pairs, one per container netns."""
    adds: list[float] = []
    dels: list[float] = []
    start = time.perf_counter()
    for name in netns_names:
        cid = uuid.uuid4().hex + uuid.uuid4().hex
        path = str(NETNS_DIR / name)
        args = cni_args("bench", name, cid)
        t0 = time.perf_counter()
        side.runtime.add(cid, path, "eth0", args=args)
        t1 = time.perf_counter()
        side.runtime.delete(cid, path, "eth0", args=args)
        t2 = time.perf_counter()
        adds.append((t1 - t0) * 1e3)
        dels.append((t2 - t1) * 1e3)
    elapsed = time.perf_counter() - start
    side.pairs_per_s.append(len(netns_names) / elapsed)
    side.add_ms.append(median(adds))
    side.del_ms.append(median(dels))


def time_execs(fn: Callable[[], object], n: int) -> float:
    """Median wall time of ``fn`` in ms over ``n`` calls."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return median(samples)


def version_exec(netns: str, plugin: Path) -> Callable[[], None]:
    def call() -> None:
        run("nsenter", f"--net={NETNS_DIR / netns}", str(plugin), input_text='{"cniVersion":"1.0.0"}',
            env={"CNI_COMMAND": "VERSION", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    return call


def agent_pair_ms(client: AgentClient, netns_names: Sequence[str]) -> tuple[float, float]:
    """Median ms of cni.add and cni.del sent straight to the agent (no plugin exec)."""
    adds: list[float] = []
    dels: list[float] = []
    for name in netns_names:
        cid = uuid.uuid4().hex + uuid.uuid4().hex
        params: dict[str, Any] = {
            "containerID": cid, "netns": str(NETNS_DIR / name), "ifname": "eth0", "network": "weft",
            "cniVersion": "1.0.0", "args": dict(kv.split("=", 1) for kv in cni_args("bench", name, cid).split(";")),
            "runtimeConfig": {}, "config": {"cniVersion": "1.0.0", "name": "weft", "type": "weft-cni"},
        }
        t0 = time.perf_counter()
        result = client.call("cni.add", params)
        t1 = time.perf_counter()
        client.call("cni.del", {**params, "prevResult": result})
        t2 = time.perf_counter()
        adds.append((t1 - t0) * 1e3)
        dels.append((t2 - t1) * 1e3)
    return median(adds), median(dels)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds x 10 pairs")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per plugin (default 7)")
    ap.add_argument("--pairs", type=int, default=None, help="ADD+DEL pairs per round (default 30)")
    ap.add_argument("--family", choices=("ipv4", "dual"), default="ipv4",
                    help="addresses per container, the same for both plugins (default ipv4)")
    ap.add_argument("--json", help="also write the figures to this file")
    opts = ap.parse_args(argv)
    rounds = opts.rounds or (3 if opts.quick else 7)
    pairs = opts.pairs or (10 if opts.quick else 30)

    with bench_session():
        lab = Lab(f"{PREFIX}c")
        host_ns = f"{PREFIX}-cnihost"
        ctr_ns = [f"{PREFIX}-cni-{i}" for i in range(pairs)]
        tmp = tmp_dir("cni")
        try:
            ensure_bpf()
            say(f"lab {lab.name}: up (1 node, {opts.family})")
            lab.up(nodes=1, ip_family=opts.family, world=False)  # no kube-dns: endpoints counted from zero
            node = lab.load().nodes[0]
            netns_add(host_ns)
            netns_add_many(ctr_ns)
            if opts.family == "dual":
                # The bridge plugin waits for IPv6 DAD to settle; weft sets its addresses NODAD.
                # Give both the same no-DAD containers.
                for n in ctr_ns:
                    sysctl(n, "net.ipv6.conf.default.accept_dad", "0")
            conf_dir = tmp / "net.d"
            conf_dir.mkdir()
            (conf_dir / "10-wbref.conflist").write_text(json.dumps(ref_conflist("wbbr0", opts.family, tmp / "ipam")))
            weft = Side("weft", lab.runtime(node))
            ref = Side("bridge+host-local", CniRuntime(conf_dir=conf_dir, bin_dirs=[REF_BIN], cache_dir=tmp / "cache",
                                                       exec_netns=str(NETNS_DIR / host_ns)))
            # Warm-up (not counted): page cache for both plugins, first-use paths of the agent.
            for side in (weft, ref):
                one_round(Side(side.name, side.runtime), ctr_ns[:3])
            say(f"{rounds} rounds x {pairs} sequential ADD+DEL pairs per plugin, interleaved")
            for r in range(rounds):
                order = (weft, ref) if r % 2 == 0 else (ref, weft)
                for side in order:
                    one_round(side, ctr_ns)
                say(f"  round {r + 1}/{rounds}: weft {weft.pairs_per_s[-1]:.1f} pairs/s, "
                    f"reference {ref.pairs_per_s[-1]:.1f} pairs/s")

            # Nothing may be left behind by either plugin.
            left = lab.client(node).call("endpoint.list")
            if left:
                raise BenchError(f"weft agent still holds {len(left)} endpoints after the DELs")
            ipam_left = [p.name for p in (tmp / "ipam").rglob("*") if p.is_file() and p.name[0].isdigit()]
            if ipam_left:
                raise BenchError(f"host-local still holds {ipam_left[:5]} after the DELs")

            # Profile: exec floor (VERSION) and the agent's own time.
            n_prof = max(10, pairs // 2)
            weft_version = version_exec(node.netns, lab.bin_dir / "weft-cni")
            ref_version = version_exec(host_ns, REF_BIN / "bridge")
            v_weft = time_execs(weft_version, n_prof)
            v_ref = time_execs(ref_version, n_prof)
            nsenter_floor = time_execs(lambda: run("nsenter", f"--net={NETNS_DIR / host_ns}", "/bin/true"), n_prof)
            a_add, a_del = agent_pair_ms(lab.client(node), ctr_ns[:n_prof])
        finally:
            lab.down(quiet=True)
            netns_del_many(ctr_ns)
            netns_del(host_ns)
            shutil.rmtree(tmp, ignore_errors=True)

    w, b = median(weft.pairs_per_s), median(ref.pairs_per_s)
    ratio = w / b
    say("")
    say(table(
        ["plugin", "pairs/s (median)", "range", "ADD ms", "DEL ms", "VERSION exec ms"],
        [["weft-cni + agent", f"{w:.1f}", spread(weft.pairs_per_s), f"{median(weft.add_ms):.1f}",
          f"{median(weft.del_ms):.1f}", f"{v_weft:.1f}"],
         ["bridge + host-local", f"{b:.1f}", spread(ref.pairs_per_s), f"{median(ref.add_ms):.1f}",
          f"{median(ref.del_ms):.1f}", f"{v_ref:.1f}"]]))
    say("")
    say("weft pair cost split (medians, ms):")
    w_add, w_del = median(weft.add_ms), median(weft.del_ms)
    say(table(
        ["verb", "through plugin", "agent alone", "plugin exec+client", "of which VERSION floor"],
        [["ADD", f"{w_add:.1f}", f"{a_add:.1f}", f"{w_add - a_add:.1f}", f"{v_weft:.1f}"],
         ["DEL", f"{w_del:.1f}", f"{a_del:.1f}", f"{w_del - a_del:.1f}", f"{v_weft:.1f}"]]))
    say(f"median of per-round ratios (noise check): {paired_ratio(weft.pairs_per_s, ref.pairs_per_s):.3f}")
    say(f"(nsenter + exec of /bin/true: {nsenter_floor:.1f} ms; runtime: libcni-like Python CniRuntime, same for both)")
    dump_json(opts.json, {
        "rounds": rounds, "pairs": pairs, "family": opts.family,
        "weft_pairs_per_s": weft.pairs_per_s, "ref_pairs_per_s": ref.pairs_per_s,
        "weft_add_ms": weft.add_ms, "weft_del_ms": weft.del_ms, "ref_add_ms": ref.add_ms, "ref_del_ms": ref.del_ms,
        "version_ms": {"weft": v_weft, "ref": v_ref, "nsenter_true": nsenter_floor},
        "agent_alone_ms": {"add": a_add, "del": a_del}, "ratio": ratio,
    })
    res = Result("cni_rate", ratio, TARGET, True,
                 f"weft {w:.1f} pairs/s vs bridge+host-local {b:.1f} pairs/s, {rounds}x{pairs} pairs")
    say("\n".join(res.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
