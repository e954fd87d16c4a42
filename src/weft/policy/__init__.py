"""Network policy: CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and Kubernetes
NetworkPolicy, from YAML to the per-endpoint map state the datapath enforces.

Owns: the document models and their validation (``model``, ``loader``, ``typography``), label
selectors and the selector cache (``selectors``), the repository with its revision and node-local
CIDR identities (``repository``), rule compilation and resolution (``resolve``), per-endpoint
policies the repository keeps current by deltas (``distill``), the map-state
types the datapath codes against (``mapstate``) and ``weft policy trace`` (``trace``).

May import: ``weft.types``, ``weft.identity``, ``weft.fqdn`` (name and pattern rules), the standard
library, pydantic and PyYAML. Pure: no kernel, no ctypes, no pyroute2, no ``weft.datapath`` (the
datapath converts our output).
"""

from weft.policy.errors import PolicyError, Problem
from weft.policy.loader import Policy, PolicyKind, load_policies, load_policy_file
from weft.policy.mapstate import EGRESS, INGRESS, EndpointPolicy, PolicyKey, PolicyVerdict, lookup
from weft.policy.repository import ApplyResult, PolicyRepository
from weft.policy.resolve import EndpointSubject
from weft.policy.selectors import SelectionChange, SelectorCache
from weft.policy.trace import DirectionDecision, TraceResult, trace

__all__ = [
    "EGRESS",
    "INGRESS",
    "ApplyResult",
    "DirectionDecision",
    "EndpointPolicy",
    "EndpointSubject",
    "Policy",
    "PolicyError",
    "PolicyKey",
    "PolicyKind",
    "PolicyRepository",
    "PolicyVerdict",
    "Problem",
    "SelectionChange",
    "SelectorCache",
    "TraceResult",
    "load_policies",
    "load_policy_file",
    "lookup",
    "trace",
]
