"""Drive one secure-aggregation round in one process: the reference for adapters, tests and benchmarks.

Every message goes through :func:`~ultrafedfm.secagg.messages.to_bytes` and back, as it would
over the wire, and sites can be made to drop at any phase. Masked inputs are handed to the
server one at a time, so memory stays at one vector per site's delta plus the server's sum.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Collection, Mapping

import numpy as np

from ultrafedfm.secagg.client import SecAggClient
from ultrafedfm.secagg.context import RoundContext
from ultrafedfm.secagg.contribution import ContributionLedger
from ultrafedfm.secagg.figures import RoundFigures
from ultrafedfm.secagg.membership import Membership
from ultrafedfm.secagg.messages import Message, from_bytes, to_bytes
from ultrafedfm.secagg.params import SecAggConfig
from ultrafedfm.secagg.server import AggregateResult, SecAggServer
from ultrafedfm.secagg.signing import SiteSigningKey

_logger = logging.getLogger(__name__)

__all__ = ["SIMULATED_CONTEXT", "RoundReport", "simulate_round", "wire"]

# A round context for simulations that have no real model (the hash of nothing in particular).
SIMULATED_CONTEXT = RoundContext(model_sha256="0" * 64, lr=0.0, training={"simulated": True})


@dataclass
class RoundReport:
    """Outcome of a simulated round and the bytes each site sent, per phase."""

    result: AggregateResult
    bytes_sent: dict[str, Counter] = field(default_factory=dict)


def wire(message: Message, counter: Counter | None = None) -> Message:
    """Serialise and parse ``message`` (as the network would), counting its bytes under its phase."""
    data = to_bytes(message)
    if counter is not None:
        counter[message.phase.value] += len(data)
    return from_bytes(data)


def simulate_round(
    *,
    signers: Mapping[str, SiteSigningKey],
    members: Membership,
    deltas: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    config: SecAggConfig,
    figures: Mapping[str, RoundFigures] | None = None,
    context: RoundContext = SIMULATED_CONTEXT,
    ledgers: Mapping[str, ContributionLedger] | None = None,
    min_sites: int = 3,
    job_id: str = "simulated-job",
    round_number: int = 0,
    drop_before_sharing: Collection[str] = (),
    drop_before_input: Collection[str] = (),
    drop_before_unmask: Collection[str] = (),
    drop_after_check: Collection[str] = (),
) -> RoundReport:
    """Run every phase for the sites in ``signers`` (site name -> its signing key); raises as the protocol does.

    ``figures`` default to loss 0, 1 step and ``round(weight)`` images per site; ``ledgers`` to an
    in-memory ledger per site; ``min_sites`` is every site's own floor. Sites in
    ``drop_before_unmask`` drop after their masked input (before the consistency check); those in
    ``drop_after_check`` after signing the survivor list, before answering the unmask request.
    """
    ledgers = ledgers or {name: ContributionLedger.in_memory() for name in signers}
    clients = {name: SecAggClient(signer=signer, members=members, job_id=job_id, round_number=round_number,
                                  config=config, context=context, ledger=ledgers[name], min_sites=min_sites)
               for name, signer in sorted(signers.items())}
    server = SecAggServer(members=members, job_id=job_id, round_number=round_number, config=config, context=context)
    sent = {name: Counter() for name in clients}

    for name, client in clients.items():
        server.receive_advertisement(wire(client.advertise_keys(), sent[name]))
    roster = server.key_roster()
    for name, client in clients.items():
        shares = client.share_keys(wire(roster))
        if name not in drop_before_sharing:
            server.receive_encrypted_shares(wire(shares, sent[name]))
    deliveries = server.share_deliveries()
    for name, delivery in deliveries.items():
        if name in drop_before_input:
            continue
        own = (figures or {}).get(name) or RoundFigures(loss=0.0, steps=1, num_samples=round(weights[name]))
        masked = clients[name].mask_input(wire(delivery), delta=deltas[name], weight=weights[name], figures=own,
                                          trained_with=context)
        server.receive_masked_input(wire(masked, sent[name]))
        del masked
    if config.consistency_check:
        survivor_list = server.survivor_list()
        for name in survivor_list.survivors:
            if name not in drop_before_unmask:
                server.receive_survivor_signature(wire(clients[name].sign_survivors(wire(survivor_list)), sent[name]))
    request = server.unmask_request()
    for name in request.survivors:
        if name not in drop_before_unmask and name not in drop_after_check:
            server.receive_unmask_response(wire(clients[name].unmask(wire(request)), sent[name]))
    return RoundReport(result=server.aggregate(), bytes_sent=sent)
