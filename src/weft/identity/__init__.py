"""Security identities: label set -> numeric identity, with Cilium's numbering.

Owns: reserved identities (1-8), cluster identities (256-65535) allocated for label sets.
May import: ``weft.types`` and the standard library. Pure: no kernel, no files.
"""
