"""podman 4.3 with its CNI backend, configured entirely through a generated containers.conf
(``CONTAINERS_CONF``) and ``--root``/``--runroot``/``--tmpdir`` in a scratch dir: /etc is not used."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import resource
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtimes.common import (
    MARKER_ENV,
    REFERENCE_PLUGINS,
    RuntimeTestError,
    Scratch,
    require_tools,
    stop_pid,
    write_bin_dir,
    write_conf_dir,
)
from runtimes.images import build_busybox_rootfs

CNI_CACHE_DIR = Path("/var/lib/cni/results")
# runc's default --root for uid 0. podman's exit command (the --rm cleanup) does not carry
# --runtime-flag, so a private runc root would split a container's state; keep the default and
# remove the dir at the end if this run created it (runc deletes each container's state itself).
RUNC_ROOT = Path("/run/runc")


def _q(value: str | Path) -> str:
    return json.dumps(str(value))


def _ulimit(name: str, which: int, cap: int) -> str:
    """``name=N:N`` with N = min(this process's hard limit, ``cap``). podman's defaults ask for more
    (nofile 1048576), and without CAP_SYS_RESOURCE runc's setrlimit fails with EPERM. Measured here:
    nproc at the hard limit (96365) is refused as well, while 4096 (the notes' value) works."""
    _, hard = resource.getrlimit(which)
    value = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    return f"{name}={value}:{value}"


def write_containers_conf(path: Path, *, plugin_dirs: list[Path], network_config_dir: Path, tmp_dir: Path,
                          default_network: str = "weft") -> Path:
    ulimits = [_ulimit("nofile", resource.RLIMIT_NOFILE, 1 << 20), _ulimit("nproc", resource.RLIMIT_NPROC, 4096)]
    text = f"""[containers]
netns = "private"
default_ulimits = [{", ".join(_q(u) for u in ulimits)}]
log_driver = "k8s-file"

[network]
network_backend = "cni"
cni_plugin_dirs = [{", ".join(_q(d) for d in plugin_dirs)}]
network_config_dir = {_q(network_config_dir)}
default_network = {_q(default_network)}

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
tmp_dir = {_q(tmp_dir)}
lock_type = "file"
"""
    path.write_text(text)
    return path


@dataclass
class PodmanRun:
    """A ``podman run`` in the background; threads drain its stdout (line by line, read with
    deadlines) and stderr, and close both pipes at EOF."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _stderr: list[str] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._threads = [threading.Thread(target=self._pump_out, daemon=True),
                         threading.Thread(target=self._pump_err, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            self._stderr.extend(self.proc.stderr)

    def read_until(self, marker: str, timeout: float) -> list[str]:
        """Lines up to and including one equal to ``marker``; fails at EOF or at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {marker!r} from the container within {timeout}s; got {self.lines}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.wait(10)
                raise AssertionError(f"container output ended before {marker!r}; got {self.lines}, "
                                     f"stderr: {self.stderr()}")
            self.lines.append(line)
            if line == marker:
                return self.lines

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=timeout)
        return rc

    def stderr(self) -> str:
        return "".join(self._stderr).strip()


@dataclass
class Podman:
    scratch: Scratch
    weft_cni: Path
    agent_socket: str
    network: str = "weft"
    runs: list[PodmanRun] = field(default_factory=list)

    @property
    def base(self) -> Path:
        return self.scratch.root

    @property
    def rootfs(self) -> Path:
        return self.base / "rootfs"

    def setup(self) -> None:
        require_tools("podman", "conmon", "runc", "nsenter")
        bin_dir = write_bin_dir(self.base / "cni-bin", self.weft_cni)
        conf_dir = self.base / "cni-net.d"
        write_conf_dir(conf_dir, self.agent_socket, name=self.network)
        (self.base / "tmp").mkdir()
        write_containers_conf(self.base / "containers.conf", plugin_dirs=[bin_dir, REFERENCE_PLUGINS],
                              network_config_dir=conf_dir, tmp_dir=self.base / "tmp", default_network=self.network)
        build_busybox_rootfs(self.rootfs)
        self.scratch.note_new_dir(CNI_CACHE_DIR)
        self.scratch.note_new_dir(RUNC_ROOT)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CONTAINERS_CONF"] = str(self.base / "containers.conf")
        env[MARKER_ENV] = self.scratch.prefix
        return env

    def argv(self, *args: str) -> list[str]:
        return ["podman", "--root", str(self.base / "root"), "--runroot", str(self.base / "run"),
                "--tmpdir", str(self.base / "tmp"), "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                *args]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), env=self.env(), capture_output=True, text=True, timeout=timeout,
                              check=False)

    def start(self, *args: str) -> PodmanRun:
        proc = subprocess.Popen(self.argv(*args), env=self.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        run = PodmanRun(proc)
        self.runs.append(run)
        return run

    def containers(self) -> list[str]:
        out = self.run("ps", "-a", "--format", "{{.Names}}")
        if out.returncode != 0:
            raise RuntimeTestError(f"podman ps: {out.stderr.strip()}")
        return out.stdout.split()

    def cleanup(self) -> list[str]:
        """Remove containers through podman (its cleanup sends CNI DEL), then every process, mount,
        cgroup and file of the run."""
        problems: list[str] = []
        for run in self.runs:
            if run.proc.poll() is None:
                stop_pid(run.proc.pid, timeout=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.wait(timeout=5)
        if (self.base / "containers.conf").exists():
            out = self.run("rm", "-af", "-t", "0", timeout=60)
            if out.returncode != 0:
                problems.append(f"podman rm -af: {out.stderr.strip()}")
        problems += self.scratch.cleanup()
        return problems
