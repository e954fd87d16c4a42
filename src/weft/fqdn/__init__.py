"""FQDN policy logic for the DNS proxy and ``toFQDNs`` rules, all pure (no root, no kernel, no sockets).

Owns FQDN name/pattern matching (``matchpattern``), the learned name -> address cache model of
one node (``cache``) and the DNS message helpers (``dnsmsg``: parsing queries and responses,
building the answer for a denied query, TCP framing).

May import only the standard library, dnspython and ``weft.types``.
"""
