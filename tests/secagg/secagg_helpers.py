"""Helpers of the secure-aggregation tests: a consortium of sites with their own signing keys, clients for it."""
from __future__ import annotations

from dataclasses import dataclass

from ultrafedfm.secagg import (
    ContributionLedger, Membership, RoundContext, RoundFigures, SecAggClient, SecAggConfig, SiteSigningKey,
)

SITE_NAMES = [f"site-{i}" for i in range(1, 8)]
CONTEXT = RoundContext(model_sha256="ab" * 32, lr=1.5e-4, training={"local_steps": 4, "img_size": 32})


def figures(loss: float = 0.5, steps: int = 3, num_samples: int = 10) -> RoundFigures:
    return RoundFigures(loss=loss, steps=steps, num_samples=num_samples)


@dataclass
class Consortium:
    """Site signing keys; ``members(n)`` = the member list of the first n sites."""

    signers: dict[str, SiteSigningKey]
    name: str = "test-consortium"

    def members(self, n: int, *, version: int = 1) -> Membership:
        return Membership.of(self.name, version, {s: self.signers[s].public_key for s in SITE_NAMES[:n]})

    def first(self, n: int) -> dict[str, SiteSigningKey]:
        return {s: self.signers[s] for s in SITE_NAMES[:n]}


def make_clients(consortium: Consortium, n: int, *, config: SecAggConfig | None = None, job_id: str = "job-A",
                 round_number: int = 4, context: RoundContext = CONTEXT, members: Membership | None = None,
                 ledgers: dict[str, ContributionLedger] | None = None, min_sites: int = 3) -> dict[str, SecAggClient]:
    """Clients of the first ``n`` sites (members: the first ``n`` unless given; in-memory ledgers unless given)."""
    config = config or SecAggConfig()
    members = members or consortium.members(n)
    ledgers = ledgers if ledgers is not None else {}
    return {name: SecAggClient(signer=signer, members=members, job_id=job_id, round_number=round_number,
                               config=config, context=context,
                               ledger=ledgers.setdefault(name, ContributionLedger.in_memory()), min_sites=min_sites)
            for name, signer in consortium.first(n).items()}
