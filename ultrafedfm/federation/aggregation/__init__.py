"""How a round turns the sites' updates into one global update: an :class:`Aggregation` strategy.

The server's run (``federation.server.FederatedRun``) is given one strategy, the way FLARE's
own workflows are given an aggregator: :class:`PlainFedAvg` (deltas in the clear, for tests
and trusted settings) or :class:`SecureAggregation` (the server only ever holds the sum of
masked inputs; the default). :func:`make_aggregation` picks the job's.
"""
from ultrafedfm.federation.aggregation.base import Aggregation, make_aggregation, vet_delta
from ultrafedfm.federation.aggregation.fedavg import PlainFedAvg
from ultrafedfm.federation.aggregation.secure import SecureAggregation

__all__ = ["Aggregation", "PlainFedAvg", "SecureAggregation", "make_aggregation", "vet_delta"]
