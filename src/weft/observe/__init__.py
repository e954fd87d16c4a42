"""weft.observe: flows as Hubble shows them.

Owns: decoding the datapath's verdict events (``struct weft_event``, versioned) into flows with
Hubble's field names (:mod:`.flow`), the node's bounded flow ring with cursors for followers
(:mod:`.ring`), the ``weft observe`` filters (:mod:`.filters`, pure: the agent and the CLI run
the same code), output formats (:mod:`.output`), flow logs with rotation (:mod:`.flowlog`)
and their node settings (:mod:`.config`).

May import: ``weft.types``, ``weft.datapath.abi`` (record layout and constants only, no FFI),
pydantic and the standard library. The agent feeds it endpoint metadata through
:class:`.flow.Enrichment`; nothing here reads agent state or the kernel.
"""
