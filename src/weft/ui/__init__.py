"""The live service map web UI (Hubble UI's kind): the pure service-map model built from flows
(:mod:`weft.ui.servicemap`: workloads grouped by namespace, edges with counts per verdict and drop
reasons, the DNS panel, the page's layout) and the aiohttp server with its single static page
(:mod:`weft.ui.server`). It reads flows only through a ``FlowSource`` (the relay's
``recent_flows``/``node_names``), so it never imports the relay, the agent or the datapath.

May import: types, observe, dnspython, aiohttp.
"""
