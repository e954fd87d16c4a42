"""weft-cni: the thin CNI plugin (spec 1.1.0, all verbs) that forwards to the agent's socket.

Owns: CNI request parsing, spec-version conversion of results and errors, the DEL queue used
while the agent is away. May import: the standard library ONLY (start-up time is paid per pod).
"""
