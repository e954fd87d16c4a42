"""The ``weft`` command line: lab, status, endpoint listing, demo.

Owns: argument parsing (typer), presentation (rich tables, JSON output). Talks to agents over
their API (``weft.agent.client``); may import ``weft.lab`` to drive the lab. Never writes maps.
"""
