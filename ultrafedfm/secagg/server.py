"""Server side of one secure-aggregation round: relays keys and shares, sums masked inputs, unmasks.

A pure message-in/message-out state machine (the caller decides when a phase closes, e.g.
on a timeout, which is how dropouts happen)::

    server = SecAggServer(members=membership, job_id="job-1", round_number=3, config=cfg, context=announced)
    for a in adverts: server.receive_advertisement(a)
    roster = server.key_roster()                      # -> every site
    for s in shares: server.receive_encrypted_shares(s)
    deliveries = server.share_deliveries()            # deliveries[site] -> that site
    for m in masked: server.receive_masked_input(m)   # checked, then summed; never stored one by one
    survivors = server.survivor_list()                # -> every survivor (consistency check)
    for s in signatures: server.receive_survivor_signature(s)
    request = server.unmask_request()                 # -> every survivor
    for r in answers: server.receive_unmask_response(r)
    result = server.aggregate()                       # sum of w * delta, sum of w, their ratio, figures

The server only ever holds the running sum of masked vectors; each site's input is checked
completely (:meth:`SecAggServer.check_masked_input`, which an adapter calls before it looks at
anything else in the reply) and only then added into the sum. It checks advertisements against
the same member list and round context as the sites, so a site with another member list or
settings is dropped at once instead of failing the round later.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ultrafedfm.secagg.client import verify_advertisement, verify_roster
from ultrafedfm.secagg.context import RoundContext
from ultrafedfm.secagg.errors import ProtocolError, RoundAborted
from ultrafedfm.secagg.figures import FIGURE_SLOTS, AggregateFigures, decode_figures
from ultrafedfm.secagg.membership import Membership
from ultrafedfm.secagg.masks import MaskStream, agree, apply_streams, derive_key, pair_sign
from ultrafedfm.secagg.messages import (
    SERVER, AdvertiseKeys, EncryptedShares, KeyRoster, MaskedInput, ShareDelivery, SurvivorList, SurvivorSignature,
    UnmaskRequest, UnmaskResponse, check_envelope, roster_payload, survivors_payload,
)
from ultrafedfm.secagg.params import SecAggConfig
from ultrafedfm.secagg.quantize import ring_dtype
from ultrafedfm.secagg.shamir import Share, ShamirError, combine_shares

_logger = logging.getLogger(__name__)

__all__ = ["AggregateResult", "SecAggServer"]

_DECODE_CHUNK = 1 << 16


@dataclass(frozen=True)
class AggregateResult:
    """The unmasked sum of a round: ``ring_sum`` = sum of q(w * delta) || figure slots over the survivors."""

    ring_sum: np.ndarray = field(repr=False)
    config: SecAggConfig
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    @property
    def frac_bits(self) -> int:
        return self.config.frac_bits

    @property
    def max_weight(self) -> float:
        return self.config.max_weight

    @property
    def vector_length(self) -> int:
        """Length of the delta (the ring sum has the figure slots after it)."""
        return self.ring_sum.shape[0] - FIGURE_SLOTS

    @property
    def figures(self) -> AggregateFigures:
        """Sum of weights, weighted mean loss, total steps and total images of the survivors."""
        return decode_figures(self.ring_sum[self.vector_length:], config=self.config)

    @property
    def weight_sum(self) -> float:
        """Sum of the survivors' FedAvg weights (in the sites' units, e.g. images)."""
        return self.figures.weight_sum

    @property
    def loss(self) -> float:
        """sum(w * loss) / sum(w) over the survivors (nan if the weights sum to zero)."""
        return self.figures.loss

    def weighted_delta_sum(self) -> np.ndarray:
        """sum_i w_i * delta_i as float64 (within len(survivors) * 2^-frac_bits * max_weight)."""
        d = self.vector_length
        signed = self.ring_sum[:d].view(np.int32 if self.ring_sum.dtype == np.uint32 else np.int64)
        return signed.astype(np.float64) * (self.max_weight / 2.0**self.frac_bits)

    def mean_delta(self, dtype: np.dtype = np.float32) -> np.ndarray:
        """Weighted FedAvg delta sum(w * delta) / sum(w), decoded chunk by chunk."""
        total = self.weight_sum
        if total <= 0:
            raise RoundAborted("the survivors' weights sum to zero; there is no weighted mean to apply")
        d = self.vector_length
        signed = self.ring_sum[:d].view(np.int32 if self.ring_sum.dtype == np.uint32 else np.int64)
        out = np.empty(d, dtype=dtype)
        scale = np.float64(self.max_weight / total / 2.0**self.frac_bits)
        for start in range(0, d, _DECODE_CHUNK):
            stop = min(start + _DECODE_CHUNK, d)
            # one pass per chunk: int -> float64 product -> cast to the output dtype
            np.multiply(signed[start:stop], scale, out=out[start:stop], dtype=np.float64, casting="same_kind")
        return out


class SecAggServer:
    """The aggregation server's state for one round.

    Args:
        members: the consortium's member list from the server's kit (the same file the sites hold).
        job_id, round_number: the round.
        config: the job's secure-aggregation settings.
        context: the round context announced to the sites (model hash, lr, training settings).
        vector_length: length of the flat delta, if known (else taken from the first valid input).
    """

    def __init__(self, *, members: Membership, job_id: str, round_number: int, config: SecAggConfig,
                 context: RoundContext, vector_length: int | None = None):
        self.members = members
        self.job_id = job_id
        self.round = round_number
        self.config = config
        self.context = context
        self.vector_length = vector_length  # of the delta; the ring vector has FIGURE_SLOTS more
        self._context_digest = context.digest(config=config, membership_digest=members.digest)
        self._step = "advertise_keys"
        self._adverts: dict[str, AdvertiseKeys] = {}
        self._index: dict[str, int] = {}
        self._threshold = members.threshold(config)
        self._needed = members.minimum_sites(config)
        self._shares: dict[str, EncryptedShares] = {}
        self._sharing_sites: tuple[str, ...] = ()
        self._sum: np.ndarray | None = None
        self._survivors: list[str] = []
        self._request: UnmaskRequest | None = None
        self._responses: dict[str, UnmaskResponse] = {}
        self._survivor_list: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self._attestations: dict[str, bytes] = {}

    def _expect_step(self, step: str, what: str) -> None:
        if self._step != step:
            raise ProtocolError(f"round {self.round}: {what} arrived in phase '{self._step}', it belongs to "
                                f"'{step}'; refused (late, replayed or out of order)")

    def _refuse_duplicate(self, seen: dict, sender: str, what: str) -> None:
        if sender in seen:
            raise ProtocolError(f"second {what} from site '{sender}' in round {self.round}; refused as a replay")

    @property
    def threshold(self) -> int:
        return self._threshold

    # -- phase 0 -------------------------------------------------------------------------------
    def receive_advertisement(self, message: AdvertiseKeys) -> None:
        self._expect_step("advertise_keys", "an advertisement")
        check_envelope(message, expected=AdvertiseKeys, job_id=self.job_id, round_number=self.round)
        self._refuse_duplicate(self._adverts, message.sender, "key advertisement")
        verify_advertisement(message, members=self.members, context=self._context_digest)
        self._adverts[message.sender] = message

    def key_roster(self) -> KeyRoster:
        """Close phase 0: the signed set of keys every site gets."""
        self._expect_step("advertise_keys", "closing key advertisement")
        n = len(self._adverts)
        if n < self._needed:
            raise RoundAborted(f"only {n} sites advertised keys in round {self.round}; {self._needed} needed "
                               f"(threshold t={self._threshold} of {self.members.size} member sites, min_sites="
                               f"{self.config.min_sites}); nothing was sent by any site")
        if n > self.config.max_sites:
            raise RoundAborted(f"{n} sites exceed max_sites={self.config.max_sites} (the ring overflow bound); "
                               "raise max_sites in the job's secagg config")
        roster = KeyRoster(sender=SERVER, job_id=self.job_id, round=self.round,
                           advertisements=tuple(self._adverts[s] for s in sorted(self._adverts)))
        verify_roster(roster, members=self.members, job_id=self.job_id, round_number=self.round,
                      context=self._context_digest)
        self._index = {name: i + 1 for i, name in enumerate(sorted(self._adverts))}
        self._step = "share_keys"
        return roster

    # -- phase 1 -------------------------------------------------------------------------------
    def receive_encrypted_shares(self, message: EncryptedShares) -> None:
        self._expect_step("share_keys", "encrypted shares")
        check_envelope(message, expected=EncryptedShares, job_id=self.job_id, round_number=self.round)
        if message.sender not in self._adverts:
            raise ProtocolError(f"encrypted shares from '{message.sender}', which did not advertise keys; refused")
        self._refuse_duplicate(self._shares, message.sender, "set of encrypted shares")
        expected = set(self._adverts) - {message.sender}
        if set(message.ciphertexts) != expected:
            raise ProtocolError(f"site '{message.sender}' sent shares for {sorted(message.ciphertexts)}, "
                                f"expected one for each of {sorted(expected)}; refused")
        self.members.verify(message.sender, roster_payload(site=message.sender, job_id=self.job_id,
                                                           round_number=self.round,
                                                           advertisements=tuple(self._adverts.values())),
                            message.roster_signature, what="the key roster")
        self._shares[message.sender] = message

    def share_deliveries(self) -> dict[str, ShareDelivery]:
        """Close phase 1: for each site that shared (U2), the ciphertexts addressed to it."""
        self._expect_step("share_keys", "closing key sharing")
        sites = tuple(sorted(self._shares))
        self._check_enough(len(sites), "sites completed key sharing")
        self._sharing_sites = sites
        self._step = "masked_input"
        return {
            site: ShareDelivery(sender=SERVER, job_id=self.job_id, round=self.round, recipient=site,
                                ciphertexts={p: self._shares[p].ciphertexts[site] for p in sites if p != site},
                                roster_signatures={p: self._shares[p].roster_signature for p in sites if p != site})
            for site in sites
        }

    def _check_enough(self, count: int, what: str) -> None:
        if count < self._needed:
            raise RoundAborted(f"round {self.round} aborted: only {count} {what}; {self._needed} needed (threshold "
                               f"t={self._threshold} of {self.members.size} member sites, min_sites="
                               f"{self.config.min_sites}); no site's input was unmasked")

    # -- phase 2 -------------------------------------------------------------------------------
    def check_masked_input(self, message: MaskedInput) -> None:
        """Validate one site's masked input completely, without touching the sum.

        An adapter calls this first, then checks whatever else the reply carries, and only then
        :meth:`receive_masked_input`: a reply refused at any point never enters the sum (the site
        is then listed as dropped, and its pairwise masks are removed through its mask key).
        """
        self._expect_step("masked_input", "a masked input")
        check_envelope(message, expected=MaskedInput, job_id=self.job_id, round_number=self.round)
        if message.sender not in self._sharing_sites:
            raise ProtocolError(f"masked input from '{message.sender}', which did not complete key sharing; refused")
        if message.sender in self._survivors:
            raise ProtocolError(f"second masked input from site '{message.sender}' in round {self.round}; refused")
        vector = message.masked
        dtype = ring_dtype(self.config.ring_bits)
        if not isinstance(vector, np.ndarray) or vector.dtype != dtype or vector.ndim != 1:
            raise ProtocolError(f"masked input from '{message.sender}' is {getattr(vector, 'dtype', type(vector))}"
                                f"{list(getattr(vector, 'shape', []))}, expected a 1-D {np.dtype(dtype).name} vector")
        expected = None if self.vector_length is None else self.vector_length + FIGURE_SLOTS
        if vector.shape[0] <= FIGURE_SLOTS or (expected is not None and vector.shape[0] != expected):
            raise ProtocolError(f"masked input from '{message.sender}' has {vector.shape[0] - FIGURE_SLOTS} "
                                f"coordinates, expected {self.vector_length}; refused")

    def receive_masked_input(self, message: MaskedInput) -> None:
        """Check one site's masked vector (:meth:`check_masked_input`), then add it into the running sum."""
        self.check_masked_input(message)
        vector = message.masked
        if self.vector_length is None:
            self.vector_length = vector.shape[0] - FIGURE_SLOTS
        if self._sum is None:
            self._sum = np.array(vector, copy=True)
        else:
            np.add(self._sum, vector, out=self._sum)  # wraps modulo 2^b
        self._survivors.append(message.sender)

    def survivor_list(self) -> SurvivorList:
        """Close phase 2: survivors U3 (inputs in the sum) and dropped D = U2 minus U3, to be signed."""
        self._expect_step("masked_input", "closing masked input")
        if not self.config.consistency_check:
            raise ProtocolError("this job has consistency_check off: call unmask_request() after the masked inputs")
        self._survivor_list = self._close_masked_input()
        self._step = "consistency_check"
        return SurvivorList(sender=SERVER, job_id=self.job_id, round=self.round, survivors=self._survivor_list[0],
                            dropped=self._survivor_list[1])

    def _close_masked_input(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        self._check_enough(len(self._survivors), "masked inputs arrived")
        return (tuple(sorted(self._survivors)),
                tuple(s for s in self._sharing_sites if s not in self._survivors))

    def receive_survivor_signature(self, message: SurvivorSignature) -> None:
        self._expect_step("consistency_check", "a survivor-list signature")
        check_envelope(message, expected=SurvivorSignature, job_id=self.job_id, round_number=self.round)
        survivors, dropped = self._survivor_list
        if message.sender not in survivors:
            raise ProtocolError(f"survivor-list signature from '{message.sender}', not a survivor; refused")
        self._refuse_duplicate(self._attestations, message.sender, "survivor-list signature")
        self.members.verify(message.sender, survivors_payload(site=message.sender, job_id=self.job_id,
                                                              round_number=self.round, survivors=survivors,
                                                              dropped=dropped),
                            message.signature, what="the survivor list")
        self._attestations[message.sender] = message.signature

    def unmask_request(self) -> UnmaskRequest:
        """Close the consistency check (or phase 2 when it is off): what every survivor is asked to reveal."""
        if self.config.consistency_check:
            self._expect_step("consistency_check", "closing the consistency check")
            if len(self._attestations) < self._threshold:
                raise RoundAborted(f"round {self.round} aborted: {len(self._attestations)} survivors signed the "
                                   f"survivor list, threshold t={self._threshold}; nothing was revealed")
            survivors, dropped = self._survivor_list
        else:
            self._expect_step("masked_input", "closing masked input")
            survivors, dropped = self._close_masked_input()
        self._request = UnmaskRequest(sender=SERVER, job_id=self.job_id, round=self.round, survivors=survivors,
                                      dropped=dropped, attestations=dict(sorted(self._attestations.items())))
        self._step = "unmask"
        return self._request

    # -- phase 4 -------------------------------------------------------------------------------
    def receive_unmask_response(self, message: UnmaskResponse) -> None:
        self._expect_step("unmask", "an unmask response")
        check_envelope(message, expected=UnmaskResponse, job_id=self.job_id, round_number=self.round)
        assert self._request is not None
        if message.sender not in self._request.survivors:
            raise ProtocolError(f"unmask response from '{message.sender}', not a survivor of round {self.round}; "
                                "refused")
        self._refuse_duplicate(self._responses, message.sender, "unmask response")
        if (set(message.self_mask_shares) != set(self._request.survivors)
                or set(message.mask_key_shares) != set(self._request.dropped)):
            raise ProtocolError(f"unmask response from '{message.sender}' does not answer the request "
                                "(one share per survivor and per dropped site); refused")
        self._responses[message.sender] = message

    def aggregate(self) -> AggregateResult:
        """Reconstruct the survivors' self-mask seeds and dropped sites' mask keys, and remove the masks."""
        self._expect_step("unmask", "aggregation")
        assert self._request is not None and self._sum is not None
        responders = sorted(self._responses)
        if len(responders) < self._threshold:
            raise RoundAborted(
                f"round {self.round} aborted: {len(responders)} sites answered the unmask request, threshold "
                f"t={self._threshold}; the masks cannot be removed and nothing about any site was revealed")
        use = responders[: self._threshold]
        streams = []
        for site in self._request.survivors:
            seed = self._reconstruct(site, use, "self_mask_shares")
            key = derive_key(seed, purpose="self-mask", job_id=self.job_id, round_number=self.round, sites=[site])
            streams.append(MaskStream(key, sign=-1, prg=self.config.prg))
        for gone in self._request.dropped:
            secret = self._reconstruct(gone, use, "mask_key_shares")
            s_key = X25519PrivateKey.from_private_bytes(secret)
            public = s_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            if public != self._adverts[gone].s_public:
                raise RoundAborted(f"the mask key reconstructed for dropped site '{gone}' does not match its "
                                   "advertised key: a share was corrupted; round aborted")
            for site in self._request.survivors:
                key = derive_key(agree(s_key, self._adverts[site].s_public), purpose="pairwise-mask",
                                 job_id=self.job_id, round_number=self.round, sites=[site, gone])
                streams.append(MaskStream(key, sign=-pair_sign(site, gone), prg=self.config.prg))
        apply_streams(self._sum, streams, description="secagg unmask")
        self._step = "done"
        _logger.info("secagg round %d: aggregated %d sites (%d dropped after key sharing)", self.round,
                     len(self._request.survivors), len(self._request.dropped))
        return AggregateResult(ring_sum=self._sum, config=self.config, survivors=self._request.survivors,
                               dropped=self._request.dropped)

    def _reconstruct(self, owner: str, responders: list[str], kind: str) -> bytes:
        shares = []
        for responder in responders:
            share = Share.from_bytes(getattr(self._responses[responder], kind)[owner])
            if share.x != self._index[responder]:
                raise ProtocolError(f"site '{responder}' returned a share for position {share.x}, its position is "
                                    f"{self._index[responder]}; refused")
            shares.append(share)
        try:
            return combine_shares(shares, threshold=self._threshold, secret_bytes=32)
        except ShamirError as exc:
            raise RoundAborted(f"cannot reconstruct the {kind.replace('_shares', '')} of site '{owner}': {exc}") from exc
