"""The aggregation interface, the vetting every site reply goes through, and the job's choice of strategy."""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np

from ultrafedfm.federation.exchange import SiteReply
from ultrafedfm.federation.job_spec import JobSpec
from ultrafedfm.federation.wire import SECAGG_KEY

if TYPE_CHECKING:
    from ultrafedfm.federation.rounds import RoundContext
    from ultrafedfm.secagg import Membership

_logger = logging.getLogger(__name__)

__all__ = ["Aggregation", "make_aggregation", "vet_delta", "vet_protocol_reply", "vet_update_meta"]


class Aggregation(ABC):
    """One round's strategy: which tasks go to the sites, and how their answers become the global update.

    :meth:`run_round` asks the sites through ``ctx.ask`` and ends with ``ctx.apply(mean_delta, ...)``
    or ``ctx.skip(reason)``; it never raises for a site's failure (the site is dropped).
    """

    name: str = "aggregation"

    @abstractmethod
    def run_round(self, ctx: "RoundContext") -> None:
        """Run one round's phases over ``ctx``."""


def vet_protocol_reply(reply: SiteReply) -> str | None:
    """Why a secure-aggregation reply carries more than its one protocol message, or ``None``.

    Only the masked payload (or a protocol message) may leave a site: a reply with any other
    parameter, any metric or any meta value of the site's own is refused, so that nothing per
    site can reach the server's records beside the mask. (The transport's own fields -- FLARE's
    client name, job id, round -- are removed by the adapter before the reply gets here.)
    """
    params = reply.params or {}
    extra = sorted(set(params) - {SECAGG_KEY})
    if extra:
        return (f"the reply carries {extra[:3]} beside the secure-aggregation message; only masked values may "
                "leave a site")
    if SECAGG_KEY not in params:
        return "the reply carries no secure-aggregation message"
    if reply.metrics:
        return (f"the reply carries metrics {sorted(reply.metrics)[:3]} in the clear; only masked values may leave "
                "a site")
    if reply.meta:
        return f"the reply carries {sorted(reply.meta)[:3]} in the clear; only masked values may leave a site"
    return None


def vet_update_meta(reply: SiteReply) -> str | None:
    """Why a plain training reply's bookkeeping (image count, steps, loss) is unusable, or ``None``."""
    num_samples = reply.meta.get("num_samples")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        return f"missing or invalid num_samples: {num_samples!r}"
    steps = reply.meta.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        return f"missing or invalid steps: {steps!r}"
    loss = (reply.metrics or {}).get("loss")
    if loss is None:
        return "no loss in the metrics"
    if not np.isfinite(float(loss)):
        return f"non-finite loss {loss!r}"
    return None


def vet_delta(reply: SiteReply, global_params: Mapping[str, np.ndarray]) -> str | None:
    """Why a plain (unmasked) update cannot be aggregated, or ``None`` when it can."""
    if not reply.is_delta:
        return "expected a delta (ParamsType.DIFF)"
    problem = vet_update_meta(reply)
    if problem:
        return problem
    params = reply.params or {}
    if set(params) != set(global_params):
        return f"delta has {len(params)} entries, the global model {len(global_params)}"
    for name, value in params.items():
        value = np.asarray(value)
        if value.shape != np.shape(global_params[name]):
            return f"delta '{name}' has shape {value.shape}, expected {np.shape(global_params[name])}"
        if not np.all(np.isfinite(value)):
            return f"delta '{name}' has non-finite values"
    return None


def make_aggregation(job: JobSpec, *, members: Callable[[], "Membership"]) -> Aggregation:
    """The job's strategy; ``members`` loads the consortium's member list (re-read every round)."""
    from ultrafedfm.federation.aggregation.fedavg import PlainFedAvg
    from ultrafedfm.federation.aggregation.secure import SecureAggregation

    if job.secure_aggregation:
        return SecureAggregation(config=job.secagg_config(), members=members)
    return PlainFedAvg()
