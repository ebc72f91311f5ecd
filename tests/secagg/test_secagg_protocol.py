"""A full round equals plaintext weighted FedAvg within the quantisation bound; dropouts recover or abort."""
from __future__ import annotations

import numpy as np
import pytest

from ultrafedfm.secagg import (
    MaskedInput, ProtocolError, RoundAborted, SecAggConfig, from_bytes, from_dict, simulate_round, to_bytes, to_dict,
)

D = 5000


def _inputs(names, *, seed=0, scale=0.01):
    rng = np.random.default_rng(seed)
    deltas = {n: (rng.standard_normal(D) * scale).astype(np.float32) for n in names}
    weights = {n: float(w) for n, w in zip(names, rng.integers(50, 400, len(names)))}
    return deltas, weights


def _plaintext(names, deltas, weights, clip_at=None):
    contributions = [weights[n] * deltas[n].astype(np.float64) for n in names]
    if clip_at is not None:
        contributions = [np.clip(c, -clip_at, clip_at) for c in contributions]
    total_w = sum(weights[n] for n in names)
    return sum(contributions), total_w


def _assert_matches(result, names, deltas, weights, config, clip_at=None):
    s, w = _plaintext(names, deltas, weights, clip_at)
    step = 2.0**-config.frac_bits * config.max_weight  # one rounding step, in weight units
    bound = len(names) * step  # |decoded sum - plaintext sum| < n * 2^-f * max_weight
    assert sorted(result.survivors) == sorted(names)
    assert np.max(np.abs(result.weighted_delta_sum() - s)) < bound
    assert abs(result.weight_sum - w) < bound
    mean = s / w
    mean_bound = (bound + np.abs(mean) * bound) / (w - bound)
    assert np.all(np.abs(result.mean_delta(np.float64) - mean) <= mean_bound)
    assert result.mean_delta().dtype == np.float32


@pytest.mark.parametrize("ring_bits,prg", [(32, "aes-256-ctr"), (64, "chacha20")])
def test_round_equals_weighted_fedavg(pki, ring_bits, prg):
    config = SecAggConfig(max_sites=8, max_weight=500.0, ring_bits=ring_bits, prg=prg)
    names = list(pki.identities(4))
    deltas, weights = _inputs(names)
    report = simulate_round(identities=pki.identities(4), root_ca=pki.root_ca, deltas=deltas, weights=weights,
                            config=config)
    _assert_matches(report.result, names, deltas, weights, config)
    # bytes on the wire for the masked input: one ring element per coordinate + the weight + a small header
    masked_bytes = report.bytes_sent[names[0]]["masked_input"]
    assert (D + 1) * ring_bits // 8 < masked_bytes < (D + 1) * ring_bits // 8 + 300


def test_clipped_coordinates_give_fedavg_of_clipped_values(pki):
    config = SecAggConfig(max_sites=8, max_weight=400.0, clip=0.005)
    names = list(pki.identities(3))
    deltas, weights = _inputs(names, scale=0.02)  # many coordinates of w/max_w * delta exceed 0.005
    report = simulate_round(identities=pki.identities(3), root_ca=pki.root_ca, deltas=deltas, weights=weights,
                            config=config)
    s_clipped, _ = _plaintext(names, deltas, {n: w / 400.0 for n, w in weights.items()}, clip_at=0.005)
    assert np.max(np.abs(report.result.weighted_delta_sum() / 400.0 - s_clipped)) < 3 * 2.0**-config.frac_bits
    assert abs(report.result.weight_sum - sum(weights.values())) < 3 * 2.0**-config.frac_bits * 400.0  # never clipped
    s_raw, _ = _plaintext(names, deltas, weights)
    assert np.max(np.abs(report.result.weighted_delta_sum() - s_raw)) > 0.1  # clipping did change it


@pytest.mark.parametrize("n,k", [(5, 0), (5, 1), (5, 2), (5, 3), (4, 1), (4, 2), (7, 3), (7, 4)])
def test_dropouts_after_masked_input(pki, n, k):
    """k sites drop after sending their masked input: recovered iff n - k >= t (strict majority)."""
    config = SecAggConfig(max_sites=8)
    identities = pki.identities(n)
    names = list(identities)
    deltas, weights = _inputs(names, seed=n * 10 + k)
    weights = {m: 1.0 / (i + 1) for i, m in enumerate(names)}
    t = config.threshold_for(n)
    gone = names[:k]
    run = dict(identities=identities, root_ca=pki.root_ca, deltas=deltas, weights=weights, config=config,
               drop_before_unmask=gone)
    if k <= n - t:
        _assert_matches(simulate_round(**run).result, names, deltas, weights, config)  # their inputs still count
    else:
        with pytest.raises(RoundAborted, match=f"{n - k} survivors signed the survivor list, threshold t={t}"):
            simulate_round(**run)


@pytest.mark.parametrize("consistency_check", [True, False])
@pytest.mark.parametrize("k", [2, 3])
def test_dropouts_during_unmasking(pki, k, consistency_check):
    """All 5 sign the survivor list (or there is no check), then k drop before answering: t = 3 needed."""
    config = SecAggConfig(max_sites=8, max_weight=500.0, consistency_check=consistency_check)
    identities = pki.identities(5)
    names = list(identities)
    deltas, weights = _inputs(names, seed=k)
    run = dict(identities=identities, root_ca=pki.root_ca, deltas=deltas, weights=weights, config=config,
               drop_after_check=names[1:1 + k])
    if k <= 2:
        _assert_matches(simulate_round(**run).result, names, deltas, weights, config)
    else:
        with pytest.raises(RoundAborted, match="2 sites answered the unmask request, threshold t=3"):
            simulate_round(**run)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dropouts_before_masked_input(pki, k):
    """k sites share keys then drop: their pairwise masks are removed via their reconstructed mask keys."""
    config = SecAggConfig(max_sites=8)
    identities = pki.identities(5)
    names = list(identities)
    deltas, weights = _inputs(names, seed=k)
    weights = {m: 0.5 for m in names}
    run = dict(identities=identities, root_ca=pki.root_ca, deltas=deltas, weights=weights, config=config,
               drop_before_input=names[-k:])
    if 5 - k >= max(config.min_sites, config.threshold_for(5)):
        result = simulate_round(**run).result
        assert result.dropped == tuple(names[-k:])
        _assert_matches(result, names[:-k], deltas, weights, config)
    else:
        with pytest.raises(RoundAborted, match="only 2 masked inputs arrived"):
            simulate_round(**run)


def test_mixed_dropouts_in_every_phase(pki):
    config = SecAggConfig(max_sites=8)
    identities = pki.identities(7)
    names = list(identities)
    deltas, weights = _inputs(names, seed=3)
    weights = {m: 1.0 for m in names}
    result = simulate_round(identities=identities, root_ca=pki.root_ca, deltas=deltas, weights=weights,
                            config=config, drop_before_sharing=[names[0]], drop_before_input=[names[1]],
                            drop_before_unmask=[names[2]]).result
    # t = 4 of 7; 4 sites answer the unmask request; the sum has the 5 inputs that arrived
    _assert_matches(result, names[2:], deltas, weights, config)
    assert result.dropped == (names[1],)


def test_min_sites_is_enforced(pki):
    config = SecAggConfig(min_sites=4, max_sites=8)
    identities = pki.identities(3)
    deltas, weights = _inputs(list(identities))
    with pytest.raises(RoundAborted, match="only 3 sites advertised keys.*min_sites=4"):
        simulate_round(identities=identities, root_ca=pki.root_ca, deltas=deltas, weights=weights, config=config)


def test_messages_roundtrip_bytes_and_dicts(open_round):
    r = open_round(3)
    messages = [r.roster, *r.shares.values(), *r.deliveries.values()]
    for name, client in r.clients.items():
        masked = client.mask_input(r.deliveries[name], delta=np.ones(10, np.float32) * 0.1, weight=1.0)
        r.server.receive_masked_input(from_bytes(to_bytes(masked)))
        messages.append(masked)
    survivor_list = r.server.survivor_list()
    signatures = [c.sign_survivors(survivor_list) for c in r.clients.values()]
    for signature in signatures:
        r.server.receive_survivor_signature(from_dict(to_dict(signature)))
    request = r.server.unmask_request()
    answers = [c.unmask(request) for c in r.clients.values()]
    messages += [survivor_list, *signatures, request, *answers]
    for message in messages:
        again = from_bytes(to_bytes(message))
        assert to_bytes(again) == to_bytes(message)  # canonical
        assert to_bytes(from_dict(to_dict(message))) == to_bytes(message)
        assert again.phase == message.phase and again.sender == message.sender
    assert isinstance(messages[7], MaskedInput) and np.array_equal(from_bytes(to_bytes(messages[7])).masked,
                                                                  messages[7].masked)


def test_malformed_messages_are_refused(open_round):
    r = open_round(3)
    data = to_bytes(r.shares["site-1"])
    with pytest.raises(ProtocolError, match="bad magic"):
        from_bytes(b"X" + data[1:])
    with pytest.raises(ProtocolError, match="trailing bytes"):
        from_bytes(data + b"\0")
    as_dict = to_dict(r.shares["site-1"])
    with pytest.raises(ProtocolError, match="must carry phase 'share_keys'"):
        from_dict({**as_dict, "phase": "unmask"})
    with pytest.raises(ProtocolError, match="round must be a non-negative integer"):
        from_dict({**as_dict, "round": "4"})
    with pytest.raises(ProtocolError, match="ciphertexts must be a mapping"):
        from_dict({**as_dict, "ciphertexts": {"site-2": "not bytes"}})


def test_non_finite_delta_is_refused_before_anything_is_sent(open_round):
    r = open_round(3)
    delta = np.zeros(1000, np.float32)
    delta[700] = np.nan
    with pytest.raises(ValueError, match="site 'site-1': the delta has non-finite values"):
        r.clients["site-1"].mask_input(r.deliveries["site-1"], delta=delta, weight=1.0)
    with pytest.raises(ValueError, match="max_weight"):
        r.clients["site-2"].mask_input(r.deliveries["site-2"], delta=np.zeros(10, np.float32), weight=2.0)


def test_flatten_and_unflatten_model_arrays():
    from ultrafedfm.secagg.vectors import flatten_arrays, unflatten_arrays

    arrays = {"b.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "a.bias": np.array([7.0], np.float64)}
    vector, layout = flatten_arrays(arrays)
    assert vector.tolist() == [7.0, 0, 1, 2, 3, 4, 5]  # sorted names: a.bias first
    back = unflatten_arrays(vector, layout)
    assert back["b.weight"].shape == (2, 3) and back["a.bias"].dtype == np.float64
    assert np.array_equal(back["b.weight"], arrays["b.weight"])
    with pytest.raises(ValueError, match="different models"):
        unflatten_arrays(vector[:-1], layout)
