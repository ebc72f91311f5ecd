"""Thin NVIDIA FLARE adapters, grouped by the process that loads them (the only package that imports nvflare).

- ``server/``: ``controller`` (a ``ModelController`` around ``ultrafedfm.federation.server.FederatedRun``)
  and ``allow_list`` (only consortium sites may register), loaded by the FLARE server;
- ``site/``: ``client_script`` (the Client API loop around ``ultrafedfm.federation.site_session``),
  run by each site's FLARE client;
- ``deploy/``: ``job_builder`` (``FedJob`` folders under ``jobs/``), ``kit_builder`` (our files in
  every provisioned kit) and ``simulation`` (the FLARE simulator for the demo and tests);
- ``registry``: task names, component classes and the class allow-list.

See ARCHITECTURE.md and docs/federation.md.
"""
