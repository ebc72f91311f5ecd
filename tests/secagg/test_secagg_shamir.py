"""Shamir t-of-n sharing over GF(2^521 - 1): any t shares reconstruct, t - 1 do not."""
from __future__ import annotations

import itertools
import os
import secrets

import pytest

from ultrafedfm.secagg.shamir import FIELD_PRIME, SHARE_BYTES, Share, ShamirError, combine_shares, split_secret


@pytest.mark.parametrize("n,t", [(2, 2), (3, 2), (5, 3), (6, 4), (7, 7)])
def test_any_t_shares_reconstruct(n, t):
    secret = os.urandom(32)
    shares = split_secret(secret, threshold=t, num_shares=n)
    assert [s.x for s in shares] == list(range(1, n + 1))
    for subset in itertools.combinations(shares, t):
        assert combine_shares(list(subset), threshold=t, secret_bytes=32) == secret
    # more than t shares work too (the first t are used, order does not matter)
    assert combine_shares(shares[::-1], threshold=t, secret_bytes=32) == secret


@pytest.mark.parametrize("n,t", [(3, 2), (5, 3), (7, 4)])
def test_t_minus_one_shares_do_not_reconstruct(n, t):
    secret = os.urandom(32)
    shares = split_secret(secret, threshold=t, num_shares=n)
    for subset in itertools.combinations(shares, t - 1):
        with pytest.raises(ShamirError, match="needed"):
            combine_shares(list(subset), threshold=t, secret_bytes=32)
        # Interpolating t - 1 points as if the threshold were t - 1 gives a random field element,
        # which is not a 32-byte secret (probability 2^-265 of a false pass).
        if t - 1 >= 2:
            with pytest.raises(ShamirError, match="do not reconstruct"):
                combine_shares(list(subset), threshold=t - 1, secret_bytes=32)


@pytest.mark.parametrize("secret", [bytes(32), b"\xff" * 32, b"\x01", b"\xff" * 64, (FIELD_PRIME >> 460).to_bytes(8, "big")])
def test_field_edge_secrets(secret):
    shares = split_secret(secret, threshold=3, num_shares=4)
    assert all(0 <= s.y < FIELD_PRIME for s in shares)
    assert combine_shares(shares[1:], threshold=3, secret_bytes=len(secret)) == secret


def test_share_serialisation_and_range_checks():
    share = Share(x=7, y=FIELD_PRIME - 1)
    data = share.to_bytes()
    assert len(data) == SHARE_BYTES and Share.from_bytes(data) == share
    with pytest.raises(ShamirError, match="out of range"):
        Share.from_bytes((7).to_bytes(2, "big") + FIELD_PRIME.to_bytes(66, "big"))  # y = p is not a field element
    with pytest.raises(ShamirError, match="out of range"):
        Share.from_bytes(bytes(SHARE_BYTES))  # x = 0 would be the secret itself
    with pytest.raises(ShamirError, match="bytes"):
        Share.from_bytes(data[:-1])


def test_bad_parameters_and_inputs_are_refused():
    with pytest.raises(ShamirError, match="threshold"):
        split_secret(b"k" * 32, threshold=1, num_shares=3)
    with pytest.raises(ShamirError, match="threshold"):
        split_secret(b"k" * 32, threshold=4, num_shares=3)
    with pytest.raises(ShamirError, match="secret"):
        split_secret(b"", threshold=2, num_shares=3)
    with pytest.raises(ShamirError, match="secret"):
        split_secret(b"k" * 65, threshold=2, num_shares=3)
    shares = split_secret(b"k" * 32, threshold=2, num_shares=3)
    with pytest.raises(ShamirError, match="duplicate"):
        combine_shares([shares[0], shares[0]], threshold=2, secret_bytes=32)


def test_corrupted_share_is_detected():
    secret = os.urandom(32)
    shares = split_secret(secret, threshold=3, num_shares=5)
    # A share replaced by a random field element is caught (all but 2^-265 of the time) ...
    bad = Share(shares[0].x, secrets.randbelow(FIELD_PRIME))
    with pytest.raises(ShamirError, match="corrupted"):
        combine_shares([bad, shares[1], shares[2]], threshold=3, secret_bytes=32)
    # ... a small deliberate offset may not be, but never yields the true secret.
    nudged = Share(shares[0].x, (shares[0].y + 1) % FIELD_PRIME)
    try:
        assert combine_shares([nudged, shares[1], shares[2]], threshold=3, secret_bytes=32) != secret
    except ShamirError:
        pass
