"""FedAvg in the clear: every site sends its delta, the server takes their sample-weighted mean.

Only for jobs with ``secure_aggregation: false`` (tests, benchmarks, a consortium that chooses
it); a site whose policy requires secure aggregation refuses such a job.
"""
from __future__ import annotations

import logging

import numpy as np

from ultrafedfm.federation.aggregation.base import Aggregation, vet_delta
from ultrafedfm.federation.fedavg import weighted_mean_delta
from ultrafedfm.federation.rounds import RoundContext
from ultrafedfm.federation.tasks import TRAIN_TASK

_logger = logging.getLogger(__name__)

__all__ = ["PlainFedAvg"]


class PlainFedAvg(Aggregation):
    """One ``train`` task; the mean of the valid deltas, applied with at least ``min_sites`` of them."""

    name = "fedavg"

    def run_round(self, ctx: RoundContext) -> None:
        stats = ctx.stats
        if not stats.targets:  # FLARE would read an empty target list as "all sites"
            ctx.skip("no site is connected")
            return
        replies = ctx.ask(TRAIN_TASK, stats.targets, ctx.params, timeout_s=ctx.job.round_timeout_s)
        deltas, weights = {}, {}
        for site, reply in sorted(replies.items()):
            problem = vet_delta(reply, ctx.params)
            if problem:
                ctx.drop(site, TRAIN_TASK, problem)
                continue
            deltas[site], weights[site] = reply.params, int(reply.meta["num_samples"])
            ctx.record_site(site, loss=float(reply.metrics["loss"]), num_samples=weights[site],
                            train_seconds=float(reply.metrics.get("train_seconds", 0.0)))
            stats.bytes_received += sum(int(np.asarray(v).nbytes) for v in reply.params.values())
        stats.participants = sorted(deltas)
        if len(deltas) < ctx.job.min_sites:
            ctx.skip(f"only {len(deltas)} valid update(s), fewer than min_sites={ctx.job.min_sites}")
            return
        sites = sorted(deltas)
        mean = weighted_mean_delta([deltas[s] for s in sites], weights=[weights[s] for s in sites])
        ctx.apply(mean, participants=sites)
