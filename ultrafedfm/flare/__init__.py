"""Thin NVIDIA FLARE adapters, grouped by the process that loads them (the only package that imports nvflare).

- ``server/``: ``controller`` (a ``ModelController`` around ``ultrafedfm.federation.server.FederatedRun``),
  ``allow_list`` (only consortium sites may register) and ``reply_record`` (a result filter that
  writes down what each reply carries, for tests and audits), loaded by the FLARE server;
- ``site/``: ``client_script`` (the Client API loop around ``ultrafedfm.federation.site_session``),
  run by each site's FLARE client;
- ``deploy/``: ``job_builder`` (``FedJob`` folders under ``jobs/``), ``kit_builder`` (our files in
  every provisioned kit) and ``simulation`` (the FLARE simulator for the demo and tests);
- ``registry``: task names, component classes and the class allow-list.

See ARCHITECTURE.md and docs/federation.md.
"""
