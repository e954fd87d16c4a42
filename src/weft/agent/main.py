"""weft-agent entry point: load the datapath, reconcile, serve the API, run periodic passes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from weft.agent.cluster import ClusterSync, open_store
from weft.agent.config import NodeConfig
from weft.agent.dnsflows import DnsFlowFollower
from weft.agent.endpoints import EndpointManager
from weft.agent.metrics import MetricsServer
from weft.agent.server import ApiServer
from weft.datapath.loader import NodeDatapath, default_object_path
from weft.dnsproxy.config import default_socket_path
from weft.hubble import server as hubble

log = logging.getLogger("weft.agent")


def drain_del_queue(manager: EndpointManager, queue_dir: Path) -> list[str]:
    """Apply the DELs weft-cni queued while the agent was away (a DEL is never lost)."""
    done: list[str] = []
    if not queue_dir.is_dir():
        return done
    for path in sorted(queue_dir.glob("*.json")):
        try:
            params: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("queued DEL %s unreadable, dropped: %s", path, exc)
            path.unlink(missing_ok=True)
            continue
        manager.cni_del(params)
        path.unlink(missing_ok=True)
        done.append(path.name)
    return done


_last_memory_snapshot: list[Any] = []  # the previous SIGUSR2 snapshot, to report growth


def log_memory_sites(limit: int = 25) -> None:
    """SIGUSR2: when the agent runs with PYTHONTRACEMALLOC set, log where its memory is held
    (the top allocation sites) and, from the second signal on, what grew since the previous one:
    to find what grows with endpoints or policies."""
    import tracemalloc

    if not tracemalloc.is_tracing():
        log.warning("SIGUSR2: start the agent with PYTHONTRACEMALLOC=<frames> to see its memory by site")
        return
    snapshot = tracemalloc.take_snapshot()
    stats = snapshot.statistics("lineno")
    total = sum(stat.size for stat in stats)
    log.warning("memory held: %.1f KiB in %d sites; the top %d:", total / 1024, len(stats), limit)
    for stat in stats[:limit]:
        frame = stat.traceback[-1]  # file:line only: formatting would load (and keep) source lines
        log.warning("  %8.1f KiB %7d blocks  %s:%d", stat.size / 1024, stat.count, frame.filename, frame.lineno)
    if _last_memory_snapshot:
        log.warning("grown since the previous SIGUSR2:")
        for diff in snapshot.compare_to(_last_memory_snapshot[0], "lineno")[:limit]:
            frame = diff.traceback[-1]
            log.warning("  %+8.1f KiB %+7d blocks  %s:%d", diff.size_diff / 1024, diff.count_diff, frame.filename,
                        frame.lineno)
    _last_memory_snapshot[:] = [snapshot]


async def run(config: NodeConfig) -> None:
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datapath")
    loop = asyncio.get_running_loop()
    datapath = NodeDatapath(config.pin_dir, config.bpf_object or default_object_path(),
                            events_ring_bytes=config.flows.events_ring_bytes, event_level=config.flows.level)
    await loop.run_in_executor(worker, datapath.load)
    manager = await loop.run_in_executor(worker, EndpointManager, config, datapath)
    metrics = MetricsServer(manager, worker)  # before the flow reader: it counts every flow
    manager.flows.start()
    dns_flows = None
    if config.dns_proxy.enabled:
        # The proxy's L7 DNS records join the node's flows (and so the DNS metrics).
        dns_flows = DnsFlowFollower(manager.flows, config.dns_proxy.socket_path
                                    or default_socket_path(config.state_dir), config.state_dir)
        dns_flows.start()
    cluster = None
    if config.cluster is not None:
        # Other nodes: the cluster store. The node joins before its first reconcile, so the
        # policy it enforces from then on knows the cluster's identities as soon as they arrive;
        # a store that does not answer yet leaves the node working on its own until it does.
        cluster = ClusterSync(config, config.cluster, open_store(config.cluster),
                              lambda fn: worker.submit(fn).result())
        await loop.run_in_executor(worker, manager.join_cluster, cluster)
        cluster.start()
    report = await loop.run_in_executor(worker, manager.reconcile)
    log.info("start-up reconcile: %s", report)
    drained = await loop.run_in_executor(worker, drain_del_queue, manager, config.del_queue_dir)
    if drained:
        log.info("applied queued DELs: %s", drained)

    server = ApiServer(config.socket_path, manager.handlers(), worker)
    await server.start()
    log.info("agent for %s serving on %s", config.node_name, config.socket_path)
    if config.metrics_address:
        try:
            metrics.start(config.metrics_address)
            manager.metrics_serving = config.metrics_address
            log.info("metrics on http://%s/metrics", config.metrics_address)
        except (OSError, ValueError) as exc:
            # Metrics are an observer: a taken port must not keep the node's network down.
            log.error("metrics not served on %s: %s", config.metrics_address, exc)

    hubble_address = f"unix://{hubble.hubble_socket(config.socket_path)}"
    observer = None
    try:
        # And on Hubble's port in the node's network namespace, when free (as Cilium's agent).
        skipped: list[str] = []
        observer = await hubble.serve(hubble.NodeObserver(config.node_name, manager.flows.ring, hubble_address,
                                                           manager.flows),
                                      [hubble_address], hubble.TCP_ADDRESSES, skipped)
        log.info("Hubble Observer on %s", ", ".join(a for a in [hubble_address, *hubble.TCP_ADDRESSES]
                                                     if a not in skipped))
    except OSError as exc:
        # An observer too: flows are still served over the agent socket.
        log.error("Hubble Observer not served on %s: %s", hubble_address, exc)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR2, log_memory_sites)

    async def every(interval: float, fn: Any, *args: Any) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
                return
            try:
                await loop.run_in_executor(worker, fn, *args)
            except Exception:
                log.exception("periodic %s failed", getattr(fn, "__name__", fn))

    tasks = [
        asyncio.create_task(every(config.reconcile_interval_s, manager.reconcile)),
        asyncio.create_task(every(config.gc_interval_s, manager.periodic_gc)),
        asyncio.create_task(every(config.gc_interval_s, drain_del_queue, manager, config.del_queue_dir)),
    ]
    if config.cluster is not None:
        tasks.append(asyncio.create_task(every(config.cluster.identity_gc_interval_s, manager.identity_gc)))
    await stop.wait()
    log.info("stopping; the datapath stays pinned and attached")
    for task in tasks:
        task.cancel()
    await server.close()
    if cluster is not None:
        await loop.run_in_executor(None, cluster.stop)
    if observer is not None:
        await observer.stop(grace=1.0)
    metrics.stop()
    worker.shutdown(wait=True)
    if dns_flows is not None:
        dns_flows.stop()
    manager.flows.stop()


def limit_malloc_arenas() -> None:
    """One glibc malloc arena for all of the agent's threads. Every pod ADD configures the pod's
    side on a short-lived thread of its own (inside the pod's netns); by default glibc gives such
    threads arenas of their own (up to 8 per CPU) that keep what the thread freed, so the agent's
    memory grew with pods well beyond what it holds. The agent's threads mostly wait on the
    kernel: one arena costs them nothing measurable."""
    import ctypes
    import ctypes.util

    m_arena_max = -8  # malloc.h
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to set
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(m_arena_max, 1)


def main(argv: list[str] | None = None) -> int:
    limit_malloc_arenas()
    parser = argparse.ArgumentParser(prog="weft-agent", description="weft per-node agent")
    parser.add_argument("--config", type=Path, required=True, help="node configuration JSON")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = NodeConfig.load(args.config)
    except Exception as exc:
        print(f"weft-agent: invalid config {args.config}: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
