"""A private containerd 1.6 with its CRI plugin wired to weft-cni, and a CRI client.

Everything lives under one scratch dir (root, state, sockets, runc root, CNI dirs, logs); the only
fixed paths containerd 1.6 still uses are /run/containerd/s (shim sockets) and libcni's cache in
/var/lib/cni/results, and both are removed again if this run made them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.common import (
    MARKER_ENV,
    RuntimeTestError,
    Scratch,
    require_tools,
    stop_pid,
    wait_until,
    write_bin_dir,
    write_conf_dir,
)
from runtimes.images import build_pause_image

CRI = 'plugins."io.containerd.grpc.v1.cri"'
K8S_NAMESPACE = "k8s.io"  # the containerd namespace of CRI
SHIM_SOCKET_DIR = Path("/run/containerd/s")
CNI_CACHE_DIR = Path("/var/lib/cni/results")


def _q(value: str | Path) -> str:
    """A TOML basic string (JSON string escaping is a subset TOML accepts)."""
    return json.dumps(str(value))


def overlay_works(scratch_dir: Path) -> bool:
    """Whether an overlay mount works on the filesystem of ``scratch_dir`` (else use ``native``)."""
    probe = scratch_dir / "overlay-probe"
    dirs = {n: probe / n for n in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        d.mkdir(parents=True)
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    ok = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["merged"])],
                        capture_output=True, check=False).returncode == 0
    if ok:
        subprocess.run(["umount", str(dirs["merged"])], check=True)
    shutil.rmtree(probe)
    return ok


def write_config(path: Path, *, base: Path, socket: Path, sandbox_image: str, bin_dir: Path, conf_dir: Path,
                 snapshotter: str, runc: str) -> Path:
    """containerd 1.6 config (version 2): root/state/sockets/runc root under ``base``, CRI with
    netns mounts under the state dir, restricted oom_score_adj (no CAP_SYS_RESOURCE here), runc via
    the runc.v2 shim with cgroupfs, and ONE CNI bin dir and conf dir."""
    text = f"""version = 2
root = {_q(base / "root")}
state = {_q(base / "state")}
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = {_q(socket)}

[ttrpc]
  address = {_q(str(socket) + ".ttrpc")}

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = {_q(base / "opt")}

# The tasks service needs this v1 runtime loaded (else the CRI plugin fails); keep its root private.
[plugins."io.containerd.runtime.v1.linux"]
  runtime_root = {_q(base / "runc-v1")}

[{CRI}]
  sandbox_image = {_q(sandbox_image)}
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{CRI}.containerd]
  snapshotter = {_q(snapshotter)}
  default_runtime_name = "runc"

[{CRI}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{CRI}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  BinaryName = {_q(runc)}
  Root = {_q(base / "runc")}

[{CRI}.cni]
  bin_dir = {_q(bin_dir)}
  conf_dir = {_q(conf_dir)}
  max_conf_num = 1
"""
    path.write_text(text)
    return path


@dataclass
class Containerd:
    """One private containerd, started by :meth:`start` and removed without trace by :meth:`cleanup`."""

    scratch: Scratch
    weft_cni: Path
    agent_socket: str
    proc: subprocess.Popen[bytes] | None = None
    snapshotter: str = "overlayfs"
    sandboxes: list[str] = field(default_factory=list)
    _channel: Any = None
    _runtime: Any = None

    @property
    def base(self) -> Path:
        return self.scratch.root

    @property
    def socket(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def log_path(self) -> Path:
        return self.base / "containerd.log"

    @property
    def pause_image(self) -> str:
        return f"localhost/{self.scratch.prefix}-pause:1"

    @property
    def cni_netns_dir(self) -> Path:
        return self.base / "state" / "io.containerd.grpc.v1.cri" / "netns"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no containerd log)"

    def start(self, timeout: float = 20.0) -> None:
        tools = require_tools("containerd", "containerd-shim-runc-v2", "runc", "ctr", "nsenter")
        bin_dir = write_bin_dir(self.base / "cni-bin", self.weft_cni, reference=["loopback"])
        conf_dir = self.base / "cni-net.d"
        write_conf_dir(conf_dir, self.agent_socket)
        snapshotter = "overlayfs" if overlay_works(self.base) else "native"
        config = write_config(self.base / "config.toml", base=self.base, socket=self.socket,
                              sandbox_image=self.pause_image, bin_dir=bin_dir, conf_dir=conf_dir,
                              snapshotter=snapshotter, runc=tools["runc"])
        self.scratch.note_new_dir(SHIM_SOCKET_DIR)
        self.scratch.note_new_dir(CNI_CACHE_DIR)
        env = dict(os.environ)
        env[MARKER_ENV] = self.scratch.prefix
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([tools["containerd"], "--config", str(config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True, env=env)
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeTestError(f"containerd exited with {proc.returncode}:\n{self.log_tail()}")
            return self.socket.is_socket()

        wait_until(f"containerd socket {self.socket}", up, timeout=timeout)
        import grpc
        from cri_api.v1 import api_pb2_grpc

        self._channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self._channel).result(timeout=timeout)
        self._runtime = api_pb2_grpc.RuntimeServiceStub(self._channel)  # type: ignore[no-untyped-call]
        # The CRI plugin registers a little after the socket appears: poll Version until it answers.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.version()
                break
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeTestError(f"CRI Version keeps failing ({exc.code()}: {exc.details()}); "
                                           f"containerd log:\n{self.log_tail()}") from None
                time.sleep(0.05)
        self.snapshotter = snapshotter

    @property
    def runtime(self) -> Any:
        if self._runtime is None:
            raise RuntimeTestError("containerd is not started")
        return self._runtime

    def version(self) -> Any:
        from cri_api.v1 import api_pb2

        return self.runtime.Version(api_pb2.VersionRequest(version="v1"), timeout=5)

    def import_pause_image(self) -> None:
        tar = build_pause_image(self.base / "pause.tar", self.pause_image)
        out = subprocess.run(["ctr", "-a", str(self.socket), "-n", "k8s.io", "images", "import",
                              "--snapshotter", self.snapshotter, str(tar)],
                             capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeTestError(f"ctr images import failed: {out.stderr.strip()}\n{self.log_tail()}")
        listed = subprocess.run(["ctr", "-a", str(self.socket), "-n", "k8s.io", "images", "ls", "-q"],
                                capture_output=True, text=True, timeout=30, check=True).stdout.split()
        if self.pause_image not in listed:
            raise RuntimeTestError(f"{self.pause_image} not listed after import: {listed}")

    def run_pod_sandbox(self, namespace: str, name: str, uid: str, cgroup_parent: str) -> str:
        from cri_api.v1 import api_pb2

        config = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, namespace=namespace, uid=uid, attempt=0),
            hostname=name,
            log_directory=str(self.base / "pod-logs" / name),
            labels={"weft-test": self.scratch.prefix},
            linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=cgroup_parent),
        )
        reply = self.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=60)
        self.sandboxes.append(reply.pod_sandbox_id)
        return str(reply.pod_sandbox_id)

    def sandbox_status(self, sandbox_id: str) -> tuple[Any, dict[str, Any]]:
        """The PodSandboxStatus and its verbose ``info`` (containerd puts the OCI spec there)."""
        from cri_api.v1 import api_pb2

        reply = self.runtime.PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True), timeout=30)
        info = json.loads(reply.info["info"]) if "info" in reply.info else {}
        return reply.status, info

    def sandbox_netns(self, sandbox_id: str) -> str:
        """The sandbox's netns path: from the OCI spec in the verbose status, checked against the
        state dir where ``netns_mounts_under_state_dir`` puts it."""
        _, info = self.sandbox_status(sandbox_id)
        namespaces = info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", [])
        paths = [ns.get("path", "") for ns in namespaces if ns.get("type") == "network"]
        if paths and paths[0]:
            return str(paths[0])
        found = sorted(self.cni_netns_dir.glob("cni-*")) if self.cni_netns_dir.is_dir() else []
        if len(found) == 1:
            return str(found[0])
        raise RuntimeTestError(f"no netns path for sandbox {sandbox_id}: spec namespaces {namespaces}, "
                               f"state dir holds {found}")

    def stop_and_remove(self, sandbox_id: str) -> None:
        from cri_api.v1 import api_pb2

        self.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=60)
        self.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=60)
        if sandbox_id in self.sandboxes:
            self.sandboxes.remove(sandbox_id)

    def list_sandboxes(self) -> list[str]:
        from cri_api.v1 import api_pb2

        reply = self.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30)
        return [str(s.id) for s in reply.items]

    def shim_socket(self, sandbox_id: str) -> Path:
        """Where containerd 1.6 puts the runc.v2 shim's socket of a sandbox (a fixed dir, not under
        our state): /run/containerd/s/<sha256(<grpc address>/<namespace>/<id>)>."""
        digest = hashlib.sha256(os.path.join(str(self.socket), K8S_NAMESPACE, sandbox_id).encode()).hexdigest()
        return SHIM_SOCKET_DIR / digest

    def _release_directly(self, sandbox_id: str) -> list[str]:
        """For a sandbox containerd could not remove (it died, or Stop/Remove failed): the CNI DEL
        it owed weft, run by hand as RemovePodSandbox sends it (empty CNI_NETNS, no prevResult),
        then its libcni cache entries and its shim socket."""
        problems = []
        conf = {"cniVersion": "1.0.0", "name": "weft", "type": "weft-cni", "agentSocket": self.agent_socket}
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": "DEL",
               "CNI_CONTAINERID": sandbox_id, "CNI_NETNS": "", "CNI_IFNAME": "eth0", "CNI_ARGS": "",
               "CNI_PATH": str(self.base / "cni-bin")}
        out = subprocess.run([str(self.weft_cni)], input=json.dumps(conf), env=env, capture_output=True, text=True,
                             timeout=60, check=False)
        if out.returncode != 0:
            problems.append(f"direct CNI DEL of {sandbox_id}: rc={out.returncode} {out.stdout}{out.stderr}")
        if CNI_CACHE_DIR.is_dir():
            for cached in CNI_CACHE_DIR.glob(f"*-{sandbox_id}-*"):
                cached.unlink(missing_ok=True)
        self.shim_socket(sandbox_id).unlink(missing_ok=True)
        return problems

    def cleanup(self) -> list[str]:
        """Stop what is left through CRI (so CNI DEL reaches weft), stop containerd by its pid,
        then remove shims, sandbox processes, mounts, cgroups and dirs. Returns what it could not."""
        problems: list[str] = []
        if self._runtime is not None and self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                for sandbox_id in set(self.sandboxes) | set(self.list_sandboxes()):
                    try:
                        self.stop_and_remove(sandbox_id)
                    except Exception as exc:
                        problems.append(f"stop/remove sandbox {sandbox_id}: {exc}")
        if self._channel is not None:
            self._channel.close()
        if self.proc is not None:
            stop_pid(self.proc.pid, timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        for sandbox_id in list(self.sandboxes):
            problems += self._release_directly(sandbox_id)
        # Shims reference our socket in their command line; pause processes sit in our cgroup.
        problems += self.scratch.cleanup()
        return problems
