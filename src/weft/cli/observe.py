"""``weft observe``: flows of every node of the lab, as ``hubble observe`` shows them, over
Hubble's gRPC Observer API: through the lab's relay (``weft relay``, which merges the nodes by
time) when it runs, else from each node's Observer (``hubble.sock``), merged here. ``--follow``
keeps the stream open until Ctrl-C. Filter semantics and output formats are in
:mod:`weft.observe`; filters go to the servers as Hubble whitelist/blacklist FlowFilters.
"""

from __future__ import annotations

import queue
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer

from weft.cli.output import console, err_console
from weft.hubble import batch, convert
from weft.hubble import relay as relay_process
from weft.hubble.proto import observer_grpc, observer_pb2
from weft.hubble.relay import relay_socket
from weft.hubble.server import hubble_socket
from weft.lab.cluster import Lab, LabError
from weft.observe.filters import FilterError, Filters, FlowFilter, with_exclusions
from weft.observe.flow import parse_time, rfc3339
from weft.observe.output import OutputFormat, compact_line, json_line, jsonpb_line, table_text

CALL_TIMEOUT_S = 30.0
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


@dataclass(frozen=True)
class Target:
    name: str  # what errors call it: the relay, a node
    address: str  # gRPC target


def targets(lab: str, node: str | None, socket: Path | None, server: str | None) -> list[Target]:
    """Whom to ask: ``--server``, one agent's Observer (``--socket``), the lab's relay, or (no
    relay, or ``--node``) the nodes' Observers."""
    if server:
        return [Target(server, server)]
    if socket is not None:
        return [Target(str(socket), f"unix://{hubble_socket(socket)}")]
    lab_obj = Lab(lab)
    state = lab_obj.load()
    relay = relay_socket(lab_obj.base)
    if node is None and relay.exists():
        return [Target(f"relay of lab {lab}", f"unix://{relay}")]
    nodes = [lab_obj.node(state, node)] if node else state.nodes
    return [Target(n.name, f"unix://{hubble_socket(Path(n.socket_path))}") for n in nodes]


def merge(answers: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Responses of several nodes, oldest first (stable: one node's order is kept on ties)."""
    return convert.merge_sorted(answers)


def _stream(target: Target, request: Any, timeout: float | None) -> Iterator[dict[str, Any]]:
    with grpc.insecure_channel(target.address) as channel:
        for message in observer_grpc.ObserverStub(channel).GetFlows(request, timeout=timeout):
            yield convert.message_to_response(message)


def _rpc_error(target: Target, exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"{target.name}: Observer not reachable at {target.address} ({details})"
    return f"{target.name}: {details}"


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
    server: Annotated[str | None, typer.Option("--server", help="a Hubble Observer's gRPC address")] = None,
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
        since_text = parse_when(since) if since else None
        until_text = parse_when(until) if until else None
        chosen = targets(lab, node, socket, server)
        if all_:
            number, from_start = 0, False
        elif first is not None:
            number, from_start = first, True
        elif last is not None or not follow:
            number, from_start = (20 if last is None else last), False
        else:
            number, from_start = 0, False  # --follow alone: only what comes from now on
        request = convert.request(filters, number=number, first=from_start, follow=follow, since=since_text,
                                  until=until_text)
    except (FilterError, LabError) as exc:
        raise _fail(str(exc)) from None
    painted = color == "always" or (color == "auto" and sys.stdout.isatty())
    if number == 0 and not all_ and not follow:
        return  # --last 0 / --first 0: nothing asked (0 means "everything" on the wire)
    if not follow:
        answers: list[list[dict[str, Any]]] = []
        for target in chosen:
            try:
                answers.append(_shown(list(_stream(target, request, CALL_TIMEOUT_S))))
            except grpc.RpcError as exc:
                raise _fail(_rpc_error(target, exc)) from None
        merged = merge(answers)
        if number:
            merged = merged[:number] if from_start else merged[-number:]
        _print(merged, output, painted, header=True)
        return
    _follow(chosen, request, output, painted)


def _shown(responses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flows and lost events; node status notices (a node the relay cannot reach) go to stderr."""
    out = []
    for response in responses:
        status = response.get("node_status")
        if status is not None:
            err_console.print(f"[yellow]{', '.join(status.get('node_names', []))}: "
                              f"{status.get('state_change', '')} {status.get('message', '')}[/yellow]",
                              highlight=False)
            continue
        out.append(response)
    return out


def _batches(target: Target, request: Any, raw: bool = False) -> Iterator[list[Any] | bytes]:
    """A target's followed stream as lists of GetFlowsResponse messages: weft's FlowBatches (as
    their bytes if ``raw``), or Hubble's GetFlows (one response a list) from a server without them."""
    with grpc.insecure_channel(target.address) as channel:
        call = channel.unary_stream(batch.PATH, request_serializer=observer_pb2.GetFlowsRequest.SerializeToString)
        try:
            for blob in call(request):
                yield blob if raw else list(batch.FlowBatch.FromString(blob).responses)
            return
        except grpc.RpcError as exc:
            if not hasattr(exc, "code") or exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
        for message in observer_grpc.ObserverStub(channel).GetFlows(request):
            yield [message]


def _follow(chosen: list[Target], request: Any, output: OutputFormat, painted: bool) -> None:
    """Print every target's stream as it comes (one thread per target feeds a queue)."""
    inbox: queue.Queue[tuple[Target, list[Any] | bytes | grpc.RpcError]] = queue.Queue(maxsize=64)
    json_lines = convert.JsonLines() if output == OutputFormat.json else None

    def pump(target: Target) -> None:
        try:
            # -o json reads FlowBatches' bytes itself (JsonLines.batch_lines): most flows are
            # written without being parsed.
            for messages in _batches(target, request, raw=json_lines is not None):
                inbox.put((target, messages))
        except grpc.RpcError as exc:
            inbox.put((target, exc))

    for target in chosen:
        threading.Thread(target=pump, args=(target,), daemon=True, name=f"observe {target.name}").start()
    header = True
    alive = len(chosen)
    try:
        while alive:
            target, item = inbox.get()
            if isinstance(item, grpc.RpcError):
                err_console.print(f"[yellow]{_rpc_error(target, item)}[/yellow]", highlight=False)
                alive -= 1
                continue
            if json_lines is not None:
                # -o json: straight from the messages (or their bytes) to text; node notices to stderr.
                entries = json_lines.batch_lines(item) if isinstance(item, bytes) else [
                    m if m.HasField("node_status") else json_lines.line(m) for m in item]
                lines = [e if isinstance(e, str) else json_lines.line(e) for e in entries
                         if isinstance(e, str) or _shown([convert.message_to_response(e)])]
                if lines:
                    sys.stdout.write("\n".join(lines) + "\n")
                    sys.stdout.flush()
                continue
            assert not isinstance(item, bytes)
            shown = _shown([convert.message_to_response(m) for m in item])
            if shown:
                _print(shown, output, painted, header=header)
                header = False
    except KeyboardInterrupt:
        return
    raise _fail("every stream ended")


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


def relay(
    lab: Annotated[str, typer.Option("--lab", envvar="WEFT_LAB_NAME", help="lab name")] = "weft",
    listen: Annotated[str, typer.Option("--listen", help="loopback TCP address, if free ('' for none)")] =
    relay_process.DEFAULT_ADDRESS,
) -> None:
    """Hubble-compatible relay: one Observer (GetFlows, GetNodes, ServerStatus) merging every node
    of the lab, on the lab's relay.sock and on --listen. `weft lab up` starts one per lab."""
    raise typer.Exit(relay_process.main(["--lab", lab, "--listen", listen]))


def register(app: typer.Typer) -> None:
    app.command("observe")(observe)
    app.command("relay")(relay)


__all__ = ["Filters", "merge", "observe", "parse_when", "register", "relay"]
