"""The kernel side as seen from Python: the ABI mirror, the libbpf binding, typed maps,
the object loader and tc attachment.

Owns: ``libbpf.py`` is the only module in weft that uses ctypes/FFI; ``abi.py`` mirrors
``bpf/include/shared/weft_abi.h``. May import: ``weft.types``, pyroute2, the standard library.
Must not import: policy, ipam, identity, agent, cni, cli, lab.
"""
