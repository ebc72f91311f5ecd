"""Thin NVIDIA FLARE adapters for federated MAE pretraining.

``job_spec`` (every knob, no FLARE) -> ``job_builder`` (the FedJob, exported to ``jobs/``);
``workflow`` (server: rounds, FedAvg of deltas, run state, stats); ``client_script`` (site:
Client API loop around ``site_training``); ``simulation`` (the simulator for tests and the
demo). Secure aggregation: ``secagg_workflow`` (server phases), ``secagg_site`` (site phases
and the site's policy), ``secagg_wire`` (messages through FLARE), ``secagg_identity``
(kit certificates, or a simulation-only CA). See docs/federation.md and docs/secure-aggregation.md.
"""
