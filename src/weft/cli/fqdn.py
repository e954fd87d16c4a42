"""``weft fqdn``: what the nodes' DNS proxies learned (``cache list``) and saw asked (``names``).

Each lab node's proxy is asked over its control socket, found from the node's configuration
(``dns_proxy.socket_path``, else ``<state_dir>/dnsproxy/proxy.sock``), like ``weft status`` finds the
agents. ``--socket`` talks to one proxy directly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from weft.cli.output import Format, console, err_console, print_json, table
from weft.dnsproxy.config import default_socket_path
from weft.dnsproxy.control import ProxyCallError, ProxyClient, ProxyUnavailable
from weft.dnsproxy.main import ProxyNodeConfig
from weft.lab.cluster import Lab, LabError

fqdn_app = typer.Typer(no_args_is_help=True, help="toFQDNs: the DNS proxies' learned names and addresses.")
cache_app = typer.Typer(no_args_is_help=True, help="The learned name -> address cache of each node's DNS proxy.")
fqdn_app.add_typer(cache_app, name="cache")

LabOpt = Annotated[str, typer.Option("--lab", envvar="WEFT_LAB_NAME", help="lab name (prefix of everything it makes)")]
OutOpt = Annotated[Format, typer.Option("-o", "--output", help="table or json")]
NodeOpt = Annotated[str | None, typer.Option("--node", help="one node (default: every node)")]
SocketOpt = Annotated[Path | None, typer.Option("--socket", help="talk to the DNS proxy at this control socket")]


def proxy_socket_of(config_path: Path) -> Path:
    """The control socket of the proxy a node configuration describes."""
    config = ProxyNodeConfig.load(config_path)
    return config.dns_proxy.socket_path or default_socket_path(config.state_dir)


def _clients(lab: str, node: str | None, socket: Path | None) -> list[tuple[str, ProxyClient]]:
    if socket is not None:
        return [(str(socket), ProxyClient(socket))]
    lab_obj = Lab(lab)
    state = lab_obj.load()
    nodes = [lab_obj.node(state, node)] if node else state.nodes
    return [(n.name, ProxyClient(proxy_socket_of(Path(n.config_path)))) for n in nodes]


def _gather(lab: str, node: str | None, socket: Path | None, method: str) -> list[dict[str, Any]]:
    """``method``'s rows from every proxy, each with its node; unreachable proxies are reported
    on stderr and make the command fail after printing what the others answered."""
    try:
        clients = _clients(lab, node, socket)
    except (LabError, OSError, ValueError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    rows: list[dict[str, Any]] = []
    failed = False
    for name, client in clients:
        try:
            answer = client.call(method)
        except (ProxyUnavailable, ProxyCallError) as exc:
            err_console.print(f"[red]error:[/red] node {name}: {exc}")
            failed = True
            continue
        rows.extend({"node": name, **row} for row in answer)
    if failed and not rows:
        raise typer.Exit(1)
    return rows


@cache_app.command("list")
def cache_list(lab: LabOpt = "weft", node: NodeOpt = None, socket: SocketOpt = None,
               output: OutOpt = Format.table) -> None:
    """Learned addresses: endpoint, pod, name, address, TTL left, how learned, zombie."""
    rows = _gather(lab, node, socket, "cache_list")
    if output == Format.json:
        print_json(rows)
        return
    if not rows:
        console.print("no learned names")
        return
    table("FQDN cache", ["NODE", "ENDPOINT", "POD", "NAME", "ADDRESS", "TTL", "TTL LEFT", "SOURCE", "ZOMBIE"],
          [[r["node"], r["ep_id"], r["pod"], r["name"] or "-", r["address"], r["ttl"], f"{r['ttl_left']:.0f}s",
            r["source"], "yes" if r["zombie"] else ""] for r in rows])


@fqdn_app.command("names")
def names(lab: LabOpt = "weft", node: NodeOpt = None, socket: SocketOpt = None,
          output: OutOpt = Format.table) -> None:
    """Names each endpoint asked for: how often, allowed or denied, the last answer's code."""
    rows = _gather(lab, node, socket, "names")
    if output == Format.json:
        print_json(rows)
        return
    if not rows:
        console.print("no names asked")
        return
    now = time.time()
    table("DNS names", ["NODE", "ENDPOINT", "POD", "NAME", "QUERIES", "ALLOWED", "DENIED", "LAST RCODE", "LAST SEEN"],
          [[r["node"], r["ep_id"], r["pod"], r["name"], r["count"], r["allowed"], r["denied"], r["last_rcode"],
            f"{max(0.0, now - r['last_seen']):.0f}s ago"] for r in rows])
