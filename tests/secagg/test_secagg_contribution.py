"""No second contribution: the site's ledger, the signed round context, and fresh training entropy."""
from __future__ import annotations

import dataclasses
import stat

import numpy as np
import pytest
from secagg_helpers import CONTEXT, SITE_NAMES, make_clients

from ultrafedfm.secagg import (
    ContributionLedger, ContributionRefused, IdentityError, KeyRoster, ProtocolError, RoundContext, SecAggConfig,
    SecAggServer, fresh_training_seed, model_digest, simulate_round,
)

NAMES5 = SITE_NAMES[:5]


def _ledgers(tmp_path, names=NAMES5):
    return {n: ContributionLedger.open(tmp_path / n / "secagg_ledger.json") for n in names}


def _run(consortium, ledgers, *, context=CONTEXT, round_number=4, job_id="job-A", **drops):
    signers = {n: consortium.signers[n] for n in ledgers}
    deltas = {n: np.full(32, 0.01, np.float32) for n in signers}
    return simulate_round(signers=signers, members=consortium.members(5), deltas=deltas,
                          weights=dict.fromkeys(signers, 1.0), config=SecAggConfig(), context=context,
                          ledgers=ledgers, job_id=job_id, round_number=round_number, **drops).result


def test_second_sum_from_the_same_model_over_other_sites_is_refused(consortium, tmp_path):
    """Sum over {1..5}, then the server "restarts" the round without site-5 to difference the two sums."""
    ledgers = _ledgers(tmp_path)
    first = _run(consortium, ledgers)
    assert first.survivors == tuple(NAMES5)
    # the restart without site-5: every site refuses as soon as it sees the roster
    reopened = {n: ContributionLedger.open(ledgers[n].path) for n in NAMES5[:4]}  # a site process restarted too
    with pytest.raises(ContributionRefused, match=r"site 'site-1' already helped unmask a sum from model abab.*"
                                                  r"\['site-5'\] are missing from the key roster"):
        _run(consortium, reopened)
    # ... the same model under another round label or job is the same model: still refused
    with pytest.raises(ContributionRefused, match="already helped unmask a sum from model"):
        _run(consortium, _ledgers(tmp_path, NAMES5[:4]), round_number=9, job_id="job-B")
    # site-5 is in the key sharing but is declared dropped: refused before signing the survivor list
    with pytest.raises(ContributionRefused, match=r"now the server asks for survivors \['site-1', 'site-2', "
                                                  r"'site-3', 'site-4'\]"):
        _run(consortium, _ledgers(tmp_path), drop_before_input=["site-5"])


def test_restarted_round_with_the_same_model_and_survivors_completes(consortium, tmp_path):
    """What a server restart may do: the same round, same model and settings, fresh keys, the same survivors."""
    ledgers = _ledgers(tmp_path)
    _run(consortium, ledgers)
    again = _run(consortium, {n: ContributionLedger.open(ledgers[n].path) for n in NAMES5})
    assert np.allclose(again.mean_delta(), 0.01, atol=1e-6)
    entry = ContributionLedger.open(ledgers["site-3"].path).round_entry("job-A", 4)
    assert entry["attempts"] == 2 and entry["masked_inputs"] == 2 and entry["model"] == CONTEXT.model_sha256
    assert stat.S_IMODE(ledgers["site-3"].path.stat().st_mode) == 0o600


def test_a_round_aborted_before_unmasking_can_run_again_with_other_sites(consortium, tmp_path):
    """Nothing was revealed from the model, so nothing binds the sites yet (e.g. the next round after an abort)."""
    ledgers = _ledgers(tmp_path)
    with pytest.raises(Exception, match="only 2 masked inputs arrived"):
        _run(consortium, ledgers, drop_before_input=["site-3", "site-4", "site-5"])
    result = _run(consortium, {n: ledgers[n] for n in NAMES5[:4]}, round_number=5)
    assert result.survivors == tuple(NAMES5[:4])


def test_restart_of_a_round_with_another_model_or_lr_is_refused(consortium, tmp_path):
    ledger = ContributionLedger.open(tmp_path / "ledger.json")
    make_clients(consortium, 3, ledgers={"site-1": ledger})["site-1"].advertise_keys()
    for changed in (dataclasses.replace(CONTEXT, model_sha256="cd" * 32), dataclasses.replace(CONTEXT, lr=3e-4),
                    dataclasses.replace(CONTEXT, training={**CONTEXT.training, "local_steps": 5})):
        client = make_clients(consortium, 3, context=changed, ledgers={"site-1": ledger})["site-1"]
        with pytest.raises(ContributionRefused, match="refuses round 4 of job 'job-A' again with another model"):
            client.advertise_keys()
    # the same context again (a restart) is fine, and another round is a new round
    make_clients(consortium, 3, ledgers={"site-1": ledger})["site-1"].advertise_keys()
    make_clients(consortium, 3, round_number=5, context=dataclasses.replace(CONTEXT, lr=3e-4),
                 ledgers={"site-1": ledger})["site-1"].advertise_keys()
    assert ledger.round_entry("job-A", 4)["attempts"] == 2


def test_server_announcing_different_models_to_different_sites_is_caught(consortium):
    """site-3 is told another model hash: every peer (and the server's own check) refuses its keys."""
    clients = make_clients(consortium, 3)
    clients["site-3"] = make_clients(consortium, 3, context=dataclasses.replace(CONTEXT, model_sha256="cd" * 32))[
        "site-3"]
    adverts = {n: c.advertise_keys() for n, c in clients.items()}
    roster = KeyRoster(sender="server", job_id="job-A", round=4, advertisements=tuple(adverts.values()))
    with pytest.raises(ContributionRefused, match="site 'site-3' signed another round context than this party"):
        clients["site-1"].share_keys(roster)
    server = SecAggServer(members=consortium.members(3), job_id="job-A", round_number=4, config=SecAggConfig(),
                          context=CONTEXT)
    with pytest.raises(ContributionRefused, match="site 'site-3' signed another round context"):
        server.receive_advertisement(adverts["site-3"])
    # the context digest cannot be swapped back in transit: it is under the site's signature
    patched = dataclasses.replace(adverts["site-3"], context=adverts["site-1"].context)
    with pytest.raises(IdentityError, match="signature of site 'site-3'"):
        server.receive_advertisement(patched)


def test_training_task_with_a_tampered_model_is_refused_before_anything_is_sent(open_round):
    """The training task must bring the announced model: its digest is recomputed from the weights received."""
    weights = {"blocks.0.w": np.ones((4, 4), np.float32), "head.b": np.zeros(3, np.float32)}
    announced = RoundContext(model_sha256=model_digest(weights), lr=1e-4, training={"local_steps": 2})
    r = open_round(3, context=announced)
    tampered = {**weights, "head.b": np.array([0, 0, 1e-3], np.float32)}
    received = dataclasses.replace(announced, model_sha256=model_digest(tampered))
    with pytest.raises(ContributionRefused, match="the training task brings model .* but the round announced"):
        r.clients["site-1"].check_task_context(received)
    with pytest.raises(ContributionRefused, match="server sends this site another model"):
        r.mask("site-1", np.zeros(8), context=received)
    with pytest.raises(ContributionRefused, match="another model or settings"):
        r.mask("site-2", np.zeros(8), context=dataclasses.replace(announced, lr=2e-4))
    r.clients["site-3"].check_task_context(RoundContext(model_sha256=model_digest(dict(weights)), lr=1e-4,
                                                        training={"local_steps": 2}))


def test_model_digest_covers_names_dtypes_shapes_and_values():
    base = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
    digest = model_digest(base)
    assert digest == model_digest({"b": base["b"].copy(), "a": base["a"].copy()})  # order of the mapping is irrelevant
    variants = [{**base, "a": base["a"].reshape(3, 2)}, {**base, "a": base["a"].astype(np.float64)},
                {"a2": base["a"], "b": base["b"]}, {**base, "b": np.array([1, 1 + 2**-20], np.float32)}]
    assert len({digest, *(model_digest(v) for v in variants)}) == 5


def test_unreadable_ledger_fails_closed(tmp_path):
    path = tmp_path / "secagg_ledger.json"
    path.write_text("{not json")
    with pytest.raises(ProtocolError, match="secagg_ledger.json is unreadable .*takes part in no round"):
        ContributionLedger.open(path)


def test_fresh_training_seed_differs_between_two_runs_of_the_same_round():
    seeds = {fresh_training_seed(1234, 7, "site-1") for _ in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


def test_round_context_digest_ignores_int_or_float_spelling_but_not_values():
    from ultrafedfm.secagg import Membership, SecAggConfig, SiteSigningKey

    members = Membership.of("c", 1, {"s": SiteSigningKey.generate(site="s").public_key})
    ctx = RoundContext(model_sha256="ab" * 32, lr=1e-4, training={"local_steps": 2, "img_size": 32})
    digest = ctx.digest(config=SecAggConfig(max_weight=1000), membership_digest=members.digest)
    same = RoundContext(model_sha256="ab" * 32, lr=1e-4, training={"img_size": 32.0, "local_steps": 2})
    assert same.digest(config=SecAggConfig(max_weight=1000.0), membership_digest=members.digest) == digest
    other = RoundContext(model_sha256="ab" * 32, lr=1e-4, training={"img_size": 32, "local_steps": 3})
    assert other.digest(config=SecAggConfig(max_weight=1000), membership_digest=members.digest) != digest
    assert ctx.digest(config=SecAggConfig(max_weight=999), membership_digest=members.digest) != digest
    assert RoundContext.from_mapping(ctx.to_mapping()) == ctx
