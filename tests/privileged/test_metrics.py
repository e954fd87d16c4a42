"""The node's Prometheus endpoint, scraped by a real Prometheus server (Debian's ``prometheus``)
from the lab's world over the underlay: real packets, one allowed connection and one policy
drop, must show up as Hubble's and Cilium's series with their labels. One lab for the module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from weft.lab import world as plan
from weft.lab.cluster import Lab, PodInfo
from weft.lab.probe import probe

from conftest import one_node_lab
from labutil import in_netns, wait_until

PROMETHEUS = "/usr/bin/prometheus"
METRICS_PORT = 9962  # NodeConfig.metrics_address's default port
PROMETHEUS_PORT = 9090  # on 127.0.0.1 inside the world netns only

ALLOW_FRONTEND = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-frontend
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: backend
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: frontend
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
"""

# Run inside the world netns: one instant query against Prometheus's HTTP API, the result as JSON.
QUERY = r"""
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as answer:
    print(json.dumps(json.load(answer)["data"]["result"]))
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from one_node_lab("m", world=True)


def v4(pod: PodInfo) -> str:
    return next(a for a in pod.addresses if ":" not in a)


def query(netns: str, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    proc = in_netns(netns, sys.executable, "-c", QUERY, url, check=False, timeout=10)
    if proc.returncode != 0:
        return []  # not up yet: the caller polls until its deadline
    result: list[dict[str, Any]] = json.loads(proc.stdout)
    return result


def test_prometheus_scrapes_hubble_and_cilium_series(lab: Lab, tmp_path: Path) -> None:
    state = lab.load()
    node = state.nodes[0]
    target = f"{node.uplink[0]}:{METRICS_PORT}"
    status = lab.client(node).call("status")
    assert status["metrics"] == {"address": f"0.0.0.0:{METRICS_PORT}", "serving": f"0.0.0.0:{METRICS_PORT}"}

    frontend = lab.pod_add("default/frontend", labels={"app": "frontend"})
    other = lab.pod_add("default/other", labels={"app": "other"})
    backend = lab.pod_add("default/backend", labels={"app": "backend"}, serve=["tcp:80"])
    policy = tmp_path / "policy.yaml"
    policy.write_text(ALLOW_FRONTEND)
    subprocess.run([sys.executable, "-m", "weft.cli.main", "apply", "-f", str(policy), "--lab", lab.name],
                   check=True, capture_output=True, timeout=60)
    assert probe(frontend.netns, "tcp", v4(backend), 80, timeout=2).outcome == "connected"
    assert probe(other.netns, "tcp", v4(backend), 80, timeout=0.5).outcome == "timeout"

    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "weft", "static_configs": [{"targets": [target]}]}],
    }))
    world = plan.world_netns(lab.name)
    log_path = tmp_path / "prometheus.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{world}", PROMETHEUS, f"--config.file={config}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        found: dict[str, list[dict[str, Any]]] = {}

        def series(name: str, promql: str) -> bool:
            found[name] = query(world, promql)
            return bool(found[name])

        try:
            wait_until("the node scraped", lambda: series("up", 'up{job="weft"} == 1'), timeout=30, interval=0.5)
            wait_until("the policy drop in hubble_drop_total",
                       lambda: series("drop", 'hubble_drop_total{reason="POLICY_DENIED",protocol="TCP"} > 0'),
                       timeout=15, interval=0.5)
            wait_until("forwarded packets in cilium_forward_count_total",
                       lambda: series("forward", 'cilium_forward_count_total{direction="EGRESS"} > 0'),
                       timeout=15, interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; found {found}; prometheus said:\n{log_path.read_text()[-3000:]}") from None
        drop_labels = [s["metric"] for s in found["drop"]]
        assert {"source": "default/other", "destination": "default/backend"}.items() <= drop_labels[0].items(), \
            drop_labels
        assert query(world, 'cilium_drop_count_total{reason="POLICY_DENIED",direction="INGRESS"} > 0')
        assert query(world, 'hubble_flows_processed_total{type="Trace",verdict="FORWARDED",protocol="TCP"} > 0')
        assert query(world, 'hubble_tcp_flags_total{flag="SYN",family="IPv4"} > 0')
        assert query(world, 'weft_map_pressure{map_name="weft_endpoints"} > 0')
        assert query(world, "weft_policy_revision > 0")
    finally:
        server.kill()
        server.wait(timeout=10)
        shutil.rmtree(tmp_path / "tsdb", ignore_errors=True)
