"""A full round equals plaintext weighted FedAvg within the quantisation bound; figures travel masked and
decode to aggregates; dropouts recover or abort; the server checks an input before summing it."""
from __future__ import annotations

import numpy as np
import pytest

from ultrafedfm.secagg import (
    MaskedInput, ProtocolError, RoundAborted, RoundFigures, SecAggConfig, from_bytes, from_dict, simulate_round,
    to_bytes, to_dict,
)
from ultrafedfm.secagg.figures import FIGURE_SLOTS, max_count
from ultrafedfm.secagg.masks import CHUNK_ELEMENTS

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
def test_round_equals_weighted_fedavg(consortium, ring_bits, prg):
    config = SecAggConfig(max_sites=8, max_weight=500.0, ring_bits=ring_bits, prg=prg)
    names = list(consortium.first(4))
    deltas, weights = _inputs(names)
    report = simulate_round(signers=consortium.first(4), members=consortium.members(4), deltas=deltas,
                            weights=weights, config=config)
    _assert_matches(report.result, names, deltas, weights, config)
    # bytes on the wire for the masked input: one ring element per coordinate + 4 figure slots + a small header
    masked_bytes = report.bytes_sent[names[0]]["masked_input"]
    assert (D + FIGURE_SLOTS) * ring_bits // 8 < masked_bytes < (D + FIGURE_SLOTS) * ring_bits // 8 + 300


def test_clipped_coordinates_give_fedavg_of_clipped_values(consortium):
    config = SecAggConfig(max_sites=8, max_weight=400.0, clip=0.005)
    names = list(consortium.first(3))
    deltas, weights = _inputs(names, scale=0.02)  # many coordinates of w/max_w * delta exceed 0.005
    report = simulate_round(signers=consortium.first(3), members=consortium.members(3), deltas=deltas,
                            weights=weights, config=config)
    s_clipped, _ = _plaintext(names, deltas, {n: w / 400.0 for n, w in weights.items()}, clip_at=0.005)
    assert np.max(np.abs(report.result.weighted_delta_sum() / 400.0 - s_clipped)) < 3 * 2.0**-config.frac_bits
    assert abs(report.result.weight_sum - sum(weights.values())) < 3 * 2.0**-config.frac_bits * 400.0  # never clipped
    s_raw, _ = _plaintext(names, deltas, weights)
    assert np.max(np.abs(report.result.weighted_delta_sum() - s_raw)) > 0.1  # clipping did change it


@pytest.mark.parametrize("n,k", [(5, 0), (5, 1), (5, 2), (5, 3), (4, 1), (4, 2), (7, 3), (7, 4)])
def test_dropouts_after_masked_input(consortium, n, k):
    """k sites drop after sending their masked input: recovered iff n - k >= t (strict majority)."""
    config = SecAggConfig(max_sites=8)
    identities = consortium.first(n)
    names = list(identities)
    deltas, weights = _inputs(names, seed=n * 10 + k)
    weights = {m: 1.0 / (i + 1) for i, m in enumerate(names)}
    t = config.threshold_for(n)
    gone = names[:k]
    run = dict(signers=identities, members=consortium.members(n), deltas=deltas, weights=weights, config=config,
               drop_before_unmask=gone)
    if k <= n - t:
        _assert_matches(simulate_round(**run).result, names, deltas, weights, config)  # their inputs still count
    else:
        with pytest.raises(RoundAborted, match=f"{n - k} survivors signed the survivor list, threshold t={t}"):
            simulate_round(**run)


@pytest.mark.parametrize("consistency_check", [True, False])
@pytest.mark.parametrize("k", [2, 3])
def test_dropouts_during_unmasking(consortium, k, consistency_check):
    """All 5 sign the survivor list (or there is no check), then k drop before answering: t = 3 needed."""
    config = SecAggConfig(max_sites=8, max_weight=500.0, consistency_check=consistency_check)
    identities = consortium.first(5)
    names = list(identities)
    deltas, weights = _inputs(names, seed=k)
    run = dict(signers=identities, members=consortium.members(5), deltas=deltas, weights=weights, config=config,
               drop_after_check=names[1:1 + k])
    if k <= 2:
        _assert_matches(simulate_round(**run).result, names, deltas, weights, config)
    else:
        with pytest.raises(RoundAborted, match="2 sites answered the unmask request, threshold t=3"):
            simulate_round(**run)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dropouts_before_masked_input(consortium, k):
    """k sites share keys then drop: their pairwise masks are removed via their reconstructed mask keys."""
    config = SecAggConfig(max_sites=8)
    identities = consortium.first(5)
    names = list(identities)
    deltas, weights = _inputs(names, seed=k)
    weights = {m: 0.5 for m in names}
    run = dict(signers=identities, members=consortium.members(5), deltas=deltas, weights=weights, config=config,
               drop_before_input=names[-k:])
    if 5 - k >= max(config.min_sites, config.threshold_for(5)):
        result = simulate_round(**run).result
        assert result.dropped == tuple(names[-k:])
        _assert_matches(result, names[:-k], deltas, weights, config)
    else:
        with pytest.raises(RoundAborted, match="only 2 masked inputs arrived"):
            simulate_round(**run)


def test_mixed_dropouts_in_every_phase(consortium):
    config = SecAggConfig(max_sites=8)
    identities = consortium.first(7)
    names = list(identities)
    deltas, weights = _inputs(names, seed=3)
    weights = {m: 1.0 for m in names}
    result = simulate_round(signers=identities, members=consortium.members(7), deltas=deltas, weights=weights,
                            config=config, drop_before_sharing=[names[0]], drop_before_input=[names[1]],
                            drop_before_unmask=[names[2]]).result
    # t = 4 of 7; 4 sites answer the unmask request; the sum has the 5 inputs that arrived
    _assert_matches(result, names[2:], deltas, weights, config)
    assert result.dropped == (names[1],)


def test_min_sites_is_enforced(consortium):
    config = SecAggConfig(min_sites=4, max_sites=8)
    identities = consortium.first(3)
    deltas, weights = _inputs(list(identities))
    with pytest.raises(RoundAborted, match="only 3 sites advertised keys.*4 needed.*min_sites=4"):
        simulate_round(signers=identities, members=consortium.members(3), deltas=deltas, weights=weights,
                       config=config)


def test_messages_roundtrip_bytes_and_dicts(open_round):
    r = open_round(3)
    messages = [r.roster, *r.shares.values(), *r.deliveries.values()]
    for name in r.clients:
        masked = r.mask(name, np.ones(10) * 0.1)
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
        r.mask("site-1", delta)
    with pytest.raises(ValueError, match="max_weight"):
        r.mask("site-2", np.zeros(10), weight=2.0)
    with pytest.raises(ValueError, match="site 'site-3': loss nan is not finite"):
        r.mask("site-3", np.zeros(10), loss=float("nan"))


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


def test_loss_steps_and_image_counts_travel_masked_and_decode_to_aggregates(consortium):
    """The server learns sum(w*loss)/sum(w), total steps and total images -- and the masked slots hide each site's."""
    config = SecAggConfig(max_sites=8, max_weight=1000.0)
    signers = consortium.first(4)
    names = list(signers)
    counts = {"site-1": 120, "site-2": 40, "site-3": 300, "site-4": 7}
    losses = {"site-1": 0.82, "site-2": 1.37, "site-3": 0.41, "site-4": 2.5}
    steps = {"site-1": 15, "site-2": 5, "site-3": 38, "site-4": 1}
    figures = {n: RoundFigures(loss=losses[n], steps=steps[n], num_samples=counts[n]) for n in names}
    deltas = {n: np.zeros(64, np.float32) for n in names}
    weights = {n: float(counts[n]) for n in names}
    result = simulate_round(signers=signers, members=consortium.members(4), deltas=deltas, weights=weights,
                            figures=figures, config=config, drop_before_unmask=["site-4"]).result
    agg = result.figures
    expected_loss = sum(counts[n] * losses[n] for n in names) / sum(counts.values())
    step = 4 * 2.0**-config.frac_bits * config.max_weight
    assert abs(agg.weight_sum - 467) < step
    assert abs(result.loss - expected_loss) < (step * config.max_loss + step * expected_loss) / (467 - step)
    assert (agg.steps, agg.num_samples) == (59, 467)  # exact integers
    # without site-4's input (dropped before its input) its figures are not in the sums
    result = simulate_round(signers=signers, members=consortium.members(4), deltas=deltas, weights=weights,
                            figures=figures, config=config, drop_before_input=["site-4"]).result
    assert (result.figures.steps, result.figures.num_samples) == (58, 460)
    assert abs(result.loss - (120 * 0.82 + 40 * 1.37 + 300 * 0.41) / 460) < 1e-4


def test_figure_slots_split_across_a_mask_chunk_boundary_decode_exactly(consortium):
    config = SecAggConfig(max_sites=8, max_weight=10.0)
    d = CHUNK_ELEMENTS - 2  # two figure slots in the first chunk, two in the second
    signers = consortium.first(3)
    deltas = {n: np.full(d, 0.25, np.float32) for n in signers}
    figures = {n: RoundFigures(loss=1.0, steps=2 + i, num_samples=5) for i, n in enumerate(signers)}
    result = simulate_round(signers=signers, members=consortium.members(3), deltas=deltas,
                            weights=dict.fromkeys(signers, 5.0), figures=figures, config=config).result
    assert result.vector_length == d
    assert (result.figures.steps, result.figures.num_samples) == (9, 15)
    assert abs(result.loss - 1.0) < 1e-4 and abs(result.weight_sum - 15.0) < 1e-4
    assert np.allclose(result.mean_delta(), 0.25, atol=1e-5)


def test_counts_beyond_the_ring_bound_and_negative_counts_are_refused(open_round):
    r = open_round(3, config=SecAggConfig(max_sites=32))
    limit = max_count(r.clients["site-1"].config)
    assert limit == (2**31 - 1) // 32
    with pytest.raises(ValueError, match=r"site 'site-1': num_samples=67108864 must be an integer in \[0, 67108863\]"):
        r.mask("site-1", np.zeros(8), num_samples=limit + 1)
    with pytest.raises(ValueError, match="site 'site-2': steps=-1"):
        r.mask("site-2", np.zeros(8), steps=-1)


def test_server_checks_a_masked_input_before_it_enters_the_sum(open_round):
    """check_masked_input never touches the sum: an input refused after it (e.g. for a bad reply) is not summed,
    the site is listed as dropped and the round still unmasks the others' exact sum."""
    r = open_round(4)
    inputs = {n: r.mask(n, np.full(16, 0.1 * (i + 1))) for i, n in enumerate(sorted(r.clients))}
    short = MaskedInput(sender="site-2", job_id="job-A", round=4, masked=inputs["site-2"].masked[:-1])
    r.server.receive_masked_input(inputs["site-1"])  # fixes the vector length at 16
    with pytest.raises(ProtocolError, match="site-2' has 15 coordinates, expected 16"):
        r.server.check_masked_input(short)
    r.server.check_masked_input(inputs["site-4"])  # valid, but the adapter then refuses the rest of its reply
    for name in ("site-2", "site-3"):
        r.server.receive_masked_input(inputs[name])
    listed = r.server.survivor_list()
    assert listed.survivors == ("site-1", "site-2", "site-3") and listed.dropped == ("site-4",)
    for name in listed.survivors:
        r.server.receive_survivor_signature(r.clients[name].sign_survivors(listed))
    request = r.server.unmask_request()
    for name in listed.survivors:
        r.server.receive_unmask_response(r.clients[name].unmask(request))
    result = r.server.aggregate()
    assert np.allclose(result.weighted_delta_sum(), 0.1 + 0.2 + 0.3, atol=1e-6)
    assert result.figures.num_samples == 30
