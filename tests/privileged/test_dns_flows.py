"""L7 DNS flows end to end: a pod's queries through the node's DNS proxy (redirected by the
datapath under an FQDN policy) become Hubble L7 flows in the agent's flow ring: an allowed query
as a REQUEST and a RESPONSE with its answers, a refused one as a REQUEST with verdict DROPPED, as
Cilium's proxy reports it; visible through the agent's flows API, `weft observe --protocol dns`
and Hubble's DNS series on the agent's Prometheus endpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from weft.dnsproxy.control import ProxyClient
from weft.lab.cluster import Lab, PodInfo

from conftest import one_node_lab
from labutil import in_netns, pod_name, wait_until

ROOT = Path(__file__).resolve().parents[2]
CANONICAL = (ROOT / "examples/policies/allow-genai-to-blobstorage.yaml").read_text()
APP1_V4 = "198.51.100.10"
METRICS_PORT = 9962
SCRAPE = r"""
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from one_node_lab("l", world=True)


@pytest.fixture(scope="module")
def genai(lab: Lab) -> Iterator[PodInfo]:
    node = lab.load().nodes[0]
    lab.client(node).call("policy.apply", {"files": [{"name": "seed.yaml", "text": CANONICAL}]})
    pod = lab.pod_add(f"default/{pod_name('genai')}", labels={"app": "genai_backend"})
    try:
        yield pod
    finally:
        lab.pod_del(pod.key)


def dig(lab: Lab, pod: PodInfo, name: str, *extra: str) -> str:
    out = subprocess.run(lab.exec_argv(pod.key, ["dig", "+tries=1", "+time=2", *extra, name, "A"]), capture_output=True,
                         text=True, timeout=30, check=False).stdout
    return next((line.split("status: ")[1].split(",")[0] for line in out.splitlines() if "status: " in line),
                "TIMEOUT")


def dns_flows(lab: Lab, pod: PodInfo, query: str) -> list[dict[str, Any]]:
    node = lab.load().nodes[0]
    answer = lab.client(node).call("flows.get", {"all": True, "filters": {"include": {"protocol": ["dns"]}}})
    return [r["flow"] for r in answer["responses"]
            if "flow" in r and r["flow"].get("Type") == "L7" and r["flow"]["l7"]["dns"]["query"] == query
            and pod.name in (r["flow"]["source"].get("pod_name"), r["flow"]["destination"].get("pod_name"))]


def test_allowed_and_refused_queries_become_l7_flows(lab: Lab, genai: PodInfo) -> None:
    assert dig(lab, genai, "app1.myblobstorage.com") == "NOERROR"
    assert dig(lab, genai, "other.example") == "REFUSED"
    allowed: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []

    def seen() -> bool:
        allowed[:] = dns_flows(lab, genai, "app1.myblobstorage.com.")
        refused[:] = dns_flows(lab, genai, "other.example.")
        return len(allowed) >= 2 and len(refused) >= 1

    wait_until("L7 DNS flows of both queries in the agent's flows", seen, timeout=10, interval=0.2)
    request = next(f for f in allowed if f["l7"]["type"] == "REQUEST")
    response = next(f for f in allowed if f["l7"]["type"] == "RESPONSE")
    assert request["verdict"] == "FORWARDED" and request["event_type"] == {"type": 129}
    assert request["source"]["pod_name"] == genai.name and request["source"]["namespace"] == "default"
    assert "k8s:app=genai_backend" in request["source"]["labels"]
    assert request["l4"]["UDP"]["destination_port"] == 53 and request["l7"]["dns"]["qtypes"] == ["A"]
    assert request["node_name"] == lab.load().nodes[0].name
    assert response["is_reply"] is True and response["destination"]["pod_name"] == genai.name
    assert response["l7"]["dns"]["ips"] == [APP1_V4] and response["l7"]["dns"]["observation_source"] == "proxy"
    assert int(response["l7"]["latency_ns"]) > 0
    assert {f["verdict"] for f in refused} == {"DROPPED"} and refused[0]["l7"]["type"] == "REQUEST"
    # Over TCP too: the same records, on TCP ports.
    assert dig(lab, genai, "www.myblobstorage.com", "+tcp") == "NOERROR"
    over_tcp: list[dict[str, Any]] = []

    def tcp_seen() -> bool:
        over_tcp[:] = [f for f in dns_flows(lab, genai, "www.myblobstorage.com.") if "TCP" in f["l4"]]
        return len(over_tcp) >= 2

    wait_until("L7 DNS flows of a TCP query", tcp_seen, timeout=10, interval=0.2)
    tcp_answer = next(f for f in over_tcp if f["l7"]["type"] == "RESPONSE")
    assert tcp_answer["l4"]["TCP"]["source_port"] == 53 and tcp_answer["l7"]["dns"]["ips"] == [APP1_V4]
    assert tcp_answer["l7"]["dns"]["cnames"] == ["app1.myblobstorage.com."]
    assert tcp_answer["l7"]["dns"]["rrtypes"] == ["CNAME", "A"]

    # weft observe --protocol dns shows them as hubble observe does.
    out = subprocess.run([sys.executable, "-m", "weft.cli.main", "observe", "--lab", lab.name, "--all",
                          "--protocol", "dns", "--type", "l7"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert "dns-request proxy FORWARDED (DNS Query app1.myblobstorage.com. A)" in out
    assert f'dns-response proxy FORWARDED (DNS Answer "{APP1_V4}" TTL:' in out
    assert "dns-request proxy DROPPED (DNS Query other.example. A)" in out
    jsonpb = subprocess.run([sys.executable, "-m", "weft.cli.main", "observe", "--lab", lab.name, "--all",
                             "--protocol", "dns", "--verdict", "DROPPED", "-o", "jsonpb"], capture_output=True,
                            text=True, timeout=60, check=True).stdout
    dropped = [json.loads(line)["flow"] for line in jsonpb.splitlines() if '"flow"' in line]
    assert dropped and all(f["verdict"] == "DROPPED" and f["Type"] == "L7" for f in dropped)

    # Hubble's DNS series, with the pod context on both sides.
    node = lab.load().nodes[0]
    source = f"default/{genai.name}"
    text = ""

    def scraped() -> bool:
        nonlocal text
        proc = in_netns(node.netns, sys.executable, "-c", SCRAPE, f"http://127.0.0.1:{METRICS_PORT}/metrics",
                        check=False, timeout=10)
        text = proc.stdout
        return f'source="{source}"' in text and "hubble_dns_responses_total" in text

    wait_until("DNS series on the metrics endpoint", scraped, timeout=10, interval=0.2)
    lines = [line for line in text.splitlines() if line.startswith("hubble_dns_") and f'"{source}"' in line]
    assert any(line.startswith("hubble_dns_queries_total{") and 'rcode="Policy denied"' in line
               and 'qtypes="A"' in line for line in lines), lines
    assert any(line.startswith("hubble_dns_queries_total{") and 'rcode=""' in line for line in lines), lines
    assert any(line.startswith("hubble_dns_responses_total{") and 'rcode="No Error"' in line
               and 'ips_returned="1"' in line and f'destination="{source}"' in line for line in lines), lines


def test_queries_while_the_agent_is_down_reach_its_flows_once(lab: Lab, genai: PodInfo) -> None:
    """The proxy keeps its records while no agent runs; the next agent resumes at the saved cursor."""
    assert dig(lab, genai, "app1.myblobstorage.com") == "NOERROR"
    wait_until("the app1 flows", lambda: len(dns_flows(lab, genai, "app1.myblobstorage.com.")) >= 2,
               timeout=10, interval=0.2)
    before = len(dns_flows(lab, genai, "app1.myblobstorage.com."))
    state = lab.load()
    node = state.nodes[0]
    # The agent saves its cursor just after it has published a page (at least once: a crash in
    # between shows that page again): wait until it covers every record the proxy made so far.
    cursor_file = Path(node.config_path).parent / "state" / "dns-l7-cursor.json"
    made = ProxyClient(node.proxy_socket).status()["l7"]["next_seq"]
    wait_until("the agent's DNS cursor saved", lambda: cursor_file.exists()
               and json.loads(cursor_file.read_text())["cursor"] >= made, timeout=10, interval=0.1)
    lab.stop_agent(state, node.name, signal.SIGKILL)
    try:
        assert dig(lab, genai, "app2.myblobstorage.com") == "NOERROR"
    finally:
        lab.start_agent(lab.load(), node.name)
    wait_until("the flows of a query made while no agent ran",
               lambda: len(dns_flows(lab, genai, "app2.myblobstorage.com.")) >= 2, timeout=15, interval=0.2)
    # Nothing shown twice: the new agent's ring starts empty and records the last agent read
    # (app1's) are not read again.
    assert before >= 2 and dns_flows(lab, genai, "app1.myblobstorage.com.") == []
