"""``weft observe``: flows of every node of the lab, as ``hubble observe`` shows them.

Every node's agent is asked (``flows.get``) with the same filters; the answers are merged by
time. ``--follow`` keeps asking each agent for what came after its last answer (a cursor) until
Ctrl-C. Filter semantics and output formats are in :mod:`weft.observe`.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from weft.agent.client import AgentCallError, AgentClient, AgentUnavailable
from weft.cli.output import console, err_console
from weft.lab.cluster import Lab, LabError
from weft.observe.filters import FilterError, Filters, FlowFilter, with_exclusions
from weft.observe.flow import parse_time, rfc3339
from weft.observe.output import OutputFormat, compact_line, json_line, jsonpb_line, table_text

FOLLOW_POLL_S = 0.25  # how often --follow asks each agent for news
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?$")

Many = Annotated[list[str] | None, typer.Option()]


def parse_when(text: str, now_ns: int | None = None) -> str:
    """``--since``/``--until``: RFC 3339, or a duration ago (``30s``, ``5m``, ``1h30m``) -> RFC 3339."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    match = _DURATION.match(text.strip())
    if match and any(match.groups()):
        h, m, s, ms = (int(g or 0) for g in match.groups())
        ago = ((h * 60 + m) * 60 + s) * 1_000_000_000 + ms * 1_000_000
        return rfc3339(now_ns - ago)
    try:
        return rfc3339(parse_time(text))
    except ValueError:
        raise FilterError(f"{text!r} is neither RFC 3339 (2024-05-01T12:00:00Z) nor a duration (30s, 5m, 1h30m)") \
            from None


def _clients(lab: str, node: str | None, socket: Path | None) -> list[tuple[str, AgentClient]]:
    if socket is not None:
        return [(str(socket), AgentClient(socket))]
    lab_obj = Lab(lab)
    state = lab_obj.load()
    nodes = [lab_obj.node(state, node)] if node else state.nodes
    return [(n.name, lab_obj.client(n)) for n in nodes]


def _time_key(response: dict[str, Any]) -> int:
    try:
        return parse_time(str(response.get("time", "")))
    except ValueError:
        return 0


def merge(answers: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Responses of several nodes, oldest first (stable: one node's order is kept on ties)."""
    return sorted((r for answer in answers for r in answer), key=_time_key)


def observe(
    pod: Many = None, from_pod: Many = None, to_pod: Many = None,
    namespace: Many = None, from_namespace: Many = None, to_namespace: Many = None,
    label: Many = None, from_label: Many = None, to_label: Many = None,
    ip: Many = None, from_ip: Many = None, to_ip: Many = None,
    fqdn: Many = None, from_fqdn: Many = None, to_fqdn: Many = None,
    port: Many = None, from_port: Many = None, to_port: Many = None,
    protocol: Many = None, verdict: Many = None,
    drop_reason_desc: Many = None,
    type_: Annotated[list[str] | None, typer.Option("--type", help="trace, drop, l7, policy-verdict")] = None,
    traffic_direction: Many = None, identity: Many = None, node_name: Many = None,
    not_: Annotated[bool, typer.Option("--not", help="the next filter excludes instead of selecting")] = False,
    last: Annotated[int | None, typer.Option("--last", min=0, help="the last N flows (default 20)")] = None,
    first: Annotated[int | None, typer.Option("--first", min=0, help="the first N flows held")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every flow held")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new flows until Ctrl-C")] = False,
    since: Annotated[str | None, typer.Option("--since", help="RFC 3339 or a duration ago (5m)")] = None,
    until: Annotated[str | None, typer.Option("--until", help="RFC 3339 or a duration ago (5m)")] = None,
    output: Annotated[OutputFormat, typer.Option("-o", "--output")] = OutputFormat.compact,
    color: Annotated[str, typer.Option("--color", help="auto, always or never")] = "auto",
    lab: Annotated[str, typer.Option("--lab", envvar="WEFT_LAB_NAME", help="lab name")] = "weft",
    node: Annotated[str | None, typer.Option("--node", help="one node (default: every node)")] = None,
    socket: Annotated[Path | None, typer.Option("--socket", help="one agent's socket instead of a lab")] = None,
) -> None:
    """Flows of every node (hubble observe's filters: values of one flag OR'ed, flags AND'ed)."""
    parsed = FlowFilter(
        pod=tuple(pod or ()), from_pod=tuple(from_pod or ()), to_pod=tuple(to_pod or ()),
        namespace=tuple(namespace or ()), from_namespace=tuple(from_namespace or ()),
        to_namespace=tuple(to_namespace or ()), label=tuple(label or ()), from_label=tuple(from_label or ()),
        to_label=tuple(to_label or ()), ip=tuple(ip or ()), from_ip=tuple(from_ip or ()), to_ip=tuple(to_ip or ()),
        fqdn=tuple(fqdn or ()), from_fqdn=tuple(from_fqdn or ()), to_fqdn=tuple(to_fqdn or ()),
        port=tuple(port or ()), from_port=tuple(from_port or ()), to_port=tuple(to_port or ()),
        protocol=_split(protocol), verdict=tuple(v.upper() for v in _split(verdict)),
        drop_reason_desc=_split(drop_reason_desc), type=_split(type_), traffic_direction=_split(traffic_direction),
        identity=tuple(identity or ()), node_name=tuple(node_name or ()),
    )
    if color not in ("auto", "always", "never"):
        raise _fail(f"--color {color!r}: auto, always or never")
    if sum(x is not None and x is not False for x in (last, first, all_ or None)) > 1:
        raise _fail("--last, --first and --all exclude each other")
    try:
        filters = with_exclusions(parsed, sys.argv[1:]) if not_ else with_exclusions(parsed, [])
        params: dict[str, Any] = {"filters": filters.to_json()}
        if since:
            params["since"] = parse_when(since)
        if until:
            params["until"] = parse_when(until)
        clients = _clients(lab, node, socket)
    except (FilterError, LabError) as exc:
        raise _fail(str(exc)) from None
    if all_:
        params["all"] = True
    elif first is not None:
        params["first"] = first
    elif last is not None or not follow:
        params["last"] = 20 if last is None else last
    else:
        params["last"] = 0  # --follow alone: only what comes from now on
    painted = color == "always" or (color == "auto" and sys.stdout.isatty())
    cursors: dict[str, int] = {}
    answers: list[list[dict[str, Any]]] = []
    for name, client in clients:
        try:
            answer = client.call("flows.get", params)
        except (AgentUnavailable, AgentCallError) as exc:
            raise _fail(f"{name}: {exc}") from None
        cursors[name] = int(answer["cursor"])
        answers.append(answer["responses"])
    merged = merge(answers)
    if first is not None:
        merged = merged[:first]
    elif "last" in params:
        merged = merged[-params["last"]:] if params["last"] else []
    _print(merged, output, painted, header=True)
    if not follow:
        return
    follow_params = {k: v for k, v in params.items() if k not in ("first", "last", "all")}
    unreachable: set[str] = set()
    try:
        while True:
            time.sleep(FOLLOW_POLL_S)
            news: list[list[dict[str, Any]]] = []
            for name, client in clients:
                try:
                    answer = client.call("flows.get", {**follow_params, "after": cursors[name]})
                except (AgentUnavailable, AgentCallError) as exc:
                    if name not in unreachable:
                        err_console.print(f"[yellow]{name}: {exc}; retrying[/yellow]")
                        unreachable.add(name)
                    continue
                unreachable.discard(name)
                cursors[name] = int(answer["cursor"])
                news.append(answer["responses"])
            _print(merge(news), output, painted, header=False)
    except KeyboardInterrupt:
        return


def _split(values: list[str] | None) -> tuple[str, ...]:
    """hubble accepts ``--verdict DROPPED,FORWARDED`` as well as repeated flags."""
    return tuple(v.strip() for value in values or () for v in value.split(",") if v.strip())


def _print(responses: list[dict[str, Any]], fmt: OutputFormat, painted: bool, header: bool) -> None:
    if fmt == OutputFormat.table:
        if responses:
            console.print(table_text(responses, header=header), markup=False, highlight=False, soft_wrap=True)
        return
    for response in responses:
        if fmt == OutputFormat.json:
            line = json_line(response)
        elif fmt == OutputFormat.jsonpb:
            line = jsonpb_line(response)
        else:
            line = compact_line(response, colour=painted)
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fail(msg: str) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {msg}", highlight=False)
    return typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("observe")(observe)


__all__ = ["Filters", "merge", "observe", "parse_when", "register"]
