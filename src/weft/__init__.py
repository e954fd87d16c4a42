"""weft: a container networking dataplane (CNI plugin, per-node agent, eBPF datapath).

This top-level package must stay import-free: the CNI plugin imports ``weft.cni.plugin``
on every pod operation, and every import here would be paid for at each exec.
"""
