"""Breast-lesion shapes with known masks: circumscribed benign ovals, spiculated malignancies.

A lesion is a star-shaped region around a centre: in the lesion's own rotated and scaled
frame a point at normalised radius ``rho`` and angle ``phi`` is inside when
``rho < r(phi)``. Benign lesions get a few gentle lobulations (oval, circumscribed,
wider than tall); malignant ones get many harmonics plus narrow radial spikes
(irregular, spiculated, often taller than wide). The same function gives the echo model
its soft edge and the ground-truth mask its exact pixels, so the two always agree.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np

_logger = logging.getLogger(__name__)

__all__ = ["Lesion", "sample_lesion"]

_TABLE_SIZE = 512


@dataclass(frozen=True)
class Lesion:
    """A lesion's geometry and acoustics (lengths in cm, attenuation in dB/cm/MHz)."""

    kind: str  # "benign" | "malignant"
    x_cm: float
    z_cm: float
    half_width_cm: float
    half_height_cm: float
    angle_rad: float
    harmonics: np.ndarray  # (K, 3): order, amplitude, phase of boundary lobulations
    spikes: np.ndarray  # (S, 3): angle, height, angular width of spicules
    echogenicity: float  # relative to glandular tissue (1.0)
    scatter_density: float
    attenuation: float  # below tissue: posterior enhancement; above: posterior shadowing
    edge_cm: float  # width of the echo transition at the margin (sharp for circumscribed)
    halo: float  # extra brightness of an echogenic rim (malignant)

    @functools.cached_property
    def _radius_table(self) -> np.ndarray:
        """Boundary radius ``r(phi)`` tabulated on ``_TABLE_SIZE`` angles over [-pi, pi)."""
        phi = np.linspace(-np.pi, np.pi, _TABLE_SIZE, endpoint=False, dtype=np.float32)
        order, amplitude, phase = self.harmonics.T.astype(np.float32)[:, :, None]
        r = 1.0 + (amplitude * np.cos(order * phi + phase)).sum(axis=0)
        if len(self.spikes):
            angle, height, width = self.spikes.T.astype(np.float32)[:, :, None]
            # Periodic bump ~ exp(-(delta / width)^2) for small delta: 2 - 2 cos(delta) ~ delta^2.
            r += (height * np.exp((np.cos(phi - angle) - 1.0) * (2.0 / width ** 2))).sum(axis=0)
        return r.astype(np.float32)

    @property
    def reach_cm(self) -> float:
        """Radius of a circle around the centre that contains the lesion, its soft edge and halo
        (those are measured in normalised radius, so they stretch along the long axis)."""
        long, short = max(self.half_width_cm, self.half_height_cm), min(self.half_width_cm, self.half_height_cm)
        return long * float(self._radius_table.max()) + (self.edge_cm + 0.15) * long / short

    def boundary(self, x_cm: np.ndarray, z_cm: np.ndarray, *, shift: tuple[float, float] = (0.0, 0.0),
                 band: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Normalised radius ``rho`` and boundary radius ``r(phi)`` at points ``(x, z)``;
        inside is ``rho < r``. ``shift`` moves the lesion (cine motion).

        With ``band``, ``r`` is exact only within ``band`` (normalised units) of the
        boundary's radial range; deeper inside it reads ``min r`` and farther out ``max r``,
        which keeps ``rho < r`` and any soft edge narrower than ``band`` unchanged.
        """
        dx = x_cm - (self.x_cm + shift[0])
        dz = z_cm - (self.z_cm + shift[1])
        c, s = math.cos(self.angle_rad), math.sin(self.angle_rad)
        xr = (dx * c + dz * s) / self.half_width_cm
        zr = (-dx * s + dz * c) / self.half_height_cm
        rho = np.hypot(xr, zr)
        table = self._radius_table
        if band is None:
            # A table lookup is ~10x cheaper than evaluating every harmonic and spike per point.
            index = ((np.arctan2(zr, xr) + np.pi) * (_TABLE_SIZE / (2 * np.pi))).astype(np.int32) % _TABLE_SIZE
            return rho, table[index]
        r_min, r_max = float(table.min()), float(table.max())
        radius = np.where(rho < r_min, np.float32(r_min), np.float32(r_max))
        near = np.flatnonzero((rho >= r_min - band) & (rho < r_max + band))
        xu, zu = xr.reshape(-1)[near], zr.reshape(-1)[near]
        index = ((np.arctan2(zu, xu) + np.pi) * (_TABLE_SIZE / (2 * np.pi))).astype(np.int32) % _TABLE_SIZE
        radius.reshape(-1)[near] = table[index]
        return rho, radius

    def contains(self, x_cm: np.ndarray, z_cm: np.ndarray, *, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """Boolean mask of the points inside the lesion."""
        dx = x_cm - (self.x_cm + shift[0])
        dz = z_cm - (self.z_cm + shift[1])
        c, s = math.cos(self.angle_rad), math.sin(self.angle_rad)
        xr = (dx * c + dz * s) / self.half_width_cm
        zr = (-dx * s + dz * c) / self.half_height_cm
        rho2 = xr * xr + zr * zr
        table = self._radius_table
        r_min, r_max = float(table.min()), float(table.max())
        inside = rho2 < r_min * r_min
        # Only the annulus between the smallest and largest boundary radius needs the angle.
        unsure = np.flatnonzero((rho2 >= r_min * r_min) & (rho2 < r_max * r_max))
        xu, zu = xr.reshape(-1)[unsure], zr.reshape(-1)[unsure]
        index = ((np.arctan2(zu, xu) + np.pi) * (_TABLE_SIZE / (2 * np.pi))).astype(np.int32) % _TABLE_SIZE
        inside.reshape(-1)[unsure] = rho2.reshape(-1)[unsure] < table[index] ** 2
        return inside


def sample_lesion(rng: np.random.Generator, *, kind: str, center: tuple[float, float], max_half_size_cm: float
                  ) -> Lesion:
    """Draw a benign or malignant lesion centred at ``center`` no larger than ``max_half_size_cm``."""
    if kind == "benign":
        half_w = rng.uniform(0.45, 1.0) * max_half_size_cm
        half_h = half_w * rng.uniform(0.5, 0.8)  # wider than tall, parallel to the skin
        k = int(rng.integers(2, 4))
        harmonics = np.stack([rng.integers(2, 5, k), rng.uniform(0.0, 0.06, k), rng.uniform(0, 2 * np.pi, k)], 1)
        spikes = np.zeros((0, 3))
        cyst = rng.random() < 0.45
        return Lesion(kind=kind, x_cm=center[0], z_cm=center[1], half_width_cm=half_w, half_height_cm=half_h,
                      angle_rad=rng.uniform(-0.25, 0.25), harmonics=harmonics.astype(float), spikes=spikes,
                      echogenicity=rng.uniform(0.005, 0.02) if cyst else rng.uniform(0.06, 0.18),
                      scatter_density=0.3 if cyst else 0.8,  # a cyst: anechoic but for faint debris
                      attenuation=rng.uniform(0.02, 0.1) if cyst else rng.uniform(0.3, 0.5),
                      edge_cm=rng.uniform(0.01, 0.03), halo=0.0)
    if kind == "malignant":
        half_w = rng.uniform(0.4, 0.9) * max_half_size_cm
        half_h = half_w * rng.uniform(0.7, 1.3)  # often taller than wide
        k = int(rng.integers(4, 8))
        harmonics = np.stack([rng.integers(2, 9, k), rng.uniform(0.03, 0.12, k), rng.uniform(0, 2 * np.pi, k)], 1)
        n_spikes = int(rng.integers(4, 11))
        spikes = np.stack([rng.uniform(-np.pi, np.pi, n_spikes), rng.uniform(0.2, 0.7, n_spikes),
                           rng.uniform(0.04, 0.12, n_spikes)], 1)
        return Lesion(kind=kind, x_cm=center[0], z_cm=center[1], half_width_cm=half_w, half_height_cm=half_h,
                      angle_rad=rng.uniform(-0.6, 0.6), harmonics=harmonics.astype(float), spikes=spikes.astype(float),
                      echogenicity=rng.uniform(0.08, 0.2), scatter_density=0.6,
                      attenuation=rng.uniform(1.1, 1.7), edge_cm=rng.uniform(0.04, 0.1),
                      halo=rng.uniform(0.0, 0.8))
    raise ValueError(f"lesion kind must be 'benign' or 'malignant', got {kind!r}")
