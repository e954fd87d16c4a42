"""weft-cni: the CNI plugin executable (CNI spec 1.1.0, every verb). It forwards to the weft agent.

The runtime execs this once per pod operation. It reads the CNI environment and the network
configuration on stdin, forwards the request to the node's weft agent over its unix socket (JSON
lines, see docs/agent-api.md) and converts the answer to the configuration's ``cniVersion``. It uses
the standard library only, and only ``json``, ``os`` and ``sys`` are imported at start-up; the rest
is imported lazily, because the start-up time is paid for on every exec.

Entry point: ``main(argv=None, environ=None, stdin=None, stdout=None) -> int``. Runtimes run it
through a launcher written by ``weft.cni.launcher.write_launcher``.

Verbs
-----
``VERSION``
    Answered locally, without contacting the agent. It echoes the ``cniVersion`` of the input (or
    "1.1.0" if stdin is empty, unparseable or has none) together with :data:`SUPPORTED_VERSIONS`.
    The environment is not checked: podman sends ``CNI_CONTAINERID=`` and ``CNI_NETNS=dummy``.
``ADD`` / ``CHECK`` / ``DEL`` / ``STATUS`` / ``GC``
    These are forwarded as ``cni.add`` / ``cni.check`` / ``cni.del`` / ``cni.status`` / ``cni.gc``.
    Every request carries the common params (``containerID``, ``netns``, ``ifname``, ``network``,
    ``cniVersion``, ``args``, ``runtimeConfig``, ``config``). STATUS and GC have no attachment, so
    their ``containerID``/``netns``/``ifname`` are whatever the environment holds, normally "".
    On success ADD prints the converted result. The other verbs print nothing.

Network configuration (stdin)
-----------------------------
Required: ``cniVersion`` (one of :data:`SUPPORTED_VERSIONS`, else code 1), ``name`` (CNI name
syntax, else code 7) and ``type``. Plugin keys, all optional:

* ``agentSocket``: path of the agent socket (default ``/run/weft/agent.sock``).
* ``delQueueDir``: the DEL queue directory (default ``<dirname(agentSocket)>/del-queue``).
* ``connectTimeout``: seconds to wait for the connect (default 2).
* ``requestTimeout``: seconds to wait for the agent's answer once connected (default 60). The brief
  does not name this key; it was added so a hung agent cannot hang the runtime forever.

``runtimeConfig`` is forwarded with every object key lower-cased, recursively (containerd sends
``HostPort``, podman sends ``hostPort``; both arrive as ``hostport``). If two keys differ only in
case, the one that is already lower case wins, and otherwise the first one wins. ``prevResult``
(optional for DEL, required for CHECK, code 7 if missing) is forwarded in the canonical 1.0 shape:
``cniVersion`` and the 0.3.x/0.4.0 per-ip ``version`` are dropped. ``CNI_ARGS`` (``K=V;K2=V2``) is
forwarded as the object ``args``. Empty items are skipped, a value may contain ``=``, and an item
without ``=`` or with an empty key gives code 4.

Error codes used by the plugin itself
-------------------------------------
Errors are written to stdout as one JSON object, ``{"cniVersion", "code", "msg", "details"}``, with
exit status 1. ``cniVersion`` there is the configuration's version when it is supported, and
"1.1.0" otherwise. Agent errors pass through unchanged.

* 1: cniVersion not supported. Also CHECK on a configuration older than 0.4.0, and STATUS/GC
  on one older than 1.1.0.
* 4: unknown or missing ``CNI_COMMAND``. Also a missing or invalid ``CNI_CONTAINERID`` /
  ``CNI_IFNAME`` (ADD/CHECK/DEL) or ``CNI_NETNS`` (ADD/CHECK), and a malformed ``CNI_ARGS``. ADD
  with a ``CNI_NETNS`` path that does not exist also gives 4: the spec makes the runtime guarantee
  the netns, so a missing one is a bad variable. So does a ``CNI_NETNS`` that is the plugin's own
  network namespace, on ADD, CHECK or DEL, which would make the agent configure the host as a pod
  (the Go skel uses its private code 8 for this). The message names the variables.
* 3: CHECK with a ``CNI_NETNS`` that does not exist ("container unknown or does not exist").
* 5: DEL that could neither reach the agent nor be written to the queue.
* 6: stdin is not valid UTF-8 JSON, or not a JSON object. details gives the parse position.
* 7: ``cniVersion``/``name``/``type`` missing or of the wrong type. Also an invalid plugin key,
  a non-object ``runtimeConfig``/``prevResult``, CHECK without ``prevResult``, or GC without a
  valid ``cni.dev/valid-attachments`` list. An empty list is accepted, but a missing list is not
  taken to mean "nothing is valid".
* 11: agent not reachable (socket missing, connection refused, connect timeout), the connection
  broken, or no answer within ``requestTimeout``. Used for ADD, CHECK and GC; the message names
  the socket.
* 50: STATUS when the agent is not reachable.
* 100: the agent's answer breaks the protocol, or an internal error in the plugin.

``CNI_PATH`` is not required: weft delegates to no other plugin.

DEL queue (the agent drains it)
-------------------------------
A DEL must never be lost, because it releases the pod's address and endpoint. If the agent cannot
be reached, or does not answer, the DEL is queued and reported as a success:

* Directory: ``delQueueDir`` (default ``<dirname(agentSocket)>/del-queue``), created with mode 0700.
* One file per attachment, named ``<CNI_CONTAINERID>@<CNI_IFNAME>.json``. The container ID cannot
  contain ``@``, so the name is unambiguous. If that name would be longer than 255 bytes, it is
  ``sha256-<hex of sha256(containerID + "\\0" + ifname)>.json``. Repeated DELs of one attachment
  therefore coalesce into one file.
* Written atomically: ``.<name>.<pid>.tmp`` (mode 0600) is written, fsynced and renamed onto the
  final name, then the directory is fsynced. Readers must skip names that start with ``.``. Such
  leftovers come from a crashed plugin and can be deleted.
* Content: one JSON object (UTF-8). Its fields are exactly the ``cni.del`` params the plugin would
  have sent (``containerID``, ``netns``, ``ifname``, ``network``, ``cniVersion``, ``args``,
  ``runtimeConfig``, ``config``, and ``prevResult`` in canonical shape when known), plus
  ``queuedAt``: the Unix time of the write, as a float in seconds. Example::

      {"containerID": "c1", "netns": "", "ifname": "eth0", "network": "weft", "cniVersion": "1.0.0",
       "args": {"K8S_POD_NAME": "p"}, "runtimeConfig": {}, "config": {...},
       "prevResult": {"interfaces": [...], "ips": [...]}, "queuedAt": 1718000000.123}

* Merging: a newer DEL of the same attachment replaces the file. If the newer DEL has no
  ``prevResult``, or an empty ``netns``, the values from the queued file are kept; containerd's
  RemovePodSandbox DEL, for example, has neither.
* Agent side: at start-up, before serving, process every ``*.json`` file (not starting with ``.``)
  in ``queuedAt`` order as a ``cni.del`` with these params (without ``queuedAt``), then unlink it.
* Plugin side: when the agent is reachable again, a queued entry is flushed by the plugin too. The
  next DEL of the same attachment merges it in as above, and the file is removed once the agent
  accepts. The next ADD of the same attachment first sends the queued ``cni.del`` on the same
  connection, then removes the file whatever the agent answers, then sends ``cni.add``. So a stale
  queued DEL can never tear down a newer attachment with the same (containerID, ifname).
"""

from __future__ import annotations

import os
import sys

from weft.cni import fastjson as json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import IO, Any

    JSONObject = dict[str, Any]
    # Opens a session with the agent: (socket path, connect timeout, request timeout) -> an
    # object with call(method, params) that is its own context manager (see AgentConnection).
    Connector = Callable[[str, float, float], Any]

SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"
_VERSION_RANK = {v: i for i, v in enumerate(SUPPORTED_VERSIONS)}

DEFAULT_AGENT_SOCKET = "/run/weft/agent.sock"
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_REQUEST_TIMEOUT = 60.0
VALID_ATTACHMENTS_KEY = "cni.dev/valid-attachments"

# CNI spec well-known error codes, plus weft's own (>= 100).
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_NOT_AVAILABLE = 50
ERR_INTERNAL = 100

_MAX_RESPONSE = 16 << 20
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_CHARS = _ALNUM | frozenset("_.-")


class CNIError(Exception):
    """An error reported to the runtime as a CNI error object (exit status 1)."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(code, msg, details)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> JSONObject:
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}


class AgentUnavailable(Exception):
    """The agent could not be reached, dropped the connection, or did not answer in time."""


class AgentProtocolError(Exception):
    """The agent answered something that is not a valid response line."""


# --------------------------------------------------------------------------- conversions


def parse_cni_args(value: str) -> dict[str, str]:
    """Parse ``CNI_ARGS`` (``K=V;K2=V2``). Empty items are skipped, and a value may contain '='."""
    out: dict[str, str] = {}
    for item in value.split(";"):
        if not item:
            continue
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise CNIError(
                ERR_INVALID_ENV,
                "invalid environment variable: CNI_ARGS",
                f"CNI_ARGS: item {item!r} is not of the form KEY=VALUE",
            )
        out[key] = val
    return out


def lower_keys(value: Any) -> Any:
    """Return ``value`` with every object key lower-cased, recursively (through lists too).

    If keys collide, the one that is already lower case wins, and otherwise the first one wins.
    """
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        exact: set[str] = set()
        for key, item in value.items():
            low = key.lower() if isinstance(key, str) else key
            if low in out and (low in exact or key != low):
                continue
            out[low] = lower_keys(item)
            if key == low:
                exact.add(low)
        return out
    if isinstance(value, list):
        return [lower_keys(item) for item in value]
    return value


def canonical_result(result: JSONObject) -> JSONObject:
    """Convert a CNI result of any supported version (0.3.0 .. 1.1.0) to the canonical 1.0 body.

    The canonical body is the 1.0 result without ``cniVersion``. 0.3.x/0.4.0 results differ from it
    only by the per-ip ``version`` field, which is dropped.
    """
    out = {k: v for k, v in result.items() if k != "cniVersion"}
    ips = out.get("ips")
    if isinstance(ips, list):
        out["ips"] = [{k: v for k, v in ip.items() if k != "version"} if isinstance(ip, dict) else ip for ip in ips]
    return out


_V0_INTERFACE_KEYS = ("name", "mac", "sandbox")
_V0_IP_KEYS = ("interface", "address", "gateway")
_V0_ROUTE_KEYS = ("dst", "gw")
_V0_DNS_KEYS = ("nameservers", "domain", "search", "options")


def _pick(obj: Any, keys: tuple[str, ...], what: str) -> JSONObject:
    if not isinstance(obj, dict):
        raise CNIError(ERR_INTERNAL, "weft agent returned an invalid result", f"{what} is not an object")
    return {k: obj[k] for k in keys if k in obj}


def result_for_version(canonical: JSONObject, cni_version: str) -> JSONObject:
    """Convert the agent's canonical (1.0-shaped) ADD result into the result for ``cni_version``.

    1.0.0 and 1.1.0 get the body as it is. 0.3.0/0.3.1/0.4.0 get the 0.x shape: only the fields that
    shape knows are kept (interface name/mac/sandbox, ip interface/address/gateway, route dst/gw, dns),
    and each ip gets ``"version": "4"`` or ``"6"``. This is what libcni's own converter does.
    """
    out: JSONObject = {"cniVersion": cni_version}
    if _VERSION_RANK[cni_version] >= _VERSION_RANK["1.0.0"]:
        out.update((k, v) for k, v in canonical.items() if k != "cniVersion")
        return out
    import ipaddress

    for key in ("interfaces", "ips", "routes"):
        if key in canonical and not isinstance(canonical[key], list):
            raise CNIError(ERR_INTERNAL, "weft agent returned an invalid result", f"{key} is not a list")
    if "interfaces" in canonical:
        out["interfaces"] = [_pick(i, _V0_INTERFACE_KEYS, "interface") for i in canonical["interfaces"]]
    if "ips" in canonical:
        ips = []
        for ip in canonical["ips"]:
            body = _pick(ip, _V0_IP_KEYS, "ip")
            try:
                version = ipaddress.ip_interface(body["address"]).version
            except (KeyError, TypeError, ValueError) as exc:
                raise CNIError(
                    ERR_INTERNAL, "weft agent returned an invalid result", f"bad ip address in {ip!r}: {exc}"
                ) from None
            ips.append({"version": str(version), **body})
        out["ips"] = ips
    if "routes" in canonical:
        out["routes"] = [_pick(r, _V0_ROUTE_KEYS, "route") for r in canonical["routes"]]
    if "dns" in canonical:
        out["dns"] = _pick(canonical["dns"], _V0_DNS_KEYS, "dns")
    return out


# --------------------------------------------------------------------------- validation


def _valid_name(value: str) -> bool:
    """CNI container-ID / network-name syntax: ``[a-zA-Z0-9][a-zA-Z0-9_.-]*``."""
    return bool(value) and value[0] in _ALNUM and all(c in _NAME_CHARS for c in value)


def _ifname_problem(value: str) -> str | None:
    if not value:
        return "missing or empty"
    if value in (".", ".."):
        return f"{value!r} is not a valid interface name"
    if len(value.encode("utf-8", "surrogateescape")) > 15:
        return f"{value!r} is longer than 15 bytes"
    if any(c in "/:" or c.isspace() for c in value):
        return f"{value!r} contains '/', ':' or whitespace"
    return None


def _parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CNIError(
            ERR_DECODE,
            "failed to decode the network configuration",
            f"not UTF-8: {exc.reason} at byte {exc.start}",
        ) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CNIError(
            ERR_DECODE,
            "failed to decode the network configuration",
            f"invalid JSON: {exc}",  # "<what>: line L column C (char N)", as json words it
        ) from None
    except RecursionError:
        raise CNIError(
            ERR_DECODE, "failed to decode the network configuration", "invalid JSON: nested too deeply"
        ) from None


def _positive_number(conf: JSONObject, key: str, default: float) -> float:
    value = conf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"invalid network configuration: {key}",
            f"{key} must be a number > 0, got {value!r}",
        )
    return float(value)


def _optional_path(conf: JSONObject, key: str, default: str) -> str:
    value = conf.get(key, default)
    if not isinstance(value, str) or not value or "\0" in value:
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"invalid network configuration: {key}",
            f"{key} must be a non-empty path, got {value!r}",
        )
    return value


class NetConf:
    """The validated network configuration (stdin), with weft's plugin keys resolved."""

    __slots__ = (
        "agent_socket",
        "connect_timeout",
        "data",
        "del_queue_dir",
        "name",
        "request_timeout",
        "version",
    )

    def __init__(self, data: JSONObject) -> None:
        self.data = data
        version = data.get("cniVersion")
        if version is None or version == "":
            raise CNIError(ERR_INVALID_CONFIG, "invalid network configuration: missing cniVersion")
        if not isinstance(version, str):
            raise CNIError(
                ERR_INVALID_CONFIG,
                "invalid network configuration: cniVersion",
                f"cniVersion must be a string, got {version!r}",
            )
        if version not in _VERSION_RANK:
            raise CNIError(
                ERR_INCOMPATIBLE_VERSION,
                "incompatible CNI versions",
                f"config is {version!r}, plugin supports {', '.join(SUPPORTED_VERSIONS)}",
            )
        self.version: str = version
        name = data.get("name")
        if name is None or name == "":
            raise CNIError(ERR_INVALID_CONFIG, "invalid network configuration: missing network name")
        if not isinstance(name, str) or not _valid_name(name):
            raise CNIError(
                ERR_INVALID_CONFIG,
                "invalid network configuration: invalid network name",
                f"{name!r}: must match [a-zA-Z0-9][a-zA-Z0-9_.-]*",
            )
        self.name: str = name
        typ = data.get("type")
        if not isinstance(typ, str) or not typ:
            raise CNIError(ERR_INVALID_CONFIG, "invalid network configuration: missing type", f"type is {typ!r}")
        self.agent_socket = _optional_path(data, "agentSocket", DEFAULT_AGENT_SOCKET)
        if len(os.fsencode(self.agent_socket)) > _SUN_PATH_MAX:
            raise CNIError(
                ERR_INVALID_CONFIG,
                "invalid network configuration: agentSocket",
                f"agentSocket is longer than {_SUN_PATH_MAX} bytes: {self.agent_socket!r}",
            )
        default_queue = os.path.join(os.path.dirname(self.agent_socket) or ".", "del-queue")
        self.del_queue_dir = _optional_path(data, "delQueueDir", default_queue)
        self.connect_timeout = _positive_number(data, "connectTimeout", DEFAULT_CONNECT_TIMEOUT)
        self.request_timeout = _positive_number(data, "requestTimeout", DEFAULT_REQUEST_TIMEOUT)
        for key in ("runtimeConfig", "prevResult"):
            if key in data and not isinstance(data[key], dict):
                raise CNIError(ERR_INVALID_CONFIG, f"invalid network configuration: {key}", f"{key} must be an object")

    def at_least(self, version: str) -> bool:
        return _VERSION_RANK[self.version] >= _VERSION_RANK[version]

    def require(self, command: str, min_version: str) -> None:
        if not self.at_least(min_version):
            raise CNIError(
                ERR_INCOMPATIBLE_VERSION,
                f"config version does not allow {command}",
                f"{command} needs cniVersion >= {min_version}, config is {self.version}",
            )

    def prev_result(self) -> JSONObject | None:
        prev = self.data.get("prevResult")
        return canonical_result(prev) if isinstance(prev, dict) else None


# --------------------------------------------------------------------------- agent client


class AgentConnection:
    """One connection to the agent's JSON-lines socket. It may carry several requests in turn."""

    def __init__(self, path: str, connect_timeout: float, request_timeout: float) -> None:
        # _socket, not socket: the wrapper module costs milliseconds of imports at every exec.
        import _socket as socket

        self.path = path
        self.request_timeout = request_timeout
        self._buf = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.settimeout(connect_timeout)
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            if isinstance(exc, TimeoutError):
                raise AgentUnavailable(f"connect to {path} timed out after {connect_timeout:g}s") from None
            raise AgentUnavailable(f"connect to {path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> AgentConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, params: JSONObject) -> Any:
        """Send one request and return its ``result``.

        An ``error`` answer raises CNIError. Transport failures raise AgentUnavailable, and an
        answer that breaks the protocol raises AgentProtocolError.
        """
        import time

        line = json.dumps({"method": method, "params": params}, separators=(",", ":")) + "\n"
        deadline = time.monotonic() + self.request_timeout
        try:
            self._sock.settimeout(self.request_timeout)
            self._sock.sendall(line.encode("utf-8", "surrogateescape"))
            while b"\n" not in self._buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self._sock.settimeout(remaining)
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise AgentUnavailable(f"{self.path}: the agent closed the connection without answering {method}")
                self._buf += chunk
                if len(self._buf) > _MAX_RESPONSE:
                    raise AgentProtocolError(f"answer to {method} is longer than {_MAX_RESPONSE} bytes")
        except TimeoutError:
            raise AgentUnavailable(f"{self.path}: no answer to {method} within {self.request_timeout:g}s") from None
        except OSError as exc:
            raise AgentUnavailable(f"{self.path}: {method}: {exc.strerror or exc}") from None
        raw, _, self._buf = self._buf.partition(b"\n")
        try:
            answer = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise AgentProtocolError(f"answer to {method} is not JSON: {exc}") from None
        if not isinstance(answer, dict):
            raise AgentProtocolError(f"answer to {method} is not an object")
        if "error" in answer:
            raise _agent_error(answer["error"])
        if "result" not in answer:
            raise AgentProtocolError(f"answer to {method} has neither result nor error")
        return answer["result"]


def _agent_error(err: Any) -> CNIError:
    if not isinstance(err, dict):
        return CNIError(ERR_INTERNAL, "weft agent error", json.dumps(err))
    code = err.get("code")
    if isinstance(code, bool) or not isinstance(code, int):
        code = ERR_INTERNAL
    msg = err.get("msg")
    if not isinstance(msg, str) or not msg:
        msg = "weft agent error"
    details = err.get("details", "")
    if details is None:
        details = ""
    elif not isinstance(details, str):
        details = json.dumps(details)
    return CNIError(code, msg, details)


def _unreachable(conf: NetConf, code: int, reason: str) -> CNIError:
    what = "try again later" if code == ERR_TRY_AGAIN else "plugin not available"
    return CNIError(code, f"weft agent not reachable at {conf.agent_socket}: {what}", reason)


def _protocol_error(conf: NetConf, reason: str) -> CNIError:
    return CNIError(ERR_INTERNAL, f"invalid answer from the weft agent at {conf.agent_socket}", reason)


def _log(message: str) -> None:
    """Unstructured log line on stderr. The spec allows it, and runtimes log it."""
    try:
        sys.stderr.write(f"weft-cni: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


# --------------------------------------------------------------------------- DEL queue


def queue_file_name(container_id: str, ifname: str) -> str:
    name = f"{container_id}@{ifname}.json"
    if len(os.fsencode(name)) <= 255:
        return name
    import hashlib

    digest = hashlib.sha256(os.fsencode(f"{container_id}\0{ifname}")).hexdigest()
    return f"sha256-{digest}.json"


def read_queued(queue_dir: str, name: str) -> JSONObject | None:
    """The queued DEL for this attachment, or None (missing or unreadable)."""
    try:
        with open(os.path.join(queue_dir, name), "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        _log(f"ignoring unreadable DEL queue entry {name}: {exc}")
        return None
    return data if isinstance(data, dict) else None


def write_queued(queue_dir: str, name: str, params: JSONObject) -> str:
    """Atomically write (tmp + fsync + rename + dir fsync) a queued DEL. Returns its path."""
    import time

    entry = dict(params)
    entry["queuedAt"] = time.time()
    body = json.dumps(entry, separators=(",", ":")).encode("utf-8", "surrogateescape") + b"\n"
    os.makedirs(queue_dir, mode=0o700, exist_ok=True)
    final = os.path.join(queue_dir, name)
    tmp = os.path.join(queue_dir, f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        try:  # noqa: SIM105 (contextlib is not imported: start-up time)
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(queue_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return final


def remove_queued(queue_dir: str, name: str) -> None:
    try:
        os.unlink(os.path.join(queue_dir, name))
    except FileNotFoundError:
        pass
    except OSError as exc:
        _log(f"cannot remove DEL queue entry {name}: {exc}")


# --------------------------------------------------------------------------- verbs


class Invocation:
    """One plugin run: environment, raw stdin and output stream."""

    __slots__ = ("command", "connect", "env", "error_version", "out", "own_netns", "raw")

    def __init__(self, command: str, env: Mapping[str, str], raw: bytes, out: IO[str],
                 connect: Connector | None = None, own_netns: tuple[int, int] | None = None) -> None:
        self.command = command
        self.env = env
        self.raw = raw
        self.out = out
        self.error_version = LATEST_VERSION
        # How to reach the agent: its socket (the plugin as its own process) or, when the agent
        # runs this code for the native launcher (cni.exec), its own handlers.
        self.connect: Connector = AgentConnection if connect is None else connect
        # (st_dev, st_ino) of the plugin process's netns; None: this process's own.
        self.own_netns = own_netns

    def netconf(self) -> NetConf:
        data = _parse_json(self.raw)
        if not isinstance(data, dict):
            raise CNIError(
                ERR_DECODE,
                "failed to decode the network configuration",
                f"expected a JSON object, got {type(data).__name__}",
            )
        version = data.get("cniVersion")
        if isinstance(version, str) and version in _VERSION_RANK:
            self.error_version = version
        return NetConf(data)

    def emit(self, obj: JSONObject) -> None:
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()

    def attachment(self, netns_required: bool) -> tuple[str, str, str]:
        """Validate CNI_CONTAINERID, CNI_IFNAME (and CNI_NETNS if required), naming all bad ones."""
        problems: list[tuple[str, str]] = []
        cid = self.env.get("CNI_CONTAINERID", "")
        if not cid:
            problems.append(("CNI_CONTAINERID", "missing or empty"))
        elif not _valid_name(cid):
            problems.append(("CNI_CONTAINERID", f"{cid!r} must match [a-zA-Z0-9][a-zA-Z0-9_.-]*"))
        netns = self.env.get("CNI_NETNS", "")
        if netns_required and not netns:
            problems.append(("CNI_NETNS", "missing or empty"))
        ifname = self.env.get("CNI_IFNAME", "")
        why = _ifname_problem(ifname)
        if why is not None:
            problems.append(("CNI_IFNAME", why))
        if problems:
            raise CNIError(
                ERR_INVALID_ENV,
                "invalid environment variables: " + ", ".join(n for n, _ in problems),
                "; ".join(f"{n}: {w}" for n, w in problems),
            )
        return cid, netns, ifname

    def params(self, conf: NetConf, cid: str, netns: str, ifname: str) -> JSONObject:
        return {
            "containerID": cid,
            "netns": netns,
            "ifname": ifname,
            "network": conf.name,
            "cniVersion": conf.version,
            "args": parse_cni_args(self.env.get("CNI_ARGS", "")),
            "runtimeConfig": lower_keys(conf.data.get("runtimeConfig", {})),
            "config": conf.data,
        }


def _netns_is_own(netns: str, own_netns: tuple[int, int] | None = None) -> bool:
    try:
        target = os.stat(netns)
        if own_netns is None:
            own = os.stat("/proc/self/ns/net")
            own_netns = (own.st_dev, own.st_ino)
    except OSError:
        return False
    return (target.st_dev, target.st_ino) == own_netns


def _own_netns_error() -> CNIError:
    return CNIError(
        ERR_INVALID_ENV,
        "invalid environment variable: CNI_NETNS",
        "CNI_NETNS is the plugin's own network namespace (the host's), not a container's",
    )


def cmd_version(inv: Invocation) -> int:
    requested: Any = None
    try:
        data = json.loads(inv.raw.decode("utf-8")) if inv.raw.strip() else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        requested = data.get("cniVersion")
    if not isinstance(requested, str) or not requested:
        requested = LATEST_VERSION
    inv.emit({"cniVersion": requested, "supportedVersions": list(SUPPORTED_VERSIONS)})
    return 0


def cmd_add(inv: Invocation) -> int:
    conf = inv.netconf()
    cid, netns, ifname = inv.attachment(netns_required=True)
    if not os.path.exists(netns):
        raise CNIError(
            ERR_INVALID_ENV, "invalid environment variable: CNI_NETNS", f"CNI_NETNS {netns!r} does not exist"
        )
    if _netns_is_own(netns, inv.own_netns):
        raise _own_netns_error()
    params = inv.params(conf, cid, netns, ifname)
    qname = queue_file_name(cid, ifname)
    queued = read_queued(conf.del_queue_dir, qname)
    try:
        with inv.connect(conf.agent_socket, conf.connect_timeout, conf.request_timeout) as agent:
            if queued is not None:
                queued.pop("queuedAt", None)
                try:
                    agent.call("cni.del", queued)
                except CNIError as exc:
                    _log(f"queued DEL of {qname} failed before ADD: {exc.code} {exc.msg} {exc.details}")
                remove_queued(conf.del_queue_dir, qname)
            result = agent.call("cni.add", params)
    except AgentUnavailable as exc:
        raise _unreachable(conf, ERR_TRY_AGAIN, str(exc)) from None
    except AgentProtocolError as exc:
        raise _protocol_error(conf, str(exc)) from None
    if not isinstance(result, dict):
        raise _protocol_error(conf, "cni.add result is not an object")
    inv.emit(result_for_version(result, conf.version))
    return 0


def cmd_del(inv: Invocation) -> int:
    conf = inv.netconf()
    cid, netns, ifname = inv.attachment(netns_required=False)
    if netns and _netns_is_own(netns, inv.own_netns):
        raise _own_netns_error()
    params = inv.params(conf, cid, netns, ifname)
    prev = conf.prev_result()
    if prev is not None:
        params["prevResult"] = prev
    qname = queue_file_name(cid, ifname)
    queued = read_queued(conf.del_queue_dir, qname)
    if queued is not None:
        if "prevResult" not in params and isinstance(queued.get("prevResult"), dict):
            params["prevResult"] = queued["prevResult"]
        if not params["netns"] and isinstance(queued.get("netns"), str):
            params["netns"] = queued["netns"]
    try:
        with inv.connect(conf.agent_socket, conf.connect_timeout, conf.request_timeout) as agent:
            agent.call("cni.del", params)
    except (AgentUnavailable, AgentProtocolError) as exc:
        try:
            path = write_queued(conf.del_queue_dir, qname, params)
        except OSError as qexc:
            raise CNIError(
                ERR_IO,
                f"weft agent not reachable at {conf.agent_socket} and the DEL could not be queued",
                f"{exc}; queue {conf.del_queue_dir}: {qexc}",
            ) from None
        _log(f"{exc}; DEL queued in {path}")
        return 0
    if queued is not None:
        remove_queued(conf.del_queue_dir, qname)
    return 0


def cmd_check(inv: Invocation) -> int:
    conf = inv.netconf()
    conf.require("CHECK", "0.4.0")
    cid, netns, ifname = inv.attachment(netns_required=True)
    prev = conf.prev_result()
    if prev is None:
        raise CNIError(ERR_INVALID_CONFIG, "invalid network configuration: CHECK requires prevResult")
    if not os.path.exists(netns):
        raise CNIError(
            ERR_UNKNOWN_CONTAINER,
            "container unknown or does not exist",
            f"CNI_NETNS {netns!r} does not exist",
        )
    if _netns_is_own(netns, inv.own_netns):
        raise _own_netns_error()
    params = inv.params(conf, cid, netns, ifname)
    params["prevResult"] = prev
    _forward(inv, conf, "cni.check", params, ERR_TRY_AGAIN)
    return 0


def _no_attachment_params(inv: Invocation, conf: NetConf) -> JSONObject:
    env = inv.env
    return inv.params(conf, env.get("CNI_CONTAINERID", ""), env.get("CNI_NETNS", ""), env.get("CNI_IFNAME", ""))


def cmd_status(inv: Invocation) -> int:
    conf = inv.netconf()
    conf.require("STATUS", "1.1.0")
    _forward(inv, conf, "cni.status", _no_attachment_params(inv, conf), ERR_NOT_AVAILABLE)
    return 0


def cmd_gc(inv: Invocation) -> int:
    conf = inv.netconf()
    conf.require("GC", "1.1.0")
    raw = conf.data.get(VALID_ATTACHMENTS_KEY)
    bad = CNIError(
        ERR_INVALID_CONFIG,
        f"invalid network configuration: {VALID_ATTACHMENTS_KEY}",
        f"GC needs {VALID_ATTACHMENTS_KEY}: a list of {{containerID, ifname}} objects (strings), got {raw!r}",
    )
    if not isinstance(raw, list):
        raise bad
    valid = []
    for item in raw:
        if not (
            isinstance(item, dict) and isinstance(item.get("containerID"), str) and isinstance(item.get("ifname"), str)
        ):
            raise bad
        valid.append({"containerID": item["containerID"], "ifname": item["ifname"]})
    params = _no_attachment_params(inv, conf)
    params["validAttachments"] = valid
    _forward(inv, conf, "cni.gc", params, ERR_TRY_AGAIN)
    return 0


def _forward(inv: Invocation, conf: NetConf, method: str, params: JSONObject, unreachable_code: int) -> Any:
    try:
        with inv.connect(conf.agent_socket, conf.connect_timeout, conf.request_timeout) as agent:
            return agent.call(method, params)
    except AgentUnavailable as exc:
        raise _unreachable(conf, unreachable_code, str(exc)) from None
    except AgentProtocolError as exc:
        raise _protocol_error(conf, str(exc)) from None


VERBS: dict[str, Callable[[Invocation], int]] = {
    "ADD": cmd_add,
    "DEL": cmd_del,
    "CHECK": cmd_check,
    "STATUS": cmd_status,
    "GC": cmd_gc,
    "VERSION": cmd_version,
}


def _read_all(stream: IO[Any] | None) -> bytes:
    if stream is None:
        return b""
    data = stream.read()
    if isinstance(data, str):
        return data.encode("utf-8", "surrogateescape")
    return bytes(data)


class InAgent:
    """The agent's side of the native launcher (``cni.exec``): this module's verbs run inside
    the agent, and their requests go straight to the agent's handlers instead of its socket.
    ``dispatch(method, params)`` returns the result or raises the agent's error as an object
    with ``to_json()`` (code, msg, details), which becomes the CNI error as over the socket."""

    def __init__(self, dispatch: Callable[[str, JSONObject], Any]) -> None:
        self.dispatch = dispatch

    def __call__(self, path: str, connect_timeout: float, request_timeout: float) -> InAgent:
        return self

    def __enter__(self) -> InAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def call(self, method: str, params: JSONObject) -> Any:
        try:
            # Through JSON as over the socket: the handlers get (and keep) data of their own.
            return self.dispatch(method, json.loads(json.dumps(params)))
        except Exception as exc:
            to_json = getattr(exc, "to_json", None)
            if to_json is None:
                raise
            raise _agent_error(to_json()) from None


def run_in_agent(environ: Mapping[str, str], stdin: bytes, own_netns: tuple[int, int] | None,
                 dispatch: Callable[[str, JSONObject], Any]) -> tuple[int, str]:
    """One plugin invocation run by the agent for the native launcher: (exit status, stdout)."""
    import io

    out = io.StringIO()
    status = main(environ=environ, stdin=io.BytesIO(stdin), stdout=out, connect=InAgent(dispatch),
                  own_netns=own_netns)
    return status, out.getvalue()


def main(
    argv: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
    stdin: IO[Any] | None = None,
    stdout: IO[str] | None = None,
    connect: Connector | None = None,
    own_netns: tuple[int, int] | None = None,
) -> int:
    """Run one CNI invocation and return the exit status (0 ok, 1 error printed on stdout).

    ``argv`` is accepted for symmetry and ignored: CNI passes everything through the environment
    and stdin. ``environ``/``stdin``/``stdout`` default to the process's own. ``stdin`` may be a
    text or binary stream.
    """
    del argv
    env: Mapping[str, str] = os.environ if environ is None else environ
    out: IO[str] = sys.stdout if stdout is None else stdout
    command = env.get("CNI_COMMAND", "")
    inv = Invocation(command, env, b"", out, connect, own_netns)
    try:
        try:
            inv.raw = _read_all(sys.stdin.buffer if stdin is None and sys.stdin is not None else stdin)
        except OSError as exc:
            raise CNIError(ERR_IO, "failed to read the network configuration from stdin", str(exc)) from None
        verb = VERBS.get(command)
        if verb is None:
            raise CNIError(
                ERR_INVALID_ENV,
                f"unknown CNI_COMMAND: {command}" if command else "missing environment variable: CNI_COMMAND",
                f"CNI_COMMAND must be one of {', '.join(VERBS)}",
            )
        return verb(inv)
    except CNIError as exc:
        err = exc
    except Exception as exc:  # last resort: the runtime must still get a CNI error object
        import traceback

        traceback.print_exc()
        err = CNIError(ERR_INTERNAL, "internal error in weft-cni", f"{type(exc).__name__}: {exc}")
    try:  # noqa: SIM105 (contextlib is not imported: start-up time)
        inv.emit(err.to_json(inv.error_version))
    except (OSError, ValueError):
        pass
    return 1
