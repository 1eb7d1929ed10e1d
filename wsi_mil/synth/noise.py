"""Deterministic randomness that does not depend on how a slide is cut into tiles.

Everything drawn at level 0 comes either from a counter-based hash of global integer keys (seed,
cell x, cell y, slot, channel) or from small periodic textures sampled at global pixel coordinates,
so any region renders identically whatever tile, band or chunk it is rendered as part of.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_MASK32 = 0xFFFFFFFF
TEXTURE_SIZE = 1024  # period of the sampled textures, level-0 pixels


def _mix(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer finaliser (good avalanche, vectorised)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def hash_u32(*keys: np.ndarray | int) -> np.ndarray:
    """Hash integer keys (broadcast together) to uniform uint32 values."""
    arrays = np.broadcast_arrays(*[np.atleast_1d(np.asarray(k, dtype=np.int64)) for k in keys])
    h = np.full(arrays[0].shape, 0x9E3779B9, dtype=np.uint32)
    for k in arrays:
        h = _mix(h ^ _mix((k & _MASK32).astype(np.uint32) + np.uint32(0x632BE5AB)))
    return h


def uniform(*keys: np.ndarray | int) -> np.ndarray:
    """Uniform floats in [0, 1) from integer keys (float64)."""
    return hash_u32(*keys).astype(np.float64) * (1.0 / 2**32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise normalised to mean 0, std 1 (float32).

    Large sigmas are drawn on a coarser grid and interpolated up, so the cost stays small.
    """
    sigma = max(float(sigma), 0.5)
    factor = max(1, int(sigma // 3))
    small = (max(2, -(-shape[0] // factor) + 2), max(2, -(-shape[1] // factor) + 2))
    n = ndimage.gaussian_filter(rng.standard_normal(small), sigma / factor, mode="reflect")
    if factor > 1:
        ys = (np.arange(shape[0]) + 0.5) / factor + 0.5
        xs = (np.arange(shape[1]) + 0.5) / factor + 0.5
        n = ndimage.map_coordinates(n, np.meshgrid(ys, xs, indexing="ij"), order=1, mode="nearest")
    n = n[: shape[0], : shape[1]]
    n -= n.mean()
    return (n / (n.std() + 1e-9)).astype(np.float32)


def periodic_texture(rng: np.random.Generator, sigma: tuple[float, float]) -> np.ndarray:
    """A ``TEXTURE_SIZE``-periodic noise texture (std 1), smoothed by (sigma_y, sigma_x) pixels."""
    n = rng.standard_normal((TEXTURE_SIZE, TEXTURE_SIZE))
    if max(sigma) > 0:
        n = ndimage.gaussian_filter(n, sigma, mode="wrap")
    n -= n.mean()
    return (n / (n.std() + 1e-9)).astype(np.float32)


def sample_texture(tex: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Lookup of a periodic (power-of-two) texture at integer global coordinates (broadcast).

    Separable coordinates (``ys`` a column, ``xs`` a row) use two cheap gathers; full 2-D
    coordinates a flat ``take``.
    """
    size = tex.shape[0]
    ys, xs = np.asarray(ys), np.asarray(xs)
    if ys.ndim == 2 and xs.ndim == 2 and ys.shape[1] == 1 and xs.shape[0] == 1:
        return tex[ys[:, 0] & (size - 1)][:, xs[0] & (size - 1)]
    flat = (ys & (size - 1)) * size + (xs & (size - 1))
    return np.take(tex.ravel(), flat)


def _axis(start: int, n: int, ds: float, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = np.clip((np.arange(start, start + n, dtype=np.float64) + 0.5) / ds - 0.5, 0, size - 1)
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, size - 1)
    return i0, i1, (c - i0).astype(np.float32)


def upsample(field: np.ndarray, x0: int, y0: int, w: int, h: int, ds: float) -> np.ndarray:
    """Bilinear values of a low-resolution ``field`` (1 px = ``ds`` level-0 px) on a level-0 region."""
    iy0, iy1, wy = _axis(y0, h, ds, field.shape[0])
    ix0, ix1, wx = _axis(x0, w, ds, field.shape[1])
    lo, hi = int(ix0.min()), int(ix1.max()) + 1
    sub = field[:, lo:hi]
    rows = sub[iy0] * (1 - wy)[:, None] + sub[iy1] * wy[:, None]
    return rows[:, ix0 - lo] * (1 - wx) + rows[:, ix1 - lo] * wx


def upsample_coarse(field: np.ndarray, x0: int, y0: int, w: int, h: int, ds: float, step: int = 4) -> np.ndarray:
    """Like :func:`upsample` but evaluated on a global ``step``-px grid and replicated (for smooth fields)."""
    gx0, gy0 = (x0 // step) * step, (y0 // step) * step
    nw, nh = -(-(x0 + w - gx0) // step), -(-(y0 + h - gy0) // step)
    small = upsample(field, gx0 // step, gy0 // step, nw, nh, ds / step)
    big = np.broadcast_to(small[:, None, :, None], (nh, step, nw, step)).reshape(nh * step, nw * step)
    return big[y0 - gy0 : y0 - gy0 + h, x0 - gx0 : x0 - gx0 + w]


def sample_points(field: np.ndarray, xs: np.ndarray, ys: np.ndarray, ds: float) -> np.ndarray:
    """Bilinear values of a low-resolution ``field`` at level-0 points (same convention as ``upsample``)."""
    coords = np.stack([(np.asarray(ys, np.float64) + 0.5) / ds - 0.5, (np.asarray(xs, np.float64) + 0.5) / ds - 0.5])
    return ndimage.map_coordinates(field, coords, order=1, mode="nearest")
