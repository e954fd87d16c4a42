"""Pure value types shared by every layer: labels, endpoint records, address helpers.

Owns: frozen dataclasses and small pure functions. May import: the standard library only.
"""
