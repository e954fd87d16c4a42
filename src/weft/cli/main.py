"""The ``weft`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from weft.agent.client import AgentCallError, AgentClient, AgentUnavailable
from weft.cli import observe as observe_cli
from weft.cli.fqdn import fqdn_app
from weft.cli.output import Format, console, err_console, print_json, table
from weft.ipam.pool import (
    DEFAULT_CLUSTER_CIDR_V4,
    DEFAULT_CLUSTER_CIDR_V6,
    DEFAULT_NODE_MASK_V4,
    DEFAULT_NODE_MASK_V6,
    ClusterPool,
    IPAMError,
)
from weft.lab.cluster import Lab, LabError
from weft.lab.runtime import CniError
from weft.lab.world import DIRECT_POD_CIDR_V4, DIRECT_POD_CIDR_V6

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="weft: eBPF container networking. Lab, status, endpoints.")
lab_app = typer.Typer(no_args_is_help=True, help="A cluster on this machine, in network namespaces.")
pod_app = typer.Typer(no_args_is_help=True, help="Pods of the lab.")
agent_app = typer.Typer(no_args_is_help=True, help="Agents of the lab's nodes.")
endpoint_app = typer.Typer(no_args_is_help=True, help="Endpoints (pod interfaces) known to agents.")
app.add_typer(lab_app, name="lab")
lab_app.add_typer(pod_app, name="pod")
lab_app.add_typer(agent_app, name="agent")
app.add_typer(endpoint_app, name="endpoint")
namespace_app = typer.Typer(no_args_is_help=True, help="Namespaces of the lab.")
policy_app = typer.Typer(no_args_is_help=True, help="Network policies: list, get, trace.")
app.add_typer(policy_app, name="policy")
connectivity_app = typer.Typer(no_args_is_help=True, help="Connectivity checks across the lab.")
app.add_typer(connectivity_app, name="connectivity")
lab_app.add_typer(namespace_app, name="namespace")
observe_cli.register(app)  # weft observe (src/weft/cli/observe.py)
app.add_typer(fqdn_app, name="fqdn")  # weft fqdn cache list / names (src/weft/cli/fqdn.py)

LabOpt = Annotated[str, typer.Option("--lab", envvar="WEFT_LAB_NAME", help="lab name (prefix of everything it makes)")]
OutOpt = Annotated[Format, typer.Option("-o", "--output", help="table or json")]
NodeOpt = Annotated[str | None, typer.Option("--node", help="one node (default: every node)")]
SocketOpt = Annotated[Path | None, typer.Option("--socket", help="talk to the agent at this socket instead of a lab")]


def fail(msg: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {msg}")
    return typer.Exit(code)


def _clients(lab: str, node: str | None, socket: Path | None) -> list[tuple[str, AgentClient]]:
    if socket is not None:
        return [(str(socket), AgentClient(socket))]
    lab_obj = Lab(lab)
    state = lab_obj.load()
    nodes = [lab_obj.node(state, node)] if node else state.nodes
    return [(n.name, lab_obj.client(n)) for n in nodes]


# ---------------------------------------------------------------------- lab
@lab_app.command("up")
def lab_up(lab: LabOpt = "weft",
           nodes: Annotated[int, typer.Option("--nodes", help="number of nodes")] = 1,
           ip_family: Annotated[str, typer.Option("--ip-family", help="ipv4, ipv6 or dual")] = "dual",
           pod_cidr_v4: Annotated[str | None, typer.Option(
               help=f"cluster pod CIDR, IPv4 [default: {DEFAULT_CLUSTER_CIDR_V4}; direct mode: "
                    f"{DIRECT_POD_CIDR_V4}]")] = None,
           node_mask_v4: Annotated[int | None, typer.Option(
               help=f"prefix of each node's IPv4 block [default: {DEFAULT_NODE_MASK_V4}]")] = None,
           pod_cidr_v6: Annotated[str | None, typer.Option(
               help=f"cluster pod CIDR, IPv6 [default: {DEFAULT_CLUSTER_CIDR_V6}; direct mode: "
                    f"{DIRECT_POD_CIDR_V6}]")] = None,
           node_mask_v6: Annotated[int | None, typer.Option(
               help=f"prefix of each node's IPv6 block [default: {DEFAULT_NODE_MASK_V6}]")] = None,
           world: Annotated[bool, typer.Option(
               "--world/--no-world",
               help="underlay, world servers and DNS behind the nodes, kube-dns")] = True,
           mode: Annotated[str | None, typer.Option(
               "--mode", help="how nodes reach each other's pods: overlay (VXLAN; the default with several "
                              "nodes), direct (pods addressed from the underlay, routed) or none")] = None,
           store: Annotated[str, typer.Option(
               "--store", help="the cluster store: sqlite (embedded) or etcd (a real etcd server)")] = "sqlite",
           ) -> None:
    """Create node namespaces, each with its own agent; by default also the world beyond the
    nodes (servers and DNS reached through the nodes' uplinks) and kube-dns. With several
    nodes, they form a cluster: a cluster store, and pods reaching each other across nodes."""
    try:
        pools: dict[int, ClusterPool] = {}
        if pod_cidr_v4 is not None or node_mask_v4 is not None:
            pools[4] = ClusterPool.parse(pod_cidr_v4 or DEFAULT_CLUSTER_CIDR_V4, node_mask_v4 or DEFAULT_NODE_MASK_V4)
        if pod_cidr_v6 is not None or node_mask_v6 is not None:
            pools[6] = ClusterPool.parse(pod_cidr_v6 or DEFAULT_CLUSTER_CIDR_V6, node_mask_v6 or DEFAULT_NODE_MASK_V6)
        with console.status(f"bringing up lab {lab} with {nodes} node(s)") as status:
            state = Lab(lab).up(nodes=nodes, ip_family=ip_family, progress=lambda m: status.update(m),
                                pools=pools or None, world=world, mode=mode, store=store)
    except (LabError, IPAMError, CniError, AgentCallError, AgentUnavailable, ValueError) as exc:
        raise fail(str(exc)) from None
    console.print(f"lab [bold]{lab}[/bold] up: " + ", ".join(f"{n.name} ({n.netns})" for n in state.nodes))
    if state.mode != "none":
        console.print(f"cluster: {state.mode} mode, {state.store} store")
    if state.world:
        console.print(f"world: {lab}-world behind {lab}-vnet; kube-dns {', '.join(state.dns_servers)} "
                      "(`weft lab world` lists the names)")


@lab_app.command("world")
def lab_world(lab: LabOpt = "weft", output: OutOpt = Format.table) -> None:
    """The names of the lab's world (served by its DNS, reached through the nodes) and the DNS servers."""
    from weft.lab import world as plan

    lab_obj = Lab(lab)
    state = lab_obj.load() if lab_obj.exists() else None
    if state is not None and not state.world:
        err_console.print(f"note: lab {lab} was made with --no-world: these names do not resolve in it")
    rows = [{"name": r.name, "type": r.kind,
             "value": [r.cname] if r.cname else list(r.addresses), "ttl": r.ttl,
             "addresses": plan.world_addresses(r.name)} for r in plan.WORLD_RECORDS]
    servers = {"world_dns": plan.world_dns_servers(), "kube_dns": state.dns_servers if state else [],
               "uplinks": {n.name: n.uplink for n in state.nodes} if state else {}}
    if output == Format.json:
        print_json({"records": rows, **servers})
        return
    table(f"world of lab {lab}", ["NAME", "TYPE", "VALUE", "TTL"],
          [[r["name"], r["type"], r["value"], r["ttl"]] for r in rows])
    console.print(f"world DNS: {', '.join(servers['world_dns'])}; kube-dns (pods' resolver): "
                  f"{', '.join(servers['kube_dns']) or '-'}; any other name: NXDOMAIN")


@lab_app.command("down")
def lab_down(lab: LabOpt = "weft") -> None:
    """Remove everything the lab made (also after a crash)."""
    removed = Lab(lab).down()
    console.print(f"lab {lab} down: removed {len(removed)} item(s)")


node_app = typer.Typer(no_args_is_help=True, help="Nodes of the lab's cluster.")
lab_app.add_typer(node_app, name="node")


@node_app.command("remove")
def node_remove(name: Annotated[str, typer.Argument(help="node name, e.g. node-2")], lab: LabOpt = "weft") -> None:
    """A node leaves the cluster (as `kubectl delete node`): its agent and pods go, and every
    other node drops its tunnel entries, routes and endpoints."""
    try:
        result = Lab(lab).node_remove(name)
    except (LabError, AgentCallError, AgentUnavailable) as exc:
        raise fail(str(exc)) from None
    console.print(f"node {name} removed ({result.get('removed_keys', 0)} store key(s))")


@pod_app.command("add")
def pod_add(ref: Annotated[str, typer.Argument(help="NAMESPACE/NAME")],
            lab: LabOpt = "weft",
            node: NodeOpt = None,
            labels: Annotated[str, typer.Option("--labels", help="k=v,k2=v2")] = "",
            serve: Annotated[str, typer.Option("--serve", help="tcp:80,udp:80,http:8080")] = "") -> None:
    """Create a pod namespace and wire it by invoking weft-cni as a container runtime does."""
    try:
        pod = Lab(lab).pod_add(ref, node_name=node, labels=parse_labels(labels),
                               serve=[s for s in serve.split(",") if s])
    except (LabError, CniError, AgentCallError, AgentUnavailable, ValueError) as exc:
        raise fail(str(exc)) from None
    console.print(f"pod {pod.key} on {pod.node}: {', '.join(pod.addresses)}")


@namespace_app.command("add")
def namespace_add(name: Annotated[str, typer.Argument(help="NAME")], lab: LabOpt = "weft",
                  labels: Annotated[str, typer.Option("--labels", help="k=v,k2=v2")] = "") -> None:
    """Create a namespace with labels (it also gets kubernetes.io/metadata.name=NAME)."""
    try:
        Lab(lab).namespace_add(name, parse_labels(labels))
    except (LabError, AgentCallError, AgentUnavailable, ValueError) as exc:
        raise fail(str(exc)) from None
    console.print(f"namespace {name} ready")


@lab_app.command("label")
def lab_label(kind: Annotated[str, typer.Argument(help="pod or namespace")],
              ref: Annotated[str, typer.Argument(help="NAMESPACE/POD or NAMESPACE")],
              changes: Annotated[list[str], typer.Argument(help="key=value to set, key- to remove")],
              lab: LabOpt = "weft") -> None:
    """Change the labels of a pod or namespace, as kubectl label does; policy follows at once."""
    parsed: dict[str, str | None] = {}
    for change in changes:
        if change.endswith("-") and "=" not in change:
            parsed[change[:-1]] = None
        else:
            key, sep, value = change.partition("=")
            if not sep or not key:
                raise fail(f"label change {change!r} is neither key=value nor key-")
            parsed[key] = value
    try:
        now = Lab(lab).label(kind, ref, parsed)
    except (LabError, AgentCallError, AgentUnavailable) as exc:
        raise fail(str(exc)) from None
    console.print(f"{kind} {ref} labels: " + ", ".join(f"{k}={v}" for k, v in sorted(now.items())))


@pod_app.command("del")
def pod_del(ref: Annotated[str, typer.Argument(help="NAMESPACE/NAME")], lab: LabOpt = "weft") -> None:
    """Delete a pod (CNI DEL, then its namespace)."""
    try:
        Lab(lab).pod_del(ref)
    except (LabError, CniError) as exc:
        raise fail(str(exc)) from None
    console.print(f"pod {ref} deleted")


@pod_app.command("list")
def pod_list(lab: LabOpt = "weft", output: OutOpt = Format.table) -> None:
    """Pods of the lab."""
    try:
        state = Lab(lab).load()
    except LabError as exc:
        raise fail(str(exc)) from None
    if output == Format.json:
        print_json([{"pod": p.key, "node": p.node, "addresses": p.addresses, "labels": p.labels, "serve": p.serve,
                     "netns": p.netns} for p in state.pods.values()])
        return
    table(f"pods of lab {lab}", ["POD", "NODE", "ADDRESSES", "LABELS", "SERVE"],
          [[p.key, p.node, p.addresses, ",".join(f"{k}={v}" for k, v in p.labels.items()), ",".join(p.serve)]
           for p in state.pods.values()])


@lab_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lab_exec(ref: Annotated[str, typer.Argument(help="NAMESPACE/NAME")],
             command: Annotated[list[str], typer.Argument(help="-- CMD ...")],
             lab: LabOpt = "weft") -> None:
    """Run a command inside a pod's network namespace."""
    try:
        argv = Lab(lab).exec_argv(ref, command)
    except LabError as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(subprocess.call(argv))


@agent_app.command("stop")
def agent_stop(node: Annotated[str, typer.Argument()], lab: LabOpt = "weft",
               kill: Annotated[bool, typer.Option("--kill", help="SIGKILL instead of SIGTERM")] = False) -> None:
    """Stop a node's agent (the datapath keeps forwarding)."""
    import signal

    lab_obj = Lab(lab)
    lab_obj.stop_agent(lab_obj.load(), node, signal.SIGKILL if kill else signal.SIGTERM)
    console.print(f"agent of {node} stopped")


@agent_app.command("start")
def agent_start(node: Annotated[str, typer.Argument()], lab: LabOpt = "weft") -> None:
    """Start a node's agent; it adopts the pinned datapath and reconciles."""
    lab_obj = Lab(lab)
    try:
        pid = lab_obj.start_agent(lab_obj.load(), node)
    except LabError as exc:
        raise fail(str(exc)) from None
    console.print(f"agent of {node} running (pid {pid})")


# ---------------------------------------------------------------------- status / endpoints
@app.command("status")
def status(lab: LabOpt = "weft", node: NodeOpt = None, socket: SocketOpt = None, output: OutOpt = Format.table) -> None:
    """Agent health, programs attached, map fill levels."""
    try:
        clients = _clients(lab, node, socket)
    except LabError as exc:
        raise fail(str(exc)) from None
    results: list[dict[str, Any]] = []
    for name, client in clients:
        try:
            results.append(client.call("status"))
        except (AgentUnavailable, AgentCallError) as exc:
            results.append({"node": name, "healthy": False, "error": str(exc)})
    if output == Format.json:
        print_json(results)
    else:
        for st in results:
            _print_status(st)
    if not all(r.get("healthy") for r in results):
        raise typer.Exit(1)


def _print_status(st: dict[str, Any]) -> None:
    if not st.get("healthy"):
        console.print(f"[bold]{st['node']}[/bold]: [red]unreachable[/red] — {st.get('error')}")
        return
    console.print(f"[bold]{st['node']}[/bold]: [green]healthy[/green], up {st['uptime_s']}s, "
                  f"{st['endpoints']} endpoint(s), {st['endpoints_attached']} with programs attached")
    table("programs", ["NAME", "ID", "PINNED"], [[p["name"], p["id"], p["pinned"]] for p in st["programs"]])
    table("maps", ["MAP", "ENTRIES", "MAX", "FILL"],
          [[k, v["entries"], v["max"], f"{100 * v['entries'] / max(v['max'], 1):.1f}%"] for k, v in st["maps"].items()])
    table("IPAM", ["FAMILY", "BLOCK", "USED", "CAPACITY"],
          [[k, v["block"], v["used"], v["capacity"]] for k, v in st["ipam"].items()])
    table("datapath counters", ["COUNTER", "PACKETS", "BYTES"],
          [[k, v["packets"], v["bytes"]] for k, v in st["counters"].items() if v["packets"]])
    _print_proxy(st.get("dns_proxy") or {})
    _print_cluster(st.get("cluster"))


def _print_cluster(cluster: dict[str, Any] | None) -> None:
    """The node's membership of its cluster: store connection, nodes, what it learnt."""
    if not cluster:
        console.print("cluster: none (a node on its own)")
        return
    state = ("[green]connected[/green]" if cluster.get("connected")
             else f"[red]disconnected[/red] — {cluster.get('error')}")
    console.print(f"cluster: {cluster.get('mode')} mode, {cluster.get('store')} store {state}, revision "
                  f"{cluster.get('revision')}, nodes {', '.join(cluster.get('nodes') or [])}, "
                  f"{cluster.get('remote_endpoints', 0)} remote endpoint(s), "
                  f"{len(cluster.get('identities') or [])} cluster identities")
    tunnels = cluster.get("tunnels") or {}
    if tunnels:
        table("other nodes' pod prefixes", ["PREFIX", "VIA"], [[k, v] for k, v in sorted(tunnels.items())])
    for problem in cluster.get("bad_records") or []:
        console.print(f"[red]store record skipped:[/red] {problem}")


def _print_proxy(proxy: dict[str, Any]) -> None:
    """The DNS proxy's line of ``weft status``: a process of its own, so its health is its own."""
    if not proxy.get("enabled", False):
        console.print("DNS proxy: disabled")
    elif not proxy.get("healthy"):
        console.print(f"DNS proxy: [red]unhealthy[/red] — {proxy.get('error', 'not ready')}")
    else:
        counters = proxy.get("counters") or {}
        shown = ", ".join(f"{k} {v}" for k, v in counters.items() if isinstance(v, int) and v)
        console.print(f"DNS proxy: [green]healthy[/green] (pid {proxy.get('pid', '?')}, rules revision "
                      f"{proxy.get('revision', proxy.get('rules_revision', '?'))}){': ' + shown if shown else ''}")


@endpoint_app.command("list")
def endpoint_list(lab: LabOpt = "weft", node: NodeOpt = None, socket: SocketOpt = None,
                  output: OutOpt = Format.table) -> None:
    """Endpoints: id, pod, IPs, identity and labels, state."""
    try:
        clients = _clients(lab, node, socket)
        rows: list[dict[str, Any]] = []
        for _name, client in clients:
            rows.extend(client.call("endpoint.list"))
    except (LabError, AgentUnavailable, AgentCallError) as exc:
        raise fail(str(exc)) from None
    if output == Format.json:
        print_json(rows)
        return
    table("endpoints", ["NODE", "ID", "POD", "ADDRESSES", "IDENTITY", "LABELS", "STATE"],
          [[r["node"], r["id"], r["pod"], r["addresses"], r["identity"], r["labels"], r["state"]] for r in rows])


@app.command("probe")
def probe_cmd(src: Annotated[str, typer.Option("--from", help="NAMESPACE/POD to connect from")],
              dst: Annotated[str, typer.Option("--to", help="NAMESPACE/POD, an IP address or a name")],
              port: Annotated[int, typer.Option("--port", min=1, max=65535)],
              proto: Annotated[str, typer.Option("--proto", help="tcp, udp or sctp")] = "tcp",
              family: Annotated[int, typer.Option("--family", help="4 or 6 when --to is a pod")] = 4,
              timeout: Annotated[float, typer.Option("--timeout", help="seconds")] = 2.0,
              lab: LabOpt = "weft", output: OutOpt = Format.table) -> None:
    """Really connect from a pod and report connected, refused or timeout."""
    from weft.lab.probe import probe

    lab_obj = Lab(lab)
    try:
        source = lab_obj.pod(src)
        target = dst
        if "/" in dst:
            pod = lab_obj.pod(dst)
            candidates = [a for a in pod.addresses if (":" in a) == (family == 6)]
            if not candidates:
                raise LabError(f"pod {dst} has no IPv{family} address")
            target = candidates[0]
        result = probe(source.netns, proto.lower(), target, port, timeout=timeout)
    except LabError as exc:
        raise fail(str(exc)) from None
    record = {"from": source.key, "to": dst, "address": target, "port": port, "protocol": proto.lower(),
              "result": result.outcome}
    if output == Format.json:
        print_json(record)
    else:
        console.print(f"{source.key} -> {dst} ({target}) {port}/{proto.lower()}: [bold]{result.outcome}[/bold]")
    raise typer.Exit(0 if result.ok else 1)


# ---------------------------------------------------------------------- policy
FilesOpt = Annotated[list[Path], typer.Option("-f", "--filename", help="YAML or JSON policy file(s)")]


def _read_policy_files(files: list[Path]) -> list[dict[str, str]]:
    """Validate locally (errors name file, document, field and line) before any agent sees them."""
    from weft.policy import PolicyError, load_policies

    out: list[dict[str, str]] = []
    problems: list[str] = []
    for path in files:
        try:
            text = path.read_text()
        except OSError as exc:
            raise fail(f"{path}: {exc.strerror}") from None
        try:
            load_policies(text, str(path))
        except PolicyError as exc:
            problems.extend(str(p) for p in exc.problems)
        out.append({"name": str(path), "text": text})
    if problems:
        for problem in problems:
            err_console.print(problem, markup=False, highlight=False)
        raise fail(f"{len(problems)} problem(s); nothing was applied")
    return out


def _each_agent(lab: str, method: str, params: dict[str, Any]) -> list[Any]:
    try:
        return [client.call(method, params) for _name, client in _clients(lab, None, None)]
    except (LabError, AgentUnavailable, AgentCallError) as exc:
        raise fail(str(exc)) from None


@app.command("apply")
def apply_cmd(files: FilesOpt, lab: LabOpt = "weft",
              dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and show, apply nothing")] = False,
              output: OutOpt = Format.table) -> None:
    """Apply CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and NetworkPolicy files (whole or not at all)."""
    results = _each_agent(lab, "policy.apply", {"files": _read_policy_files(files), "dryRun": dry_run})
    result = results[0]
    if output == Format.json:
        print_json(result)
        return
    verb = "would be " if dry_run else ""
    for what in ("created", "configured", "unchanged"):
        for key in result[what]:
            console.print(f"{key} {verb}{what}")
    for note in result["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")


@app.command("delete")
def delete_cmd(files: FilesOpt, lab: LabOpt = "weft") -> None:
    """Delete the policies defined in the files."""
    result = _each_agent(lab, "policy.delete", {"files": _read_policy_files(files)})[0]
    for key in result["deleted"]:
        console.print(f"{key} deleted")


@policy_app.command("list")
def policy_list(lab: LabOpt = "weft", output: OutOpt = Format.table) -> None:
    """Policies in force."""
    rows = _each_agent(lab, "policy.list", {})[0]
    if output == Format.json:
        print_json(rows)
        return
    table("policies", ["KIND", "NAMESPACE", "NAME", "SOURCE"],
          [[r["kind"], r["namespace"] or "-", r["name"], r["source"]] for r in rows])


@policy_app.command("get")
def policy_get(name: Annotated[str, typer.Argument()], lab: LabOpt = "weft",
               namespace: Annotated[str | None, typer.Option("-n", "--namespace")] = None,
               output: Annotated[str, typer.Option("-o", "--output", help="yaml or json")] = "yaml") -> None:
    """One policy, as applied."""
    docs = _each_agent(lab, "policy.get", {"name": name, "namespace": namespace})[0]
    if output == "json":
        print_json(docs if len(docs) > 1 else docs[0])
    else:
        import yaml

        print(yaml.safe_dump_all(docs, sort_keys=False), end="")


@policy_app.command("trace")
def policy_trace(src: Annotated[str, typer.Option("--from", help="NAMESPACE/POD")],
                 dst: Annotated[str, typer.Option("--to", help="NAMESPACE/POD or an IP address")],
                 port: Annotated[str, typer.Option("--port", help="N/PROTO, e.g. 80/tcp")],
                 lab: LabOpt = "weft", output: OutOpt = Format.table) -> None:
    """The verdict for a connection and the rules that decide it."""
    number, _, proto = port.partition("/")
    if not number.isdigit():
        raise fail(f"--port {port!r} is not N/PROTO")
    lab_obj = Lab(lab)
    try:
        node = lab_obj.node(lab_obj.load(), lab_obj.pod(src).node)
        result = lab_obj.client(node).call("policy.trace", {"from": src, "to": dst,
                                                             "port": int(number), "protocol": proto or "tcp"})
    except (LabError, AgentUnavailable, AgentCallError) as exc:
        raise fail(str(exc)) from None
    if output == Format.json:
        print_json(result)
    else:
        for line in result["lines"]:
            console.print(line, markup=False, highlight=False)
    raise typer.Exit(0 if result["verdict"] == "allowed" else 1)


@connectivity_app.command("matrix")
def connectivity_matrix(lab: LabOpt = "weft",
                        namespaces: Annotated[str, typer.Option("--namespaces", help="a,b (default: all)")] = "",
                        ports: Annotated[str, typer.Option("--ports", help="80,81")] = "80",
                        protocols: Annotated[str, typer.Option("--protocols", help="tcp,udp")] = "tcp",
                        family: Annotated[int, typer.Option("--family", help="4 or 6")] = 4,
                        output: Annotated[str, typer.Option("-o", "--output", help="table or json")] = "table") -> None:
    """Every pod to every pod and port: expected (policy model) next to observed (real packets)."""
    from weft.lab.matrix import MatrixError
    from weft.lab.matrix import connectivity_matrix as build

    try:
        cells = build(Lab(lab), [n for n in namespaces.split(",") if n], [int(p) for p in ports.split(",") if p],
                      [p.strip().lower() for p in protocols.split(",") if p.strip()], family)
    except (MatrixError, LabError, AgentUnavailable, AgentCallError, ValueError) as exc:
        raise fail(str(exc)) from None
    mismatches = [c for c in cells if not c["match"]]
    if output == "json":
        print_json({"cells": cells, "mismatches": len(mismatches)})
    else:
        from rich.table import Table

        columns = sorted({(c["to"], c["port"], c["protocol"]) for c in cells})
        t = Table(title=f"connectivity matrix of lab {lab} (expected / observed)")
        t.add_column("FROM")
        for dst, port, proto in columns:
            t.add_column(f"{dst}\n{port}/{proto}")
        for src in sorted({c["from"] for c in cells}):
            row = [src]
            for col in columns:
                cell = next((c for c in cells if c["from"] == src and (c["to"], c["port"], c["protocol"]) == col),
                            None)
                if cell is None:
                    row.append("-")
                else:
                    text = f"{cell['expected']} / {cell['observed']}"
                    row.append(text if cell["match"] else f"[bold red]{text} MISMATCH[/bold red]")
            t.add_row(*row)
        console.print(t)
        console.print(f"{len(cells)} checks, {len(mismatches)} mismatch(es)")
    raise typer.Exit(1 if mismatches else 0)


@app.command("demo")
def demo(lab: Annotated[str, typer.Option("--lab")] = "weft-demo",
         keep: Annotated[bool, typer.Option("--keep", help="leave the lab up afterwards")] = False) -> None:
    """A two-node lab (VXLAN overlay) with three pods; connectivity across nodes, policies, the flows."""
    from weft.lab.demo import run_demo

    raise typer.Exit(run_demo(lab, keep=keep))


def parse_labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"label {item!r} is not key=value")
        out[key] = value
    return out


def main() -> None:
    if os.geteuid() != 0:
        err_console.print("weft: most commands need root (network namespaces, bpffs)")
    app()


if __name__ == "__main__":
    sys.exit(app())
