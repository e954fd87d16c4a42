"""Unit tests of the weft CNI plugin (no root needed).

Most tests exec the real plugin the way a runtime does: a launcher written by ``write_launcher``
into a temporary dir, run with the CNI environment variables and the netconf on stdin. It talks
to ``fake_agent.FakeAgent``, a scripted test double of the agent's unix socket. A few in-process
tests call ``main()`` directly, and property tests cover the pure conversions.
"""

from __future__ import annotations

import io
import json
import socket
import stat
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weft.cni import plugin as cni
from weft.cni.launcher import PYTHON, default_src_dir, write_launcher

try:  # tests/unit is not a package: pytest puts this directory on sys.path
    from cni_fixtures import netns, sockdir  # noqa: F401 (pytest fixtures, used by name)

    from fake_agent import CANONICAL_RESULT, FakeAgent
except ImportError:  # pragma: no cover - if tests/unit ever becomes a package
    from .fake_agent import CANONICAL_RESULT, FakeAgent

ALL_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
V0 = ["0.3.0", "0.3.1", "0.4.0"]
V1 = ["1.0.0", "1.1.0"]
CHECK_VERSIONS = ["0.4.0", "1.0.0", "1.1.0"]
ERROR_KEYS = {"cniVersion", "code", "msg", "details"}

# The CANONICAL_RESULT as each version must print it.
RESULT_V0_BODY = {
    "interfaces": [
        {"name": "lxc1a2b3c4d", "mac": "aa:bb:cc:00:00:01"},
        {"name": "eth0", "mac": "aa:bb:cc:00:00:02", "sandbox": "/run/netns/pod1"},
    ],
    "ips": [
        {"version": "4", "interface": 1, "address": "10.244.1.7/32", "gateway": "10.244.1.1"},
        {"version": "6", "interface": 1, "address": "fd00:10:244:1::7/128", "gateway": "fd00:10:244:1::1"},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0", "gw": "fd00:10:244:1::1"}],
    "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]},
}


# --------------------------------------------------------------------------- harness


class Run:
    def __init__(self, proc: subprocess.CompletedProcess[bytes]) -> None:
        self.rc = proc.returncode
        self.stdout = proc.stdout.decode()
        self.stderr = proc.stderr.decode()

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    def error(self) -> dict[str, Any]:
        """Assert a well-formed CNI error: exit 1 and exactly one error object on stdout."""
        assert self.rc == 1, (self.rc, self.stdout, self.stderr)
        assert self.stdout.count("\n") == 1 and self.stdout.endswith("\n"), self.stdout
        err = self.json
        assert set(err) == ERROR_KEYS, err
        assert isinstance(err["code"], int) and err["msg"] and isinstance(err["details"], str)
        return err

    def ok(self) -> None:
        assert self.rc == 0, (self.rc, self.stdout, self.stderr)


@pytest.fixture(scope="session")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cnibin") / "weft"
    write_launcher(path, native=False)  # the Python plugin itself (the native launcher: test_cni_native.py)
    return path


@pytest.fixture
def agent(sockdir: Path) -> Iterator[FakeAgent]:
    with FakeAgent(sockdir / "agent.sock") as fake:
        yield fake


def netconf(version: str, sock: Path | str, **extra: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": "weftnet", "type": "weft", "agentSocket": str(sock), **extra}


def run(
    plugin: Path,
    command: str | None,
    stdin: dict[str, Any] | bytes | str | None,
    *,
    containerid: str | None = "ctr1",
    netns: str | None = None,
    ifname: str | None = "eth0",
    args: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Run:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_PATH": "/usr/lib/cni"}
    for key, value in (
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", containerid),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", ifname),
        ("CNI_ARGS", args),
    ):
        if value is not None:
            env[key] = value
    env.update(extra_env or {})
    if isinstance(stdin, dict):
        data = json.dumps(stdin).encode()
    elif isinstance(stdin, str):
        data = stdin.encode()
    else:
        data = stdin or b""
    proc = subprocess.run([str(plugin)], input=data, env=env, capture_output=True, timeout=30, check=False)
    return Run(proc)


def prev_result(version: str) -> dict[str, Any]:
    """The canonical result as a runtime would send it back as prevResult for ``version``."""
    if version in V0:
        return {"cniVersion": version, **RESULT_V0_BODY}
    return {"cniVersion": version, **CANONICAL_RESULT}


def expected_canonical_prev(version: str) -> dict[str, Any]:
    if version in V0:
        body = json.loads(json.dumps(RESULT_V0_BODY))
        for ip in body["ips"]:
            del ip["version"]
        return body
    return CANONICAL_RESULT


# --------------------------------------------------------------------------- launcher


def test_launcher_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "weft"
    write_launcher(path, src_dir=tmp_path / "src", native=False)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o755
    lines = path.read_text().splitlines()
    assert lines[0] == f"#!{PYTHON} -S" == "#!/usr/bin/python3 -S"
    assert f"sys.path.insert(0, {str((tmp_path / 'src').resolve())!r})" in lines
    assert lines[-2:] == ["from weft.cni.plugin import main", "sys.exit(main())"]
    write_launcher(path, native=False)  # rewrite in place: default src dir, no tmp files left behind
    assert repr(str(default_src_dir())) in path.read_text()
    assert (default_src_dir() / "weft" / "cni" / "plugin.py").is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["weft"]


def test_plugin_imports_only_the_standard_library(plugin: Path) -> None:
    """The plugin module starts fast: at import it loads only os/sys and _json (json's own C
    accelerator), not json, re, enum or socket, which cost milliseconds at every exec."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(default_src_dir())!r})\n"
        "import os\n"
        "base = set(sys.modules)\n"
        "import weft.cni.plugin\n"
        "print(' '.join(sorted(set(sys.modules) - base)))\n"
    )
    out = subprocess.run([PYTHON, "-S", "-c", code], capture_output=True, check=True, text=True).stdout
    assert out.split() == ["__future__", "_json", "weft", "weft.cni", "weft.cni.fastjson", "weft.cni.plugin"]


def test_version_exec_time(plugin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Measure (not assert) the exec time of VERSION, which podman runs for every plugin at each command."""
    samples = []
    for _ in range(15):
        start = time.perf_counter()
        res = run(plugin, "VERSION", {"cniVersion": "1.0.0"}, containerid="", netns="dummy", ifname="dummy")
        samples.append((time.perf_counter() - start) * 1000)
        res.ok()
    with capsys.disabled():
        print(
            f"\n[weft-cni] VERSION exec time over {len(samples)} runs: "
            f"min {min(samples):.1f} ms, median {statistics.median(samples):.1f} ms, max {max(samples):.1f} ms"
        )


# --------------------------------------------------------------------------- VERSION


@pytest.mark.parametrize("requested", [*ALL_VERSIONS, "0.2.0", "9.9.9"])
def test_version_echoes_requested(plugin: Path, agent: FakeAgent, requested: str) -> None:
    # podman's probe: CNI_CONTAINERID empty, CNI_NETNS/IFNAME/PATH = dummy
    res = run(
        plugin,
        "VERSION",
        {"cniVersion": requested, "agentSocket": str(agent.path)},
        containerid="",
        netns="dummy",
        ifname="dummy",
        extra_env={"CNI_PATH": "dummy"},
    )
    res.ok()
    assert res.json == {"cniVersion": requested, "supportedVersions": ALL_VERSIONS}
    assert agent.requests == []  # answered locally


@pytest.mark.parametrize("stdin", [b"", b"{broken", b"[]", b'{"name": "x"}'])
def test_version_without_usable_input(plugin: Path, stdin: bytes) -> None:
    res = run(plugin, "VERSION", stdin, containerid=None, netns=None, ifname=None)
    res.ok()
    assert res.json == {"cniVersion": "1.1.0", "supportedVersions": ALL_VERSIONS}


# --------------------------------------------------------------------------- ADD


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_add_result_shape_per_version(plugin: Path, agent: FakeAgent, netns: str, version: str) -> None:
    conf = netconf(version, agent.path)
    res = run(plugin, "ADD", conf, netns=netns, args="IgnoreUnknown=1;K8S_POD_NAME=web-0")
    res.ok()
    if version in V0:
        assert res.json == {"cniVersion": version, **RESULT_V0_BODY}
    else:
        assert res.json == {"cniVersion": version, **CANONICAL_RESULT}
    assert agent.methods == ["cni.add"]
    assert agent.params("cni.add") == {
        "containerID": "ctr1",
        "netns": netns,
        "ifname": "eth0",
        "network": "weftnet",
        "cniVersion": version,
        "args": {"IgnoreUnknown": "1", "K8S_POD_NAME": "web-0"},
        "runtimeConfig": {},
        "config": conf,
    }


def test_add_netns_missing_is_env_error(plugin: Path, agent: FakeAgent, tmp_path: Path) -> None:
    err = run(plugin, "ADD", netconf("1.0.0", agent.path), netns=str(tmp_path / "gone")).error()
    assert err["code"] == 4 and "CNI_NETNS" in err["msg"]
    assert agent.requests == []


@pytest.mark.parametrize("command", ["ADD", "CHECK", "DEL"])
def test_own_netns_is_refused(plugin: Path, agent: FakeAgent, command: str) -> None:
    conf = netconf("1.0.0", agent.path, prevResult=prev_result("1.0.0"))
    err = run(plugin, command, conf, netns="/proc/self/ns/net").error()
    assert err["code"] == 4 and "CNI_NETNS" in err["msg"]
    assert agent.requests == []


def test_add_agent_error_passes_through(plugin: Path, agent: FakeAgent, netns: str) -> None:
    agent.fail("cni.add", 101, "no free address in the node's block", "10.244.1.0/24: 254/254 in use")
    err = run(plugin, "ADD", netconf("0.4.0", agent.path), netns=netns).error()
    assert err == {
        "cniVersion": "0.4.0",
        "code": 101,
        "msg": "no free address in the node's block",
        "details": "10.244.1.0/24: 254/254 in use",
    }


@pytest.mark.parametrize(
    ("script", "code"),
    [
        ({"raw": b"this is not json\n"}, 100),
        ({"raw": b'{"neither": 1}\n'}, 100),
        ({"result": [1, 2]}, 100),
        ({"result": {"ips": [{"address": "not-an-ip", "interface": 0}]}}, 100),
        ({"hangup": True}, 11),
    ],
    ids=["garbage", "no-result", "result-not-object", "bad-address", "hangup"],
)
def test_add_bad_agent_answers(plugin: Path, agent: FakeAgent, netns: str, script: dict[str, Any], code: int) -> None:
    agent.script("cni.add", **script)
    err = run(plugin, "ADD", netconf("0.3.1", agent.path), netns=netns).error()
    assert err["code"] == code
    assert str(agent.path) in err["msg"] or err["msg"] == "weft agent returned an invalid result"


def test_add_agent_too_slow(plugin: Path, agent: FakeAgent, netns: str) -> None:
    agent.script("cni.add", delay=2.0)
    start = time.monotonic()
    err = run(plugin, "ADD", netconf("1.0.0", agent.path, requestTimeout=0.3), netns=netns).error()
    assert err["code"] == 11 and str(agent.path) in err["msg"] and "0.3s" in err["details"]
    assert time.monotonic() - start < 1.9


# --------------------------------------------------------------------------- runtimeConfig, CNI_ARGS


@pytest.mark.parametrize(
    "runtime_config",
    [
        # containerd 1.6: Go-style capitalised keys
        {"portMappings": [{"HostPort": 18090, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""}]},
        # podman 4.3: lower camel case
        {"portMappings": [{"hostPort": 18090, "containerPort": 80, "protocol": "tcp", "hostIP": ""}]},
    ],
    ids=["containerd", "podman"],
)
def test_runtime_config_keys_lowercased(
    plugin: Path, agent: FakeAgent, netns: str, runtime_config: dict[str, Any]
) -> None:
    rc = {**runtime_config, "Bandwidth": {"IngressRate": 1000, "nested": [{"DeepKey": {"X": 1}}]}}
    conf = netconf("1.0.0", agent.path, runtimeConfig=rc)
    run(plugin, "ADD", conf, netns=netns).ok()
    params = agent.params("cni.add")
    assert params["runtimeConfig"] == {
        "portmappings": [{"hostport": 18090, "containerport": 80, "protocol": "tcp", "hostip": ""}],
        "bandwidth": {"ingressrate": 1000, "nested": [{"deepkey": {"x": 1}}]},
    }
    assert params["config"]["runtimeConfig"] == rc  # the config itself is forwarded as received


@pytest.mark.parametrize(
    ("cni_args", "expected"),
    [
        (None, {}),
        ("", {}),
        (
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
            "K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=5f1c-77",
            {
                "IgnoreUnknown": "1",
                "K8S_POD_NAMESPACE": "default",
                "K8S_POD_NAME": "web-0",
                "K8S_POD_INFRA_CONTAINER_ID": "0123abcd",
                "K8S_POD_UID": "5f1c-77",
            },
        ),
        (
            "IgnoreUnknown=1;K8S_POD_NAME=ctr;MAC=02:42:ac:11:00:02;IP=10.89.8.51",
            {"IgnoreUnknown": "1", "K8S_POD_NAME": "ctr", "MAC": "02:42:ac:11:00:02", "IP": "10.89.8.51"},
        ),
        ("A=b=c;;B=;A2=x;", {"A": "b=c", "B": "", "A2": "x"}),
    ],
    ids=["unset", "empty", "containerd", "podman", "edge-cases"],
)
def test_cni_args_parsed(
    plugin: Path, agent: FakeAgent, netns: str, cni_args: str | None, expected: dict[str, str]
) -> None:
    run(plugin, "ADD", netconf("1.1.0", agent.path), netns=netns, args=cni_args).ok()
    assert agent.params("cni.add")["args"] == expected


@pytest.mark.parametrize("cni_args", ["FOO", "A=1;BAR", "=value"])
def test_cni_args_malformed(plugin: Path, agent: FakeAgent, netns: str, cni_args: str) -> None:
    err = run(plugin, "ADD", netconf("1.1.0", agent.path), netns=netns, args=cni_args).error()
    assert err["code"] == 4 and "CNI_ARGS" in err["msg"]
    assert agent.requests == []


# --------------------------------------------------------------------------- DEL


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_del_with_prev_result(plugin: Path, agent: FakeAgent, netns: str, version: str) -> None:
    conf = netconf(version, agent.path, prevResult=prev_result(version))
    res = run(plugin, "DEL", conf, netns=netns)
    res.ok()
    assert res.stdout == ""
    params = agent.params("cni.del")
    assert params["prevResult"] == expected_canonical_prev(version)
    assert (params["containerID"], params["netns"], params["ifname"]) == ("ctr1", netns, "eth0")
    assert params["cniVersion"] == version and params["network"] == "weftnet"


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_del_containerd_remove_sandbox(plugin: Path, agent: FakeAgent, version: str) -> None:
    """RemovePodSandbox: CNI_NETNS= empty and no prevResult. It must succeed."""
    res = run(plugin, "DEL", netconf(version, agent.path), netns="")
    res.ok()
    assert res.stdout == ""
    params = agent.params("cni.del")
    assert params["netns"] == "" and "prevResult" not in params


def test_del_netns_unset_and_gone(plugin: Path, agent: FakeAgent, tmp_path: Path) -> None:
    run(plugin, "DEL", netconf("1.0.0", agent.path), netns=None).ok()
    run(plugin, "DEL", netconf("1.0.0", agent.path), netns=str(tmp_path / "deleted")).ok()
    assert agent.methods == ["cni.del", "cni.del"]


def test_del_agent_error_passes_through(plugin: Path, agent: FakeAgent) -> None:
    agent.fail("cni.del", 100, "internal error", "map update failed")
    err = run(plugin, "DEL", netconf("1.0.0", agent.path), netns="").error()
    assert (err["code"], err["msg"], err["details"]) == (100, "internal error", "map update failed")


# --------------------------------------------------------------------------- CHECK


@pytest.mark.parametrize("version", CHECK_VERSIONS)
def test_check_forwards_canonical_prev_result(plugin: Path, agent: FakeAgent, netns: str, version: str) -> None:
    res = run(plugin, "CHECK", netconf(version, agent.path, prevResult=prev_result(version)), netns=netns)
    res.ok()
    assert res.stdout == ""
    assert agent.params("cni.check")["prevResult"] == expected_canonical_prev(version)


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1"])
def test_check_rejected_before_0_4_0(plugin: Path, agent: FakeAgent, netns: str, version: str) -> None:
    err = run(plugin, "CHECK", netconf(version, agent.path, prevResult=prev_result(version)), netns=netns).error()
    assert err["code"] == 1 and err["cniVersion"] == version
    assert agent.requests == []


def test_check_needs_prev_result(plugin: Path, agent: FakeAgent, netns: str) -> None:
    err = run(plugin, "CHECK", netconf("1.0.0", agent.path), netns=netns).error()
    assert err["code"] == 7 and "prevResult" in err["msg"]


def test_check_unknown_netns_is_code_3(plugin: Path, agent: FakeAgent, tmp_path: Path) -> None:
    conf = netconf("1.0.0", agent.path, prevResult=prev_result("1.0.0"))
    err = run(plugin, "CHECK", conf, netns=str(tmp_path / "gone")).error()
    assert err["code"] == 3
    assert agent.requests == []


def test_check_agent_error_passes_through(plugin: Path, agent: FakeAgent, netns: str) -> None:
    agent.fail("cni.check", 999, "address 10.244.1.7/32 missing on eth0")
    conf = netconf("1.1.0", agent.path, prevResult=prev_result("1.1.0"))
    err = run(plugin, "CHECK", conf, netns=netns).error()
    assert (err["code"], err["msg"], err["details"]) == (999, "address 10.244.1.7/32 missing on eth0", "")


# --------------------------------------------------------------------------- STATUS / GC

ATTACHMENTS = [{"containerID": "ctr1", "ifname": "eth0"}, {"containerID": "ctr2", "ifname": "net1"}]


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_status(plugin: Path, agent: FakeAgent, version: str) -> None:
    res = run(plugin, "STATUS", netconf(version, agent.path), containerid=None, netns=None, ifname=None)
    if version == "1.1.0":
        res.ok()
        assert res.stdout == ""
        params = agent.params("cni.status")
        assert params["network"] == "weftnet" and params["cniVersion"] == "1.1.0"
    else:
        err = res.error()
        assert err["code"] == 1 and "STATUS" in err["msg"]
        assert agent.requests == []


def test_status_agent_says_unavailable(plugin: Path, agent: FakeAgent) -> None:
    agent.fail("cni.status", 50, "plugin not available", "address pool exhausted")
    err = run(plugin, "STATUS", netconf("1.1.0", agent.path), containerid=None, ifname=None).error()
    assert (err["code"], err["details"]) == (50, "address pool exhausted")


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_gc(plugin: Path, agent: FakeAgent, version: str) -> None:
    conf = netconf(version, agent.path, **{"cni.dev/valid-attachments": ATTACHMENTS})
    res = run(plugin, "GC", conf, containerid=None, netns=None, ifname=None)
    if version == "1.1.0":
        res.ok()
        assert res.stdout == ""
        params = agent.params("cni.gc")
        assert params["validAttachments"] == ATTACHMENTS
        assert params["config"] == conf
    else:
        err = res.error()
        assert err["code"] == 1 and "GC" in err["msg"]
        assert agent.requests == []


def test_gc_empty_valid_attachments(plugin: Path, agent: FakeAgent) -> None:
    conf = netconf("1.1.0", agent.path, **{"cni.dev/valid-attachments": []})
    run(plugin, "GC", conf, containerid=None, netns=None, ifname=None).ok()
    assert agent.params("cni.gc")["validAttachments"] == []


@pytest.mark.parametrize(
    "extra",
    [{}, {"cni.dev/valid-attachments": "ctr1"}, {"cni.dev/valid-attachments": [{"containerID": "ctr1"}]}],
    ids=["missing", "not-a-list", "no-ifname"],
)
def test_gc_invalid_valid_attachments(plugin: Path, agent: FakeAgent, extra: dict[str, Any]) -> None:
    err = run(plugin, "GC", netconf("1.1.0", agent.path, **extra), containerid=None, ifname=None).error()
    assert err["code"] == 7 and "cni.dev/valid-attachments" in err["msg"]
    assert agent.requests == []


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("stdin", "where"),
    [
        (b'{"cniVersion": "1.0.0", "name": "weftnet",', "line 1 column 43 (char 42)"),
        (b'{"cniVersion": "1.0.0",\n "name": weftnet}', "line 2 column 10"),
        (b"", "line 1 column 1"),
        (b"\xff\xfe", "byte 0"),
        (b"[1, 2]", "JSON object"),
    ],
    ids=["truncated", "bare-word", "empty", "not-utf8", "not-object"],
)
@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "STATUS", "GC"])
def test_broken_json_is_code_6(plugin: Path, command: str, stdin: bytes, where: str, netns: str) -> None:
    err = run(plugin, command, stdin, netns=netns).error()
    assert err["code"] == 6
    assert where in err["details"]


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "1.2.0", "2.0.0", "1.0"])
@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "STATUS", "GC"])
def test_unsupported_version_is_code_1(plugin: Path, agent: FakeAgent, netns: str, command: str, version: str) -> None:
    err = run(plugin, command, netconf(version, agent.path), netns=netns).error()
    assert err["code"] == 1 and err["cniVersion"] == "1.1.0"
    assert agent.requests == []


@pytest.mark.parametrize(
    ("drop", "extra"),
    [
        ("cniVersion", {}),
        ("name", {}),
        ("type", {}),
        (None, {"cniVersion": 1.0}),
        (None, {"name": "bad name!"}),
        (None, {"name": ["weftnet"]}),
        (None, {"agentSocket": ""}),
        (None, {"agentSocket": "/tmp/" + "x" * 120}),
        (None, {"delQueueDir": 7}),
        (None, {"connectTimeout": 0}),
        (None, {"connectTimeout": "2"}),
        (None, {"requestTimeout": True}),
        (None, {"runtimeConfig": []}),
        (None, {"prevResult": "x"}),
    ],
)
def test_invalid_netconf_is_code_7(
    plugin: Path, agent: FakeAgent, netns: str, drop: str | None, extra: dict[str, Any]
) -> None:
    conf = netconf("1.0.0", agent.path, **extra)
    if drop:
        del conf[drop]
    err = run(plugin, "ADD", conf, netns=netns).error()
    assert err["code"] == 7, err
    assert agent.requests == []


@pytest.mark.parametrize(
    ("command", "var", "value"),
    [
        ("ADD", "CNI_CONTAINERID", None),
        ("ADD", "CNI_CONTAINERID", ""),
        ("ADD", "CNI_CONTAINERID", "-leading-dash"),
        ("ADD", "CNI_CONTAINERID", "has/slash"),
        ("ADD", "CNI_NETNS", None),
        ("ADD", "CNI_NETNS", ""),
        ("ADD", "CNI_IFNAME", None),
        ("ADD", "CNI_IFNAME", "averyverylongifname"),
        ("ADD", "CNI_IFNAME", "eth 0"),
        ("ADD", "CNI_IFNAME", "eth:0"),
        ("ADD", "CNI_IFNAME", ".."),
        ("CHECK", "CNI_CONTAINERID", None),
        ("CHECK", "CNI_NETNS", None),
        ("CHECK", "CNI_IFNAME", None),
        ("DEL", "CNI_CONTAINERID", None),
        ("DEL", "CNI_IFNAME", None),
        ("DEL", "CNI_IFNAME", "a/b"),
    ],
)
def test_missing_or_invalid_env_is_code_4(
    plugin: Path, agent: FakeAgent, netns: str, command: str, var: str, value: str | None
) -> None:
    kwargs: dict[str, Any] = {"containerid": "ctr1", "netns": netns, "ifname": "eth0"}
    kwargs[{"CNI_CONTAINERID": "containerid", "CNI_NETNS": "netns", "CNI_IFNAME": "ifname"}[var]] = value
    conf = netconf("1.0.0", agent.path, prevResult=prev_result("1.0.0"))
    err = run(plugin, command, conf, **kwargs).error()
    assert err["code"] == 4 and var in err["msg"], err
    assert agent.requests == []


def test_env_error_names_every_bad_variable(plugin: Path, agent: FakeAgent) -> None:
    err = run(plugin, "ADD", netconf("1.0.0", agent.path), containerid=None, netns=None, ifname=None).error()
    assert err["code"] == 4
    for var in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"):
        assert var in err["msg"] and var in err["details"]


@pytest.mark.parametrize("command", ["FOO", "add", "INIT", "", None])
def test_unknown_command_is_code_4(plugin: Path, agent: FakeAgent, netns: str, command: str | None) -> None:
    err = run(plugin, command, netconf("1.0.0", agent.path), netns=netns).error()
    assert err["code"] == 4 and "CNI_COMMAND" in err["msg"] + err["details"]
    assert err["cniVersion"] == "1.1.0"
    assert agent.requests == []


# --------------------------------------------------------------------------- agent down


@pytest.fixture(params=["missing", "refused"])
def dead_socket(request: pytest.FixtureRequest, sockdir: Path) -> Iterator[Path]:
    """An agent socket path nobody answers on: no file at all, or a bound socket with no listener."""
    path = sockdir / "agent.sock"
    if request.param == "missing":
        yield path
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))  # bound but not listening: connect() gives ECONNREFUSED
    yield path
    sock.close()


@pytest.mark.parametrize(
    ("command", "version", "code"),
    [("ADD", "1.0.0", 11), ("ADD", "0.3.1", 11), ("CHECK", "1.1.0", 11), ("GC", "1.1.0", 11), ("STATUS", "1.1.0", 50)],
)
def test_agent_down(plugin: Path, dead_socket: Path, netns: str, command: str, version: str, code: int) -> None:
    conf = netconf(version, dead_socket, prevResult=prev_result(version), **{"cni.dev/valid-attachments": ATTACHMENTS})
    err = run(plugin, command, conf, netns=netns).error()
    assert err["code"] == code
    assert str(dead_socket) in err["msg"]
    assert err["cniVersion"] == version


def _queue_files(queue_dir: Path) -> list[str]:
    return sorted(p.name for p in queue_dir.iterdir()) if queue_dir.exists() else []


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_del_agent_down_is_queued(plugin: Path, dead_socket: Path, netns: str, version: str) -> None:
    conf = netconf(version, dead_socket, prevResult=prev_result(version))
    before = time.time()
    res = run(plugin, "DEL", conf, netns=netns, args="K8S_POD_NAME=web-0")
    res.ok()
    assert res.stdout == "" and "queued" in res.stderr
    queue = dead_socket.parent / "del-queue"  # default: <dirname(agentSocket)>/del-queue
    assert _queue_files(queue) == ["ctr1@eth0.json"]
    assert stat.S_IMODE(queue.stat().st_mode) == 0o700
    assert stat.S_IMODE((queue / "ctr1@eth0.json").stat().st_mode) == 0o600
    entry = json.loads((queue / "ctr1@eth0.json").read_text())
    queued_at = entry.pop("queuedAt")
    assert before <= queued_at <= time.time()
    assert entry == {
        "containerID": "ctr1",
        "netns": netns,
        "ifname": "eth0",
        "network": "weftnet",
        "cniVersion": version,
        "args": {"K8S_POD_NAME": "web-0"},
        "runtimeConfig": {},
        "config": conf,
        "prevResult": expected_canonical_prev(version),
    }


def test_del_queue_coalesces_and_keeps_prev_result(plugin: Path, dead_socket: Path, netns: str) -> None:
    queue = dead_socket.parent / "q"
    # StopPodSandbox: DEL with netns + prevResult; RemovePodSandbox: DEL with neither.
    run(
        plugin,
        "DEL",
        netconf("1.0.0", dead_socket, delQueueDir=str(queue), prevResult=prev_result("1.0.0")),
        netns=netns,
    ).ok()
    first = json.loads((queue / "ctr1@eth0.json").read_text())
    run(plugin, "DEL", netconf("1.0.0", dead_socket, delQueueDir=str(queue)), netns="").ok()
    run(plugin, "DEL", netconf("1.0.0", dead_socket, delQueueDir=str(queue)), netns="", ifname="net1").ok()
    assert _queue_files(queue) == ["ctr1@eth0.json", "ctr1@net1.json"]
    second = json.loads((queue / "ctr1@eth0.json").read_text())
    assert second["prevResult"] == CANONICAL_RESULT and second["netns"] == netns
    assert second["queuedAt"] >= first["queuedAt"]
    assert "prevResult" not in second["config"]  # config is the newest DEL's, as received


def test_del_agent_hangs_is_queued(plugin: Path, agent: FakeAgent) -> None:
    agent.script("cni.del", delay=2.0)
    run(plugin, "DEL", netconf("1.0.0", agent.path, requestTimeout=0.3), netns="").ok()
    assert _queue_files(agent.path.parent / "del-queue") == ["ctr1@eth0.json"]


def test_del_agent_garbage_is_queued(plugin: Path, agent: FakeAgent) -> None:
    agent.script("cni.del", raw=b"\x00\x01 nonsense\n")
    run(plugin, "DEL", netconf("1.0.0", agent.path), netns="").ok()
    assert _queue_files(agent.path.parent / "del-queue") == ["ctr1@eth0.json"]


def test_del_unqueueable_is_code_5(plugin: Path, dead_socket: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.touch()
    conf = netconf("1.0.0", dead_socket, delQueueDir=str(blocker / "queue"))
    err = run(plugin, "DEL", conf, netns="").error()
    assert err["code"] == 5 and str(dead_socket) in err["msg"]


def test_queued_del_merged_into_next_del(plugin: Path, sockdir: Path, netns: str) -> None:
    sock = sockdir / "agent.sock"
    run(plugin, "DEL", netconf("1.0.0", sock, prevResult=prev_result("1.0.0")), netns=netns).ok()
    with FakeAgent(sock) as agent:
        run(plugin, "DEL", netconf("1.0.0", sock), netns="").ok()
        params = agent.params("cni.del")
    assert params["prevResult"] == CANONICAL_RESULT and params["netns"] == netns
    assert "queuedAt" not in params
    assert _queue_files(sockdir / "del-queue") == []


def test_queued_del_flushed_before_add(plugin: Path, sockdir: Path, netns: str) -> None:
    sock = sockdir / "agent.sock"
    run(plugin, "DEL", netconf("1.0.0", sock, prevResult=prev_result("1.0.0")), netns=netns).ok()
    queued = json.loads((sockdir / "del-queue" / "ctr1@eth0.json").read_text())
    with FakeAgent(sock) as agent:
        agent.fail("cni.del", 100, "stale")  # even a failed flush must not block the ADD
        run(plugin, "ADD", netconf("1.0.0", sock), netns=netns).ok()
        assert agent.methods == ["cni.del", "cni.add"]
        assert agent.connections[0] == agent.connections[1]  # one connection, in order
        queued.pop("queuedAt")
        assert agent.params("cni.del") == queued
    assert _queue_files(sockdir / "del-queue") == []


def test_long_container_id_queue_name(plugin: Path, dead_socket: Path) -> None:
    cid = "c" * 300
    run(plugin, "DEL", netconf("1.0.0", dead_socket), containerid=cid, netns="").ok()
    (name,) = _queue_files(dead_socket.parent / "del-queue")
    assert name.startswith("sha256-") and name.endswith(".json")
    assert name == cni.queue_file_name(cid, "eth0")


# --------------------------------------------------------------------------- in-process main()


def test_main_in_process(agent: FakeAgent, netns: str) -> None:
    out = io.StringIO()
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr9", "CNI_NETNS": netns, "CNI_IFNAME": "eth1"}
    stdin = io.BytesIO(json.dumps(netconf("0.4.0", agent.path)).encode())
    assert cni.main([], environ=env, stdin=stdin, stdout=out) == 0
    assert json.loads(out.getvalue()) == {"cniVersion": "0.4.0", **RESULT_V0_BODY}
    assert agent.params("cni.add")["ifname"] == "eth1"

    out = io.StringIO()
    assert cni.main(environ={"CNI_COMMAND": "VERSION"}, stdin=io.StringIO(""), stdout=out) == 0
    assert json.loads(out.getvalue())["cniVersion"] == "1.1.0"

    out = io.StringIO()
    assert cni.main(environ={"CNI_COMMAND": "ADD"}, stdin=io.StringIO("{"), stdout=out) == 1
    assert json.loads(out.getvalue())["code"] == 6


def test_internal_error_is_reported_as_cni_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(inv: cni.Invocation) -> int:
        raise RuntimeError("kaboom")

    monkeypatch.setitem(cni.VERBS, "ADD", boom)
    out = io.StringIO()
    assert cni.main(environ={"CNI_COMMAND": "ADD"}, stdin=io.StringIO("{}"), stdout=out) == 1
    err = json.loads(out.getvalue())
    assert err["code"] == 100 and "kaboom" in err["details"]


# --------------------------------------------------------------------------- properties

json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


def _all_keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _all_keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _all_keys(item)


@given(json_values)
def test_lower_keys_properties(value: Any) -> None:
    low = cni.lower_keys(value)
    assert all(k == k.lower() for k in _all_keys(low))
    assert cni.lower_keys(low) == low
    if value == cni.lower_keys(value) and all(k == k.lower() for k in _all_keys(value)):
        assert low == value


def test_lower_keys_collision_prefers_lower_case() -> None:
    assert cni.lower_keys({"HostPort": 1, "hostport": 2}) == {"hostport": 2}
    assert cni.lower_keys({"hostport": 2, "HostPort": 1}) == {"hostport": 2}
    assert cni.lower_keys({"HostPort": 1, "HOSTPORT": 2}) == {"hostport": 1}


keys = st.text(alphabet=st.characters(blacklist_characters=";=", blacklist_categories=("Cs",)), min_size=1)
vals = st.text(alphabet=st.characters(blacklist_characters=";", blacklist_categories=("Cs",)))


@given(st.dictionaries(keys, vals, max_size=5))
def test_cni_args_round_trip(args: dict[str, str]) -> None:
    assert cni.parse_cni_args(";".join(f"{k}={v}" for k, v in args.items())) == args


addresses_v4 = st.ip_addresses(v=4).map(lambda a: f"{a}/24")
addresses_v6 = st.ip_addresses(v=6).map(lambda a: f"{a}/64")
canonical_results = st.fixed_dictionaries(
    {
        "interfaces": st.lists(
            st.fixed_dictionaries({"name": st.text(min_size=1, max_size=15)}, optional={"mac": st.text()}),
            max_size=3,
        ),
        "ips": st.lists(
            st.fixed_dictionaries(
                {"address": addresses_v4 | addresses_v6},
                optional={"gateway": st.ip_addresses().map(str), "interface": st.integers(0, 3)},
            ),
            max_size=4,
        ),
        "routes": st.lists(st.fixed_dictionaries({"dst": addresses_v4 | addresses_v6}), max_size=3),
        "dns": st.fixed_dictionaries({}, optional={"nameservers": st.lists(st.ip_addresses().map(str))}),
    }
)


@given(canonical_results, st.sampled_from(ALL_VERSIONS))
def test_result_conversion_round_trip(result: dict[str, Any], version: str) -> None:
    converted = cni.result_for_version(result, version)
    assert converted["cniVersion"] == version
    for ip in converted["ips"]:
        if version in V0:
            assert ip["version"] == ("6" if ":" in ip["address"] else "4")
        else:
            assert "version" not in ip
    assert cni.canonical_result(converted) == result
