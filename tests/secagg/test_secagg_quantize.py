"""Fixed-point encoding into Z_{2^b}: stochastic rounding, clipping, and the ring overflow bound."""
from __future__ import annotations

import numpy as np
import pytest

from ultrafedfm.config import ConfigError, from_mapping
from ultrafedfm.secagg import SecAggConfig
from ultrafedfm.secagg.quantize import (
    RingOverflowError, StochasticEncoder, check_overflow_bound, dequantize, max_safe_frac_bits, quantize_into, ring_dtype,
)


@pytest.mark.parametrize("ring_bits", [32, 64])
def test_rounding_error_below_one_step_and_unbiased(ring_bits):
    rng = np.random.default_rng(0)
    f = 10
    values = rng.uniform(-0.9, 0.9, 200_000)
    out = np.empty(values.size, dtype=ring_dtype(ring_bits))
    assert quantize_into(values, out, clip=1.0, frac_bits=f) == 0
    decoded = dequantize(out, frac_bits=f)
    assert np.max(np.abs(decoded - values)) < 2.0**-f
    # unbiased: a value a third of a step above a grid point averages back to itself
    third = np.full(200_000, 2.0**-f / 3)
    quantize_into(third, out, clip=1.0, frac_bits=f)
    assert abs(dequantize(out, frac_bits=f).mean() - third[0]) < 0.01 * 2.0**-f


def test_chunked_encoder_with_multiplier_matches_bound():
    values = np.random.default_rng(3).uniform(-1, 1, 10_000).astype(np.float32)
    encoder = StochasticEncoder(clip=0.5, frac_bits=12, chunk_elements=4096)
    out = np.empty(values.size, dtype=np.uint32)
    clipped = sum(encoder.encode_into(values[i:i + 4096], out[i:i + 4096], multiplier=0.75)
                  for i in range(0, values.size, 4096))
    expected = np.clip(values.astype(np.float64) * 0.75, -0.5, 0.5)
    assert clipped == np.count_nonzero(np.abs(values.astype(np.float64) * 0.75) > 0.5)
    assert np.max(np.abs(dequantize(out, frac_bits=12) - expected)) < 2.0**-12
    with pytest.raises(ValueError, match="non-finite"):
        encoder.encode_into(np.array([1.0, np.inf]), out[:2])


def test_clipping_counts_and_limits():
    out = np.empty(4, dtype=np.uint32)
    clipped = quantize_into(np.array([-3.0, -0.5, 0.5, 7.0]), out, clip=1.0, frac_bits=8)
    assert clipped == 2
    assert dequantize(out, frac_bits=8).tolist() == [-1.0, -0.5, 0.5, 1.0]


def test_overflow_bound_is_exact_at_the_boundary():
    # n * (max(C, 1) * 2^f + 1) < 2^(b-1): 16 sites, C = 1, 32 bits -> f = 26 is the largest safe
    assert max_safe_frac_bits(num_sites=16, clip=1.0, ring_bits=32) == 26
    check_overflow_bound(num_sites=16, clip=1.0, frac_bits=26, ring_bits=32)
    with pytest.raises(RingOverflowError, match="could overflow the 32-bit ring.*frac_bits <= 26"):
        check_overflow_bound(num_sites=16, clip=1.0, frac_bits=27, ring_bits=32)
    assert max_safe_frac_bits(num_sites=16, clip=1.0, ring_bits=64) == 48  # float64-exact: 2^53


def _sum_of_extremes(n: int, frac_bits: int, sign: float) -> float:
    encoded = np.empty(n, dtype=np.uint32)
    quantize_into(np.full(n, sign * 1.0), encoded, clip=1.0, frac_bits=frac_bits)
    total = np.zeros(1, dtype=np.uint32)
    for value in encoded:  # the ring sum, as the server forms it
        total += value
    return float(dequantize(total, frac_bits=frac_bits)[0])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_bound_is_what_keeps_the_sum_right(sign):
    n = 16
    safe = max_safe_frac_bits(num_sites=n, clip=1.0, ring_bits=32)
    assert _sum_of_extremes(n, safe, sign) == sign * n  # every site at +-C: still decodes
    # one more bit: all sites at +C wrap around (-2^31 is still representable, so -C needs two)
    assert _sum_of_extremes(n, safe + (1 if sign > 0 else 2), sign) != sign * n


def test_config_checks_overflow_loudly():
    cfg = SecAggConfig(max_sites=16)
    assert cfg.frac_bits == 26 and cfg.ring_bits == 32
    with pytest.raises(ConfigError, match="key 'frac_bits'.*16 sites.*overflow"):
        SecAggConfig(max_sites=16, frac_bits=27)
    with pytest.raises(ConfigError, match="key 'clip'.*fraction bits"):
        SecAggConfig(max_sites=64, clip=2.0**20)
    assert SecAggConfig(max_sites=64, clip=2.0**20, ring_bits=64).frac_bits == 26
    with pytest.raises(ConfigError, match="secagg.yaml: key 'secagg.frac_bits'"):
        from_mapping(SecAggConfig, {"max_sites": 16, "frac_bits": 40}, source="secagg.yaml", prefix="secagg")


def test_config_threshold_only_upward_and_min_sites():
    cfg = SecAggConfig()
    assert [cfg.threshold_for(n) for n in (3, 4, 5, 8, 16)] == [2, 3, 3, 5, 9]
    assert SecAggConfig(threshold=6).threshold_for(8) == 6
    with pytest.raises(ConfigError, match="below the strict majority 5"):
        SecAggConfig(threshold=3).threshold_for(8)
    with pytest.raises(ConfigError, match="exceeds the 5 sites"):
        SecAggConfig(threshold=6).threshold_for(5)
    with pytest.raises(ConfigError, match="min_sites"):
        SecAggConfig(min_sites=1)
