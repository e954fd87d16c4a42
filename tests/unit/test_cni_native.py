"""weft-cni's native launcher (src/weft/cni/native_launcher.c), no root needed.

The launcher hands each invocation to the agent (``cni.exec``), which runs the same plugin code;
whatever it cannot hand over it gives to the Python launcher beside it. So for every input the
native launcher must print and exit exactly as the Python plugin does. Each case runs both: the
Python plugin against a fake agent, the native launcher against a fake agent that answers
``cni.exec`` the way the agent does (and, for the fallbacks, one that does not).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from weft.cni.launcher import default_src_dir, native_launcher_path, write_launcher

try:  # tests/unit is not a package: pytest puts this directory on sys.path
    from cni_fixtures import netns, sockdir  # noqa: F401 (pytest fixtures, used by name)
    from test_cni_plugin import netconf, prev_result, run

    from fake_agent import FakeAgent
except ImportError:  # pragma: no cover
    from .fake_agent import FakeAgent
    from .test_cni_plugin import netconf, prev_result, run


@pytest.fixture(scope="module")
def launchers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"python": the Python launcher, "native": the native one (with its fallback beside it)}."""
    subprocess.run(["make", "-s", "native"], cwd=default_src_dir().parent, check=True)
    assert native_launcher_path().exists()
    base = tmp_path_factory.mktemp("cnibin")
    (base / "py").mkdir()
    (base / "native").mkdir()
    write_launcher(base / "py" / "weft", native=False)
    write_launcher(base / "native" / "weft")
    return {"python": base / "py" / "weft", "native": base / "native" / "weft"}


def test_native_install_layout(launchers: dict[str, Path]) -> None:
    native = launchers["native"]
    assert native.read_bytes()[:4] == b"\x7fELF", "the native launcher is what runtimes exec"
    fallback = native.with_name("weft.py")
    assert fallback.read_text().startswith("#!/usr/bin/python3 -S")
    assert os.access(native, os.X_OK) and os.access(fallback, os.X_OK)


def both(launchers: dict[str, Path], sockdir: Path, command: str | None, stdin: Any, inline: bool = True,
         agent: bool = True, scripts: dict[str, dict[str, Any]] | None = None, **kw: Any
         ) -> dict[str, tuple[int, str, list[dict[str, Any]]]]:
    """Run one invocation through each launcher, each against a fresh fake agent: (exit status,
    stdout, the agent's requests as the plugin code made them)."""
    out = {}
    for kind, path in launchers.items():
        sock = sockdir / f"{kind}.sock"
        data = stdin(sock) if callable(stdin) else stdin
        if not agent:
            res = run(path, command, data, **kw)
            out[kind] = (res.rc, res.stdout, [])
            continue
        with FakeAgent(sock, inline_exec=inline and kind == "native") as fake:
            for method, script in (scripts or {}).items():
                fake.script(method, **script)
            res = run(path, command, data, **kw)
            requests = [{"method": r["method"], "params": r["params"]} for r in fake.requests]
            if inline and kind == "native":
                # Handed over, not fallen back: every request came from the plugin code run for cni.exec.
                assert all(r.get("via") == "cni.exec" for r in fake.requests), fake.requests
        out[kind] = (res.rc, res.stdout, requests)
    return out


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_del_check_answer_as_the_python_plugin(launchers: dict[str, Path], sockdir: Path, netns: str,
                                                  version: str) -> None:
    for command, conf in (("ADD", {}), ("DEL", {}), ("CHECK", {"prevResult": prev_result(version)}),
                          ("STATUS", {}), ("VERSION", {})):
        if command == "CHECK" and version == "0.3.1":
            continue
        got = both(launchers, sockdir, command, lambda s, c=conf: netconf(version, s, **c), netns=netns)
        py, nat = got["python"], got["native"]
        assert nat[0] == py[0], (command, nat, py)
        assert nat[1] == py[1], (command, nat[1], py[1])
        # The native path made the same requests to the agent's handlers (minus the socket path
        # the config names, which differs between the two fake agents).
        for reqs in (py[2], nat[2]):
            for r in reqs:
                r["params"].get("config", {}).pop("agentSocket", None)
        assert nat[2] == py[2], command


def test_agent_errors_pass_through_unchanged(launchers: dict[str, Path], sockdir: Path, netns: str) -> None:
    scripts = {"cni.add": {"error": {"code": 7, "msg": "bad config", "details": "spec.x: wrong"}}}
    got = both(launchers, sockdir, "ADD", lambda s: netconf("1.0.0", s), scripts=scripts, netns=netns)
    assert got["native"][:2] == got["python"][:2]
    assert json.loads(got["native"][1])["code"] == 7


@pytest.mark.parametrize("stdin", [
    b"{not json",
    b"[1, 2]",
    b"",
    b'{"cniVersion": "1.0.0", "name": "n", "type": "weft", "agentSocket": "/tmp/\\u0077cnn-none.sock"}',
    b'{"cniVersion": "9.9.9", "name": "n", "type": "weft"}',
    b'{"cniVersion": "1.0.0", "name": "n", "type": "weft", "nested": {"a": [1, {"b": "\\"}"}]}, "x": null}',
])
def test_unusual_configurations_answer_as_the_python_plugin(launchers: dict[str, Path], sockdir: Path, netns: str,
                                                            stdin: bytes) -> None:
    for command in ("ADD", "VERSION"):
        got = both(launchers, sockdir, command, stdin, agent=False, netns=netns)
        assert got["native"][:2] == got["python"][:2], (command, got)


def test_no_agent_falls_back_to_the_python_plugin(launchers: dict[str, Path], sockdir: Path, netns: str,
                                                  tmp_path: Path) -> None:
    sock = sockdir / "absent.sock"
    conf = netconf("1.0.0", sock, delQueueDir=str(tmp_path / "queue"))
    add = run(launchers["native"], "ADD", conf, netns=netns)
    assert add.rc == 1 and json.loads(add.stdout)["code"] == 11, add.stdout
    deleted = run(launchers["native"], "DEL", conf, netns=netns)
    assert deleted.rc == 0, deleted.stdout
    assert len(list((tmp_path / "queue").iterdir())) == 1, "the DEL was queued for the agent"


def test_an_agent_without_cni_exec_gets_the_plain_requests(launchers: dict[str, Path], sockdir: Path,
                                                           netns: str) -> None:
    """An older agent refuses cni.exec: the Python plugin takes over and speaks to it as usual."""
    with FakeAgent(sockdir / "old.sock") as fake:
        fake.fail("cni.exec", 102, "unknown method 'cni.exec'")
        add = run(launchers["native"], "ADD", netconf("1.0.0", sockdir / "old.sock"), netns=netns)
        assert add.rc == 0, add.stdout
        assert fake.methods == ["cni.exec", "cni.add"]
