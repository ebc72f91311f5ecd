"""Site side of one secure-aggregation round (Bonawitz et al., CCS 2017; see docs/secure-aggregation.md).

A pure message-in/message-out state machine; the caller (a FLARE executor, a test) moves the
messages. One object per site per round::

    client = SecAggClient(identity=site, root_ca=ca, job_id="job-1", round_number=3, config=cfg)
    advert = client.advertise_keys()                         # -> server
    shares = client.share_keys(roster)                       # roster <- server; shares -> server
    masked = client.mask_input(delivery, delta=d, weight=w)  # delivery <- server; masked -> server
    signed = client.sign_survivors(survivor_list)            # list <- server; signature -> server
    answer = client.unmask(request)                          # request <- server; answer -> server

The site never sends its delta in the clear, refuses keys not signed under the project's CA,
and for each peer reveals either the share of its self-mask seed (the peer's input arrived) or
the share of its mask key (the peer dropped), never both, whatever the server asks.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ultrafedfm.secagg.errors import (
    AuthenticationError, IdentityError, ProtocolError, RoundAborted, ShareRequestRefused,
)
from ultrafedfm.secagg.identity import SiteIdentity, verify_signed_by_site
from ultrafedfm.secagg.masks import (
    CHUNK_ELEMENTS, MaskStream, agree, apply_streams, derive_key, length_prefixed, pair_sign,
)
from ultrafedfm.secagg.messages import (
    SERVER, AdvertiseKeys, EncryptedShares, KeyRoster, MaskedInput, ShareDelivery, SurvivorList, SurvivorSignature,
    UnmaskRequest, UnmaskResponse, check_envelope, roster_payload, survivors_payload,
)
from ultrafedfm.secagg.params import SecAggConfig
from ultrafedfm.secagg.quantize import StochasticEncoder, quantize_into, ring_dtype
from ultrafedfm.secagg.shamir import SHARE_BYTES, Share, split_secret

_logger = logging.getLogger(__name__)

__all__ = ["SecAggClient", "share_associated_data", "verify_roster"]

_SEED_BYTES = 32
_RAW = serialization.Encoding.Raw


def share_associated_data(*, sender: str, receiver: str, job_id: str, round_number: int) -> bytes:
    """AES-GCM associated data of a share ciphertext: binds sender, receiver, job and round."""
    fields = [b"ultrafedfm-secagg/v1/shares", sender.encode(), receiver.encode(), job_id.encode(),
              round_number.to_bytes(8, "big")]
    return length_prefixed(*fields)


def verify_roster(roster: KeyRoster, *, root_ca: x509.Certificate, job_id: str, round_number: int) -> dict[str, AdvertiseKeys]:
    """Check every advertisement in ``roster`` (signature, CA chain, name, job, round, distinct keys)."""
    check_envelope(roster, expected=KeyRoster, job_id=job_id, round_number=round_number, sender=SERVER)
    by_site: dict[str, AdvertiseKeys] = {}
    keys_seen: set[bytes] = set()
    for advert in roster.advertisements:
        check_envelope(advert, expected=AdvertiseKeys, job_id=job_id, round_number=round_number)
        if advert.sender in by_site or advert.sender == SERVER:
            raise ProtocolError(f"site '{advert.sender}' appears twice in the key roster; refused")
        verify_signed_by_site(certificate_pem=advert.certificate_pem, data=advert.signed_payload(),
                              signature=advert.signature, site_name=advert.sender, root_ca=root_ca)
        for key in (advert.c_public, advert.s_public):
            if len(key) != 32 or key in keys_seen:
                raise ProtocolError(f"site '{advert.sender}' advertises a malformed or reused public key; refused")
            keys_seen.add(key)
        by_site[advert.sender] = advert
    return by_site


class SecAggClient:
    """One site's state for one round. Methods must be called in protocol order, each once
    (``unmask`` may be repeated with a consistent request)."""

    def __init__(self, *, identity: SiteIdentity, root_ca: x509.Certificate, job_id: str, round_number: int,
                 config: SecAggConfig):
        self.identity = identity
        self.site = identity.name
        self.root_ca = root_ca
        self.job_id = job_id
        self.round = round_number
        self.config = config
        self._step = "start"
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self._roster: dict[str, AdvertiseKeys] = {}
        self._index: dict[str, int] = {}
        self._threshold = 0
        self._self_mask_seed = b""
        self._held: dict[str, tuple[Share, Share]] = {}  # peer -> (its b-share, its s_sk-share) for us
        self._revealed: dict[str, str] = {}  # peer -> "self_mask" | "mask_key"
        self._advert: AdvertiseKeys | None = None
        self._signed_list: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    def _advance(self, expected: str, to: str) -> None:
        if self._step != expected:
            raise ProtocolError(f"site '{self.site}' round {self.round}: cannot do '{to}' after '{self._step}' "
                                f"(expected after '{expected}'); a replayed or out-of-order message is refused")
        self._step = to

    # -- phase 0 -------------------------------------------------------------------------------
    def advertise_keys(self) -> AdvertiseKeys:
        """Fresh X25519 public keys for this round, signed with the site's certificate key."""
        self._advance("start", "advertise_keys")
        c_public = self._c_key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
        s_public = self._s_key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
        unsigned = AdvertiseKeys(sender=self.site, job_id=self.job_id, round=self.round, c_public=c_public,
                                 s_public=s_public, certificate_pem=self.identity.certificate_pem, signature=b"")
        self._advert = dataclasses.replace(unsigned, signature=self.identity.sign(unsigned.signed_payload()))
        return self._advert

    # -- phase 1 -------------------------------------------------------------------------------
    def share_keys(self, roster: KeyRoster) -> EncryptedShares:
        """Verify every site's keys, then Shamir-share our self-mask seed and mask key to each peer."""
        self._advance("advertise_keys", "share_keys")
        roster_by_site = verify_roster(roster, root_ca=self.root_ca, job_id=self.job_id, round_number=self.round)
        if roster_by_site.get(self.site) != self._advert:
            raise ProtocolError(f"the key roster does not carry site '{self.site}''s own keys unchanged; refused")
        n = len(roster_by_site)
        if n > self.config.max_sites:
            raise RoundAborted(f"{n} sites in the round exceed max_sites={self.config.max_sites}, for which the "
                               "ring overflow bound was checked; raise max_sites in the job's secagg config")
        if n < self.config.min_sites:
            raise RoundAborted(f"only {n} sites advertised keys; at least min_sites={self.config.min_sites} needed")
        self._roster = roster_by_site
        self._index = {name: i + 1 for i, name in enumerate(sorted(roster_by_site))}
        self._threshold = self.config.threshold_for(n)
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
                               roster_signature=self.identity.sign(attest))

    def _share_key(self, peer: str) -> bytes:
        secret = agree(self._c_key, self._roster[peer].c_public)
        return derive_key(secret, purpose="share-encryption", job_id=self.job_id, round_number=self.round,
                          sites=[self.site, peer])

    # -- phase 2 -------------------------------------------------------------------------------
    def mask_input(self, delivery: ShareDelivery, *, delta: np.ndarray, weight: float) -> MaskedInput:
        """Decrypt the peers' shares, then return q(w * delta) || q(w) plus all masks.

        ``delta`` is the flat float update (any float dtype); ``weight`` the FedAvg weight
        (e.g. image count), at most ``config.max_weight``.
        """
        self._advance("share_keys", "mask_input")
        check_envelope(delivery, expected=ShareDelivery, job_id=self.job_id, round_number=self.round, sender=SERVER)
        if delivery.recipient != self.site:
            raise ProtocolError(f"share delivery addressed to '{delivery.recipient}' reached '{self.site}'; refused")
        unknown = sorted(set(delivery.ciphertexts) - set(self._roster) | ({self.site} & set(delivery.ciphertexts)))
        if unknown:
            raise ProtocolError(f"share delivery carries ciphertexts from {unknown}, not peers of the roster; refused")
        peers = sorted(delivery.ciphertexts)
        needed = max(self._threshold, self.config.min_sites)
        if len(peers) + 1 < needed:
            raise RoundAborted(f"only {len(peers) + 1} sites completed key sharing; {needed} needed; "
                               f"site '{self.site}' does not send its input")
        if set(delivery.roster_signatures) != set(peers):
            raise ProtocolError(f"share delivery to '{self.site}' lacks the roster signatures of "
                                f"{sorted(set(peers) - set(delivery.roster_signatures))}; refused")
        for peer in peers:
            self._check_same_roster(peer, delivery.roster_signatures[peer])
            self._held[peer] = self._decrypt_shares(peer, delivery.ciphertexts[peer])

        delta = np.asarray(delta).reshape(-1)
        w = self._normalised_weight(weight)
        masked = np.empty(delta.shape[0] + 1, dtype=ring_dtype(self.config.ring_bits))
        cfg = self.config
        encoder = StochasticEncoder(clip=cfg.clip, frac_bits=cfg.frac_bits, chunk_elements=CHUNK_ELEMENTS)
        clipped = 0

        def quantize_chunk(start: int, stop: int) -> None:
            nonlocal clipped
            stop_delta = min(stop, delta.shape[0])
            try:
                clipped += encoder.encode_into(delta[start:stop_delta], masked[start:stop_delta], multiplier=w)
            except ValueError as exc:
                raise ValueError(f"site '{self.site}': the delta has non-finite values in [{start}, {stop_delta}); "
                                 "nothing was sent (fix the local training, e.g. a diverged loss)") from exc
            if stop > delta.shape[0]:  # the weight slot at the end, w <= 1
                quantize_into(np.array([w]), masked[-1:], clip=1.0, frac_bits=cfg.frac_bits)

        streams = [MaskStream(self._self_mask_key(), sign=1, prg=cfg.prg)]
        s_private = self._s_key
        for peer in peers:
            secret = agree(s_private, self._roster[peer].s_public)
            key = derive_key(secret, purpose="pairwise-mask", job_id=self.job_id, round_number=self.round,
                             sites=[self.site, peer])
            streams.append(MaskStream(key, sign=pair_sign(self.site, peer), prg=cfg.prg))
        apply_streams(masked, streams, before_chunk=quantize_chunk, description=f"secagg mask {self.site}")
        if clipped:
            _logger.warning("site %s: %d of %d coordinates of weight*delta exceeded clip=%g and were clipped; "
                            "raise secagg clip if this is frequent", self.site, clipped, delta.shape[0], cfg.clip)
        self._self_mask_seed = b""  # its shares are with the peers now
        return MaskedInput(sender=self.site, job_id=self.job_id, round=self.round, masked=masked)

    def _check_same_roster(self, peer: str, signature: bytes) -> None:
        # A peer that saw another roster (another set of sites or keys) would share with another
        # threshold and positions; a server showing different rosters could isolate one site.
        payload = roster_payload(site=peer, job_id=self.job_id, round_number=self.round,
                                 advertisements=tuple(self._roster.values()))
        try:
            verify_signed_by_site(certificate_pem=self._roster[peer].certificate_pem, data=payload,
                                  signature=signature, site_name=peer, root_ca=self.root_ca)
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
        needed = max(self._threshold, self.config.min_sites)
        if len(survivors) < needed:
            raise RoundAborted(f"only {len(survivors)} masked inputs; site '{self.site}' unmasks only with at least "
                               f"{needed} (threshold t={self._threshold}, min_sites={self.config.min_sites})")

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
        self._step = "consistency_check"
        self._signed_list = listed
        payload = survivors_payload(site=self.site, job_id=self.job_id, round_number=self.round,
                                    survivors=listed[0], dropped=listed[1])
        return SurvivorSignature(sender=self.site, job_id=self.job_id, round=self.round,
                                 signature=self.identity.sign(payload))

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
            verify_signed_by_site(certificate_pem=self._roster[signer].certificate_pem, data=payload,
                                  signature=request.attestations[signer], site_name=signer, root_ca=self.root_ca)

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
        for peer in survivors:
            self._revealed[peer] = "self_mask"
        for peer in dropped:
            self._revealed[peer] = "mask_key"
        return UnmaskResponse(
            sender=self.site, job_id=self.job_id, round=self.round,
            self_mask_shares={p: self._held[p][0].to_bytes() for p in sorted(survivors)},
            mask_key_shares={p: self._held[p][1].to_bytes() for p in sorted(dropped)},
        )
