"""weft-agent: the per-node daemon and composition root.

Owns: the node's endpoints and IP allocations (persisted crash-safely on disk), the local API
on a root-only unix socket, the reconciler that holds the kernel (interfaces, maps, attached
programs) to that state, and the node's membership of its cluster (``cluster``: what it
publishes in the cluster store, what it applies from it). May import every lower layer: types,
ipam, identity, policy, observe, hubble, datapath, store, dnsproxy.config/control, cni.plugin.
"""
