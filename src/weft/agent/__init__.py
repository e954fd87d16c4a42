"""weft-agent: the per-node daemon and composition root.

Owns: the node's endpoints and IP allocations (persisted crash-safely on disk), the local API
on a root-only unix socket, and the reconciler that holds the kernel (interfaces, maps,
attached programs) to that state. May import every lower layer: types, ipam, identity, datapath.
"""
