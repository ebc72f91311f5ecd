"""The empirical audit: the one-run bound's arithmetic, and a smoke run of both attacks.

The full run is a command (``ultrafedfm audit --empirical --out DIR``, a few minutes on two cores);
its numbers are in docs/privacy-audit.md.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from ultrafedfm.privacy.audit.onerun import audit_scores, epsilon_lower_bound, p_value
from ultrafedfm.privacy.audit.schema import REPORT_SCHEMA


def test_all_guesses_right_without_delta_gives_the_randomized_response_bound():
    # P[Binomial(r, q) >= r] = q^r = beta  ->  q = beta^(1/r), epsilon = log(q / (1 - q)).
    q = 0.05 ** (1 / 20)
    assert epsilon_lower_bound(m=100, r=20, v=20, delta=0.0, beta=0.05) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)


def test_the_bound_is_zero_at_chance_grows_with_correct_guesses_and_delta_only_lowers_it():
    assert epsilon_lower_bound(m=200, r=100, v=50, delta=0.0) == 0.0
    bounds = [epsilon_lower_bound(m=200, r=100, v=v, delta=0.0) for v in (65, 75, 85, 95)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert epsilon_lower_bound(m=200, r=100, v=85, delta=1e-4) < epsilon_lower_bound(m=200, r=100, v=85, delta=0.0)
    assert p_value(m=200, r=100, v=85, epsilon=0.5, delta=0.0) < p_value(m=200, r=100, v=85, epsilon=1.5, delta=0.0)


def test_the_bound_stays_below_the_true_epsilon_of_randomized_response():
    """Randomized response with epsilon = 1 is exactly 1-DP: the audit must not claim more (seeded trials)."""
    rng = np.random.default_rng(7)
    truth, bounds = 1.0, []
    for _ in range(20):
        included = rng.random(2000) < 0.5
        keep = rng.random(2000) < math.exp(truth) / (1 + math.exp(truth))
        scores = np.where(included == keep, 1.0, -1.0) + rng.normal(0, 1e-6, 2000)  # the best possible attacker
        bounds.append(audit_scores(scores, included, delta=0.0, ks=[1000]).epsilon_lower_bound)
    assert max(bounds) <= truth and np.median(bounds) > 0.7


def test_perfect_scores_guess_everything_and_bonferroni_splits_beta():
    included = np.array([True, False] * 20)
    result = audit_scores(included.astype(float), included, delta=0.0, ks=[5, 10])
    assert (result.k, result.correct, result.guesses, result.beta_each) == (10, 20, 20, 0.025)


def test_the_quick_empirical_audit_bounds_below_the_accountant_and_masking_defeats_inversion(quick_empirical):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (test dependency) validates the report schema")
    report = quick_empirical["report"]
    jsonschema.validate(report, REPORT_SCHEMA)
    dp_on, dp_off = report["canary_audit"]["runs"]
    assert dp_on["dp"] and not dp_off["dp"] and dp_off["epsilon_accountant"] is None
    assert 0 <= dp_on["epsilon_lower_bound"] < dp_on["epsilon_accountant"] and dp_on["noise_multiplier"] == 1.0
    assert dp_on["canaries"] == 32 and 0 < dp_on["inserted"] < 32
    plain, masked = report["inversion"]["attacks"]
    assert "plain" in plain["label"] and "masked" in masked["label"]
    assert plain["similarity"] > 0.99 and plain["rank"] == 1 and plain["p_value"] < 0.01  # exact recovery
    # At chance (the masks are fresh randomness, so only bounds that chance almost never crosses are asserted):
    # the mean similarity over three targets within 4 single-image sd of the decoys', not every target ranked first.
    assert abs(masked["similarity"] - masked["chance_mean"]) < 4 * masked["chance_sd"] and masked["rank"] > 1
    assert all(f["severity"] != "critical" for f in report["findings"])
