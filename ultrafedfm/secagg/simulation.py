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
from cryptography import x509

from ultrafedfm.secagg.client import SecAggClient
from ultrafedfm.secagg.identity import SiteIdentity
from ultrafedfm.secagg.messages import Message, from_bytes, to_bytes
from ultrafedfm.secagg.params import SecAggConfig
from ultrafedfm.secagg.server import AggregateResult, SecAggServer

_logger = logging.getLogger(__name__)

__all__ = ["RoundReport", "simulate_round", "wire"]


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
    identities: Mapping[str, SiteIdentity],
    root_ca: x509.Certificate,
    deltas: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    config: SecAggConfig,
    job_id: str = "simulated-job",
    round_number: int = 0,
    drop_before_sharing: Collection[str] = (),
    drop_before_input: Collection[str] = (),
    drop_before_unmask: Collection[str] = (),
    drop_after_check: Collection[str] = (),
) -> RoundReport:
    """Run every phase for ``identities`` (site name -> identity); raises as the protocol does.

    Sites in ``drop_before_unmask`` drop after their masked input (before the consistency check);
    those in ``drop_after_check`` after signing the survivor list, before answering the unmask request.
    """
    clients = {name: SecAggClient(identity=identity, root_ca=root_ca, job_id=job_id, round_number=round_number,
                                  config=config) for name, identity in sorted(identities.items())}
    server = SecAggServer(root_ca=root_ca, job_id=job_id, round_number=round_number, config=config)
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
        masked = clients[name].mask_input(wire(delivery), delta=deltas[name], weight=weights[name])
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
