"""Shared pieces: unique names, scratch dirs, the weft CNI dirs, netns probes and leak-proof cleanup.

Everything a run creates carries one unique prefix (``wtrt<hex>``): scratch dirs, cgroup parents,
pod names, the marker in the environment of the processes started. Cleanup finds leftovers by that
prefix (processes by environment marker, command line or cgroup; mounts by path; cgroups by name),
so it also works when a test failed half-way.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
REFERENCE_PLUGINS = Path("/usr/lib/cni")
MARKER_ENV = "WEFT_RUNTIME_TEST"


class RuntimeTestError(Exception):
    pass


def unique_prefix(tag: str = "") -> str:
    return f"wtrt{tag}{secrets.token_hex(3)}"


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` when the deadline passes (no blind sleeps)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def require_tools(*names: str) -> dict[str, str]:
    """Absolute paths of the tools; a missing one is an error, not a skip (CI installs them all)."""
    found: dict[str, str] = {}
    missing = []
    for name in names:
        path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin")
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        raise RuntimeTestError(f"missing tools {missing}: run `make apt` (APT_PACKAGES in the Makefile)")
    return found


# ---------------------------------------------------------------------------- CNI dirs


def weft_conflist(agent_socket: str, name: str = "weft", cni_version: str = "1.0.0") -> dict[str, object]:
    return {"cniVersion": cni_version, "name": name,
            "plugins": [{"type": "weft-cni", "agentSocket": agent_socket}]}


def write_conf_dir(conf_dir: Path, agent_socket: str, name: str = "weft") -> Path:
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / f"10-{name}.conflist"
    path.write_text(json.dumps(weft_conflist(agent_socket, name), indent=1))
    return path


def write_bin_dir(bin_dir: Path, weft_cni: Path, reference: Iterable[str] = ()) -> Path:
    """One directory holding weft-cni (symlinked) and the named reference plugins (containerd 1.6
    takes ``bin_dir`` as ONE directory; a colon list is used literally)."""
    if not os.access(weft_cni, os.X_OK):
        raise RuntimeTestError(f"weft-cni launcher {weft_cni} is missing or not executable")
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "weft-cni").symlink_to(weft_cni)
    for plugin in reference:
        src = REFERENCE_PLUGINS / plugin
        if not os.access(src, os.X_OK):
            raise RuntimeTestError(f"reference CNI plugin {src} missing (package containernetworking-plugins)")
        (bin_dir / plugin).symlink_to(src)
    return bin_dir


# ---------------------------------------------------------------------------- probes from a netns

_TCP_ECHO = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
payload = b"weft-runtime-probe"
try:
    s = socket.create_connection((host, port), timeout=3)
    s.sendall(payload); s.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := s.recv(100):
        got += chunk
    print("connected" if got == payload else "mismatch:" + repr(got))
except OSError as e:
    print("error:" + repr(e))
"""


def tcp_echo_from(netns_path: str, host: str, port: int) -> str:
    """Connect from inside the netns at ``netns_path`` to ``host:port``, send a payload, expect it back."""
    out = subprocess.run(["nsenter", f"--net={netns_path}", sys.executable, "-c", _TCP_ECHO, host, str(port)],
                         capture_output=True, text=True, timeout=20, check=False)
    return out.stdout.strip() or f"error:{out.stderr.strip()}"


def ping_from(netns_path: str, host: str, count: int = 2) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net={netns_path}", "ping", "-n", "-q", "-c", str(count), "-i", "0.2",
                           "-W", "2", host], capture_output=True, text=True, timeout=20, check=False)


# ---------------------------------------------------------------------------- cleanup


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout``; wait until it is gone."""
    if not alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_until(f"pid {pid} to die after SIGKILL", lambda: not alive(pid), timeout=10)


def pids_matching(marker: str, cgroup_name: str | None = None) -> list[int]:
    """Processes whose command line or environment mentions ``marker``, or (with ``cgroup_name``)
    that sit in a cgroup below ``/<cgroup_name>`` of any hierarchy."""
    me = os.getpid()
    needle = marker.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            hit = needle in (entry / "cmdline").read_bytes() or needle in (entry / "environ").read_bytes()
            if not hit and cgroup_name:
                paths = [line.split(":", 2)[2] for line in (entry / "cgroup").read_text().splitlines()
                         if line.count(":") >= 2]
                hit = any(p == f"/{cgroup_name}" or p.startswith(f"/{cgroup_name}/") for p in paths)
        except OSError:
            continue
        if hit:
            found.append(int(entry.name))
    return found


def kill_matching(marker: str, cgroup_name: str | None = None) -> list[int]:
    pids = [p for p in pids_matching(marker, cgroup_name) if alive(p)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(AssertionError):
        wait_until("leftover processes to die", lambda: not any(alive(p) for p in pids), timeout=10)
    return pids


def mounts_under(path: Path) -> list[str]:
    root = str(path).rstrip("/") + "/"
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].encode().decode("unicode_escape")
        if mount_point.startswith(root) or mount_point == root.rstrip("/"):
            out.append(mount_point)
    return out


def unmount_under(path: Path) -> list[str]:
    """Unmount every mount at or below ``path``, deepest first (overlay rootfs, netns and shm mounts)."""
    done: list[str] = []
    for _ in range(5):
        left = sorted(set(mounts_under(path)), key=lambda m: m.count("/"), reverse=True)
        if not left:
            break
        for mount_point in left:
            if subprocess.run(["umount", mount_point], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", mount_point], capture_output=True, check=False)
            done.append(mount_point)
    return done


def remove_cgroups(name: str) -> list[str]:
    """rmdir ``/<name>`` and everything below it in every cgroup hierarchy (after its processes died)."""
    removed: list[str] = []
    if not CGROUP_ROOT.is_dir():
        return removed
    for hierarchy in CGROUP_ROOT.iterdir():
        top = hierarchy / name
        if not top.is_dir():
            continue
        dirs = sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True)
        for d in dirs:
            with contextlib.suppress(OSError):
                d.rmdir()
                removed.append(str(d))
    return removed


@dataclass
class Scratch:
    """A scratch dir named after the run's prefix, plus the list of things the run must undo."""

    prefix: str
    root: Path
    made_dirs: list[Path] = field(default_factory=list)  # outside root, removed if empty at the end

    @classmethod
    def create(cls, prefix: str, base: Path = Path("/tmp")) -> Scratch:
        root = base / prefix
        root.mkdir(mode=0o700)
        return cls(prefix, root)

    def note_new_dir(self, path: Path) -> None:
        """Remember ``path`` for removal-if-empty at the end when it does not exist yet (e.g. a
        runtime's fixed /run or /var/lib dir that this run is about to create)."""
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        self.made_dirs.extend(missing)

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        kill_matching(str(self.root), cgroup_name=self.prefix)
        kill_matching(f"{MARKER_ENV}={self.prefix}")
        unmount_under(self.root)
        left = mounts_under(self.root)
        if left:
            problems.append(f"mounts left: {left}")
        remove_cgroups(self.prefix)
        for hierarchy in CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else []:
            if (hierarchy / self.prefix).exists():
                problems.append(f"cgroup left: {hierarchy / self.prefix}")
        if not left:
            shutil.rmtree(self.root, ignore_errors=True)
        if self.root.exists():
            problems.append(f"dir left: {self.root}")
        for d in sorted(self.made_dirs, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        return problems
