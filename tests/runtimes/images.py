"""Local images without a registry or docker: the pause image for containerd and a busybox rootfs
for ``podman --rootfs``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

CATATONIT = Path("/usr/bin/catatonit")
BUSYBOX = Path("/bin/busybox")  # busybox-static
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def _is_static(path: Path) -> bool:
    """True when the ELF file has no PT_INTERP program header (no dynamic loader needed)."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF":
            return False
        is64, order = head[4] == 2, "<" if head[5] == 1 else ">"
        if is64:
            phoff, = struct.unpack_from(order + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(order + "HH", head, 54)
        else:
            phoff, = struct.unpack_from(order + "I", head, 28)
            phentsize, phnum = struct.unpack_from(order + "HH", head, 42)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            p_type, = struct.unpack(order + "I", f.read(4))
            if p_type == 3:  # PT_INTERP
                return False
    return True


def _layer_tar(files: dict[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime, info.uid, info.gid = len(data), mode, 0, 0, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_pause_image(dest: Path, tag: str, pause_binary: Path = CATATONIT) -> Path:
    """Write a docker-archive tar (what ``docker save`` writes, which ``ctr images import`` reads) with
    one layer holding the static ``pause_binary`` as ``/pause`` and Entrypoint ``["/pause", "-P"]``
    (catatonit's pause mode)."""
    if not pause_binary.is_file():
        raise FileNotFoundError(f"{pause_binary} missing (package catatonit)")
    if not _is_static(pause_binary):
        raise ValueError(f"{pause_binary} is not statically linked; the pause image holds nothing else")
    layer = _layer_tar({"pause": (pause_binary.read_bytes(), 0o755)})
    diff_id = hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": _ARCH.get(platform.machine(), platform.machine()),
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Entrypoint": ["/pause", "-P"], "WorkingDir": "/", "Env": ["PATH=/"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": f"weft tests: {pause_binary} as /pause"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": [f"{diff_id}/layer.tar"]}]
    repo, _, version = tag.rpartition(":")
    archive = {
        "manifest.json": (json.dumps(manifest).encode(), 0o644),
        config_name: (config_bytes, 0o644),
        f"{diff_id}/layer.tar": (layer, 0o644),
        f"{diff_id}/VERSION": (b"1.0", 0o644),
        "repositories": (json.dumps({repo: {version: diff_id}}).encode(), 0o644),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(_layer_tar(archive))
    return dest


def build_busybox_rootfs(dest: Path, busybox: Path = BUSYBOX) -> Path:
    """A minimal root filesystem: static busybox in /bin with a symlink per applet, the mount point
    dirs, and /etc/passwd and /etc/group for root."""
    if not busybox.is_file():
        raise FileNotFoundError(f"{busybox} missing (package busybox-static)")
    if not _is_static(busybox):
        raise ValueError(f"{busybox} is not statically linked (install busybox-static)")
    for d in ("bin", "proc", "sys", "dev", "etc", "tmp", "run", "root", "var/tmp"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, dest / "bin" / "busybox")
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = dest / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")
    os.chmod(dest / "tmp", 0o1777)
    return dest
