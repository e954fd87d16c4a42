"""Hubble's gRPC API for weft: the Observer service (GetFlows, GetNodes, ServerStatus) as each
agent serves it on its node and as ``weft relay`` serves it for the whole lab, conversion between
weft's flow dicts and Hubble's protobuf messages, Hubble FlowFilters to weft filters, and clients.

Owns: ``proto.py`` (typed access to the stubs generated from ``proto/`` into ``gen/`` by
``make proto``), ``convert.py``, ``server.py`` (a node's Observer over its flow ring),
``relay.py`` (merges every node's Observer), ``client.py``.
May import: observe, grpcio, protobuf; ``relay`` also lab (to find the nodes). Never agent.
"""
