"""weft's DNS proxy: one process per node, apart from the agent.

Owns: answering the DNS queries the datapath redirects to it (toPorts rules with DNS rules),
allowing or refusing each by the endpoint's DNS rules, forwarding allowed ones to their original
destination, and writing the addresses of names that match the endpoint's toFQDNs selectors
into the ``weft_fqdn`` map before the answer reaches the pod; expiring them (TTL, grace, live
connections); its own state across restarts and a socket hand-over so a restart has no outage.

Inputs: the node configuration (``dns_proxy`` section) and the per-endpoint rules the agent
writes (:mod:`weft.dnsproxy.config`). It keeps working from its last rules while the agent is
away. May import: weft.fqdn, weft.datapath (maps and ABI only), weft.types. Never weft.agent.
"""
