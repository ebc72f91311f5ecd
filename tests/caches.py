"""Small real site caches (the ingest format) for tests of training and federation."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ultrafedfm.data.cache import CacheEntry, ManifestWriter, image_relpath, init_cache, salted_key, write_png


def make_cache(root: Path, *, n_images: int, size: int = 16, seed: int = 0, brightness: float = 0.5) -> Path:
    """A real site cache (the ingest format) of smooth random images; ``brightness`` makes sites non-IID."""
    rng = np.random.default_rng(seed)
    salt = init_cache(root, image_size=size)
    yy, xx = np.mgrid[0:size, 0:size] / size
    with ManifestWriter(root) as manifest:
        for i in range(n_images):
            fx, fy, phase = rng.uniform(1, 3), rng.uniform(1, 3), rng.uniform(0, 6.28)
            img = brightness + 0.3 * np.sin(6.28 * (fx * xx + fy * yy) + phase) + 0.05 * rng.standard_normal((size, size))
            img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
            key = salted_key(salt, "test", i)
            write_png(root, image_relpath(key), img)
            manifest.add(CacheEntry(key=key, instance=key, image=image_relpath(key), source="image"))
    return root
