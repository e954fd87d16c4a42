"""Real container runtimes drive weft-cni against a lab node: containerd 1.6 through its CRI API and
podman 4.3 with its CNI backend. Each gets dual-stack weft addresses, reaches a lab pod over TCP and
ICMP on both families, and leaves no endpoint or address behind once its pod/container is gone.

The recipe (configs, pitfalls) is /work/shared/notes/cni-clients.md. Every runtime runs privately:
its own root/state/sockets/config under a uniquely prefixed scratch dir, removed with everything
it made (processes, mounts, cgroups) by the fixture finalizers, also when a test fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from weft.lab.cluster import NETNS_DIR, Lab, NodeInfo, PodInfo

from labutil import pod_name
from runtimes.common import Scratch, ping_from, tcp_echo_from, unique_prefix, wait_until
from runtimes.containerd import Containerd
from runtimes.podman import Podman

POD_V4 = ipaddress.ip_network("10.244.1.0/24")
POD_V6 = ipaddress.ip_network("fd12:3456:789a:0:1::/80")

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(180)]


def _addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text.split("/")[0])


def _family(pod: PodInfo, version: int) -> str:
    return str(next(a for a in pod.addresses if ipaddress.ip_address(a).version == version))


def _node(lab: Lab) -> NodeInfo:
    return lab.load().nodes[0]


def _endpoints(lab: Lab) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = lab.client(_node(lab)).call("endpoint.list")
    return result


def _usage(lab: Lab) -> dict[str, Any]:
    """What the node holds: endpoints, IPAM usage per family, endpoint-map entries."""
    status = lab.client(_node(lab)).call("status")
    return {"endpoints": sorted(e["containerID"] for e in _endpoints(lab)),
            "ipam": {k: v["used"] for k, v in status["ipam"].items()},
            "map": status["maps"]["weft_endpoints"]["entries"]}


def _wait_usage_back(lab: Lab, before: dict[str, Any], what: str, timeout: float = 20.0) -> None:
    last: dict[str, Any] = {}

    def back() -> bool:
        last.update(_usage(lab))
        return last == before

    try:
        wait_until(what, back, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: before {before}, now {last}") from None


@pytest.fixture(scope="module")
def server(lab: Lab) -> Iterator[PodInfo]:
    """A lab pod with a TCP echo server on port 80: the only destination of the runtimes' traffic."""
    pod = lab.pod_add(f"rt/{pod_name('srv')}", serve=["tcp:80"])
    yield pod
    lab.pod_del(pod.key)


@pytest.fixture
def containerd(lab: Lab) -> Iterator[Containerd]:
    scratch = Scratch.create(unique_prefix("c"))
    ctrd = Containerd(scratch, weft_cni=lab.bin_dir / "weft-cni", agent_socket=_node(lab).socket_path)
    try:
        yield ctrd
    finally:
        problems = ctrd.cleanup()
    assert not problems, f"containerd cleanup left: {problems}"


@pytest.fixture
def podman(lab: Lab) -> Iterator[Podman]:
    scratch = Scratch.create(unique_prefix("p"))
    pm = Podman(scratch, weft_cni=lab.bin_dir / "weft-cni", agent_socket=_node(lab).socket_path)
    try:
        yield pm
    finally:
        problems = pm.cleanup()
    assert not problems, f"podman cleanup left: {problems}"


def test_containerd_cri_pod_gets_weft_addresses_and_reaches_a_pod(lab: Lab, server: PodInfo,
                                                                  containerd: Containerd) -> None:
    from cri_api.v1 import api_pb2

    before = _usage(lab)
    containerd.start()
    version = containerd.version()
    assert version.runtime_name == "containerd" and version.runtime_api_version == "v1", version
    containerd.import_pause_image()

    prefix = containerd.scratch.prefix
    namespace, name, uid = f"{prefix}-ns", f"{prefix}-pod", str(uuid.uuid4())
    sandbox_id = containerd.run_pod_sandbox(namespace, name, uid, cgroup_parent=f"/{prefix}")

    status, _ = containerd.sandbox_status(sandbox_id)
    assert status.state == api_pb2.SANDBOX_READY, status
    assert status.metadata.name == name and status.metadata.namespace == namespace
    v4 = _addr(status.network.ip)
    v6s = [_addr(ip.ip) for ip in status.network.additional_ips]
    assert v4.version == 4 and v4 in POD_V4, status.network
    assert len(v6s) == 1 and v6s[0] in POD_V6, status.network
    v6 = v6s[0]

    # netns_mounts_under_state_dir: the sandbox's netns is a mount in containerd's state dir.
    netns = containerd.sandbox_netns(sandbox_id)
    assert netns.startswith(str(containerd.cni_netns_dir) + "/"), netns
    addr_info = json.loads(subprocess.run(["nsenter", f"--net={netns}", "ip", "-j", "addr", "show", "eth0"],
                                          capture_output=True, text=True, check=True).stdout)[0]["addr_info"]
    assert {a["local"] for a in addr_info} >= {str(v4), str(v6)}

    # The agent recorded the sandbox under the pod identity of containerd's CNI_ARGS.
    endpoint = next((e for e in _endpoints(lab) if e["containerID"] == sandbox_id), None)
    assert endpoint is not None, f"sandbox {sandbox_id} not in endpoint.list: {_endpoints(lab)}"
    assert endpoint["pod"] == f"{namespace}/{name}", endpoint
    assert endpoint["ifname"] == "eth0" and endpoint["netns"] == netns, endpoint
    assert {str(_addr(a)) for a in endpoint["addresses"]} == {str(v4), str(v6)}, endpoint
    during = _usage(lab)
    assert {k: during["ipam"][k] - before["ipam"][k] for k in before["ipam"]} == {"ipv4": 1, "ipv6": 1}

    # Traffic: from the sandbox to the lab pod (TCP echo and ping, both families) and back (ping).
    for version_ in (4, 6):
        target = _family(server, version_)
        assert tcp_echo_from(netns, target, 80) == "connected", f"TCP echo {target}:80 from the sandbox"
        ping = ping_from(netns, target)
        assert ping.returncode == 0, f"ping {target} from the sandbox: {ping.stdout}{ping.stderr}"
        back = ping_from(str(NETNS_DIR / server.netns), str(v4 if version_ == 4 else v6))
        assert back.returncode == 0, f"ping the sandbox from {server.key}: {back.stdout}{back.stderr}"

    # Stop (CNI DEL with netns) + Remove (DEL again, empty CNI_NETNS): endpoint and addresses released.
    containerd.stop_and_remove(sandbox_id)
    assert sandbox_id not in containerd.list_sandboxes()
    _wait_usage_back(lab, before, "the sandbox's endpoint and addresses to be released")
    assert not any(e["containerID"] == sandbox_id for e in _endpoints(lab))
    wait_until(f"the sandbox netns {netns} to be removed", lambda: not os.path.exists(netns), timeout=10)


_PODMAN_SCRIPT = """
ip -o addr show eth0
echo "tcp4=$(echo weft-hello-4 | nc -w 3 {v4} 80)"
echo "tcp6=$(echo weft-hello-6 | nc -w 3 {v6} 80)"
if out=$(ping -c 1 -W 2 {v4} 2>&1); then echo ping4=ok; else echo "ping4=fail $out" | tr '\\n' ' '; echo; fi
if out=$(ping6 -c 1 -W 2 {v6} 2>&1); then echo ping6=ok; else echo "ping6=fail $out" | tr '\\n' ' '; echo; fi
echo READY
i=0
while [ ! -e /weft-sync/go ] && [ $i -lt 300 ]; do usleep 100000; i=$((i + 1)); done
"""


def test_podman_cni_container_gets_weft_addresses_and_reaches_a_pod(lab: Lab, server: PodInfo,
                                                                     podman: Podman) -> None:
    podman.setup()
    before = _usage(lab)
    prefix = podman.scratch.prefix
    name = f"{prefix}-ctr"
    (podman.rootfs / "weft-sync").mkdir()
    script = _PODMAN_SCRIPT.format(v4=_family(server, 4), v6=_family(server, 6))
    cidfile = podman.base / "cid"
    run = podman.start("run", "--rm", "--network", podman.network, "--name", name, "--cidfile", str(cidfile),
                       "--cgroup-parent", f"/{prefix}", "--cap-add", "NET_RAW", "--rootfs", str(podman.rootfs),
                       "/bin/sh", "-c", script)
    lines = run.read_until("READY", timeout=45)
    output = "\n".join(lines)

    v4 = [_addr(m) for m in re.findall(r"\binet (\S+)", output)]
    v6 = [_addr(m) for m in re.findall(r"\binet6 (\S+)", output) if not m.startswith("fe80:")]
    assert len(v4) == 1 and v4[0] in POD_V4, output
    assert len(v6) == 1 and v6[0] in POD_V6, output
    assert "tcp4=weft-hello-4" in lines, output
    assert "tcp6=weft-hello-6" in lines, output
    assert "ping4=ok" in lines, output
    assert "ping6=ok" in lines, output

    # While the container runs: the agent has it under podman's CNI_ARGS (K8S_POD_NAME only).
    container_id = cidfile.read_text().strip()
    endpoint = next((e for e in _endpoints(lab) if e["containerID"] == container_id), None)
    assert endpoint is not None, f"container {name} ({container_id}) not in endpoint.list: {_endpoints(lab)}"
    assert endpoint["pod"].endswith(f"/{name}"), endpoint
    assert endpoint["ifname"] == "eth0" and endpoint["netns"].startswith("/run/netns/"), endpoint
    assert {str(_addr(a)) for a in endpoint["addresses"]} == {str(v4[0]), str(v6[0])}, endpoint
    during = _usage(lab)
    assert {k: during["ipam"][k] - before["ipam"][k] for k in before["ipam"]} == {"ipv4": 1, "ipv6": 1}

    (podman.rootfs / "weft-sync" / "go").touch()
    rc = run.wait(timeout=30)
    assert rc == 0, f"podman run exited {rc}: {run.stderr()}"
    # --rm: the CNI DEL runs in podman's cleanup (conmon's exit command or podman itself).
    _wait_usage_back(lab, before, "the container's endpoint and addresses to be released")
    wait_until("the --rm container to be gone", lambda: name not in podman.containers(), timeout=20)
    assert not os.path.exists(endpoint["netns"]), f"netns {endpoint['netns']} left behind"
