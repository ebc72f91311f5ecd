"""The site's DP ledger: charged before training, re-runs charged again, caps stop the site, crash- and race-safe."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ultrafedfm.privacy import (
    BudgetExhausted, DPConfig, LedgerError, PolicyRefusal, PrivacyLedger, PrivacyPolicy, SiteDP, plan_job, read_ledger,
)
from ultrafedfm.privacy.dp import Mechanism, compute_epsilon

CONFIG = DPConfig(enabled=True, noise_multiplier=1.0, accountant="rdp", delta=1e-5)


def _plan(config=CONFIG, *, job="mae_pretrain", rounds=10, num_images=100, batch_size=10, policy=PrivacyPolicy()):
    return plan_job(config, policy, site_name="site-a", job=job, num_images=num_images, batch_size=batch_size,
                    rounds=rounds, local_epochs=1)


def test_each_charge_records_the_mechanism_and_the_epsilon_after_it(tmp_path):
    path = tmp_path / "privacy" / "dp_ledger.json"
    ledger = PrivacyLedger(path, site_name="site-a")
    plan = _plan()
    first = ledger.charge_round(plan, job_id="job-1", round_index=0, policy=PrivacyPolicy())
    ledger.record_completion(first, steps_taken=10, clipping="ghost")
    second = ledger.charge_round(plan, job_id="job-1", round_index=1, policy=PrivacyPolicy())
    entries = read_ledger(path, site_name="site-a").entries
    assert [(e.seq, e.kind, e.round) for e in entries] == [(1, "charge", 0), (2, "completed", 0), (3, "charge", 1)]
    charge = entries[0]
    assert (charge.job_id, charge.job, charge.noise_multiplier, charge.sample_rate, charge.steps, charge.delta,
            charge.accountant) == ("job-1", "mae_pretrain", 1.0, 0.1, 10, 1e-5, "rdp")
    assert charge.epsilon_job == pytest.approx(compute_epsilon([Mechanism(1.0, 0.1, 10)], 1e-5, "rdp")[0])
    assert second.epsilon_job == pytest.approx(compute_epsilon([Mechanism(1.0, 0.1, 20)], 1e-5, "rdp")[0])
    assert entries[1].steps_taken == 10 and entries[1].clipping == "ghost"
    assert os.stat(path).st_mode & 0o777 == 0o600  # the site's own record
    assert json.loads(path.read_text())["site"] == "site-a"


def test_a_re_run_round_is_charged_again(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", site_name="site-a")
    plan = _plan()
    once = ledger.charge_round(plan, job_id="job-1", round_index=0, policy=PrivacyPolicy())
    again = ledger.charge_round(plan, job_id="job-1", round_index=0, policy=PrivacyPolicy())
    assert len(ledger.read().charges()) == 2 and again.epsilon_job > once.epsilon_job
    assert ledger.spent("job-1").epsilon == pytest.approx(again.epsilon_job)


def test_the_site_accountant_spans_jobs_and_processes(tmp_path):
    path = tmp_path / "l.json"
    plan_a, plan_b = _plan(job="a"), _plan(job="b", num_images=200)
    PrivacyLedger(path, site_name="site-a").charge_round(plan_a, job_id="job-a", round_index=0,
                                                        policy=PrivacyPolicy())
    reopened = PrivacyLedger(path, site_name="site-a")  # a new site process: the history comes from disk
    charge = reopened.charge_round(plan_b, job_id="job-b", round_index=0, policy=PrivacyPolicy())
    both = [Mechanism(1.0, 0.1, 10), Mechanism(1.0, 0.05, 20)]
    assert charge.epsilon_lifetime == pytest.approx(compute_epsilon(both, 1e-5, "rdp")[0])
    assert charge.epsilon_job == pytest.approx(compute_epsilon(both[1:], 1e-5, "rdp")[0])
    assert charge.epsilon_lifetime > charge.epsilon_job
    assert reopened.spent().epsilon == pytest.approx(charge.epsilon_lifetime)


def test_a_site_at_its_lifetime_cap_stops_contributing_and_says_why(tmp_path):
    one_round = compute_epsilon([Mechanism(1.0, 0.1, 10)], 1e-5, "rdp")[0]
    two_rounds = compute_epsilon([Mechanism(1.0, 0.1, 20)], 1e-5, "rdp")[0]
    policy = PrivacyPolicy(lifetime_epsilon=(one_round + two_rounds) / 2)  # room for one round only
    site = SiteDP(site_name="site-a", policy=policy, ledger_path=tmp_path / "l.json")
    plan = site.plan(CONFIG, job="mae_pretrain", num_images=100, batch_size=10, rounds=10, local_epochs=1)
    with site.begin_round(plan, job_id="job-1", round_index=0):
        pass
    with pytest.raises(BudgetExhausted) as info:
        site.begin_round(plan, job_id="job-1", round_index=1)
    assert isinstance(info.value, PolicyRefusal) and info.value.key == "privacy.lifetime_epsilon"
    message = str(info.value)
    assert "privacy.lifetime_epsilon" in message and f"{two_rounds:.3f}" in message and "site-a" in message
    assert str(tmp_path) not in message
    # Another job is stopped as well: the lifetime budget is the site's, not the job's.
    other = site.plan(CONFIG, job="other", num_images=100, batch_size=10, rounds=1, local_epochs=1)
    with pytest.raises(BudgetExhausted, match="lifetime"):
        site.begin_round(other, job_id="job-2", round_index=0)
    entries = read_ledger(tmp_path / "l.json").entries
    assert [e.kind for e in entries] == ["charge", "refusal", "refusal"]
    assert entries[1].key == "privacy.lifetime_epsilon" and entries[1].epsilon_lifetime == pytest.approx(two_rounds)
    assert site.spent().epsilon == pytest.approx(one_round)  # refusals spend nothing


def test_the_job_caps_stop_re_runs_and_rounds_beyond_the_plan(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", site_name="site-a")
    planned = _plan(rounds=2).planned_epsilon
    policy = PrivacyPolicy(max_epsilon=planned * 1.01)
    plan = _plan(rounds=2, policy=policy)
    for r in (0, 1):
        ledger.charge_round(plan, job_id="job-1", round_index=r, policy=policy)
    with pytest.raises(BudgetExhausted) as info:  # round 1 again: past the site's per-job cap
        ledger.charge_round(plan, job_id="job-1", round_index=1, policy=policy)
    assert info.value.key == "privacy.max_epsilon" and "privacy.max_epsilon" in str(info.value)
    with pytest.raises(BudgetExhausted) as info:  # the server cannot run more rounds than the job declared
        ledger.charge_round(plan, job_id="job-1", round_index=2, policy=PrivacyPolicy())
    assert info.value.key == "rounds"
    target = _plan(DPConfig(enabled=True, target_epsilon=2.0, accountant="rdp"), rounds=2)
    for r in (0, 1):
        ledger.charge_round(target, job_id="job-2", round_index=r, policy=PrivacyPolicy())
    with pytest.raises(BudgetExhausted) as info:  # a re-run would pass the job's own target epsilon
        ledger.charge_round(target, job_id="job-2", round_index=0, policy=PrivacyPolicy())
    assert info.value.key == "dp.target_epsilon"


def test_a_damaged_edited_or_foreign_ledger_is_refused_not_reset(tmp_path):
    path = tmp_path / "l.json"
    ledger = PrivacyLedger(path, site_name="site-a")
    for r in range(3):
        ledger.charge_round(_plan(), job_id="job-1", round_index=r, policy=PrivacyPolicy())
    with pytest.raises(LedgerError, match="belongs to site 'site-a'"):
        PrivacyLedger(path, site_name="site-b")
    data = json.loads(path.read_text())
    del data["entries"][1]  # someone removes a charge to free budget
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="numbered"):
        ledger.charge_round(_plan(), job_id="job-1", round_index=3, policy=PrivacyPolicy())
    path.write_text('{"format": 1, "site": "site-a", "entries": [')
    with pytest.raises(LedgerError, match="do not delete it"):
        read_ledger(path)


_CHARGER = textwrap.dedent("""
    import sys
    from ultrafedfm.privacy import DPConfig, PrivacyLedger, PrivacyPolicy, plan_job
    path, job, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    plan = plan_job(DPConfig(enabled=True, noise_multiplier=1.0, accountant="rdp", delta=1e-5), PrivacyPolicy(),
                    site_name="site-a", job=job, num_images=100, batch_size=10, rounds=n, local_epochs=1)
    ledger = PrivacyLedger(path, site_name="site-a")
    for r in range(n):
        ledger.charge_round(plan, job_id=job, round_index=r, policy=PrivacyPolicy())
""")


def test_two_jobs_charging_at_once_lose_no_charge(tmp_path):
    path = tmp_path / "l.json"
    script = tmp_path / "charge.py"
    script.write_text(_CHARGER)
    procs = [subprocess.Popen([sys.executable, str(script), str(path), job, "12"]) for job in ("job-a", "job-b")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ledger = read_ledger(path, site_name="site-a")
    assert len(ledger.charges("job-a")) == 12 and len(ledger.charges("job-b")) == 12
    assert ledger.spent().epsilon == pytest.approx(compute_epsilon([Mechanism(1.0, 0.1, 240)], 1e-5, "rdp")[0])


_SITE_ROUNDS = textwrap.dedent("""
    import sys, time, torch
    from ultrafedfm.privacy import DPConfig, PrivacyPolicy, SiteDP
    from ultrafedfm.train.pretrain import PretrainConfig, build_model, train_local
    torch.set_num_threads(1)
    path = sys.argv[1]
    STALL_ROUND = 3

    class Images(torch.utils.data.Dataset):
        round = 0
        def __len__(self):
            return 8
        def __getitem__(self, i):
            if Images.round == STALL_ROUND:
                time.sleep(0.05)  # round 3 trains slowly: the parent kills the process inside it
            return torch.full((1, 32, 32), i / 8)

    config = PretrainConfig(preset="tiny", batch_size=4, num_workers=0, degradations=None)
    torch.manual_seed(0)
    model = build_model(config)
    site = SiteDP(site_name="site-a", policy=PrivacyPolicy(), ledger_path=path)
    plan = site.plan(DPConfig(enabled=True, noise_multiplier=1.0, accountant="rdp"), job="mae_pretrain",
                     num_images=8, batch_size=4, rounds=10, local_epochs=10)
    for r in range(10):
        Images.round = r
        with site.begin_round(plan, job_id="job-1", round_index=r) as dp_round:
            print(f"training {r}", flush=True)
            train_local(model=model, dataset=Images(), config=config, epochs=10, lr=1e-3,
                        privatize=dp_round.privatize, progress=False)
            dp_round.finish()
        print(f"done {r}", flush=True)
""")


def test_the_ledger_is_intact_and_correct_after_the_site_is_killed_mid_round(tmp_path):
    path = tmp_path / "privacy" / "dp_ledger.json"
    script = tmp_path / "site.py"
    script.write_text(_SITE_ROUNDS)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == "training 3":
                time.sleep(0.5)  # well inside round 3 (20 steps that read ~4 images at 0.05 s each)
                break
        assert proc.poll() is None, f"the site process ended early: {lines}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lines[-2:] == ["done 2", "training 3"]

    ledger = read_ledger(path, site_name="site-a")  # parses: every write was whole
    kinds = [(e.kind, e.round) for e in ledger.entries]
    assert kinds == [("charge", 0), ("completed", 0), ("charge", 1), ("completed", 1), ("charge", 2),
                     ("completed", 2), ("charge", 3)]  # the killed round was paid for before it trained
    steps = ledger.charges()[0].steps
    assert steps == 20 and all(e.steps_taken == 20 for e in ledger.entries if e.kind == "completed")
    expected = compute_epsilon([Mechanism(1.0, 0.5, 4 * steps)], 1 / 80, "rdp")[0]
    assert ledger.entries[-1].epsilon_job == pytest.approx(expected)

    # The site restarts and the server re-runs round 3: charged again, on top of the killed attempt.
    ledger = PrivacyLedger(path, site_name="site-a")
    plan = plan_job(DPConfig(enabled=True, noise_multiplier=1.0, accountant="rdp"), PrivacyPolicy(),
                    site_name="site-a", job="mae_pretrain", num_images=8, batch_size=4, rounds=10, local_epochs=10)
    rerun = ledger.charge_round(plan, job_id="job-1", round_index=3, policy=PrivacyPolicy())
    assert rerun.seq == 8
    assert rerun.epsilon_job == pytest.approx(compute_epsilon([Mechanism(1.0, 0.5, 5 * steps)], 1 / 80, "rdp")[0])
