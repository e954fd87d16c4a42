"""The lab: a cluster on one machine, built from network namespaces.

Owns: node and pod namespaces, agent processes, the lab's CNI config and bin dirs, a
libcni-like runtime that execs weft-cni exactly as containerd does, test servers in pods,
and teardown (also after a crash). Names everything with the lab's prefix; adds nothing to
the root namespace that leads outside. May import: agent.client, types, the standard library.
"""
