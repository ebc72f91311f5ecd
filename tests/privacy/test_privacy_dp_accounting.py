"""The ledger's epsilon against an independent recomputation with Google's dp-accounting.

Tolerances (stated in docs/differential-privacy.md too):
- RDP (ledger, Opacus' orders) vs dp-accounting's ``RdpAccountant`` on the same orders: the same
  analysis implemented twice, so within 0.1 % relative.
- PRV (ledger, Opacus' upper bound at epsilon error 0.01) vs dp-accounting's PLD accountant
  (discretisation 1e-4): two different numerical methods for the same exact privacy curve, so
  within 0.02 + 1 % of the PLD value, and PRV never below PLD by more than 0.02 (an upper bound).
The histories use noise >= 0.9, where dp-accounting's RDP converges at every order.
"""
from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from opacus.accountants import RDPAccountant

from ultrafedfm.privacy import DPConfig, PrivacyLedger, PrivacyPolicy, plan_job

HISTORIES = {
    # (job id, noise, images, batch, rounds, local epochs)
    "one job": [("job-1", 1.0, 500, 16, 3, 2)],
    "two jobs, other noise and rate": [("job-1", 1.1, 300, 20, 2, 3), ("job-2", 0.9, 300, 10, 2, 1)],
}


def _charge_all(tmp_path, history, accountant):
    ledger = PrivacyLedger(tmp_path / f"ledger-{accountant}.json", site_name="site-a")
    plans = {}
    for job_id, noise, images, batch, rounds, epochs in history:
        plan = plan_job(DPConfig(enabled=True, noise_multiplier=noise, accountant=accountant, delta=1e-5),
                        PrivacyPolicy(), site_name="site-a", job=job_id, num_images=images, batch_size=batch,
                        rounds=rounds, local_epochs=epochs)
        plans[job_id] = plan
        for r in range(rounds):
            charge = ledger.charge_round(plan, job_id=job_id, round_index=r, policy=PrivacyPolicy())
    return ledger, plans, charge


def _events(ledger, job_id=None):
    return [dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)),
        e.steps) for e in ledger.read().charges(job_id)]


@pytest.mark.parametrize("name", list(HISTORIES))
def test_rdp_ledger_epsilon_equals_dp_accounting_rdp(tmp_path, name):
    ledger, plans, last = _charge_all(tmp_path, HISTORIES[name], "rdp")
    independent = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    independent.compose(dp_accounting.ComposedDpEvent(_events(ledger)))
    expected = independent.get_epsilon(1e-5)
    assert last.epsilon_lifetime == pytest.approx(expected, rel=1e-3)
    assert ledger.spent().epsilon == pytest.approx(expected, rel=1e-3)
    first_job = HISTORIES[name][0][0]
    per_job = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    per_job.compose(dp_accounting.ComposedDpEvent(_events(ledger, first_job)))
    assert ledger.spent(first_job).epsilon == pytest.approx(per_job.get_epsilon(1e-5), rel=1e-3)
    assert ledger.spent().accountant == "rdp" and last.accountant == "rdp"


@pytest.mark.parametrize("name", list(HISTORIES))
def test_prv_ledger_epsilon_matches_dp_accounting_pld(tmp_path, name):
    ledger, plans, last = _charge_all(tmp_path, HISTORIES[name], "prv")
    independent = pld.PLDAccountant(value_discretization_interval=1e-4)
    independent.compose(dp_accounting.ComposedDpEvent(_events(ledger)))
    expected = independent.get_epsilon(1e-5)
    assert last.accountant == "prv"
    assert abs(last.epsilon_lifetime - expected) <= 0.02 + 0.01 * expected, (last.epsilon_lifetime, expected)
    assert last.epsilon_lifetime >= expected - 0.02
    # And PRV is the tighter accountant: below RDP on the same history.
    rdp_check = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp_check.compose(dp_accounting.ComposedDpEvent(_events(ledger)))
    assert last.epsilon_lifetime < rdp_check.get_epsilon(1e-5)
