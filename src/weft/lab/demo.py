"""``make demo``: a one-node lab, three pods, connectivity over IPv4 and IPv6 through the eBPF
datapath, shown with the agent's counters."""

from __future__ import annotations

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
        with console.status("bringing up a one-node lab"):
            state = lab.up(nodes=1, ip_family="dual")
        console.print(f"[bold]lab {lab_name}[/bold]: node-1 in netns {state.nodes[0].netns}, agent running")
        pods = [
            lab.pod_add("default/frontend", labels={"app": "frontend"}, serve=["tcp:80", "udp:53"]),
            lab.pod_add("default/backend", labels={"app": "backend"}, serve=["tcp:80", "udp:53"]),
            lab.pod_add("default/db", labels={"app": "db"}, serve=["tcp:80", "udp:53"]),
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

        failures += _policy_step(lab, state.nodes[0], pods)
        status = lab.client(state.nodes[0]).call("status")
        counters = Table(title="eBPF datapath counters on node-1 (forwarding never used the node's IP stack)")
        counters.add_column("COUNTER")
        counters.add_column("PACKETS", justify="right")
        for name, value in status["counters"].items():
            if value["packets"]:
                counters.add_row(name, str(value["packets"]))
        console.print(counters)
        console.print("weft endpoint list:")
        ep = Table()
        for col in ("ID", "POD", "ADDRESSES", "IDENTITY", "LABELS"):
            ep.add_column(col)
        for row in lab.client(state.nodes[0]).call("endpoint.list"):
            ep.add_row(str(row["id"]), row["pod"], "\n".join(row["addresses"]), str(row["identity"]),
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


def _policy_step(lab: Lab, node: Any, pods: list[Any]) -> int:
    """Apply a least-privilege policy and show it hold on real packets."""
    frontend, backend, db = pods
    console.print("\n[bold]policy[/bold] db-from-backend-only: only app=backend may reach app=db, on 80/tcp")
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
    counters = lab.client(node).call("status")["counters"]
    console.print(f"drops by reason: policy (ingress) {counters['drop_policy_ingress']['packets']}, "
                  f"explicit deny {counters['drop_policy_deny']['packets']}")
    return failures


def _mark(ok: bool, detail: str = "") -> str:
    return "[green]ok[/green]" if ok else f"[red]{detail or 'FAIL'}[/red]"
