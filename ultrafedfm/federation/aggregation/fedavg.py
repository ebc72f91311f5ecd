"""FedAvg in the clear: every site sends its delta, the server takes their sample-weighted mean.

Only for jobs with ``secure_aggregation: false`` (tests, benchmarks, a consortium that chooses
it); a site whose policy requires secure aggregation refuses such a job. The deltas and each
site's image count, steps and loss arrive in the clear (FedAvg needs the count); the server uses
them for this round's mean and keeps only the aggregates, as with secure aggregation.
"""
from __future__ import annotations

import logging

import numpy as np

from ultrafedfm.federation.aggregation.base import Aggregation, vet_delta
from ultrafedfm.federation.fedavg import weighted_mean_delta
from ultrafedfm.federation.rounds import RoundContext
from ultrafedfm.federation.tasks import TRAIN_TASK
from ultrafedfm.secagg.figures import AggregateFigures

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
        deltas, weights, losses, steps = {}, {}, {}, {}
        for site, reply in sorted(replies.items()):
            problem = vet_delta(reply, ctx.params)
            if problem:
                ctx.drop(site, TRAIN_TASK, problem)
                continue
            deltas[site], weights[site] = reply.params, int(reply.meta["num_samples"])
            losses[site], steps[site] = float(reply.metrics["loss"]), int(reply.meta["steps"])
            stats.bytes_received += sum(int(np.asarray(v).nbytes) for v in reply.params.values())
        stats.participants = sorted(deltas)
        if len(deltas) < ctx.job.min_sites:
            ctx.skip(f"only {len(deltas)} valid update(s), fewer than min_sites={ctx.job.min_sites}")
            return
        sites = sorted(deltas)
        mean = weighted_mean_delta([deltas[s] for s in sites], weights=[weights[s] for s in sites])
        total = sum(weights.values())
        # The same aggregates secure aggregation decodes from its sum; no site's own value is kept.
        figures = AggregateFigures(weight_sum=float(total), loss=sum(weights[s] * losses[s] for s in sites) / total,
                                   steps=sum(steps.values()), num_samples=total)
        ctx.apply(mean, participants=sites, figures=figures)
