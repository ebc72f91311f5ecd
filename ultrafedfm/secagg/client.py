"""Site side of one secure-aggregation round (Bonawitz et al., CCS 2017; see docs/secure-aggregation.md).

A pure message-in/message-out state machine; the caller (a FLARE executor, a test) moves the
messages. One object per site per round::

    client = SecAggClient(signer=key, members=membership, job_id="job-1", round_number=3, config=cfg,
                          context=announced, ledger=ledger, min_sites=3)
    advert = client.advertise_keys()                           # -> server
    shares = client.share_keys(roster)                         # roster <- server; shares -> server
    client.check_task_context(received)                        # the training task brought the announced model
    masked = client.mask_input(delivery, delta=d, weight=w, figures=f, trained_with=received)  # -> server
    signed = client.sign_survivors(survivor_list)              # list <- server; signature -> server
    answer = client.unmask(request)                            # request <- server; answer -> server

The site never sends its delta, loss or counts in the clear; accepts keys only from members of
its pinned member list, signed with their own site keys; takes the threshold and the smallest
roster from the consortium's size and its own floor, not from the server; signs the round
context (model, lr, settings) so that peers trained from the same model; for each peer reveals
either the share of its self-mask seed (the peer's input arrived) or of its mask key (the peer
dropped), never both; and, through its :class:`ContributionLedger`, helps unmask at most one
sum per global model.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ultrafedfm.secagg.context import RoundContext
from ultrafedfm.secagg.contribution import ContributionLedger
from ultrafedfm.secagg.errors import (
    AuthenticationError, ContributionRefused, IdentityError, ProtocolError, RoundAborted, ShareRequestRefused,
)
from ultrafedfm.secagg.figures import FIGURE_SLOTS, RoundFigures, encode_figures
from ultrafedfm.secagg.masks import (
    CHUNK_ELEMENTS, MaskStream, agree, apply_streams, derive_key, length_prefixed, pair_sign,
)
from ultrafedfm.secagg.membership import Membership
from ultrafedfm.secagg.messages import (
    SERVER, AdvertiseKeys, EncryptedShares, KeyRoster, MaskedInput, ShareDelivery, SurvivorList, SurvivorSignature,
    UnmaskRequest, UnmaskResponse, check_envelope, roster_payload, survivors_payload,
)
from ultrafedfm.secagg.params import SecAggConfig
from ultrafedfm.secagg.quantize import StochasticEncoder, ring_dtype
from ultrafedfm.secagg.shamir import SHARE_BYTES, Share, split_secret
from ultrafedfm.secagg.signing import SiteSigningKey, key_fingerprint

_logger = logging.getLogger(__name__)

__all__ = ["SecAggClient", "share_associated_data", "verify_advertisement", "verify_roster"]

_SEED_BYTES = 32
_RAW = serialization.Encoding.Raw


def share_associated_data(*, sender: str, receiver: str, job_id: str, round_number: int) -> bytes:
    """AES-GCM associated data of a share ciphertext: binds sender, receiver, job and round."""
    fields = [b"ultrafedfm-secagg/v2/shares", sender.encode(), receiver.encode(), job_id.encode(),
              round_number.to_bytes(8, "big")]
    return length_prefixed(*fields)


def verify_roster(roster: KeyRoster, *, members: Membership, job_id: str, round_number: int,
                  context: bytes) -> dict[str, AdvertiseKeys]:
    """Check every advertisement in ``roster``: a member site, signed with its pinned key over this job,
    round and round ``context`` digest; every public key distinct. Returns them by site."""
    check_envelope(roster, expected=KeyRoster, job_id=job_id, round_number=round_number, sender=SERVER)
    by_site: dict[str, AdvertiseKeys] = {}
    keys_seen: set[bytes] = set()
    for advert in roster.advertisements:
        check_envelope(advert, expected=AdvertiseKeys, job_id=job_id, round_number=round_number)
        if advert.sender in by_site:
            raise ProtocolError(f"site '{advert.sender}' appears twice in the key roster; refused")
        verify_advertisement(advert, members=members, context=context)
        for key in (advert.c_public, advert.s_public):
            if len(key) != 32 or key in keys_seen:
                raise ProtocolError(f"site '{advert.sender}' advertises a malformed or reused public key; refused")
            keys_seen.add(key)
        by_site[advert.sender] = advert
    return by_site


def verify_advertisement(advert: AdvertiseKeys, *, members: Membership, context: bytes) -> None:
    """One advertisement: from a member, signed with its pinned site key, over the same round context."""
    members.verify(advert.sender, advert.signed_payload(), advert.signature,
                   what=f"its round keys (job '{advert.job_id}', round {advert.round})")
    if advert.context != context:
        raise ContributionRefused(
            f"site '{advert.sender}' signed another round context than this party (another global model, lr, training "
            "or secure-aggregation settings, or member list): the server sent sites different rounds, or the sites' "
            "member lists differ (compare `ultrafedfm kit members` at each site); round refused")


class SecAggClient:
    """One site's state for one round. Methods must be called in protocol order, each once
    (``unmask`` may be repeated with a consistent request).

    Args:
        signer: the site's own signing key (its ``site`` is this site's name).
        members: the consortium's member list as this site verified and pinned it.
        job_id, round_number: the round; bound into every key, signature and ciphertext.
        config: the job's secure-aggregation settings, as the site's policy admitted them.
        context: the round context the server announced (model hash, lr, training settings).
        ledger: the site's durable contribution ledger (``ContributionLedger.open(path)``).
        min_sites: the site's own floor (``privacy.min_sites`` of its site.yaml); the site refuses
            rosters and survivor sets smaller than ``max(t, config.min_sites, min_sites)``.
    """

    def __init__(self, *, signer: SiteSigningKey, members: Membership, job_id: str, round_number: int,
                 config: SecAggConfig, context: RoundContext, ledger: ContributionLedger, min_sites: int = 3):
        if isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 2:
            raise ValueError(f"site '{signer.site}': min_sites={min_sites!r}; the site floor must be an integer >= 2 "
                             "(privacy.min_sites in site.yaml)")
        if signer.site not in members.names:
            raise IdentityError(f"site '{signer.site}' is not in the member list of '{members.consortium}' (version "
                                f"{members.version}); run `ultrafedfm kit enroll` and have the project admin enrol it")
        enrolled = members.key_of(signer.site)
        if enrolled != signer.public_key:
            raise IdentityError(
                f"site '{signer.site}': its signing key ({signer.fingerprint[:16]}...) is not the key the member list "
                f"(version {members.version}) enrols for it ({key_fingerprint(enrolled)[:16]}...); "
                "run `ultrafedfm kit enroll` and have the project admin enrol this key")
        self.signer = signer
        self.site = signer.site
        self.members = members
        self.job_id = job_id
        self.round = round_number
        self.config = config
        self.context = context
        self.ledger = ledger
        self._threshold = members.threshold(config)
        self._needed = members.minimum_sites(config, min_sites)
        self._context_digest = context.digest(config=config, membership_digest=members.digest)
        self._step = "start"
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self._roster: dict[str, AdvertiseKeys] = {}
        self._index: dict[str, int] = {}
        self._self_mask_seed = b""
        self._held: dict[str, tuple[Share, Share]] = {}  # peer -> (its b-share, its s_sk-share) for us
        self._revealed: dict[str, str] = {}  # peer -> "self_mask" | "mask_key"
        self._advert: AdvertiseKeys | None = None
        self._signed_list: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        # Coordinates of weight*delta the last mask_input clipped to [-clip, clip] (the site records it).
        self.clipped_coordinates: int | None = None

    @property
    def threshold(self) -> int:
        return self._threshold

    @property
    def minimum_sites(self) -> int:
        """Fewest sites this site accepts in the roster, key sharing and the survivor set."""
        return self._needed

    def _advance(self, expected: str, to: str) -> None:
        if self._step != expected:
            raise ProtocolError(f"site '{self.site}' round {self.round}: cannot do '{to}' after '{self._step}' "
                                f"(expected after '{expected}'); a replayed or out-of-order message is refused")
        self._step = to

    # -- phase 0 -------------------------------------------------------------------------------
    def advertise_keys(self) -> AdvertiseKeys:
        """Fresh X25519 public keys for this round and the round context, signed with the site's key."""
        self._advance("start", "advertise_keys")
        self.ledger.start_round(site=self.site, job_id=self.job_id, round_number=self.round,
                                model_sha256=self.context.model_sha256, context_digest=self._context_digest)
        c_public = self._c_key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
        s_public = self._s_key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
        unsigned = AdvertiseKeys(sender=self.site, job_id=self.job_id, round=self.round, c_public=c_public,
                                 s_public=s_public, context=self._context_digest, signature=b"")
        self._advert = dataclasses.replace(unsigned, signature=self.signer.sign(unsigned.signed_payload()))
        return self._advert

    # -- phase 1 -------------------------------------------------------------------------------
    def share_keys(self, roster: KeyRoster) -> EncryptedShares:
        """Verify every site's keys, then Shamir-share our self-mask seed and mask key to each peer."""
        self._advance("advertise_keys", "share_keys")
        roster_by_site = verify_roster(roster, members=self.members, job_id=self.job_id, round_number=self.round,
                                       context=self._context_digest)
        if roster_by_site.get(self.site) != self._advert:
            raise ProtocolError(f"the key roster does not carry site '{self.site}''s own keys unchanged; refused")
        n = len(roster_by_site)
        if n > self.config.max_sites:
            raise RoundAborted(f"{n} sites in the round exceed max_sites={self.config.max_sites}, for which the "
                               "ring overflow bound was checked; raise max_sites in the job's secagg config")
        if n < self._needed:
            raise RoundAborted(f"only {n} sites advertised keys; site '{self.site}' takes part only with at least "
                               f"{self._needed} (threshold t={self._threshold} of {self.members.size} member sites, "
                               f"min_sites={self.config.min_sites}, the site's own floor)")
        self.ledger.check_reachable(site=self.site, model_sha256=self.context.model_sha256,
                                    available=roster_by_site, where="the key roster")
        self._roster = roster_by_site
        self._index = {name: i + 1 for i, name in enumerate(sorted(roster_by_site))}
        self._self_mask_seed = os.urandom(_SEED_BYTES)
        s_private = self._s_key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        b_shares = split_secret(self._self_mask_seed, threshold=self._threshold, num_shares=n)
        s_shares = split_secret(s_private, threshold=self._threshold, num_shares=n)
        ciphertexts = {}
        for peer, x in self._index.items():
            b_share, s_share = b_shares[x - 1], s_shares[x - 1]
            if peer == self.site:
                self._held[peer] = (b_share, s_share)
                continue
            key = self._share_key(peer)
            nonce = os.urandom(12)
            ad = share_associated_data(sender=self.site, receiver=peer, job_id=self.job_id, round_number=self.round)
            ciphertexts[peer] = nonce + AESGCM(key).encrypt(nonce, b_share.to_bytes() + s_share.to_bytes(), ad)
        attest = roster_payload(site=self.site, job_id=self.job_id, round_number=self.round,
                                advertisements=tuple(roster_by_site.values()))
        return EncryptedShares(sender=self.site, job_id=self.job_id, round=self.round, ciphertexts=ciphertexts,
                               roster_signature=self.signer.sign(attest))

    def _share_key(self, peer: str) -> bytes:
        secret = agree(self._c_key, self._roster[peer].c_public)
        return derive_key(secret, purpose="share-encryption", job_id=self.job_id, round_number=self.round,
                          sites=[self.site, peer])

    # -- phase 2 -------------------------------------------------------------------------------
    def check_task_context(self, received: RoundContext) -> None:
        """Refuse a training task whose model, lr or settings differ from the announced (signed) context.

        Call it before training, with ``RoundContext(model_sha256=model_digest(weights received), lr=...,
        training=...)`` of the training task; :meth:`mask_input` checks it again.
        """
        if received != self.context:
            raise ContributionRefused(
                f"site '{self.site}' round {self.round}: the training task brings {received.describe()}, but the "
                f"round announced (and every site signed) {self.context.describe()} or other training settings: the "
                "server sends this site another model or settings than its peers; nothing is sent")

    def mask_input(self, delivery: ShareDelivery, *, delta: np.ndarray, weight: float, figures: RoundFigures,
                   trained_with: RoundContext) -> MaskedInput:
        """Decrypt the peers' shares, then return q(w * delta) || figure slots, plus all masks.

        ``delta`` is the flat float update (any float dtype); ``weight`` the FedAvg weight (e.g.
        image count), at most ``config.max_weight``; ``figures`` the site's loss, steps and image
        count (they travel masked; see :mod:`ultrafedfm.secagg.figures`); ``trained_with`` the
        round context of the weights the site actually trained from.
        """
        self._advance("share_keys", "mask_input")
        self.check_task_context(trained_with)
        check_envelope(delivery, expected=ShareDelivery, job_id=self.job_id, round_number=self.round, sender=SERVER)
        if delivery.recipient != self.site:
            raise ProtocolError(f"share delivery addressed to '{delivery.recipient}' reached '{self.site}'; refused")
        unknown = sorted(set(delivery.ciphertexts) - set(self._roster) | ({self.site} & set(delivery.ciphertexts)))
        if unknown:
            raise ProtocolError(f"share delivery carries ciphertexts from {unknown}, not peers of the roster; refused")
        peers = sorted(delivery.ciphertexts)
        if len(peers) + 1 < self._needed:
            raise RoundAborted(f"only {len(peers) + 1} sites completed key sharing; {self._needed} needed; "
                               f"site '{self.site}' does not send its input")
        self.ledger.check_reachable(site=self.site, model_sha256=self.context.model_sha256,
                                    available=[*peers, self.site], where="the sites that shared keys")
        if set(delivery.roster_signatures) != set(peers):
            raise ProtocolError(f"share delivery to '{self.site}' lacks the roster signatures of "
                                f"{sorted(set(peers) - set(delivery.roster_signatures))}; refused")
        for peer in peers:
            self._check_same_roster(peer, delivery.roster_signatures[peer])
            self._held[peer] = self._decrypt_shares(peer, delivery.ciphertexts[peer])

        delta = np.asarray(delta).reshape(-1)
        d = delta.shape[0]
        w = self._normalised_weight(weight)
        cfg = self.config
        tail = encode_figures(site=self.site, weight=w, figures=figures, config=cfg)
        masked = np.empty(d + FIGURE_SLOTS, dtype=ring_dtype(cfg.ring_bits))
        encoder = StochasticEncoder(clip=cfg.clip, frac_bits=cfg.frac_bits, chunk_elements=CHUNK_ELEMENTS)
        clipped = 0

        def quantize_chunk(start: int, stop: int) -> None:
            nonlocal clipped
            stop_delta = min(stop, d)
            if start < stop_delta:
                try:
                    clipped += encoder.encode_into(delta[start:stop_delta], masked[start:stop_delta], multiplier=w)
                except ValueError as exc:
                    raise ValueError(f"site '{self.site}': the delta has non-finite values in [{start}, {stop_delta}); "
                                     "nothing was sent (fix the local training, e.g. a diverged loss)") from exc
            if stop > d:  # (part of) the figure slots lie in this chunk
                first = max(start, d)
                masked[first:stop] = tail[first - d:stop - d]

        streams = [MaskStream(self._self_mask_key(), sign=1, prg=cfg.prg)]
        for peer in peers:
            secret = agree(self._s_key, self._roster[peer].s_public)
            key = derive_key(secret, purpose="pairwise-mask", job_id=self.job_id, round_number=self.round,
                             sites=[self.site, peer])
            streams.append(MaskStream(key, sign=pair_sign(self.site, peer), prg=cfg.prg))
        apply_streams(masked, streams, before_chunk=quantize_chunk, description=f"secagg mask {self.site}")
        if clipped:
            _logger.warning("site %s: %d of %d coordinates of weight*delta exceeded clip=%g and were clipped; "
                            "raise secagg clip if this is frequent", self.site, clipped, d, cfg.clip)
        self.clipped_coordinates = clipped
        self._self_mask_seed = b""  # its shares are with the peers now
        self.ledger.record_masked_input(job_id=self.job_id, round_number=self.round)
        return MaskedInput(sender=self.site, job_id=self.job_id, round=self.round, masked=masked)

    def _check_same_roster(self, peer: str, signature: bytes) -> None:
        # A peer that saw another roster (another set of sites or keys) would share with another
        # threshold and positions; a server showing different rosters could isolate one site.
        payload = roster_payload(site=peer, job_id=self.job_id, round_number=self.round,
                                 advertisements=tuple(self._roster.values()))
        try:
            self.members.verify(peer, payload, signature, what="the key roster")
        except IdentityError as exc:
            raise IdentityError(f"site '{peer}' did not sign the key roster that '{self.site}' saw (the server showed "
                                f"sites different rosters, or altered the signature); round refused: {exc}") from exc

    def _normalised_weight(self, weight: float) -> float:
        if not (math.isfinite(weight) and 0 <= weight <= self.config.max_weight):
            raise ValueError(f"site '{self.site}': FedAvg weight {weight} must be in [0, max_weight="
                             f"{self.config.max_weight}]; raise secagg max_weight in the job config")
        return weight / self.config.max_weight

    def _self_mask_key(self) -> bytes:
        return derive_key(self._self_mask_seed, purpose="self-mask", job_id=self.job_id, round_number=self.round,
                          sites=[self.site])

    def _decrypt_shares(self, peer: str, ciphertext: bytes) -> tuple[Share, Share]:
        ad = share_associated_data(sender=peer, receiver=self.site, job_id=self.job_id, round_number=self.round)
        try:
            plain = AESGCM(self._share_key(peer)).decrypt(ciphertext[:12], ciphertext[12:], ad)
        except (InvalidTag, ValueError) as exc:
            raise AuthenticationError(
                f"encrypted shares from site '{peer}' to '{self.site}' (job {self.job_id}, round {self.round}) failed "
                "AES-GCM authentication: tampered with, replayed from another round, or misaddressed; round refused",
                sender=peer) from exc
        if len(plain) != 2 * SHARE_BYTES:
            raise ProtocolError(f"shares from site '{peer}' have length {len(plain)}, expected {2 * SHARE_BYTES}")
        b_share, s_share = Share.from_bytes(plain[:SHARE_BYTES]), Share.from_bytes(plain[SHARE_BYTES:])
        if b_share.x != self._index[self.site] or s_share.x != self._index[self.site]:
            raise ProtocolError(f"shares from site '{peer}' are for another position than '{self.site}''s")
        return b_share, s_share

    def _check_survivor_list(self, survivors_listed: tuple[str, ...], dropped_listed: tuple[str, ...]) -> None:
        survivors, dropped = set(survivors_listed), set(dropped_listed)
        for peer in sorted(survivors & dropped):
            raise ShareRequestRefused(f"server asked site '{self.site}' for both shares of site '{peer}' (listed as "
                                      "survivor and dropped); that would reveal its update; refused", peer=peer)
        if survivors | dropped != set(self._held) or len(survivors) != len(survivors_listed):
            raise ProtocolError(f"survivor list names {sorted(survivors | dropped)}, but the sites that shared keys "
                                f"with '{self.site}' are {sorted(self._held)}; refused")
        if self.site not in survivors:
            raise ProtocolError(f"survivor list names site '{self.site}' as dropped, but it sent its input; refused")
        if len(survivors) < self._needed:
            raise RoundAborted(f"only {len(survivors)} masked inputs; site '{self.site}' unmasks only with at least "
                               f"{self._needed} (threshold t={self._threshold} of {self.members.size} member sites, "
                               f"min_sites={self.config.min_sites}, the site's own floor)")

    # -- phase 3 (consistency check, Bonawitz et al. round 3) ------------------------------------
    def sign_survivors(self, survivor_list: SurvivorList) -> SurvivorSignature:
        """Sign the survivor list; a site signs one list per round, so at most one list gathers t signatures."""
        if self._step not in ("mask_input", "consistency_check"):
            raise ProtocolError(f"site '{self.site}' round {self.round}: survivor list before masked input, or after "
                                "unmasking; refused")
        check_envelope(survivor_list, expected=SurvivorList, job_id=self.job_id, round_number=self.round,
                       sender=SERVER)
        listed = (tuple(sorted(survivor_list.survivors)), tuple(sorted(survivor_list.dropped)))
        if self._signed_list is not None and self._signed_list != listed:
            raise ProtocolError(f"server showed site '{self.site}' a second, different survivor list in round "
                                f"{self.round}; refused (a server must show every site the same list)")
        self._check_survivor_list(*listed)
        self.ledger.check_survivors(site=self.site, model_sha256=self.context.model_sha256, survivors=listed[0])
        self._step = "consistency_check"
        self._signed_list = listed
        payload = survivors_payload(site=self.site, job_id=self.job_id, round_number=self.round,
                                    survivors=listed[0], dropped=listed[1])
        return SurvivorSignature(sender=self.site, job_id=self.job_id, round=self.round,
                                 signature=self.signer.sign(payload))

    def _check_attestations(self, request: UnmaskRequest) -> None:
        listed = (tuple(sorted(request.survivors)), tuple(sorted(request.dropped)))
        if self._signed_list != listed:
            raise ProtocolError(f"unmask request to '{self.site}' lists other survivors than the list it signed; "
                                "refused")
        signers = set(request.attestations) & set(request.survivors)
        if len(signers) < self._threshold:
            raise RoundAborted(f"only {len(signers)} survivors attested the survivor list; site '{self.site}' "
                               f"unmasks only when t={self._threshold} did")
        for signer in sorted(signers):
            payload = survivors_payload(site=signer, job_id=self.job_id, round_number=self.round,
                                        survivors=listed[0], dropped=listed[1])
            self.members.verify(signer, payload, request.attestations[signer], what="the survivor list")

    # -- phase 4 -------------------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal, per peer, the self-mask share (survivor) or the mask-key share (dropped), never both."""
        allowed = ("consistency_check", "unmask") if self.config.consistency_check else ("mask_input", "unmask")
        if self._step not in allowed:
            raise ProtocolError(f"site '{self.site}' round {self.round}: unmask request in step '{self._step}' "
                                f"(expected after {' or '.join(allowed)}); refused")
        check_envelope(request, expected=UnmaskRequest, job_id=self.job_id, round_number=self.round, sender=SERVER)
        self._check_survivor_list(request.survivors, request.dropped)
        if self.config.consistency_check:
            self._check_attestations(request)
        self._step = "unmask"
        survivors, dropped = set(request.survivors), set(request.dropped)
        for peer, kind in [(p, "self_mask") for p in survivors] + [(p, "mask_key") for p in dropped]:
            if self._revealed.get(peer, kind) != kind:
                raise ShareRequestRefused(
                    f"server asked site '{self.site}' for the {kind.replace('_', '-')} share of site '{peer}' after "
                    f"its {self._revealed[peer].replace('_', '-')} share; both would reveal its update; refused",
                    peer=peer)
        # Write-ahead: the survivor set is on disk before any share leaves.
        self.ledger.bind_survivors(site=self.site, model_sha256=self.context.model_sha256, job_id=self.job_id,
                                   round_number=self.round, survivors=survivors, dropped=dropped)
        for peer in survivors:
            self._revealed[peer] = "self_mask"
        for peer in dropped:
            self._revealed[peer] = "mask_key"
        return UnmaskResponse(
            sender=self.site, job_id=self.job_id, round=self.round,
            self_mask_shares={p: self._held[p][0].to_bytes() for p in sorted(survivors)},
            mask_key_shares={p: self._held[p][1].to_bytes() for p in sorted(dropped)},
        )
