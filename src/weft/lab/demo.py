"""``make demo``: a two-node lab with its world (kube-dns, a DNS server and servers beyond the
node's uplink), three pods, connectivity over IPv4 and IPv6 through the eBPF datapath, a
least-privilege L4 policy, the seed's FQDN policy (app=genai_backend may resolve
*.myblobstorage.com through kube-dns and reach app1.myblobstorage.com, nothing else) enforced by
the datapath and the node's DNS proxy, and the flows that show it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from weft.lab.cluster import Lab, LabError
from weft.lab.probe import ping, probe

console = Console()


def run_demo(lab_name: str, keep: bool = False) -> int:
    lab = Lab(lab_name)
    lab.down(quiet=True)
    failures = 0
    try:
        with console.status("bringing up a two-node lab (VXLAN overlay, SQLite cluster store)"):
            state = lab.up(nodes=2, ip_family="dual", mode="overlay", store="sqlite")
        console.print(f"[bold]lab {lab_name}[/bold]: " + ", ".join(f"{n.name} in netns {n.netns}" for n in state.nodes)
                      + f", an agent each; {state.mode} mode, {state.store} cluster store")
        # db on the other node: its traffic crosses the overlay, its policy holds there.
        pods = [
            lab.pod_add("default/frontend", node_name="node-1", labels={"app": "frontend"}, serve=["tcp:80", "udp:53"]),
            lab.pod_add("default/backend", node_name="node-1", labels={"app": "backend"}, serve=["tcp:80", "udp:53"]),
            lab.pod_add("default/db", node_name="node-2", labels={"app": "db"}, serve=["tcp:80", "udp:53"]),
        ]
        t = Table(title="pods (wired by weft-cni, as containerd would)")
        for col in ("POD", "NODE", "IPv4", "IPv6"):
            t.add_column(col)
        for p in pods:
            v4 = [a for a in p.addresses if ":" not in a]
            v6 = [a for a in p.addresses if ":" in a]
            t.add_row(p.key, p.node, ", ".join(v4), ", ".join(v6))
        console.print(t)

        results = Table(title="pod-to-pod connectivity (real packets)")
        for col in ("FROM", "TO", "ADDRESS", "PING", "TCP/80", "UDP/53"):
            results.add_column(col)
        for src in pods:
            for dst in pods:
                if src is dst:
                    continue
                for addr in dst.addresses:
                    ok_ping = ping(src.netns, addr, count=1)
                    tcp = probe(src.netns, "tcp", addr, 80)
                    udp = probe(src.netns, "udp", addr, 53)
                    failures += (not ok_ping) + (not tcp.ok) + (not udp.ok)
                    results.add_row(src.key, dst.key, addr, _mark(ok_ping), _mark(tcp.ok, tcp.outcome),
                                    _mark(udp.ok, udp.outcome))
        console.print(results)

        failures += _policy_step(lab, state.nodes, pods)
        failures += _fqdn_step(lab, state.nodes[0])
        counters = Table(title="eBPF datapath counters (pod traffic never used the nodes' IP stacks)")
        counters.add_column("COUNTER")
        for node in state.nodes:
            counters.add_column(f"{node.name} PACKETS", justify="right")
        per_node = [lab.client(node).call("status")["counters"] for node in state.nodes]
        for name in per_node[0]:
            if any(c[name]["packets"] for c in per_node):
                counters.add_row(name, *(str(c[name]["packets"]) for c in per_node))
        console.print(counters)
        console.print("weft endpoint list (identities are cluster-wide: numbered by the cluster store):")
        ep = Table()
        for col in ("NODE", "ID", "POD", "ADDRESSES", "IDENTITY", "LABELS"):
            ep.add_column(col)
        for node in state.nodes:
            for row in lab.client(node).call("endpoint.list"):
                ep.add_row(node.name, str(row["id"]), row["pod"], "\n".join(row["addresses"]), str(row["identity"]),
                           "\n".join(row["labels"]))
        console.print(ep)
    except LabError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        failures += 1
    finally:
        if not keep:
            lab.down(quiet=True)
            console.print(f"lab {lab_name} removed")
    console.print("[green]all probes passed[/green]" if not failures else f"[red]{failures} probe(s) failed[/red]")
    return 0 if not failures else 1


DEMO_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: db-from-backend-only
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: db
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: backend
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
"""


def _policy_step(lab: Lab, nodes: list[Any], pods: list[Any]) -> int:
    """Apply a least-privilege policy (to every node, as `weft apply` does) and show it hold on
    real packets across nodes."""
    frontend, backend, db = pods
    console.print("\n[bold]policy[/bold] db-from-backend-only: only app=backend may reach app=db, on 80/tcp")
    for node in nodes:
        result = lab.client(node).call("policy.apply", {"files": [{"name": "demo-policy.yaml", "text": DEMO_POLICY}]})
    console.print(f"applied: {', '.join(result['created'] + result['configured'])} (revision {result['revision']})")
    t = Table(title="after the policy (real packets; denied = dropped in the datapath)")
    for col in ("FROM", "TO", "PORT", "EXPECTED", "OBSERVED"):
        t.add_column(col)
    failures = 0
    for src, port, expected in ((backend, 80, "allowed"), (frontend, 80, "denied"), (backend, 53, "denied"),
                                (frontend, 80, None)):
        dst = db if expected is not None else backend
        want = expected or "allowed"
        proto = "udp" if port == 53 else "tcp"
        outcome = probe(src.netns, proto, dst.addresses[0], port, timeout=1.0).outcome
        seen = "allowed" if outcome in ("connected", "refused") else "denied"
        failures += seen != want
        t.add_row(src.key, dst.key, f"{port}/{proto}", want, _mark(seen == want, seen) if seen != want else seen)
    console.print(t)
    counters = lab.client(nodes[1] if len(nodes) > 1 else nodes[0]).call("status")["counters"]
    console.print(f"drops by reason on db's node: policy (ingress) {counters['drop_policy_ingress']['packets']}, "
                  f"explicit deny {counters['drop_policy_deny']['packets']}")
    return failures


SEED_POLICY = Path(__file__).resolve().parents[3] / "examples" / "policies" / "allow-genai-to-blobstorage.yaml"


def _fqdn_step(lab: Lab, node: Any) -> int:
    """The seed's FQDN policy on real DNS and real connections, and the flows that show it."""
    console.print("\n[bold]FQDN policy[/bold] allow-genai-to-blobstorage (the seed's, as plain YAML): "
                  "app=genai_backend may resolve *.myblobstorage.com through kube-dns and reach "
                  "app1.myblobstorage.com, nothing else")
    genai = lab.pod_add("default/genai", node_name=node.name, labels={"app": "genai_backend"})
    result = lab.client(node).call("policy.apply", {"files": [{"name": SEED_POLICY.name,
                                                                "text": SEED_POLICY.read_text()}]})
    console.print(f"applied: {', '.join(result['created'] + result['configured'])} (revision {result['revision']})")
    t = Table(title="from default/genai (real DNS through the node's DNS proxy, real connections)")
    for col in ("STEP", "EXPECTED", "OBSERVED"):
        t.add_column(col)
    failures = 0

    def row(step: str, expected: str, observed: str) -> None:
        nonlocal failures
        failures += expected != observed
        t.add_row(step, expected, observed if expected == observed else _mark(False, observed))

    row("resolve app1.myblobstorage.com", "NOERROR", _dig(lab, genai.key, "app1.myblobstorage.com"))
    row("connect app1.myblobstorage.com:80", "connected", probe(genai.netns, "tcp", "app1.myblobstorage.com", 80,
                                                                 timeout=2.0, family=4).outcome)
    row("resolve app2.myblobstorage.com", "NOERROR", _dig(lab, genai.key, "app2.myblobstorage.com"))
    app2 = lab.world_address("app2.myblobstorage.com")[0]
    row(f"connect app2 ({app2}):80, not in toFQDNs", "timeout",
        probe(genai.netns, "tcp", app2, 80, timeout=1.0).outcome)
    row("resolve other.example", "REFUSED", _dig(lab, genai.key, "other.example"))
    other = lab.world_address("other.example")[0]
    row(f"connect {other}:80, never resolved", "timeout", probe(genai.netns, "tcp", other, 80, timeout=1.0).outcome)
    console.print(t)
    for title, argv in (("weft fqdn cache list", ["fqdn", "cache", "list"]),
                        ("weft observe --pod default/genai --last 12", ["observe", "--pod", "default/genai", "--last",
                                                                         "12"])):
        console.print(f"\n[bold]{title}[/bold]")
        out = subprocess.run([sys.executable, "-m", "weft.cli.main", *argv, "--lab", lab.name], capture_output=True,
                             text=True, timeout=60, check=False)
        console.print(out.stdout.rstrip() or out.stderr.rstrip(), markup=False, highlight=False)
    return failures


def _dig(lab: Lab, pod: str, name: str) -> str:
    """The DNS status the pod's resolver (kube-dns, through the proxy when policy says so) gets."""
    out = subprocess.run(lab.exec_argv(pod, ["dig", "+tries=1", "+time=2", name, "A"]), capture_output=True,
                         text=True, timeout=30, check=False).stdout
    return next((line.split("status: ")[1].split(",")[0] for line in out.splitlines() if "status: " in line),
                "no answer")


def _mark(ok: bool, detail: str = "") -> str:
    return "[green]ok[/green]" if ok else f"[red]{detail or 'FAIL'}[/red]"
