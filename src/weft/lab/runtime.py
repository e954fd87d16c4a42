"""A minimal container runtime's CNI client, doing what libcni does for containerd and podman:
read the first conflist of a config dir, exec each plugin found in CNI_PATH with the CNI
environment and its netconf on stdin (name, cniVersion, runtimeConfig, prevResult injected),
cache the ADD result and hand it back as prevResult on DEL and CHECK.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CniError(Exception):
    def __init__(self, plugin: str, command: str, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"CNI {command} via {plugin} failed: [{code}] {msg}" + (f": {details}" if details else ""))
        self.code = code
        self.msg = msg
        self.details = details


@dataclass
class CniRuntime:
    conf_dir: Path
    bin_dirs: list[Path]
    cache_dir: Path
    # Run plugins inside this netns (the node's), as a runtime on that node would.
    exec_netns: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def conflist(self) -> dict[str, Any]:
        files = sorted(p for p in self.conf_dir.iterdir() if p.suffix in (".conflist", ".conf"))
        if not files:
            raise FileNotFoundError(f"no CNI configuration in {self.conf_dir}")
        data: dict[str, Any] = json.loads(files[0].read_text())
        if "plugins" not in data:  # a single .conf
            data = {"cniVersion": data["cniVersion"], "name": data["name"], "plugins": [data]}
        return data

    def _find(self, plugin_type: str) -> Path:
        for d in self.bin_dirs:
            candidate = d / plugin_type
            if os.access(candidate, os.X_OK):
                return candidate
        raise FileNotFoundError(f"CNI plugin {plugin_type!r} not found in {self.bin_dirs}")

    def _exec(self, command: str, plugin: dict[str, Any], netconf: dict[str, Any], container_id: str,
              netns: str, ifname: str, args: str) -> dict[str, Any] | None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_ARGS": args,
            "CNI_PATH": ":".join(str(d) for d in self.bin_dirs),
            **self.extra_env,
        }
        argv = [str(self._find(plugin["type"]))]
        if self.exec_netns:
            argv = ["nsenter", f"--net={self.exec_netns}", *argv]
        proc = subprocess.run(argv, input=json.dumps(netconf).encode(), env=env, capture_output=True,
                              timeout=120, check=False)
        out = proc.stdout.decode().strip()
        if proc.returncode != 0:
            try:
                err = json.loads(out)
                raise CniError(plugin["type"], command, int(err.get("code", 0)), str(err.get("msg", "")),
                               str(err.get("details", "")))
            except (ValueError, AttributeError):
                raise CniError(plugin["type"], command, -1, f"exit {proc.returncode}",
                               (out + proc.stderr.decode()).strip()) from None
        return json.loads(out) if out else None

    def _netconf(self, conf: dict[str, Any], plugin: dict[str, Any], prev: dict[str, Any] | None,
                 runtime_config: dict[str, Any]) -> dict[str, Any]:
        netconf = dict(plugin)
        netconf["name"] = conf["name"]
        netconf["cniVersion"] = conf["cniVersion"]
        caps = plugin.get("capabilities") or {}
        rc = {k: v for k, v in runtime_config.items() if caps.get(k)}
        if rc:
            netconf["runtimeConfig"] = rc
        if prev is not None:
            netconf["prevResult"] = prev
        return netconf

    def _cache_path(self, network: str, container_id: str, ifname: str) -> Path:
        return self.cache_dir / f"{network}-{container_id}-{ifname}.json"

    def add(self, container_id: str, netns: str, ifname: str = "eth0", args: str = "",
            runtime_config: dict[str, Any] | None = None) -> dict[str, Any]:
        conf = self.conflist()
        prev: dict[str, Any] | None = None
        done: list[dict[str, Any]] = []
        try:
            for plugin in conf["plugins"]:
                prev = self._exec("ADD", plugin, self._netconf(conf, plugin, prev, runtime_config or {}),
                                  container_id, netns, ifname, args)
                done.append(plugin)
        except CniError:
            # As libcni's callers do after a failed ADD: DEL what was added (in reverse).
            for plugin in reversed(conf["plugins"]):
                with contextlib.suppress(CniError):
                    self._exec("DEL", plugin, self._netconf(conf, plugin, None, runtime_config or {}),
                               container_id, netns, ifname, args)
            raise
        assert prev is not None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._cache_path(conf["name"], container_id, ifname).write_text(json.dumps(prev))
        return prev

    def cached(self, container_id: str, ifname: str = "eth0") -> dict[str, Any] | None:
        path = self._cache_path(self.conflist()["name"], container_id, ifname)
        return json.loads(path.read_text()) if path.exists() else None

    def delete(self, container_id: str, netns: str, ifname: str = "eth0", args: str = "") -> None:
        conf = self.conflist()
        prev = self.cached(container_id, ifname)
        for plugin in reversed(conf["plugins"]):
            self._exec("DEL", plugin, self._netconf(conf, plugin, prev, {}), container_id, netns, ifname, args)
        self._cache_path(conf["name"], container_id, ifname).unlink(missing_ok=True)

    def check(self, container_id: str, netns: str, ifname: str = "eth0", args: str = "") -> None:
        conf = self.conflist()
        prev = self.cached(container_id, ifname)
        if prev is None:
            raise CniError("-", "CHECK", 3, f"no cached result for {container_id}/{ifname}")
        for plugin in conf["plugins"]:
            self._exec("CHECK", plugin, self._netconf(conf, plugin, prev, {}), container_id, netns, ifname, args)
