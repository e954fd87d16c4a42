"""Run a real etcd server (Debian's ``etcd``) on loopback for tests and the lab.

Listens on 127.0.0.1 only, on ports picked free at construction and kept across restarts (so clients
reconnect to the same address); its data dir lives in a temp dir removed by ``stop(cleanup=True)``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

ETCD_BINARY = "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    def __init__(self, name: str = "weft-store", binary: str = ETCD_BINARY) -> None:
        if not Path(binary).exists():
            raise FileNotFoundError(f"etcd server binary {binary} not found: `make -s install` installs etcd-server")
        self.name = name
        self.binary = binary
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        self.client_port = free_port()
        self.peer_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        if self.process is not None:
            raise RuntimeError(f"etcd {self.name} already running (pid {self.process.pid})")
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            self.binary, "--name", self.name, "--data-dir", str(self.workdir / "data"),
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
            "--log-outputs", str(self.workdir / "etcd.log"), "--logger", "zap",
        ]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd {self.name} exited with {self.process.returncode}; log: {self.log_tail()}")
            try:
                if httpx.get(f"{self.endpoint}/health", timeout=1.0).json().get("health") == "true":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd {self.name} not healthy after {timeout}s; log: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        log = self.workdir / "etcd.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"

    def stop(self, cleanup: bool = False) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if cleanup:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(cleanup=True)
