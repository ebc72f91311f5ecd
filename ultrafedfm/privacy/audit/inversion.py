"""Gradient inversion against one upload: what a server recovers from a masked update vs. a plain one.

The victim: a tiny autoencoder (a fully connected first layer with a bias, as in Phong et al.
2017 and the "analytic" attacks surveyed by Geiping et al. 2020) takes one SGD step on one
training image and uploads ``delta = w_after - w_before``. For a first layer ``h = W x + b``,
``dL/dW[i, :] = dL/db[i] * x`` for every hidden unit ``i``, so the attacker reads the image back
as ``x = delta_W[i, :] / delta_b[i]`` from the unit with the largest ``|delta_b[i]|`` -- exact on
an unmasked delta.

The same attack is run on that site's *masked* upload from a real secure-aggregation round
(``ultrafedfm.secagg``: three member sites with their own keys, the real fixed-point encoding
and masks), decoded exactly as the server would decode a plain encoding. The recovered image is
compared with the true image and with decoy images from the same distribution (Pearson
correlation): on a masked upload the true image ranks where chance puts it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ultrafedfm.secagg import (
    ContributionLedger, Membership, RoundContext, RoundFigures, SecAggClient, SecAggConfig, SecAggServer,
    SiteSigningKey, flatten_arrays, model_digest, unflatten_arrays,
)
from ultrafedfm.secagg.quantize import dequantize

_logger = logging.getLogger(__name__)

__all__ = ["AttackResult", "first_layer_inversion", "masked_upload", "one_step_delta", "similarity_against_chance",
           "tiny_autoencoder"]


def tiny_autoencoder(img_size: int, *, hidden: int = 64, seed: int = 0) -> nn.Module:
    """A one-hidden-layer autoencoder on flattened (1, S, S) images (seeded initial weights)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(img_size * img_size, hidden), nn.ReLU(),
                             nn.Linear(hidden, img_size * img_size))


def one_step_delta(model: nn.Module, image: torch.Tensor, *, lr: float) -> dict[str, np.ndarray]:
    """What a site uploads after one SGD step on ``image`` (1, S, S): ``w_after - w_before`` by name."""
    model.zero_grad()
    x = image.unsqueeze(0)
    loss = nn.functional.mse_loss(model(x), x.flatten(1))
    loss.backward()
    return {name: (-lr * p.grad).detach().numpy().astype(np.float32) for name, p in model.named_parameters()}


def first_layer_inversion(delta: dict[str, np.ndarray], img_size: int) -> np.ndarray:
    """The analytic attack: the image row of the first layer's weight update, over its bias update."""
    weight, bias = np.asarray(delta["1.weight"], np.float64), np.asarray(delta["1.bias"], np.float64)
    unit = int(np.argmax(np.abs(bias)))
    if bias[unit] == 0:
        return np.zeros((img_size, img_size))
    return (weight[unit] / bias[unit]).reshape(img_size, img_size)


def masked_upload(delta: dict[str, np.ndarray], *, seed: int = 0) -> tuple[dict[str, np.ndarray], int]:
    """The target site's masked input in a real 3-site secure-aggregation round, decoded by the server as if
    it were a plain encoding of a delta; returns the decoded "delta" and the bytes of the masked vector."""
    sites = ["site-a", "site-b", "site-c"]
    signers = {s: SiteSigningKey.generate(site=s) for s in sites}
    members = Membership.of("empirical-audit", 1, {s: k.public_key for s, k in signers.items()})
    vector, layout = flatten_arrays(delta)
    context = RoundContext(model_sha256=model_digest({"w": np.zeros(1, np.float32)}), lr=0.1,
                           training={"audit": seed})
    config = SecAggConfig(max_weight=1.0)
    server = SecAggServer(members=members, job_id="empirical-audit", round_number=0, config=config, context=context)
    clients = {s: SecAggClient(signer=signers[s], members=members, job_id="empirical-audit", round_number=0,
                               config=config, context=context, ledger=ContributionLedger.in_memory(), min_sites=3)
               for s in sites}
    for c in clients.values():
        server.receive_advertisement(c.advertise_keys())
    roster = server.key_roster()
    for c in clients.values():
        server.receive_encrypted_shares(c.share_keys(roster))
    target = clients[sites[0]]
    target.check_task_context(context)
    masked = target.mask_input(server.share_deliveries()[sites[0]], delta=vector, weight=1.0,
                               figures=RoundFigures(loss=0.5, steps=1, num_samples=1), trained_with=context)
    decoded = dequantize(masked.masked[: vector.size], frac_bits=config.frac_bits).astype(np.float32)
    return unflatten_arrays(decoded, layout), int(masked.masked.nbytes)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 and np.isfinite(denom) else 0.0


@dataclass(frozen=True)
class AttackResult:
    """How close an attack's reconstruction is to the true image, against decoys (chance)."""

    label: str
    similarity: float
    chance_mean: float
    chance_sd: float
    rank: int  # 1: the true image is the most similar of all candidates
    candidates: int
    p_value: float  # share of candidates (true included) at least as similar as the true image

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def similarity_against_chance(label: str, reconstruction: np.ndarray, true_image: np.ndarray,
                              decoys: list[np.ndarray]) -> AttackResult:
    """Pearson similarity of ``reconstruction`` to ``true_image``, ranked among its similarity to ``decoys``."""
    true_sim = _pearson(reconstruction, true_image)
    others = np.array([_pearson(reconstruction, d) for d in decoys])
    at_least = int((others >= true_sim).sum())
    return AttackResult(label=label, similarity=true_sim, chance_mean=float(others.mean()),
                        chance_sd=float(others.std(ddof=1)) if len(others) > 1 else 0.0, rank=1 + at_least,
                        candidates=1 + len(decoys), p_value=(1 + at_least) / (1 + len(decoys)))
