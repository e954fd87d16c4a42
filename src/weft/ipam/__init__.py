"""IP address management: cluster pod CIDRs carved into per-node blocks, per-node allocators.

Owns: pure allocation logic (no I/O) and the serialisable allocation state the agent persists.
May import: ``weft.types`` and the standard library. No kernel, no netlink, no files.
"""
