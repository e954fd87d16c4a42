"""``weft connectivity matrix``: for every pod pair and port, what the policy model expects
(the agent's ``policy.trace``) next to what real packets do (a probe from the source pod)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from weft.lab.cluster import Lab, PodInfo
from weft.lab.probe import probe


class MatrixError(Exception):
    pass


def _observed(outcome: str) -> str:
    # "refused" means the packet reached the pod (no server there): policy let it through.
    if outcome in ("connected", "refused", "mismatch"):
        return "allowed"
    if outcome == "timeout":
        return "denied"
    return f"error ({outcome})"


def connectivity_matrix(lab: Lab, namespaces: list[str], ports: list[int], protocols: list[str],
                        family: int = 4) -> list[dict[str, Any]]:
    state = lab.load()
    pods = [p for p in state.pods.values() if not namespaces or p.namespace in namespaces]
    if len(pods) < 2:
        raise MatrixError("the matrix needs at least two pods")
    for proto in protocols:
        if proto not in ("tcp", "udp", "sctp"):
            raise MatrixError(f"protocol {proto!r}: use tcp, udp or sctp")
    checks: list[tuple[PodInfo, PodInfo, str, int, str]] = []
    for src in pods:
        for dst in pods:
            if src is dst:
                continue
            address = next((a for a in dst.addresses if (":" in a) == (family == 6)), None)
            if address is None:
                raise MatrixError(f"pod {dst.key} has no IPv{family} address")
            for port in ports:
                for proto in protocols:
                    checks.append((src, dst, address, port, proto))

    def run(check: tuple[PodInfo, PodInfo, str, int, str]) -> dict[str, Any]:
        src, dst, address, port, proto = check
        node = lab.node(state, src.node)
        if dst.node == src.node:
            expected = lab.client(node).call("policy.trace", {"from": src.key, "to": dst.key, "port": port,
                                                              "protocol": proto})["verdict"]
        else:
            # Across nodes each side judges its own part, as the datapath does: the source's
            # node its egress (the destination known by its cluster identity), the destination's
            # node its ingress (the source by the identity the packet carries).
            expected = lab.client(node).call("policy.trace", {"from": src.key, "to": address, "port": port,
                                                              "protocol": proto})["verdict"]
            src_address = next((a for a in src.addresses if (":" in a) == (family == 6)), None)
            if expected == "allowed" and src_address is not None:
                expected = lab.client(lab.node(state, dst.node)).call(
                    "policy.trace", {"from": src_address, "to": dst.key, "port": port, "protocol": proto})["verdict"]
        observed = _observed(probe(src.netns, proto, address, port, timeout=1.0).outcome)
        return {"from": src.key, "to": dst.key, "address": address, "port": port, "protocol": proto,
                "expected": expected, "observed": observed, "match": expected == observed}

    # Denied pairs wait out their timeout: run the probes side by side.
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(run, checks))
