"""What the server (or a network attacker) cannot do: read one upload, tamper, replay, swap keys, unmask one site."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

from ultrafedfm.secagg import (
    AuthenticationError, IdentityError, KeyRoster, ProtocolError, RoundAborted, SecAggClient, SecAggConfig,
    SecAggServer, ShareDelivery, ShareRequestRefused, SurvivorList, UnmaskRequest,
)
from ultrafedfm.secagg.quantize import quantize_into

N = 1 << 16
ALPHA = 1e-6  # false-alarm rate of each statistical check


def _byte_uniformity_p(values: np.ndarray) -> tuple[float, float]:
    low = np.bincount((values & 0xFF).astype(np.int64), minlength=256)
    high = np.bincount((values >> 24).astype(np.int64), minlength=256)
    return stats.chisquare(low).pvalue, stats.chisquare(high).pvalue


def test_single_masked_upload_is_uniform_and_uncorrelated(open_round):
    r = open_round(3)
    name = sorted(r.clients)[1]
    delta = np.linspace(-0.5, 0.5, N, dtype=np.float32)  # highly structured: a ramp
    masked = r.clients[name].mask_input(r.deliveries[name], delta=delta, weight=1.0).masked[:-1]
    p_low, p_high = _byte_uniformity_p(masked)
    assert p_low > ALPHA and p_high > ALPHA
    assert stats.kstest(masked / 2.0**32, "uniform").pvalue > ALPHA
    r_delta = stats.pearsonr(masked.astype(np.float64), delta).statistic
    assert abs(r_delta) < 5 / np.sqrt(N)
    # The same checks catch the unmasked encoding (so they have the power to fail).
    plain = np.empty(N, dtype=np.uint32)
    quantize_into(delta, plain, clip=1.0, frac_bits=r.clients[name].config.frac_bits)
    assert min(_byte_uniformity_p(plain)) < ALPHA
    assert abs(stats.pearsonr(plain.view(np.int32).astype(np.float64), delta).statistic) > 0.99


def test_tampered_share_fails_authentication_naming_sender(open_round):
    r = open_round(4)
    victim = "site-3"
    delivery = r.deliveries[victim]
    ct = bytearray(delivery.ciphertexts["site-2"])
    ct[40] ^= 0x01
    tampered = dataclasses.replace(delivery, ciphertexts={**delivery.ciphertexts, "site-2": bytes(ct)})
    with pytest.raises(AuthenticationError, match="from site 'site-2' to 'site-3'.*AES-GCM") as info:
        r.clients[victim].mask_input(tampered, delta=np.zeros(8, np.float32), weight=1.0)
    assert info.value.sender == "site-2"


def test_swapped_share_ciphertexts_fail_authentication(open_round):
    """A ciphertext presented as coming from another sender fails: the sender is in the associated data."""
    r = open_round(4)
    delivery = r.deliveries["site-1"]
    swapped = dict(delivery.ciphertexts)
    swapped["site-2"], swapped["site-3"] = swapped["site-3"], swapped["site-2"]
    with pytest.raises(AuthenticationError) as info:
        r.clients["site-1"].mask_input(dataclasses.replace(delivery, ciphertexts=swapped),
                                       delta=np.zeros(8, np.float32), weight=1.0)
    assert info.value.sender in ("site-2", "site-3")


def test_replayed_and_wrong_round_or_job_messages_are_refused(pki, open_round):
    r = open_round(3)
    # replay of a whole phase to a client
    with pytest.raises(ProtocolError, match="replayed or out-of-order"):
        r.clients["site-1"].share_keys(r.roster)
    # replay of a site's shares to the server
    with pytest.raises(ProtocolError, match="phase 'masked_input'"):
        r.server.receive_encrypted_shares(r.shares["site-1"])
    # a roster from round 4 offered in round 5, and one from another job
    config = SecAggConfig()
    for job, rnd, match in [("job-A", 5, "round 4, this is round 5"), ("job-B", 4, "job 'job-A', this is job 'job-B'")]:
        client = SecAggClient(identity=pki.sites["site-1"], root_ca=pki.root_ca, job_id=job, round_number=rnd,
                              config=config)
        client.advertise_keys()
        with pytest.raises(ProtocolError, match=match):
            client.share_keys(r.roster)
    # a last-round advertisement replayed into a new round's server
    server = SecAggServer(root_ca=pki.root_ca, job_id="job-A", round_number=5, config=config)
    with pytest.raises(ProtocolError, match="round 4, this is round 5"):
        server.receive_advertisement(r.roster.advertisements[0])
    # masked input sent twice
    name = "site-2"
    masked = r.clients[name].mask_input(r.deliveries[name], delta=np.zeros(8, np.float32), weight=1.0)
    r.server.receive_masked_input(masked)
    with pytest.raises(ProtocolError, match="second masked input from site 'site-2'"):
        r.server.receive_masked_input(masked)


def test_advertisement_with_altered_round_fails_signature(pki, open_round):
    """Changing the round in a signed advertisement (to replay it) breaks its signature."""
    r = open_round(3)
    forged = dataclasses.replace(r.roster.advertisements[0], round=5)
    server = SecAggServer(root_ca=pki.root_ca, job_id="job-A", round_number=5, config=SecAggConfig())
    with pytest.raises(IdentityError, match="signature of site 'site-1'.*does not verify"):
        server.receive_advertisement(forged)


def _fresh_clients(pki, n, config=None):
    config = config or SecAggConfig()
    return {name: SecAggClient(identity=ident, root_ca=pki.root_ca, job_id="job-A", round_number=1, config=config)
            for name, ident in pki.identities(n).items()}


def test_key_not_signed_by_project_ca_is_refused(pki, site_factory):
    clients = _fresh_clients(pki, 3)
    impostor = site_factory("site-2", pki.rogue_ca, kind="ec")  # same name and CA name, different CA key
    rogue = SecAggClient(identity=impostor, root_ca=pki.rogue_ca[0], job_id="job-A", round_number=1,
                         config=SecAggConfig())
    server = SecAggServer(root_ca=pki.root_ca, job_id="job-A", round_number=1, config=SecAggConfig())
    rogue_advert = rogue.advertise_keys()
    with pytest.raises(IdentityError, match="site 'site-2'.*not issued by the project root CA"):
        server.receive_advertisement(rogue_advert)
    # A server that substitutes the rogue keys in the roster is caught by every site.
    adverts = {n: c.advertise_keys() for n, c in clients.items()}
    adverts["site-2"] = rogue_advert
    roster = KeyRoster(sender="server", job_id="job-A", round=1, advertisements=tuple(adverts.values()))
    with pytest.raises(IdentityError, match="not issued by the project root CA"):
        clients["site-1"].share_keys(roster)


def test_keys_signed_by_another_site_or_swapped_are_refused(pki):
    clients = _fresh_clients(pki, 3)
    adverts = {n: c.advertise_keys() for n, c in clients.items()}
    # server relabels site-3's (validly signed) keys as site-2's
    relabelled = dataclasses.replace(adverts["site-3"], sender="site-2")
    roster = KeyRoster(sender="server", job_id="job-A", round=1,
                       advertisements=(adverts["site-1"], relabelled, adverts["site-3"]))
    with pytest.raises(IdentityError, match="claim to come from site 'site-2' but are signed with .*'site-3'"):
        clients["site-1"].share_keys(roster)
    # server swaps in its own mask key under site-2's signature (a fresh set of sites: the first refused the round)
    clients = _fresh_clients(pki, 3)
    adverts = {n: c.advertise_keys() for n, c in clients.items()}
    forged = dataclasses.replace(adverts["site-2"], s_public=adverts["site-3"].s_public[::-1])
    roster = KeyRoster(sender="server", job_id="job-A", round=1,
                       advertisements=(adverts["site-1"], forged, adverts["site-3"]))
    with pytest.raises(IdentityError, match="signature of site 'site-2'"):
        clients["site-1"].share_keys(roster)


def test_expired_certificate_is_refused(pki, site_factory):
    expired = site_factory("site-9", (pki.root_ca, pki.ca_key), valid_days=-1)
    client = SecAggClient(identity=expired, root_ca=pki.root_ca, job_id="job-A", round_number=1, config=SecAggConfig())
    server = SecAggServer(root_ca=pki.root_ca, job_id="job-A", round_number=1, config=SecAggConfig())
    with pytest.raises(IdentityError, match="site 'site-9' is not valid now"):
        server.receive_advertisement(client.advertise_keys())


def _masked(r, names):
    """Each named site sends a masked delta of 0.1 everywhere (weight 1)."""
    for name in names:
        r.server.receive_masked_input(
            r.clients[name].mask_input(r.deliveries[name], delta=np.full(8, 0.1, np.float32), weight=1.0))


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
    # ... and the reverse order
    assert "site-4" in r.clients["site-3"].unmask(later).mask_key_shares
    with pytest.raises(ShareRequestRefused, match="self-mask share of site 'site-4' after its mask-key share"):
        r.clients["site-3"].unmask(honest)


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


def test_site_refuses_a_survivor_list_below_threshold_or_calling_it_dropped(open_round):
    r = open_round(5)
    _masked(r, ["site-1", "site-2", "site-3", "site-4"])
    lonely = SurvivorList(sender="server", job_id="job-A", round=4, survivors=("site-1", "site-2"),
                          dropped=("site-3", "site-4", "site-5"))
    with pytest.raises(RoundAborted, match="only 2 masked inputs"):
        r.clients["site-1"].sign_survivors(lonely)
    with pytest.raises(ProtocolError, match="names site 'site-4' as dropped, but it sent its input"):
        r.clients["site-4"].sign_survivors(lonely)


def test_roster_without_the_sites_own_keys_is_refused(open_round):
    """The roster must carry the site's own keys unchanged."""
    r = open_round(3)
    other = open_round(3)
    client = SecAggClient(identity=r.clients["site-1"].identity, root_ca=r.clients["site-1"].root_ca, job_id="job-A",
                          round_number=4, config=SecAggConfig())
    client.advertise_keys()
    with pytest.raises(ProtocolError, match="own keys unchanged"):
        client.share_keys(other.roster)


def test_server_showing_sites_different_rosters_is_caught(pki):
    """Split view: site-1 is shown a 3-site roster, the others a 4-site one (to isolate site-1)."""
    clients = _fresh_clients(pki, 4)
    adverts = {n: c.advertise_keys() for n, c in clients.items()}
    full = KeyRoster(sender="server", job_id="job-A", round=1, advertisements=tuple(adverts.values()))
    small = KeyRoster(sender="server", job_id="job-A", round=1,
                      advertisements=tuple(adverts[n] for n in ("site-1", "site-2", "site-3")))
    shares = {"site-1": clients["site-1"].share_keys(small)}
    shares.update({n: clients[n].share_keys(full) for n in ("site-2", "site-3", "site-4")})
    delivery = ShareDelivery(
        sender="server", job_id="job-A", round=1, recipient="site-2",
        ciphertexts={p: shares[p].ciphertexts["site-2"] for p in ("site-1", "site-3", "site-4")},
        roster_signatures={p: shares[p].roster_signature for p in ("site-1", "site-3", "site-4")})
    with pytest.raises(IdentityError, match="site 'site-1' did not sign the key roster that 'site-2' saw"):
        clients["site-2"].mask_input(delivery, delta=np.zeros(8, np.float32), weight=1.0)
