"""What the server (or a network attacker) cannot do: read one upload, tamper, replay, swap keys, unmask one site."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from secagg_helpers import CONTEXT, figures, make_clients
from scipy import stats

from ultrafedfm.secagg import (
    AuthenticationError, IdentityError, KeyRoster, ProtocolError, RoundAborted, SecAggConfig, SecAggServer,
    ShareDelivery, ShareRequestRefused, SiteSigningKey, SurvivorList, UnmaskRequest,
)
from ultrafedfm.secagg.client import share_associated_data
from ultrafedfm.secagg.figures import FIGURE_SLOTS
from ultrafedfm.secagg.masks import MaskStream, agree, apply_streams, derive_key, pair_sign
from ultrafedfm.secagg.quantize import quantize_into
from ultrafedfm.secagg.shamir import Share, combine_shares

N = 1 << 16
ALPHA = 1e-6  # false-alarm rate of each statistical check


def _byte_uniformity_p(values: np.ndarray) -> tuple[float, float]:
    low = np.bincount((values & 0xFF).astype(np.int64), minlength=256)
    high = np.bincount((values >> 24).astype(np.int64), minlength=256)
    return stats.chisquare(low).pvalue, stats.chisquare(high).pvalue


def _looks_uniform_and_unrelated(ring: np.ndarray, delta: np.ndarray) -> bool:
    p_low, p_high = _byte_uniformity_p(ring)
    r = stats.pearsonr(ring.view(np.int32).astype(np.float64), delta).statistic
    return min(p_low, p_high) > ALPHA and abs(r) < 5 / np.sqrt(ring.size)


def test_single_masked_upload_is_uniform_and_uncorrelated(open_round):
    r = open_round(3)
    name = sorted(r.clients)[1]
    delta = np.linspace(-0.5, 0.5, N, dtype=np.float32)  # highly structured: a ramp
    masked = r.mask(name, delta).masked[:-FIGURE_SLOTS]
    p_low, p_high = _byte_uniformity_p(masked)
    assert p_low > ALPHA and p_high > ALPHA
    assert stats.kstest(masked / 2.0**32, "uniform").pvalue > ALPHA
    assert abs(stats.pearsonr(masked.astype(np.float64), delta).statistic) < 5 / np.sqrt(N)
    # The same checks catch the unmasked encoding (so they have the power to fail).
    plain = np.empty(N, dtype=np.uint32)
    quantize_into(delta, plain, clip=1.0, frac_bits=r.clients[name].config.frac_bits)
    assert min(_byte_uniformity_p(plain)) < ALPHA
    assert abs(stats.pearsonr(plain.view(np.int32).astype(np.float64), delta).statistic) > 0.99


def test_late_input_of_a_dropped_site_stays_hidden_by_its_self_mask(open_round):
    """The server takes site-3's input, declares it dropped anyway and gets its mask key from the others.

    It can then strip every pairwise mask of site-3's input; what remains is q(x) + PRG(b): the
    self-mask still hides it. (Without the self-mask the server would now read q(x) exactly.)
    """
    r = open_round(5)
    victim = "site-3"
    delta = np.linspace(-0.5, 0.5, N, dtype=np.float32)
    late = r.mask(victim, delta).masked.copy()  # arrives "late": the server keeps it aside
    for name in sorted(r.clients):
        if name != victim:
            r.server.receive_masked_input(r.mask(name, np.zeros(N)))
    listed = r.server.survivor_list()
    assert victim in listed.dropped
    for name in listed.survivors:
        r.server.receive_survivor_signature(r.clients[name].sign_survivors(listed))
    request = r.server.unmask_request()
    answers = [r.clients[name].unmask(request) for name in listed.survivors]
    t = r.clients["site-1"].threshold
    s_private = combine_shares([Share.from_bytes(a.mask_key_shares[victim]) for a in answers[:t]], threshold=t,
                               secret_bytes=32)
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    s_key = X25519PrivateKey.from_private_bytes(s_private)
    adverts = {a.sender: a for a in r.roster.advertisements}
    streams = []
    for peer in listed.survivors:  # remove the victim's pairwise masks, exactly as the server could
        key = derive_key(agree(s_key, adverts[peer].s_public), purpose="pairwise-mask", job_id="job-A",
                         round_number=4, sites=[victim, peer])
        streams.append(MaskStream(key, sign=-pair_sign(victim, peer), prg="aes-256-ctr"))
    apply_streams(late, streams)
    residual = late[:N]
    assert _looks_uniform_and_unrelated(residual, delta)
    # power check: the same test flags the bare encoding the residual would be without a self-mask
    plain = np.empty(N, dtype=np.uint32)
    quantize_into(delta, plain, clip=1.0, frac_bits=r.clients[victim].config.frac_bits)
    assert not _looks_uniform_and_unrelated(plain, delta)


def test_mask_keys_are_bound_to_purpose_job_round_and_pair():
    """HKDF info binds the purpose, job, round and the pair: the same shared secret never gives the same key twice."""
    secret = bytes(range(32))
    base = dict(purpose="pairwise-mask", job_id="job-A", round_number=4, sites=["site-1", "site-2"])
    variants = [dict(base), {**base, "job_id": "job-B"}, {**base, "round_number": 5},
                {**base, "purpose": "share-encryption"}, {**base, "sites": ["site-1", "site-3"]}]
    keys = [derive_key(secret, **v) for v in variants]
    assert len(set(keys)) == len(keys)
    assert derive_key(secret, **{**base, "sites": ["site-2", "site-1"]}) == keys[0]  # the pair is unordered


def test_share_associated_data_binds_direction_job_and_round():
    base = dict(sender="site-1", receiver="site-2", job_id="job-A", round_number=4)
    variants = [base, {**base, "sender": "site-2", "receiver": "site-1"}, {**base, "job_id": "job-B"},
                {**base, "round_number": 5}]
    assert len({share_associated_data(**v) for v in variants}) == len(variants)


def test_tampered_share_fails_authentication_naming_sender(open_round):
    r = open_round(4)
    victim = "site-3"
    delivery = r.deliveries[victim]
    ct = bytearray(delivery.ciphertexts["site-2"])
    ct[40] ^= 0x01
    r.deliveries[victim] = dataclasses.replace(delivery, ciphertexts={**delivery.ciphertexts, "site-2": bytes(ct)})
    with pytest.raises(AuthenticationError, match="from site 'site-2' to 'site-3'.*AES-GCM") as info:
        r.mask(victim, np.zeros(8))
    assert info.value.sender == "site-2"


def test_swapped_share_ciphertexts_fail_authentication(open_round):
    """A ciphertext presented as coming from another sender fails: the sender is in the key and associated data."""
    r = open_round(4)
    delivery = r.deliveries["site-1"]
    swapped = dict(delivery.ciphertexts)
    swapped["site-2"], swapped["site-3"] = swapped["site-3"], swapped["site-2"]
    r.deliveries["site-1"] = dataclasses.replace(delivery, ciphertexts=swapped)
    with pytest.raises(AuthenticationError) as info:
        r.mask("site-1", np.zeros(8))
    assert info.value.sender in ("site-2", "site-3")


def test_reflected_share_ciphertext_fails_authentication(open_round):
    """site-2's ciphertext *to* site-1 handed back to site-2 as if *from* site-1: both directions share one
    AES key, so only the associated data (sender -> receiver) tells them apart."""
    r = open_round(4)
    reflected = r.shares["site-2"].ciphertexts["site-1"]
    delivery = r.deliveries["site-2"]
    r.deliveries["site-2"] = dataclasses.replace(delivery, ciphertexts={**delivery.ciphertexts, "site-1": reflected})
    with pytest.raises(AuthenticationError, match="from site 'site-1' to 'site-2'") as info:
        r.mask("site-2", np.zeros(8))
    assert info.value.sender == "site-1"


def test_replayed_and_wrong_round_or_job_messages_are_refused(consortium, open_round):
    r = open_round(3)
    # replay of a whole phase to a client
    with pytest.raises(ProtocolError, match="replayed or out-of-order"):
        r.clients["site-1"].share_keys(r.roster)
    # replay of a site's shares to the server
    with pytest.raises(ProtocolError, match="phase 'masked_input'"):
        r.server.receive_encrypted_shares(r.shares["site-1"])
    # a roster from round 4 offered in round 5, and one from another job
    for job, rnd, match in [("job-A", 5, "round 4, this is round 5"), ("job-B", 4, "job 'job-A', this is job 'job-B'")]:
        client = make_clients(consortium, 3, job_id=job, round_number=rnd)["site-1"]
        client.advertise_keys()
        with pytest.raises(ProtocolError, match=match):
            client.share_keys(r.roster)
    # a last-round advertisement replayed into a new round's server
    server = SecAggServer(members=r.members, job_id="job-A", round_number=5, config=SecAggConfig(), context=CONTEXT)
    with pytest.raises(ProtocolError, match="round 4, this is round 5"):
        server.receive_advertisement(r.roster.advertisements[0])
    # masked input sent twice
    masked = r.mask("site-2", np.zeros(8))
    r.server.receive_masked_input(masked)
    with pytest.raises(ProtocolError, match="second masked input from site 'site-2'"):
        r.server.receive_masked_input(masked)


def test_advertisement_with_altered_round_fails_signature(open_round):
    """Changing the round in a signed advertisement (to replay it) breaks its signature."""
    r = open_round(3)
    forged = dataclasses.replace(r.roster.advertisements[0], round=5)
    server = SecAggServer(members=r.members, job_id="job-A", round_number=5, config=SecAggConfig(), context=CONTEXT)
    with pytest.raises(IdentityError, match="signature of site 'site-1'.*does not verify with the key the member list"):
        server.receive_advertisement(forged)


def _adverts(clients):
    return {n: c.advertise_keys() for n, c in clients.items()}


def test_keys_from_a_non_member_or_signed_with_another_key_are_refused(consortium):
    """A key not enrolled in the member list is refused, whatever name it claims."""
    clients = make_clients(consortium, 3)
    adverts = _adverts(clients)
    outsider = SiteSigningKey.generate(site="site-2")  # right name, key not the enrolled one
    forged = dataclasses.replace(adverts["site-2"], s_public=bytes(32 * [7]))
    forged = dataclasses.replace(forged, signature=outsider.sign(forged.signed_payload()))
    roster = KeyRoster(sender="server", job_id="job-A", round=4,
                       advertisements=(adverts["site-1"], forged, adverts["site-3"]))
    with pytest.raises(IdentityError, match="signature of site 'site-2'.*does not verify with the key the member list"):
        clients["site-1"].share_keys(roster)
    # A fourth, validly signed site that is not in the 3-site member list
    clients = make_clients(consortium, 3)
    adverts = _adverts(clients)
    stranger = make_clients(consortium, 4)["site-4"].advertise_keys()
    roster = KeyRoster(sender="server", job_id="job-A", round=4, advertisements=(*adverts.values(), stranger))
    with pytest.raises(IdentityError, match="'site-4' is not a member site of consortium 'test-consortium'"):
        clients["site-1"].share_keys(roster)


def test_keys_relabelled_as_another_site_or_swapped_are_refused(consortium):
    clients = make_clients(consortium, 3)
    adverts = _adverts(clients)
    # server relabels site-3's (validly signed) keys as site-2's
    relabelled = dataclasses.replace(adverts["site-3"], sender="site-2")
    roster = KeyRoster(sender="server", job_id="job-A", round=4,
                       advertisements=(adverts["site-1"], relabelled, adverts["site-3"]))
    with pytest.raises(IdentityError, match="signature of site 'site-2'"):
        clients["site-1"].share_keys(roster)
    # server swaps in its own mask key under site-2's signature (a fresh set of sites: the first refused the round)
    clients = make_clients(consortium, 3)
    adverts = _adverts(clients)
    forged = dataclasses.replace(adverts["site-2"], s_public=adverts["site-3"].s_public[::-1])
    roster = KeyRoster(sender="server", job_id="job-A", round=4,
                       advertisements=(adverts["site-1"], forged, adverts["site-3"]))
    with pytest.raises(IdentityError, match="signature of site 'site-2'"):
        clients["site-1"].share_keys(roster)


def test_duplicate_public_keys_in_a_roster_are_refused(consortium):
    """A colluding member re-advertises an honest site's public keys under its own (valid) signature."""
    clients = make_clients(consortium, 4)
    adverts = _adverts(clients)
    copy = dataclasses.replace(adverts["site-4"], c_public=adverts["site-1"].c_public,
                               s_public=adverts["site-1"].s_public)
    copy = dataclasses.replace(copy, signature=consortium.signers["site-4"].sign(copy.signed_payload()))
    roster = KeyRoster(sender="server", job_id="job-A", round=4,
                       advertisements=(adverts["site-1"], adverts["site-2"], adverts["site-3"], copy))
    with pytest.raises(ProtocolError, match="site '(site-1|site-4)' advertises a malformed or reused public key"):
        clients["site-2"].share_keys(roster)


def _masked(r, names):
    """Each named site sends a masked delta of 0.1 everywhere (weight 1)."""
    for name in names:
        r.server.receive_masked_input(r.mask(name, np.full(8, 0.1)))


def test_server_asking_both_shares_of_a_site_is_refused(open_round):
    # Without the consistency check, so that the per-site memory of what was revealed is what refuses.
    r = open_round(5, config=SecAggConfig(consistency_check=False))
    _masked(r, sorted(r.clients))
    honest = r.server.unmask_request()
    both = dataclasses.replace(honest, dropped=("site-4",))  # site-4 listed as survivor and dropped
    with pytest.raises(ShareRequestRefused, match="both shares of site 'site-4'") as info:
        r.clients["site-1"].unmask(both)
    assert info.value.peer == "site-4"
    # Across two requests: first the self-mask share of site-4, then its mask-key share.
    assert "site-4" in r.clients["site-2"].unmask(honest).self_mask_shares
    later = UnmaskRequest(sender="server", job_id="job-A", round=4, survivors=("site-1", "site-2", "site-3", "site-5"),
                          dropped=("site-4",), attestations={})
    with pytest.raises(ShareRequestRefused, match="mask-key share of site 'site-4' after its self-mask share"):
        r.clients["site-2"].unmask(later)


def test_consistency_check_stops_split_survivor_lists(open_round):
    r = open_round(5)
    _masked(r, sorted(r.clients))
    listed = r.server.survivor_list()
    signatures = {n: r.clients[n].sign_survivors(listed) for n in ("site-1", "site-2", "site-3")}
    # a site signs one survivor list per round
    other = SurvivorList(sender="server", job_id="job-A", round=4, survivors=("site-1", "site-2", "site-3"),
                         dropped=("site-4", "site-5"))
    with pytest.raises(ProtocolError, match="second, different survivor list"):
        r.clients["site-1"].sign_survivors(other)
    # too few attestations: the site does not unmask
    r.server.receive_survivor_signature(signatures["site-1"])
    with pytest.raises(RoundAborted, match="1 survivors signed the survivor list, threshold t=3"):
        r.server.unmask_request()
    for name in ("site-2", "site-3"):
        r.server.receive_survivor_signature(signatures[name])
    request = r.server.unmask_request()
    thin = dataclasses.replace(request, attestations=dict(list(request.attestations.items())[:2]))
    with pytest.raises(RoundAborted, match="only 2 survivors attested"):
        r.clients["site-1"].unmask(thin)
    forged = dataclasses.replace(request, attestations={**request.attestations,
                                                        "site-3": request.attestations["site-2"]})
    with pytest.raises(IdentityError, match="site 'site-3'"):
        r.clients["site-1"].unmask(forged)
    split = dataclasses.replace(request, survivors=("site-1", "site-2", "site-3", "site-4"), dropped=("site-5",))
    with pytest.raises(ProtocolError, match="other survivors than the list it signed"):
        r.clients["site-2"].unmask(split)
    answers = [r.clients[n].unmask(request) for n in ("site-1", "site-2", "site-3")]
    for answer in answers:
        r.server.receive_unmask_response(answer)
    assert np.allclose(r.server.aggregate().mean_delta(), 0.1, atol=1e-6)


def test_site_refuses_a_survivor_list_below_its_minimum_or_calling_it_dropped(open_round):
    r = open_round(5)
    _masked(r, ["site-1", "site-2", "site-3", "site-4"])
    lonely = SurvivorList(sender="server", job_id="job-A", round=4, survivors=("site-1", "site-2"),
                          dropped=("site-3", "site-4", "site-5"))
    with pytest.raises(RoundAborted, match="only 2 masked inputs; site 'site-1' unmasks only with at least 3"):
        r.clients["site-1"].sign_survivors(lonely)
    with pytest.raises(ProtocolError, match="names site 'site-4' as dropped, but it sent its input"):
        r.clients["site-4"].sign_survivors(lonely)


@pytest.mark.parametrize("survivors,dropped", [
    (("site-1", "site-2", "site-3", "site-4"), ()),  # site-5 shared keys but is in neither list
    (("site-1", "site-2", "site-3", "site-3", "site-4"), ("site-5",)),  # a name twice
    (("site-1", "site-2", "site-3", "site-4", "site-9"), ("site-5",)),  # a site that never shared keys
])
def test_survivor_list_must_cover_exactly_the_sites_that_shared_keys(open_round, survivors, dropped):
    """Leaving a site out (neither its self-mask nor its mask key would be revealed) or adding one is refused."""
    r = open_round(5)
    _masked(r, ["site-1", "site-2", "site-3", "site-4"])
    listed = SurvivorList(sender="server", job_id="job-A", round=4, survivors=survivors, dropped=dropped)
    with pytest.raises(ProtocolError, match="but the sites that shared keys with 'site-1' are"):
        r.clients["site-1"].sign_survivors(listed)


def test_roster_without_the_sites_own_keys_is_refused(consortium, open_round):
    """The roster must carry the site's own keys unchanged."""
    other = open_round(3)
    client = make_clients(consortium, 3)["site-1"]
    client.advertise_keys()
    with pytest.raises(ProtocolError, match="own keys unchanged"):
        client.share_keys(other.roster)


def test_server_showing_sites_different_rosters_is_caught(consortium):
    """Split view: site-1 is shown a 3-site roster, the others a 4-site one (to isolate site-1)."""
    clients = make_clients(consortium, 4)
    adverts = _adverts(clients)
    full = KeyRoster(sender="server", job_id="job-A", round=4, advertisements=tuple(adverts.values()))
    small = KeyRoster(sender="server", job_id="job-A", round=4,
                      advertisements=tuple(adverts[n] for n in ("site-1", "site-2", "site-3")))
    shares = {"site-1": clients["site-1"].share_keys(small)}
    shares.update({n: clients[n].share_keys(full) for n in ("site-2", "site-3", "site-4")})
    delivery = ShareDelivery(
        sender="server", job_id="job-A", round=4, recipient="site-2",
        ciphertexts={p: shares[p].ciphertexts["site-2"] for p in ("site-1", "site-3", "site-4")},
        roster_signatures={p: shares[p].roster_signature for p in ("site-1", "site-3", "site-4")})
    with pytest.raises(IdentityError, match="site 'site-1' did not sign the key roster that 'site-2' saw"):
        clients["site-2"].mask_input(delivery, delta=np.zeros(8, np.float32), weight=1.0,
                                     figures=figures(), trained_with=CONTEXT)


# -- the site's own minimum and maximum, enforced whatever the server sends ---------------------

def test_threshold_and_minimum_roster_come_from_the_consortium_not_the_roster(consortium):
    """7 member sites: t = 4. A server-assembled roster of 3 (enough for min_sites=3 and its own majority) is refused."""
    members = consortium.members(7)
    clients = make_clients(consortium, 3, members=members)
    assert clients["site-1"].threshold == 4 and clients["site-1"].minimum_sites == 4
    adverts = _adverts(clients)
    roster = KeyRoster(sender="server", job_id="job-A", round=4, advertisements=tuple(adverts.values()))
    with pytest.raises(RoundAborted, match="only 3 sites advertised keys; site 'site-1' takes part only with at "
                                           "least 4 \\(threshold t=4 of 7 member sites"):
        clients["site-1"].share_keys(roster)


def test_site_floor_refuses_a_roster_the_job_would_accept(consortium):
    """The site's own privacy.min_sites (4) holds although the job says min_sites=3 and t=3 (5 members)."""
    clients = make_clients(consortium, 3, members=consortium.members(5), min_sites=4)
    adverts = _adverts(clients)
    roster = KeyRoster(sender="server", job_id="job-A", round=4, advertisements=tuple(adverts.values()))
    with pytest.raises(RoundAborted, match="only 3 sites advertised keys; site 'site-1' takes part only with at least 4"):
        clients["site-1"].share_keys(roster)
    with pytest.raises(ValueError, match="min_sites=1; the site floor must be an integer >= 2"):
        make_clients(consortium, 3, min_sites=1)


def test_site_refuses_a_roster_above_max_sites(consortium):
    config = SecAggConfig(max_sites=3)
    clients = make_clients(consortium, 4, config=config)
    adverts = _adverts(clients)
    roster = KeyRoster(sender="server", job_id="job-A", round=4, advertisements=tuple(adverts.values()))
    with pytest.raises(RoundAborted, match="4 sites in the round exceed max_sites=3"):
        clients["site-1"].share_keys(roster)


def test_site_refuses_to_send_its_input_when_too_few_sites_shared_keys(open_round):
    """5 sites advertised, but the server delivers site-1 the shares of one peer only: site-1 sends nothing."""
    r = open_round(5)
    delivery = r.deliveries["site-1"]
    r.deliveries["site-1"] = dataclasses.replace(
        delivery, ciphertexts={"site-2": delivery.ciphertexts["site-2"]},
        roster_signatures={"site-2": delivery.roster_signatures["site-2"]})
    with pytest.raises(RoundAborted, match="only 2 sites completed key sharing; 3 needed; site 'site-1' does not send"):
        r.mask("site-1", np.zeros(8))


def test_a_site_whose_key_is_not_the_enrolled_one_cannot_start_a_round(consortium):
    from ultrafedfm.secagg import ContributionLedger, SecAggClient

    regenerated = SiteSigningKey.generate(site="site-1")
    with pytest.raises(IdentityError, match="site 'site-1': its signing key .* is not the key the member list"):
        SecAggClient(signer=regenerated, members=consortium.members(3), job_id="job-A", round_number=4,
                     config=SecAggConfig(), context=CONTEXT, ledger=ContributionLedger.in_memory())
    with pytest.raises(IdentityError, match="site 'site-9' is not in the member list of 'test-consortium'"):
        SecAggClient(signer=SiteSigningKey.generate(site="site-9"), members=consortium.members(3), job_id="job-A",
                     round_number=4, config=SecAggConfig(), context=CONTEXT, ledger=ContributionLedger.in_memory())
