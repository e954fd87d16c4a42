"""Helpers that drive real container runtimes (containerd 1.6 CRI, podman 4.3 with its CNI backend)
against a weft lab node: config writers, a local pause image and busybox rootfs, and cleanup that
removes every process, mount, cgroup and file a run made. See /work/shared/notes/cni-clients.md."""
