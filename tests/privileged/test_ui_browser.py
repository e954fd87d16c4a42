"""The service map UI in a real browser: headless Chromium, driven over the DevTools protocol,
loads the page from the UI server (fed by a fake relay with known flows), draws the expected
nodes and edges (read from the DOM, and the verdict colours counted in a screenshot), and clicking
the dropped edge lists its flows with their drop reason. The same checks on an empty relay find
nothing, so they cannot pass on an empty or wrong map."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from PIL import Image

from weft.hubble.relay import Peer, Relay
from weft.hubble.server import hubble_socket
from weft.lab.cluster import Lab
from weft.lab.probe import probe
from weft.ui import servicemap
from weft.ui.server import start_ui

from conftest import one_node_lab

CHROMIUM = shutil.which("chromium")
GREEN, RED = (0x1A, 0x9E, 0x3A), (0xD6, 0x28, 0x28)
DEADLINE = 20.0

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make install)")


def ep(namespace: str, pod: str, app: str) -> dict[str, Any]:
    return {"ID": 7, "identity": 5000, "namespace": namespace, "pod_name": pod,
            "labels": [f"k8s:app={app}", f"k8s:io.kubernetes.pod.namespace={namespace}"]}


def flow(src: dict[str, Any], dst: dict[str, Any], verdict: str, port: int, second: int,
         reason: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {
        "time": f"2026-11-27T01:00:{second:02d}.000000000Z", "verdict": verdict,
        "IP": {"source": "10.200.0.5", "destination": "10.200.0.9", "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": 40000 + second, "destination_port": port}}, "source": src, "destination": dst,
        "Type": "L3_L4", "node_name": "uilab-n1", "traffic_direction": "EGRESS", "is_reply": False,
        "event_type": {"type": 1 if verdict == "DROPPED" else 4}}
    if reason:
        out["drop_reason_desc"] = reason
    return out


FRONTEND = ep("shop", "frontend-7d9f8b6c5d-x2k4p", "frontend")
BACKEND = ep("shop", "backend-0", "backend")
INTRUDER = ep("default", "intruder-1", "intruder")
KNOWN_FLOWS = (
    [flow(FRONTEND, BACKEND, "FORWARDED", 80, s) for s in range(6)]
    + [flow(INTRUDER, BACKEND, "DROPPED", 80, 10 + s, "POLICY_DENIED") for s in range(3)]
    + [{"time": "2026-11-27T01:00:30Z", "Type": "L7", "verdict": "FORWARDED", "source": FRONTEND,
        "destination": BACKEND, "l7": {"type": "RESPONSE", "dns": {"query": "gone.example.", "rcode": 3}}}]
)


class FakeRelay:
    def __init__(self, flows: list[dict[str, Any]]) -> None:
        self.flows = flows

    async def recent_flows(self, limit: int) -> list[dict[str, Any]]:
        return self.flows[-limit:]

    async def node_names(self) -> list[str]:
        return ["uilab-n1"]


class Page:
    """One tab of Chromium over the DevTools protocol."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        await self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), DEADLINE))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str) -> Any:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        shown = await self.js("document.getElementById('status').textContent + ' | edges: ' + [...document"
                              ".querySelectorAll('text.count')].map(t => t.dataset.edge + ' ' + t.textContent)"
                              ".join('; ')"
                              " + ' | nodes: ' + [...document.querySelectorAll('g.node')].map(g => g.dataset.id)"
                              ".join(', ')")
        raise AssertionError(f"the page never made this true: {expression}\nthe page shows: {shown}")

    async def screenshot(self) -> Image.Image:
        shot = await self.call("Page.captureScreenshot", format="png")
        return Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")


@asynccontextmanager
async def browser_page(url: str) -> AsyncIterator[Page]:
    """Headless Chromium (as root: no sandbox) with a throw-away profile, killed with every child."""
    assert CHROMIUM is not None
    profile = tempfile.mkdtemp(prefix="wui-chromium-")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
         "--window-size=1400,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + DEADLINE
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, f"chromium exited with {proc.returncode}"
            assert time.monotonic() < deadline, "chromium never opened its DevTools port"
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        target = next(t for t in targets if t["type"] == "page")
        async with websockets.connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
            page = Page(ws)
            await page.call("Page.enable")
            await page.call("Page.navigate", url=url)
            await page.wait_for("document.readyState === 'complete' && document.body.dataset.loaded === '1'")
            yield page
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def colour_pixels(image: Image.Image, colour: tuple[int, int, int]) -> int:
    """Pixels within a small distance of a colour (antialiasing shifts edges' pixels a little)."""
    r0, g0, b0 = colour
    return sum(1 for r, g, b in image.getdata() if abs(r - r0) + abs(g - g0) + abs(b - b0) < 40)


DOM_SUMMARY = """(() => ({
  nodes: [...document.querySelectorAll('g.node text')].map(t => t.textContent).sort(),
  namespaces: [...document.querySelectorAll('g.ns text')].map(t => t.textContent).sort(),
  edges: [...document.querySelectorAll('path.edge')].map(p => {
    const b = p.getBoundingClientRect();
    return {id: p.dataset.edge, verdict: p.dataset.verdict, count: +p.dataset.count, stroke: p.getAttribute('stroke'),
            w: b.width, h: b.height};
  }),
  counts: [...document.querySelectorAll('text.count')].map(t => t.textContent).sort(),
  dns: [...document.querySelectorAll('#dns-rcodes tbody td')].map(t => t.textContent),
}))()"""

# The middle of an edge's path in the page's coordinates (where a user would click).
EDGE_POINT = """((verdict) => {
  const p = document.querySelector(`path.edge[data-verdict="${verdict}"]`);
  const pt = p.getPointAtLength(p.getTotalLength() / 2).matrixTransform(p.getScreenCTM());
  return {x: pt.x, y: pt.y};
})"""


async def check_map(url: str, shot: str) -> tuple[dict[str, Any], int, int, list[list[str]]]:
    async with browser_page(url) as page:
        dom = await page.js(DOM_SUMMARY)
        image = await page.screenshot()
        image.save(Path(tempfile.gettempdir()) / shot)  # for a human, when it fails
        rows: list[list[str]] = []
        if dom["edges"]:
            point = await page.js(EDGE_POINT + "('DROPPED')")
            for kind in ("mousePressed", "mouseReleased"):
                await page.call("Input.dispatchMouseEvent", type=kind, x=point["x"], y=point["y"], button="left",
                                clickCount=1)
            await page.wait_for("document.querySelectorAll('#flows tbody tr').length > 0")
            rows = await page.js("[...document.querySelectorAll('#flows tbody tr')]"
                                 ".map(r => [...r.cells].map(c => c.textContent))")
        return dom, colour_pixels(image, GREEN), colour_pixels(image, RED), rows


async def with_ui(flows: list[dict[str, Any]], shot: str) -> tuple[dict[str, Any], int, int, list[list[str]]]:
    runner = await start_ui(FakeRelay(flows), port=0)
    try:
        host, port = runner.addresses[0][:2]
        return await check_map(f"http://{host}:{port}/", shot)
    finally:
        await runner.cleanup()


def test_browser_draws_the_map_and_lists_an_edges_flows() -> None:
    dom, green, red, rows = asyncio.run(with_ui(list(KNOWN_FLOWS), "weft-ui-servicemap.png"))
    assert dom["nodes"] == ["backend", "frontend", "intruder"]
    assert dom["namespaces"] == ["default", "shop"]
    edges = {(e["verdict"], e["count"], e["stroke"]) for e in dom["edges"]}
    assert edges == {("FORWARDED", 6, "#1a9e3a"), ("DROPPED", 3, "#d62828")}
    assert all(e["w"] > 20 for e in dom["edges"]), dom["edges"]  # drawn between columns, not collapsed
    assert dom["counts"] == ["TCP/80 dropped 3", "TCP/80 forwarded 6"]
    assert dom["dns"] == ["NXDOMAIN", "1"]
    # The screenshot shows both verdicts' strokes (3 px wide, ~150 px long each, plus arrowheads).
    assert green > 200 and red > 200, (green, red)
    assert len(rows) == 3
    for time_, source, destination, port, verdict, reason, node in rows:
        assert (source, destination, port, verdict, reason, node) == (
            "default/intruder-1", "shop/backend-0", "80/TCP", "DROPPED", "POLICY_DENIED", "uilab-n1")
        assert time_.startswith("2026-11-27T01:00:1")


def test_browser_check_fails_on_an_empty_map() -> None:
    dom, green, red, rows = asyncio.run(with_ui([], "weft-ui-empty.png"))
    assert dom["nodes"] == [] and dom["edges"] == [] and rows == []
    assert green < 50 and red < 50, (green, red)


# ---------------------------------------------------------------- the real relay of a 1-node lab
ALLOW_CLIENTS = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: backend-from-clients
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: backend
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from one_node_lab("ui")


def test_browser_shows_the_real_relays_edges(lab: Lab, tmp_path: Path) -> None:
    """Two replicas of one workload reach the backend (forwarded), another pod is dropped by the
    policy's default deny: the map of the lab's relay shows both edges, and the drop's reason."""
    clients = [lab.pod_add(f"default/client-{i}", labels={"app": "client"}) for i in (1, 2)]
    intruder = lab.pod_add("default/intruder", labels={"app": "intruder"})
    backend = lab.pod_add("default/backend", labels={"app": "backend"}, serve=["tcp:80"])
    policy = tmp_path / "policy.yaml"
    policy.write_text(ALLOW_CLIENTS)
    subprocess.run([sys.executable, "-m", "weft.cli.main", "apply", "-f", str(policy), "--lab", lab.name],
                   check=True, capture_output=True, timeout=60)
    address = next(a for a in backend.addresses if ":" not in a)
    for client in clients:
        assert probe(client.netns, "tcp", address, 80, timeout=2).outcome == "connected"
    assert probe(intruder.netns, "tcp", address, 80, timeout=0.5).outcome == "timeout"
    node = lab.load().nodes[0]
    forwarded = servicemap.edge_id("default/client", "default/backend", "TCP", 80)
    dropped = servicemap.edge_id("default/intruder", "default/backend", "TCP", 80)

    async def main() -> tuple[list[str], list[list[str]]]:
        relay = Relay([Peer(node.name, f"unix://{hubble_socket(Path(node.socket_path))}")])
        runner = await start_ui(relay, port=0)
        try:
            host, port = runner.addresses[0][:2]
            async with browser_page(f"http://{host}:{port}/") as page:
                await page.wait_for(f"!!document.querySelector('path.edge[data-edge=\"{forwarded}\"]"
                                    f"[data-verdict=\"FORWARDED\"][stroke=\"#1a9e3a\"]') && "
                                    f"!!document.querySelector('path.edge[data-edge=\"{dropped}\"]"
                                    f"[data-verdict=\"DROPPED\"][stroke=\"#d62828\"]')")
                labels = await page.js("[...document.querySelectorAll('g.node text')].map(t => t.textContent)")
                point = await page.js(f"""(() => {{
                  const p = document.querySelector('path.edge[data-edge="{dropped}"]');
                  const pt = p.getPointAtLength(p.getTotalLength() / 2).matrixTransform(p.getScreenCTM());
                  return {{x: pt.x, y: pt.y}}; }})()""")
                for kind in ("mousePressed", "mouseReleased"):
                    await page.call("Input.dispatchMouseEvent", type=kind, x=point["x"], y=point["y"],
                                    button="left", clickCount=1)
                await page.wait_for("document.querySelectorAll('#flows tbody tr').length > 0")
                rows = await page.js("[...document.querySelectorAll('#flows tbody tr')]"
                                     ".map(r => [...r.cells].map(c => c.textContent))")
                (await page.screenshot()).save(Path(tempfile.gettempdir()) / "weft-ui-lab.png")
                return labels, rows
        finally:
            await runner.cleanup()
            await relay.close()

    labels, rows = asyncio.run(main())
    assert {"client", "intruder", "backend"} <= set(labels), labels
    assert labels.count("client") == 1, "both replicas are one workload"
    assert rows and all(r[1] == "default/intruder" and r[2] == "default/backend" and r[3] == "80/TCP"
                        and r[4] == "DROPPED" and r[5] == "POLICY_DENIED" and r[6] == node.name for r in rows), rows
