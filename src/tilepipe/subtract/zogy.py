"""ZOGY proper image subtraction on halo tiles.

Implements Zackay, Ofek & Gal-Yam (2016, ApJ 830, 27; "ZOGY") tile by tile on
the :mod:`tilepipe.tiling` engine.  Notation of the paper: ``N`` new image,
``R`` reference, ``P_n, P_r`` their PSFs (sum 1), ``sigma_n, sigma_r`` their
background noise, ``F_n, F_r`` their flux-based zero points.  tilepipe fixes
``F_n = 1`` and ``F_r = 1 / scale`` where ``scale`` is the flux ratio
``new / ref``, so every flux is expressed in the **new image's units**.

Hats are 2-D DFTs (numpy convention: unnormalised forward transform).  On an
FFT grid of ``Npix = ny * nx`` pixels:

* Eq. 13  ``D^ = (F_r P_r^ N^ - F_n P_n^ R^) / sqrt(sigma_n^2 F_r^2 |P_r^|^2 + sigma_r^2 F_n^2 |P_n^|^2)``
* Eq. 14  ``P_D^ = F_r F_n P_r^ P_n^ / (F_D sqrt(...))``
* Eq. 15  ``F_D = F_r F_n / sqrt(sigma_n^2 F_r^2 + sigma_r^2 F_n^2)``
* Eq. 17  ``S = F_D D (x) P_D``  (matched filter), written as ``S = S_N - S_R``
  with ``S_N = k_n (x) N``, ``S_R = k_r (x) R`` and
  ``k_n^ = F_n F_r^2 conj(P_n^) |P_r^|^2 / den``,
  ``k_r^ = F_r F_n^2 conj(P_r^) |P_n^|^2 / den`` (Eqs. 26-29)
* Eqs. 25-33  ``S_corr = S / sqrt(V(S_N) + V(S_R) + V_ast(S_N) + V_ast(S_R))`` with
  ``V(S_N) = V(eps_n) (x) k_n^2`` from the per-pixel variance map of ``N``
  (background + source Poisson), the same for ``R``, and the astrometric terms
  ``V_ast(S_N) = sigma_x^2 (dS_N/dx)^2 + sigma_y^2 (dS_N/dy)^2``; the
  derivatives are central differences in real space (``numpy.gradient``), which
  never wrap around the tile.
* Eqs. 41-43  ``F_S = (1 / Npix) sum_k F_n^2 F_r^2 |P_n^|^2 |P_r^|^2 / den``
  (the ``1/Npix`` is the inverse-DFT normalisation: ``S(0)`` of a point source
  of flux ``alpha`` is ``alpha (1/Npix) sum_k ...``; dividing by the image
  *width* squared, as properimage and stdpipe do, is only right for square
  FFT grids), ``Fpsf = S / F_S`` and ``Fpsf_err = sqrt(V(S_N) + V(S_R)) / F_S``.

``diff`` is ``D / F_D``: the proper difference in the new image's flux units
(a point source of flux ``alpha`` appears as ``alpha P_D``; its background
noise is ``1 / F_D = sqrt(sigma_n^2 + scale^2 sigma_r^2)`` per pixel).

Tiling: each tile's outer box (core + ``overlap`` halo) is padded on the
sides that lie on the image edge with noise that depends only on global pixel
coordinates (never zeros) and extended by reflection to a fast FFT length, so
the circular convolutions never wrap into the part that is kept.  Every tile
is computed **once**: one dask task reads its neighbours' core chunks, builds
its outer box and runs ZOGY on it.  With a constant PSF the tile's core is
the output chunk, equal to the whole-image result to float precision.  With a
spatially varying PSF each tile uses the PSFs evaluated at its core centre
and keeps its result on its *blend region* (core grown by ``feather`` px);
each output core is then the sum of the blend regions of the (up to 9) tiles
that cover it, weighted by separable tent ramps (:func:`_edge_weights`)
across the ``2 feather`` px wide zones around core borders: the weights sum
to exactly 1 at every pixel and are 1 in the part of a core no other tile
reaches, so no seam appears.  A tile's result is exact in its blend region
when its halo covers the feather plus the kernel support, so the default
halo is ``3 x PSF half-size + feather`` (the support alone without
feathering).  Data FFTs are float64 by default: in float32 the tiled result
differs from the whole image by ~2e-4 of the noise near bright stars
(``precision="float32"``, faster, misses the 1e-4 tile-invariance bar).
"""

from __future__ import annotations

import contextvars
import logging
import operator
import uuid
import warnings
from typing import Any, Callable

import dask
import dask.array as da
import numpy as np
import scipy.fft as sfft
import xarray as xr
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from dask.utils import apply
from scipy import ndimage

from .._validate import as_pair, check_choice, check_int, check_positive
from ..background import fit_mesh_to_image
from ..exceptions import FallbackWarning, OverlapWarning
from ..image import has_wcs, open_image, wcs
from ..tiling import (Region, TileGrid, _tile_table, bind_regions, evaluate_regions, fill_regions, map_windows,
                      merge_tables, region_array, region_of, several_workers, uses_distributed)
from . import noise as nz

log = logging.getLogger(__name__)

__all__ = ["zogy_subtract", "zogy_arrays", "as_psf_function", "EmpiricalPSF"]

OUTPUTS = ("diff", "scorr", "s", "fpsf", "fpsf_err", "mask")

#: threads of each FFT inside a tile task (1: parallelism comes from the tiles)
_FFT_WORKERS = 1


# ===================================================================== PSFs
def _odd_stamp(stamp: Any, what: str) -> np.ndarray:
    a = np.asarray(stamp, dtype=np.float64)
    if a.ndim != 2 or min(a.shape) < 3:
        raise ValueError(f"{what} must give a 2-D PSF stamp of at least 3x3 pixels; got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contains non-finite values")
    # make it odd-sized and square, centred: an axis of even length has its centre between its two middle
    # pixels ((n - 1) / 2, the numpy/astropy convention); it gets one more pixel and is shifted by half a pixel
    # onto the odd grid's middle pixel (a Fourier shift: exact for a band-limited, well-sampled PSF)
    shift = [0.5 if m % 2 == 0 else 0.0 for m in a.shape]
    n = max(a.shape)
    n += 1 - n % 2
    out = np.zeros((n, n))
    oy, ox = (n - a.shape[0]) // 2, (n - a.shape[1]) // 2  # an even side: its centre lands half a pixel short
    out[oy:oy + a.shape[0], ox:ox + a.shape[1]] = a
    if any(shift):
        out = np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(out), shift)).real
    s = out.sum()
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"{what} has a non-positive sum; a PSF stamp must sum to a positive value (it is normalised to 1)")
    return out / s


def as_psf_function(psf: Any, what: str = "psf") -> Callable[[float, float], np.ndarray] | None:
    """Normalise a PSF argument to ``f(x, y) -> stamp`` (odd, square, sum 1).

    Accepts a 2-D array (constant PSF), a callable ``(x, y) -> stamp``, or an
    object with ``.at(x, y)`` (e.g. :class:`tilepipe.PSFModel`,
    :class:`tilepipe.datasets.TruePSF`).  Coordinates are global 0-based
    pixels; the stamp is centred on the source: on its middle pixel for an
    odd side, between its two middle pixels (``(n - 1) / 2``) for an even one,
    which is then Fourier-shifted by half a pixel onto an odd grid of side
    ``n + 1``.  ``None`` passes through.
    """
    if psf is None:
        return None
    if hasattr(psf, "at") and callable(psf.at):
        return lambda x, y: _odd_stamp(psf.at(float(x), float(y)), what)
    if callable(psf):
        return lambda x, y: _odd_stamp(psf(float(x), float(y)), what)
    arr = np.asarray(psf)
    if arr.ndim == 2 and arr.dtype.kind in "fiu":
        st = _odd_stamp(arr, what)
        return lambda x, y: st
    raise TypeError(
        f"{what} must be a 2-D array, a callable (x, y) -> stamp, or an object with .at(x, y); "
        f"got {type(psf).__name__}"
    )


def _taper(n: int, inner: float) -> np.ndarray:
    c = n // 2
    yy, xx = np.mgrid[-c:c + 1, -c:c + 1]
    r = np.hypot(xx, yy)
    w = np.ones_like(r)
    ramp = (r > inner) & (r < c)
    w[ramp] = np.cos(0.5 * np.pi * (r[ramp] - inner) / (c - inner)) ** 2
    w[r >= c] = 0.0
    return w


class EmpiricalPSF:
    """Spatially varying empirical PSF fitted from star stamps (fallback model).

    Every pixel of the ``(2 half + 1)^2`` stamp is a polynomial of degree
    ``degree`` in the normalised coordinates ``u = 2 x / (W - 1) - 1``,
    ``v = 2 y / (H - 1) - 1`` (PSFEx-like), fitted by weighted least squares
    over all stars of the image (one global fit, never per tile), with one
    round of 4-sigma clipping of deviant stars.  Evaluated stamps are tapered
    to zero at the stamp edge and normalised to sum 1.
    """

    def __init__(self, stamps: np.ndarray, x: np.ndarray, y: np.ndarray, weights: np.ndarray,
                 shape: tuple[int, int], degree: int | None = None) -> None:
        stamps = np.asarray(stamps, dtype=np.float64)
        n = len(stamps)
        if n == 0:
            raise ValueError("no isolated unsaturated stars to build a PSF from; pass new_psf/ref_psf")
        if degree is None:
            degree = 2 if n >= 60 else 1 if n >= 15 else 0
        self.degree = int(degree)
        self.shape = tuple(shape)
        self.size = stamps.shape[1]
        A = self._design(np.asarray(x, float), np.asarray(y, float))
        Y = stamps.reshape(n, -1)
        w = np.sqrt(np.clip(np.asarray(weights, float), 1e-12, None))
        keep = np.ones(n, bool)
        for _ in range(2):
            coef, *_ = np.linalg.lstsq(A[keep] * w[keep, None], Y[keep] * w[keep, None], rcond=None)
            res = np.sqrt(np.mean((Y - A @ coef) ** 2, axis=1)) * w
            med = np.median(res[keep])
            mad = nz.MAD_TO_SIGMA * np.median(np.abs(res[keep] - med))
            new = res < med + 4 * max(mad, 1e-12)
            if new.sum() < max(3, A.shape[1]) or (new == keep).all():
                break
            keep = new
        self.coef = coef
        self.nstars = int(keep.sum())
        self._taper = _taper(self.size, max(2.0, self.size // 2 - 3.0))

    def _design(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        h, w = self.shape
        u = 2 * x / max(w - 1, 1) - 1
        v = 2 * y / max(h - 1, 1) - 1
        cols = [np.ones_like(u)]
        for d in range(1, self.degree + 1):
            for j in range(d + 1):
                cols.append(u ** (d - j) * v**j)
        return np.stack(cols, axis=1)

    def at(self, x: float, y: float) -> np.ndarray:
        """The PSF stamp at global pixel ``(x, y)`` (sum 1, centred)."""
        st = (self._design(np.atleast_1d(float(x)), np.atleast_1d(float(y))) @ self.coef).reshape(self.size, self.size)
        st = st * self._taper
        return st / st.sum()

    def __repr__(self) -> str:
        return f"EmpiricalPSF(size={self.size}, degree={self.degree}, nstars={self.nstars})"


def _window_offset(stamp: np.ndarray, fwhm: float) -> tuple[float, float]:
    """Windowed centroid of a PSF stamp relative to its centre: ``(ox, oy)``."""
    c = stamp.shape[0] // 2
    x, y = nz.window_centroid(stamp, max(fwhm, 1.0) / 2.3548, c, c)
    if not np.isfinite(x):
        return 0.0, 0.0
    return x - c, y - c


def _stamp_fwhm(stamp: np.ndarray) -> float:
    """FWHM (px) of a stamp from its effective area: ``sqrt(1 / (sum P^2 * 1.133))``."""
    # For a Gaussian, sum P^2 = 1 / (4 pi sigma^2); FWHM = 2.3548 sigma.
    s2 = float((stamp**2).sum())
    return 2.3548 * np.sqrt(1.0 / (4 * np.pi * s2)) if s2 > 0 else 3.0


# ================================================================ core math
def _full_plane_sum(half: np.ndarray, nx: int) -> float:
    """Sum over the full DFT plane of a Hermitian quantity given on the rfft half plane."""
    w = np.full(half.shape[1], 2.0)
    w[0] = 1.0
    if nx % 2 == 0:
        w[-1] = 1.0
    return float((half * w[None, :]).sum())


def _psf_fft(stamp: np.ndarray, shape: tuple[int, int], shift: tuple[float, float] = (0.0, 0.0),
             dtype: Any = np.float64) -> np.ndarray:
    """rfft2 of a centred stamp placed at the origin of an FFT grid, shifted by ``(sx, sy)`` px."""
    sx, sy = shift
    if sx or sy:
        stamp = _shift_stamp(stamp, sx, sy)
    n = stamp.shape[0]
    c = n // 2
    if n > min(shape):
        raise ValueError(f"PSF stamp of {n} px does not fit in a tile FFT grid of {shape}; use larger tiles")
    g = np.zeros(shape, dtype=dtype)
    g[:n - c, :n - c] = stamp[c:, c:]
    g[:n - c, -c:] = stamp[c:, :c]
    g[-c:, :n - c] = stamp[:c, c:]
    g[-c:, -c:] = stamp[:c, :c]
    return sfft.rfft2(g, workers=1)


def _shift_stamp(stamp: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Shift a PSF stamp by ``(sx, sy)`` px (cubic spline, grown by 2 px per side, sum kept).

    Done in real space on the stamp, not as a Fourier phase ramp on the tile
    grid: a ramp is discontinuous at the Nyquist frequency, which gives the
    kernels a 1/r tail and makes the result depend on the FFT grid (tile
    size).  A shifted compact stamp keeps every kernel the same on any grid.
    """
    g = 2 + int(np.ceil(max(abs(sx), abs(sy))))
    a = np.pad(np.asarray(stamp, dtype=np.float64), g)
    out = ndimage.shift(a, (sy, sx), order=3, mode="constant", cval=0.0, prefilter=True)
    tot = out.sum()
    return out * (stamp.sum() / tot) if tot != 0 else out


_KCACHE: dict[Any, tuple[np.ndarray, np.ndarray]] = {}


def _small_kernels(pn: np.ndarray, pr: np.ndarray, fn: float, fr: float, sn: float, sr: float,
                   shift: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Cached :func:`_small_kernels_compute` (keyed on the stamps' bytes and the parameters)."""
    key = (pn.tobytes(), pr.tobytes(), fn, fr, sn, sr, tuple(map(tuple, shift)))
    hit = _KCACHE.get(key)
    if hit is None:
        hit = _small_kernels_compute(pn, pr, fn, fr, sn, sr, shift)
        if len(_KCACHE) > 256:
            _KCACHE.clear()
        _KCACHE[key] = hit
    return hit


def _small_kernels_compute(pn: np.ndarray, pr: np.ndarray, fn: float, fr: float, sn: float, sr: float,
                   shift: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Real-space ZOGY kernels ``k_n, k_r`` (Eqs. 28-29) on a small grid, centred (odd size).

    They are compact (a few PSF widths), so they are computed once on a grid
    of 8 stamp sizes and cropped to 4 stamp sizes; their squares feed the
    variance terms of Eqs. 26-27 on any tile without a full-size inverse FFT.
    """
    n = pn.shape[0]
    m = sfft.next_fast_len(8 * n)
    Pn = _psf_fft(pn, (m, m), shift[0])
    Pr = _psf_fft(pr, (m, m), shift[1])
    an, ar = np.abs(Pn) ** 2, np.abs(Pr) ** 2
    den = sn * sn * fr * fr * ar + sr * sr * fn * fn * an
    den = np.maximum(den, 1e-30 * den.max())
    kn = sfft.irfft2(fn * fr * fr * np.conj(Pn) * ar / den, s=(m, m))
    kr = sfft.irfft2(fr * fn * fn * np.conj(Pr) * an / den, s=(m, m))
    h = 2 * n
    kn = np.roll(kn, (h, h), axis=(0, 1))[: 2 * h + 1, : 2 * h + 1]
    kr = np.roll(kr, (h, h), axis=(0, 1))[: 2 * h + 1, : 2 * h + 1]
    return kn, kr


def _transfer(pn: np.ndarray, pr: np.ndarray, shape: tuple[int, int], fn: float, fr: float, sn: float,
              sr: float, shift: tuple[float, float], ctype: Any = np.complex128) -> dict[str, Any]:
    """Fourier-space ZOGY operators for one pair of PSFs on one FFT grid.

    In float32 |P^|^2 of a smooth PSF underflows at high frequencies: the
    denominator is floored at 1e-30 of its maximum, so the operators stay
    finite and tend to zero there (they are products of bounded ratios).
    Computed with in-place operations (a handful of passes over the grid).
    """
    rdt = np.float32 if ctype == np.complex64 else np.float64
    Pn = _psf_fft(pn, shape, shift[0], dtype=rdt)
    Pr = _psf_fft(pr, shape, shift[1], dtype=rdt)
    an = Pn.real**2
    an += Pn.imag**2
    ar = Pr.real**2
    ar += Pr.imag**2
    inv = ar * (sn * sn * fr * fr)
    inv += an * (sr * sr * fn * fn)  # den of Eqs. 13-14, 28-29
    np.maximum(inv, 1e-30 * inv.max(), out=inv)
    np.divide(1.0, inv, out=inv)  # 1 / den
    isq = np.sqrt(inv)
    f_d = fr * fn / np.sqrt(sn * sn * fr * fr + sr * sr * fn * fn)  # Eq. 15
    npix = shape[0] * shape[1]
    wn = np.multiply(ar, inv, out=ar)  # |P_r^|^2 / den
    f_s = fn * fn * fr * fr * _full_plane_sum((an * wn).astype(np.float64, copy=False), shape[1]) / npix  # Eq. 42
    wr = np.multiply(an, inv, out=an)  # |P_n^|^2 / den
    del an, ar, inv
    kn_s, kr_s = _small_kernels(pn, pr, fn, fr, sn, sr, shift)
    # each product written into the grid it no longer needs (same values: conj and the complex x real
    # products are the same ufuncs in place): a few grids alive at once instead of a dozen
    isq_n = isq * fr
    isq *= fn
    dn = Pr * isq_n  # Eq. 13, operator on N^
    dr = Pn * isq  # Eq. 13, operator on R^
    del isq, isq_n
    wn *= fn * fr * fr
    wr *= fr * fn * fn
    kn = np.conjugate(Pn, out=Pn)
    kn *= wn  # Eq. 28
    kr = np.conjugate(Pr, out=Pr)
    kr *= wr  # Eq. 29
    del wn, wr, Pn, Pr
    return {
        "dn": dn.astype(ctype, copy=False),
        "dr": dr.astype(ctype, copy=False),
        "kn": kn.astype(ctype, copy=False),
        "kr": kr.astype(ctype, copy=False),
        "kn2": _psf_fft(kn_s * kn_s, shape, dtype=rdt).astype(ctype, copy=False),  # Eq. 26 kernel k_n^2
        "kr2": _psf_fft(kr_s * kr_s, shape, dtype=rdt).astype(ctype, copy=False),  # Eq. 27 kernel k_r^2
        "f_d": f_d,
        "f_s": f_s,
    }


def _psf_shifts(pn: np.ndarray, pr: np.ndarray, shift: tuple[float, float], on: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Phase-ramp shifts ``(shift of P_n, shift of P_r)`` implementing the registration ``shift``."""
    sx, sy = float(shift[0]), float(shift[1])
    if on == "auto":
        on = "new" if _stamp_fwhm(pn) >= _stamp_fwhm(pr) else "ref"
    if on == "new":  # work in the ref frame: a ref-frame source appears in new shifted by +shift
        return (sx, sy), (0.0, 0.0)
    return (0.0, 0.0), (-sx, -sy)  # work in the new frame: the ref PSF seen from new is shifted by -shift


def _pd_hat(pn, pr, shape, fn, fr, sn, sr, shift):
    Pn = _psf_fft(pn, shape, shift[0])
    Pr = _psf_fft(pr, shape, shift[1])
    den = sn * sn * fr * fr * np.abs(Pr) ** 2 + sr * sr * fn * fn * np.abs(Pn) ** 2
    den = np.maximum(den, 1e-30 * den.max())
    f_d = fr * fn / np.sqrt(sn * sn * fr * fr + sr * sr * fn * fn)
    return fr * fn * Pr * Pn / (f_d * np.sqrt(den))  # Eq. 14


_HASH_M1 = np.uint64(0xBF58476D1CE4E5B9)
_HASH_M2 = np.uint64(0x94D049BB133111EB)


def _hash_uniform(gy: np.ndarray, gx: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic uniform (0, 1) numbers from global pixel coordinates (splitmix64)."""
    z = (gy.astype(np.int64).astype(np.uint64) << np.uint64(32)) ^ (gx.astype(np.int64).astype(np.uint64) & np.uint64(0xFFFFFFFF))
    z = z + np.uint64((0x9E3779B97F4A7C15 * (seed + 1)) % (1 << 64))
    z = (z ^ (z >> np.uint64(30))) * _HASH_M1
    z = (z ^ (z >> np.uint64(27))) * _HASH_M2
    z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def _noise_pad(a: np.ndarray, before: tuple[int, int], after: tuple[int, int], origin: tuple[int, int],
               sigma: float, fill: float, seed: int, edges: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """Pad ``a`` for the FFTs.

    Sides on the image edge (``edges`` = bottom, top, left, right) get
    Gaussian noise of ``sigma`` around ``fill`` that depends only on global
    pixel coordinates (outside the image there is no data: noise, never zeros
    and never a mirror image of the stars, and identical for a tile and for
    the whole image).  Other sides (a tile's halo continues there) are
    reflected; they only feed pixels of the halo, which are discarded.
    """
    h, w = a.shape
    out = np.pad(a, ((before[0], after[0]), (before[1], after[1])), mode="reflect")
    H, W = out.shape
    y0, x0 = origin[0] - before[0], origin[1] - before[1]
    strips = []
    if edges[0]:
        strips.append((slice(0, before[0]), slice(0, W)))
    if edges[1]:
        strips.append((slice(before[0] + h, H), slice(0, W)))
    if edges[2]:
        strips.append((slice(0, H), slice(0, before[1])))
    if edges[3]:
        strips.append((slice(0, H), slice(before[1] + w, W)))
    for ys, xs in strips:
        if ys.stop <= ys.start or xs.stop <= xs.start:
            continue
        if sigma > 0:
            GY, GX = np.meshgrid(np.arange(ys.start, ys.stop) + y0, np.arange(xs.start, xs.stop) + x0, indexing="ij")
            u1 = _hash_uniform(GY, GX, 2 * seed)
            u2 = _hash_uniform(GY, GX, 2 * seed + 1)
            out[ys, xs] = fill + sigma * np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)
        else:
            out[ys, xs] = fill
    return out


def zogy_arrays(
    new: np.ndarray,
    ref: np.ndarray,
    var_new: np.ndarray,
    var_ref: np.ndarray,
    bad: np.ndarray,
    psf_new: np.ndarray,
    psf_ref: np.ndarray,
    *,
    scale: float,
    sigma_new: float,
    sigma_ref: float,
    shift: tuple[float, float] = (0.0, 0.0),
    shift_on: str = "auto",
    dx: float = 0.25,
    dy: float = 0.25,
    pad: int | tuple[int, int, int, int] = 0,
    origin: tuple[int, int] = (0, 0),
    precision: str = "float32",
) -> dict[str, np.ndarray]:
    """ZOGY on one box of background-subtracted, aligned numpy arrays.

    Parameters
    ----------
    new, ref : ndarray (ny, nx)
        Background-subtracted images ``N`` and ``R`` (ADU).
    var_new, var_ref : ndarray
        Per-pixel variances ``V(eps_n)``, ``V(eps_r)`` (background + source).
    bad : ndarray of bool
        True = bad in either image; such pixels are set to 0 (the background)
        before the transforms.  The caller masks their PSF footprint.
    psf_new, psf_ref : ndarray
        Centred PSF stamps (odd, sum 1).
    scale : float
        Flux ratio ``new / ref`` (``F_n = 1``, ``F_r = 1 / scale``).
    sigma_new, sigma_ref : float
        Background noise ``sigma_n``, ``sigma_r`` (ADU) of Eqs. 13-15.
    shift : (float, float)
        ``(sx, sy)`` = position in new - position in ref (px), applied as a
        Fourier phase ramp to one PSF.
    shift_on : {"auto", "new", "ref"}
        Which PSF carries the shift.  ``"auto"``: the broader one.  A phase
        ramp on the sharper PSF survives up to the Nyquist frequency in ``D``
        (a sinc interpolation kernel with a 1/r tail, so ``D`` would depend
        on the tile size); on the broader PSF it is damped and ``D`` stays
        local.  With the shift on ``new`` the outputs are in the reference's
        pixel frame (a source at new position ``x`` appears at ``x - sx``),
        with the shift on ``ref`` in the new image's frame.
    dx, dy : float
        Astrometric noise ``sigma_x, sigma_y`` (px) of Eqs. 30-33.
    pad : int or (int, int, int, int)
        Padding (px) on every side, or per side ``(bottom, top, left,
        right)``, before the FFTs, so the circular convolutions do not wrap
        into the box; filled with noise of ``sigma_*`` that depends only on
        the global pixel coordinates.  Tiles pad only the sides on the image
        edge: elsewhere their halo already keeps the wrap out of the core.
    origin : (int, int)
        Global ``(y0, x0)`` of the box (seeds the padding noise).
    precision : {"float32", "float64"}
        Precision of the data transforms (operators are built in float64).

    Returns
    -------
    dict of ndarray
        ``diff`` (D / F_D), ``scorr``, ``s``, ``fpsf``, ``fpsf_err``
        (float32 or float64), plus scalars ``f_d``, ``f_s``.
    """
    fdt = np.float32 if precision == "float32" else np.float64
    h, w = new.shape
    pb, pt, pl, pr_ = (pad,) * 4 if np.ndim(pad) == 0 else tuple(int(v) for v in pad)
    fy = sfft.next_fast_len(h + pb + pt, real=True)
    fx = sfft.next_fast_len(w + pl + pr_, real=True)
    before = (pb, pl)
    after = (fy - h - pb, fx - w - pl)
    shape = (fy, fx)
    ctype = np.complex64 if fdt is np.float32 else np.complex128
    T = _transfer(psf_new, psf_ref, shape, 1.0, 1.0 / scale, sigma_new, sigma_ref,
                  _psf_shifts(psf_new, psf_ref, shift, shift_on), ctype)
    badm = np.asarray(bad, bool) | ~np.isfinite(new) | ~np.isfinite(ref)
    anyb = bool(badm.any())
    edges = (pb > 0, pt > 0, pl > 0, pr_ > 0)
    wk = _FFT_WORKERS
    crop = (slice(pb, pb + h), slice(pl, pl + w))
    # Each grid is freed (and each operator dropped from T) as soon as it has been used: the peak is a few
    # grids, not all of them at once (less memory, and fewer fresh pages to fault in on a first call).
    # 1. V(S_N) + V(S_R), Eqs. 26-27: the variance maps convolved with k_n^2, k_r^2
    VNh = None
    for var, sig, key in ((var_new, sigma_new, "kn2"), (var_ref, sigma_ref, "kr2")):
        v = np.array(var, dtype=fdt)
        fix = ~np.isfinite(v)
        if anyb:
            fix |= badm
        if fix.any():
            v[fix] = sig**2
        v = _noise_pad(v, before, after, origin, 0.0, sig**2, 0, edges)  # constant fill: no noise, no seed
        Vh = sfft.rfft2(v, workers=wk)
        del v
        Vh *= T.pop(key)
        if VNh is None:
            VNh = Vh
        else:
            VNh += Vh
        del Vh
    V = np.maximum(sfft.irfft2(VNh, s=shape, workers=wk)[crop], 0)
    del VNh
    # 2. the data transforms
    n = np.array(new, dtype=fdt)
    if anyb:
        n[badm] = 0
    Nh = sfft.rfft2(_noise_pad(n, before, after, origin, sigma_new, 0.0, 1, edges), workers=wk)
    r = np.array(ref, dtype=fdt)
    if anyb:
        r[badm] = 0
    Rh = sfft.rfft2(_noise_pad(r, before, after, origin, sigma_ref, 0.0, 2, edges), workers=wk)
    del n, r
    X = T.pop("dn") * Nh
    X -= T.pop("dr") * Rh
    diff = sfft.irfft2(X, s=shape, workers=wk)[crop] / T["f_d"]  # Eq. 13, D / F_D
    np.multiply(T.pop("kn"), Nh, out=X)
    del Nh
    SN = sfft.irfft2(X, s=shape, workers=wk)  # Eq. 30
    np.multiply(T.pop("kr"), Rh, out=X)
    del Rh
    SR = sfft.irfft2(X, s=shape, workers=wk)  # Eq. 31
    del X
    # central differences (np.gradient) on the crop grown by 1 px where the grid allows:
    # identical to the gradient of the whole grid, at a fraction of the cost
    gy0, gy1, gx0, gx1 = max(0, pb - 1), min(fy, pb + h + 1), max(0, pl - 1), min(fx, pl + w + 1)
    inner = (slice(pb - gy0, pb - gy0 + h), slice(pl - gx0, pl - gx0 + w))
    vast = np.zeros((h, w))
    for A in (SN, SR):
        gy, gx = np.gradient(A[gy0:gy1, gx0:gx1])
        gx = gx[inner]
        gy = gy[inner]
        gx *= gx
        gy *= gy
        vast += (dx * dx) * gx
        vast += (dy * dy) * gy  # Eqs. 32-33
        del gx, gy
    S = SN[crop] - SR[crop]  # Eq. 17
    del SN, SR
    f_s = T["f_s"]
    with np.errstate(invalid="ignore", divide="ignore"):
        vast += V
        scorr = S / np.sqrt(vast)  # Eq. 25
        fpsf = S / f_s  # Eq. 41
        fpsf_err = np.sqrt(V) / f_s  # Eq. 43
    return {
        "diff": diff.astype(fdt, copy=False),
        "scorr": scorr.astype(fdt, copy=False),
        "s": S.astype(fdt, copy=False),
        "fpsf": fpsf.astype(fdt, copy=False),
        "fpsf_err": fpsf_err.astype(fdt, copy=False),
        "f_d": T["f_d"],
        "f_s": f_s,
    }


def psf_d_stamp(psf_new: np.ndarray, psf_ref: np.ndarray, *, scale: float, sigma_new: float, sigma_ref: float,
                shift: tuple[float, float] = (0.0, 0.0), shift_on: str = "auto") -> np.ndarray:
    """The PSF ``P_D`` of the proper difference (Eq. 14) as a centred stamp (sum 1)."""
    n = max(psf_new.shape[0], psf_ref.shape[0])
    m = 4 * n
    pd = np.fft.irfft2(_pd_hat(psf_new, psf_ref, (m, m), 1.0, 1.0 / scale, sigma_new, sigma_ref,
                               _psf_shifts(psf_new, psf_ref, shift, shift_on)), s=(m, m))
    pd = np.roll(pd, (n, n), axis=(0, 1))[: 2 * n + 1, : 2 * n + 1]
    c = n
    h = n // 2
    return pd[c - h:c + h + 1, c - h:c + h + 1]


# ================================================================== tiles
def _edge_weights(edges: np.ndarray, i: int, coords: np.ndarray, b: float) -> np.ndarray:
    """1-D tent weight of tile column/row ``i`` at pixel ``coords`` (global), feather half-width ``b``."""
    u = coords + 0.5
    w = np.ones(coords.shape, dtype=np.float64)
    if b <= 0:
        return ((u > edges[i]) & (u < edges[i + 1])).astype(float)
    if i > 0:  # border on the low side: weight rises from 0 to 1
        w *= np.clip(0.5 + (u - edges[i]) / (2 * b), 0, 1)
    if i < len(edges) - 2:  # border on the high side
        w *= np.clip(0.5 - (u - edges[i + 1]) / (2 * b), 0, 1)
    return w


def _footprint(psf_new: np.ndarray, psf_ref: np.ndarray, frac: float = 1e-3) -> np.ndarray:
    """Disk-shaped footprint covering the pixels where either PSF exceeds ``frac`` of its peak."""
    n = max(psf_new.shape[0], psf_ref.shape[0])
    rad = 1.0
    for p in (psf_new, psf_ref):
        c = p.shape[0] // 2
        yy, xx = np.mgrid[-c:c + 1, -c:c + 1]
        sel = p >= frac * p.max()
        rad = max(rad, float(np.hypot(xx[sel], yy[sel]).max()))
    rad = min(rad, n // 2)
    r = int(np.ceil(rad))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx * xx + yy * yy) <= rad * rad


def _lin_weights(g: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Matrix of 1-D linear-interpolation weights of points ``g`` on ``nodes`` (clamped at the ends)."""
    t = np.clip(np.interp(g, nodes, np.arange(len(nodes), dtype=float)), 0, len(nodes) - 1)
    i0 = np.minimum(np.floor(t).astype(int), len(nodes) - 2) if len(nodes) > 1 else np.zeros(len(g), int)
    out = np.zeros((len(g), len(nodes)))
    if len(nodes) == 1:
        out[:, 0] = 1
        return out
    f = t - i0
    out[np.arange(len(g)), i0] = 1 - f
    out[np.arange(len(g)), i0 + 1] += f
    return out


def _flux_correction(f_psf: Callable[[float, float], np.ndarray], tile_psf_new: np.ndarray, tile_psf_ref: np.ndarray,
                     ys: np.ndarray, xs: np.ndarray, scale: float, sigma_new: float, sigma_ref: float) -> np.ndarray:
    """Response of ``S`` to a point source with the *local* new PSF, relative to ``F_S`` (Eqs. 41-42).

    With the tile's PSFs ``P_n, P_r`` the peak of ``S`` for a source of flux
    ``alpha`` whose true PSF is ``P_loc`` is ``alpha (1/Npix) sum_k w conj(P_n^) P_loc^``
    with ``w = F_n F_r^2 |P_r^|^2 / den``, while ``F_S`` assumes ``P_loc = P_n``.
    The ratio, evaluated on a grid of positions, corrects ``Fpsf`` for the PSF
    variation inside a tile (first order in the PSF width error).
    """
    n = tile_psf_new.shape[0]
    m = sfft.next_fast_len(4 * n)
    Pn = _psf_fft(tile_psf_new, (m, m))
    Pr = _psf_fft(tile_psf_ref, (m, m))
    fr, fn = 1.0 / scale, 1.0
    an, ar = np.abs(Pn) ** 2, np.abs(Pr) ** 2
    den = sigma_new**2 * fr * fr * ar + sigma_ref**2 * fn * fn * an
    den = np.maximum(den, 1e-30 * den.max())
    wgt = ar / den
    norm = _full_plane_sum(wgt * an, m)
    out = np.ones((len(ys), len(xs)))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            loc = _odd_stamp(_embed(f_psf(x, y), n), "new PSF")
            Pl = _psf_fft(loc, (m, m))
            out[i, j] = _full_plane_sum((wgt * np.conj(Pn) * Pl).real, m) / norm
    return out


def _extended(grid: TileGrid, tile: Any, feather: int) -> tuple[slice, slice]:
    """Global slices of a tile's blend region: its core grown by ``feather`` px (clipped to the image)."""
    H, W = grid.shape
    (y0, y1), (x0, x1) = (tile.core[0].start, tile.core[0].stop), (tile.core[1].start, tile.core[1].stop)
    return (slice(max(0, y0 - feather), min(H, y1 + feather)), slice(max(0, x0 - feather), min(W, x1 + feather)))


def _zogy_tile(new, ref, vnew, vref, bad, *, tile, tgrid, psfs_new, psfs_ref, feather, pad, params, f_new,
               flux_correction):
    """ZOGY on one tile's outer box, computed **once**.

    Returns ``(6, h, w)`` float32: ``diff, scorr, s, fpsf, fpsf_err`` (NaN on
    the mask) and ``mask`` (0/1), on the tile's core when ``feather == 0`` or
    on its blend region (core grown by ``feather`` px) otherwise; the
    partition-of-unity weights are applied by :func:`_assemble_core`.
    """
    grid = tgrid
    t = tile.index
    H, W = grid.shape
    y0, x0 = tile.origin
    oh, ow = tile.outer_shape
    pads = (pad if y0 == 0 else 0, pad if y0 + oh == H else 0, pad if x0 == 0 else 0, pad if x0 + ow == W else 0)
    out = zogy_arrays(new, ref, vnew, vref, bad, psfs_new[t], psfs_ref[t], pad=pads, origin=tile.origin, **params)
    ext = _extended(grid, tile, feather)
    loc = (slice(ext[0].start - y0, ext[0].stop - y0), slice(ext[1].start - x0, ext[1].stop - x0))
    if flux_correction:
        ys = np.linspace(ext[0].start, ext[0].stop - 1, 4)
        xs = np.linspace(ext[1].start, ext[1].stop - 1, 4)
        vals = _flux_correction(f_new, psfs_new[t], psfs_ref[t], ys, xs, params["scale"], params["sigma_new"],
                                params["sigma_ref"])
        # separable bilinear field; the (h, 4) x (4, w) product is summed by hand: a BLAS call here
        # would start (and spin) its own thread pool inside every tile task
        a = _lin_weights(np.arange(ext[0].start, ext[0].stop), ys) @ vals
        b = _lin_weights(np.arange(ext[1].start, ext[1].stop), xs)
        field = a[:, 0, None] * b[None, :, 0]
        for k in range(1, b.shape[1]):
            field += a[:, k, None] * b[None, :, k]
    else:
        field = None
    # mask: bad pixels of either image spread over the PSF footprint
    fp = _footprint(psfs_new[t], psfs_ref[t])
    m = ndimage.binary_dilation(bad, structure=fp)[loc] if bad.any() else np.zeros(
        (loc[0].stop - loc[0].start, loc[1].stop - loc[1].start), bool)
    res = np.empty((6,) + m.shape, np.float32)
    for i, k in enumerate(("diff", "scorr", "s", "fpsf", "fpsf_err")):
        v = out[k][loc]
        if field is not None and k in ("fpsf", "fpsf_err"):
            v = v / field
        res[i] = v
        res[i][m] = np.nan
    res[5] = m
    return res


def _blend_parts(grid: TileGrid, index: int, feather: int) -> list[tuple[int, tuple[slice, slice], tuple[slice, slice], np.ndarray]]:
    """Where each tile contributes to the output core of tile ``index``.

    Per tile ``j`` of :func:`_neighbours` with a non-zero weight somewhere in
    the core: ``(j, src, dst, w)``, where ``src`` are the slices of ``j``'s
    :func:`_zogy_tile` result (its blend region) that land on the core slices
    ``dst``, and ``w`` the separable tent weights (:func:`_edge_weights`) on
    ``dst``.  For a neighbour that is a strip of ``2 feather`` px at most: the
    graph cuts it where the neighbour's result lives, so only strips travel
    between workers, not whole tile results.
    """
    tile = grid.tile(index)
    cy, cx = tile.core
    ys = np.arange(cy.start, cy.stop)
    xs = np.arange(cx.start, cx.stop)
    out = []
    for j in _neighbours(grid, index, feather):
        nb = grid.tile(j)
        ext = _extended(grid, nb, feather)
        wy = _edge_weights(grid.y_edges, nb.iy, ys, feather)
        wx = _edge_weights(grid.x_edges, nb.ix, xs, feather)
        ry = np.nonzero(wy > 0)[0]
        rx = np.nonzero(wx > 0)[0]
        if ry.size == 0 or rx.size == 0:
            continue
        dst = (slice(int(ry[0]), int(ry[-1]) + 1), slice(int(rx[0]), int(rx[-1]) + 1))
        src = (slice(cy.start + dst[0].start - ext[0].start, cy.start + dst[0].stop - ext[0].start),
               slice(cx.start + dst[1].start - ext[1].start, cx.start + dst[1].stop - ext[1].start))
        out.append((j, src, dst, wy[dst[0], None] * wx[None, dst[1]]))
    return out


def _cut_part(result: np.ndarray, src: tuple[slice, slice]) -> np.ndarray:
    """The ``src`` part of a tile result (all 6 planes), as its own array (what travels to another worker)."""
    return np.ascontiguousarray(result[(slice(None),) + src])


def _assemble_core(grid: TileGrid, index: int, feather: int, *parts: np.ndarray) -> np.ndarray:
    """One output core: the partition-of-unity weighted sum of its neighbours' blend regions.

    ``parts`` are the pieces of the :func:`_zogy_tile` results that land on
    this core, in :func:`_blend_parts` order (each already cut to its
    ``src``).  Weights are separable tents (:func:`_edge_weights`) that sum
    to exactly 1 at every pixel; the sum is accumulated in float64 and a
    pixel is masked (NaN) when any tile with a non-zero weight there masks it.
    """
    cy, cx = grid.tile(index).core
    shape = (cy.stop - cy.start, cx.stop - cx.start)
    acc = np.zeros((5,) + shape)
    mask = np.zeros(shape, bool)
    blend = _blend_parts(grid, index, feather)
    if len(parts) != len(blend):
        raise ValueError(f"internal: {len(parts)} parts for the {len(blend)} blend regions of tile {index}")
    for (_, _, (a, b), w), p in zip(blend, parts):
        pm = p[5] > 0
        mask[a, b] |= pm
        acc[:, a, b] += np.where(pm, 0.0, p[:5]) * w
    acc[:, mask] = np.nan
    out = np.empty((6,) + shape, np.float32)
    out[:5] = acc
    out[5] = mask
    return out


def _neighbours(grid: TileGrid, index: int, feather: int) -> list[int]:
    """Tiles whose blend region (core grown by ``feather``) meets the core of tile ``index``."""
    t = grid.tile(index)
    out = []
    for a in (-1, 0, 1):
        for b in (-1, 0, 1):
            iy, ix = t.iy + a, t.ix + b
            if not (0 <= iy < grid.ny and 0 <= ix < grid.nx):
                continue
            if (a or b) and feather <= 0:
                continue
            out.append(iy * grid.nx + ix)
    return out


# ============================================================== the driver
def _phase_timer() -> Callable[[str], None]:
    """Log (debug) the wall time of each driver phase."""
    import time

    last = [time.perf_counter()]

    def tick(name: str) -> None:
        now = time.perf_counter()
        log.debug("zogy phase %-18s %.3f s", name, now - last[0])
        last[0] = now

    return tick


def _check_pair(new: xr.Dataset, ref: xr.Dataset, align: bool) -> xr.Dataset:
    same_shape = new["image"].shape == ref["image"].shape
    hn, hr = has_wcs(new), has_wcs(ref)
    if not same_shape and not (align and hn and hr):
        raise ValueError(
            f"new has shape {new['image'].shape} but ref has shape {ref['image'].shape}; ZOGY needs aligned images "
            "of the same shape: resample the reference onto the new image's pixel grid first "
            "(e.g. tilepipe.subtract(..., align=True) when both have a WCS, or reproject.reproject_interp)"
        )
    if not (hn and hr):
        if align:
            raise ValueError("align=True needs a celestial WCS in both images; one of them has none")
        return ref
    wn, wr = wcs(new), wcs(ref)
    h, w = new["image"].shape
    yy, xx = np.mgrid[0:h - 1:5j, 0:w - 1:5j]
    world = wn.pixel_to_world(xx.ravel(), yy.ravel())
    xr_, yr_ = wr.world_to_pixel(world)
    off = float(np.nanmax(np.hypot(np.asarray(xr_) - xx.ravel(), np.asarray(yr_) - yy.ravel())))
    if off <= 0.5 and same_shape:
        return ref
    if not align:
        raise ValueError(
            f"the WCS of new and ref disagree by up to {off:.2f} px: the images are not aligned. "
            "Align the reference first (pass align=True to reproject it onto the new image's WCS with "
            "`reproject`, or register them yourself)"
        )
    from reproject import reproject_interp

    log.info("reprojecting the reference (shape %s) onto the new image's WCS (shape %s, offset up to %.2f px)",
             ref["image"].shape, new["image"].shape, off)
    img, foot = reproject_interp((np.asarray(ref["image"].data, dtype=np.float64), wr), wn, shape_out=(h, w))
    var, _ = reproject_interp((np.asarray(ref["variance"].data, dtype=np.float64), wr), wn, shape_out=(h, w))
    msk, _ = reproject_interp((np.asarray(ref["mask"].data, dtype=np.float64), wr), wn, shape_out=(h, w), order=0)
    bad = (foot < 1) | ~np.isfinite(img) | (np.nan_to_num(msk, nan=1.0) > 0)
    cards = [c for c in ref.attrs.get("header", [])]
    out = open_image(np.where(bad, np.nan, img).astype(np.float32), mask=bad, variance=np.nan_to_num(var, nan=1.0),
                     gain=ref.attrs.get("gain"), saturation=ref.attrs.get("saturation"), fwhm=ref.attrs.get("fwhm"),
                     header=[c for c in new.attrs.get("header", []) if c[0].startswith(("CTYPE", "CRPIX", "CRVAL", "CD", "PC", "CDELT", "CUNIT", "PV", "RADESYS", "EQUINOX", "LONPOLE", "LATPOLE"))]
                     + [c for c in cards if not c[0].startswith(("CTYPE", "CRPIX", "CRVAL", "CD", "PC", "CDELT", "CUNIT", "PV", "A_", "B_", "AP_", "BP_"))])
    return out


def _block_stat(block: np.ndarray, func: Callable[[np.ndarray], float]) -> np.ndarray:
    return np.full((1, 1), func(block), dtype=np.float64)


def _tile_stats(arr: da.Array, grid: TileGrid, func: Callable[[np.ndarray], float]) -> list[float]:
    """``func`` of every tile core of ``arr``, in tile order: one blockwise layer, one compute (fused with
    the chunks' own graph), not one collection per tile."""
    stats = arr.rechunk(grid.chunks).map_blocks(_block_stat, func, chunks=((1,) * grid.ny, (1,) * grid.nx),
                                                dtype=np.float64, meta=np.empty((0, 0)))
    return [float(v) for v in np.asarray(stats.compute()).ravel()]


def _check_fracs(fracs: list[float], nx: int, ny: int) -> None:
    """Raise when no pixel, or no pixel of some tile, is valid in both images."""
    if max(fracs) == 0:
        raise ValueError("no pixel is valid in both images (the combined mask covers everything); check the masks and overlap of the images")
    dead = [i for i, f in enumerate(fracs) if f == 0]
    if dead:
        raise ValueError(
            f"tile(s) {dead} of the {ny}x{nx} grid are entirely masked in new or ref: nothing to subtract there. "
            "Use a coarser grid (smaller nx/ny) or crop the images to the common valid area"
        )


def _median_finite(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else float("nan")


def _good_fraction(m: np.ndarray) -> float:
    return float(1.0 - np.asarray(m).mean()) if np.asarray(m).size else 0.0


def _resolve_gain(ds: xr.Dataset, gain: float | None, what: str) -> float | None:
    if gain is not None:
        return check_positive(f"{what}_gain", gain)
    g = ds.attrs.get("gain")
    return float(g) if g else None


def zogy_subtract(
    new: xr.Dataset,
    ref: xr.Dataset,
    *,
    nx: int = 1,
    ny: int | None = None,
    overlap: int | None = None,
    new_psf: Any = None,
    ref_psf: Any = None,
    new_var: Any = None,
    ref_var: Any = None,
    new_gain: float | None = None,
    ref_gain: float | None = None,
    scale: float | None = None,
    fit_scale: bool = True,
    fit_shift: bool = True,
    shift: tuple[float, float] | None = None,
    dx: float = 0.25,
    dy: float = 0.25,
    subtract_background: bool = True,
    psf_method: str = "auto",
    feather: int | None = None,
    precision: str = "float64",
    align: bool = False,
    mesh: int = 64,
    flux_correction: bool = True,
) -> xr.Dataset:
    """ZOGY subtraction of two aligned image Datasets; see :func:`tilepipe.subtract`."""
    check_choice("precision", precision, ("float32", "float64"))
    check_choice("psf_method", psf_method, ("auto", "model", "empirical"))
    check_positive("dx", dx, allow_zero=True)
    check_positive("dy", dy, allow_zero=True)
    ref = _check_pair(new, ref, align)
    shape = tuple(new["image"].shape)
    h, w = shape
    gain_n = _resolve_gain(new, new_gain, "new")
    gain_r = _resolve_gain(ref, ref_gain, "ref")

    nx = check_int("nx", nx, lower=1)
    ny = nx if ny is None else check_int("ny", ny, lower=1)
    _tick = _phase_timer()
    # FITS files opened lazily, on a cluster: every task reads its own box from the files (no input chunk
    # travels between workers, nothing is persisted); otherwise the inputs are read once and persisted
    rin = _pair_regions(new, ref, new_var, ref_var) if _use_regions() else None
    pre_grid = TileGrid(shape, nx=nx, ny=ny)
    if rin is None:
        img_n = new["image"].data
        img_r, m_n, m_r = (a.rechunk(img_n.chunks) for a in (ref["image"].data, new["mask"].data, ref["mask"].data))
        img_n, img_r, m_n, m_r = dask.persist(img_n, img_r, m_n, m_r)
        new = new.assign(image=(("y", "x"), img_n), mask=(("y", "x"), m_n))
        ref = ref.assign(image=(("y", "x"), img_r), mask=(("y", "x"), m_r))
        bad = m_n | m_r | ~da.isfinite(img_n) | ~da.isfinite(img_r)
        _check_fracs(_tile_stats(bad, pre_grid, _good_fraction), nx, ny)
        _tick("read + mask check")
    else:
        img_n, img_r = new["image"].data, ref["image"].data

    # ---------------------------------------------------------- background
    # the mesh backgrounds stay lazy: statistics, mesh-grid solve and maps are computed in the persist
    # below (one pass over the pixels); mesh statistics one task per input chunk (no rechunk)
    bny, bnx = len(img_n.chunks[0]), len(img_n.chunks[1])
    (bkg_n, rms_n, solved_n, check_n), (bkg_r, rms_r, solved_r, check_r) = (
        _background(ds, mesh=mesh, nx=bnx, ny=bny) for ds in (new, ref))
    if rin is not None:
        # one pass: mesh statistics, the mesh-grid solves, then per tile core the good-pixel fraction and the
        # noise medians (the tiles' boxes are read later, by each task)
        rbad = Region(_pair_bad_region, {"mn": rin["mask_n"], "mr": rin["mask_r"], "a": rin["img_n"],
                                         "b": rin["img_r"]})
        core_stats, filled = map_windows(_core_stats, [rbad, region_of(rms_n), region_of(rms_r)],
                                         [t.core_box for t in pre_grid.tiles])
        _, rrms_n, rrms_r = filled  # rbad as built: it shares the file regions with rN, rR
        solved = [rrms_n.kwargs["solved"], rrms_r.kwargs["solved"]]  # computed in that pass
        templates, lazy = bind_regions([region_of(bkg_n), region_of(bkg_r)])  # the same solved grids
        grids = {solved_n.name: solved[0], solved_r.name: solved[1]}
        rbkg_n, rbkg_r = fill_regions(templates, [grids[a.name] for a in lazy])
        _check_fracs([c[0] for c in core_stats], nx, ny)
        noises = [c[1] for c in core_stats] + [c[2] for c in core_stats]
        if subtract_background:
            rN = Region(_sub_region, {"a": rin["img_n"], "b": rbkg_n})
            rR = Region(_sub_region, {"a": rin["img_r"], "b": rbkg_r})
        else:
            rN, rR = rin["img_n"], rin["img_r"]
        N = region_array(rN, pre_grid, np.float32, "zogy-new")
        R = region_array(rR, pre_grid, np.float32, "zogy-ref")
        bmeth = "estimate_background" if subtract_background else "none (rms from estimate_background)"
    elif subtract_background:
        N = (img_n - bkg_n.rechunk(img_n.chunks)).astype(np.float32)
        R = (img_r - bkg_r.rechunk(img_n.chunks)).astype(np.float32)
        bmeth = "estimate_background"
    else:
        N, R = img_n, img_r
        bmeth = "none (rms from estimate_background)"

    _tick("background")
    # ------------------------------------------------------- PSFs and sizes
    fwhm_n = new.attrs.get("fwhm")
    fwhm_r = ref.attrs.get("fwhm")
    f_new = as_psf_function(new_psf, "new_psf")
    f_ref = as_psf_function(ref_psf, "ref_psf")
    if fwhm_n is None or fwhm_r is None:
        cy, cx = slice(max(0, h // 2 - 512), min(h, h // 2 + 512)), slice(max(0, w // 2 - 512), min(w, w // 2 + 512))
        if fwhm_n is None:
            fwhm_n = _stamp_fwhm(f_new(w / 2, h / 2)) if f_new else None
        if fwhm_r is None:
            fwhm_r = _stamp_fwhm(f_ref(w / 2, h / 2)) if f_ref else None
        if fwhm_n is None or fwhm_r is None:
            if rin is not None:
                cut_n, cut_r, cut_b = evaluate_regions([rN, rR, rbad], cy, cx)
            else:
                cut_n, cut_r, cut_b = dask.compute(N[cy, cx], R[cy, cx], bad[cy, cx])
            fwhm_n = nz.estimate_fwhm(cut_n, cut_b) if fwhm_n is None else fwhm_n
            fwhm_r = nz.estimate_fwhm(cut_r, cut_b) if fwhm_r is None else fwhm_r
    fwhm_n, fwhm_r = float(fwhm_n), float(fwhm_r)
    half = int(np.clip(np.ceil(3.0 * max(fwhm_n, fwhm_r)), 7, 40))
    if f_new is not None:
        half = max(half, f_new(w / 2, h / 2).shape[0] // 2)
    if f_ref is not None:
        half = max(half, f_ref(w / 2, h / 2).shape[0] // 2)
    support = 3 * half
    # Feathering (varying PSF): a tile's blend region is its core grown by fe px,
    # and its result there is exact when the halo covers fe + the kernel support.
    maybe_varying = nx * ny > 1 and not (
        f_new is not None and f_ref is not None and _is_constant(f_new, shape) and _is_constant(f_ref, shape))
    fe0 = max(support // 2, 8) if feather is None else check_int("feather", feather, lower=0)
    need = support + (fe0 if (maybe_varying or feather is not None) else 0)
    if overlap is None:
        ov = (need if ny > 1 else 0, need if nx > 1 else 0)
    else:
        ov = as_pair("overlap", overlap, lower=0)
    grid = TileGrid(shape, nx=nx, ny=ny, overlap=ov)
    grid._check_engine()
    oy, ox = grid.overlap
    if (ny > 1 and oy < half) or (nx > 1 and ox < half):
        raise ValueError(
            f"overlap={grid.overlap} px is smaller than the PSF half-size ({half} px): the PSF does not fit "
            f"in a tile's halo. Use overlap >= {need} (recommended) or at least {half}"
        )
    grid.check_overlap(support, "ZOGY (3 x PSF half-size)")
    if min(grid.min_core) < 2 * half + 1:
        raise ValueError(f"tiles of {grid.min_core} px are smaller than the PSF stamp ({2 * half + 1} px); use fewer tiles")

    _tick("sizes")
    # ------------------- one pass over the pixels: inputs persisted in tile chunks
    gc = grid.chunks
    if rin is None:
        N, R, rms_n, rms_r, bad, solved_n, solved_r = dask.persist(
            N.rechunk(gc), R.rechunk(gc), rms_n.rechunk(gc), rms_r.rechunk(gc), bad.rechunk(gc), solved_n, solved_r)
        solved = list(dask.compute(solved_n, solved_r))
    for check, grids in zip((check_n, check_r), solved):  # bad meshes: after the first pass
        text = check(grids)
        if text:
            warnings.warn(text, FallbackWarning, stacklevel=3)
    step = max(1, int(np.sqrt(h * w / 250_000)))
    samples = _map_samples(solved, fit_mesh_to_image(shape, mesh, 1, 1)[0], shape, step)
    if gain_n is None or gain_r is None:
        est = {}
        for key, g, b_, r_ in zip(("new", "ref"), (gain_n, gain_r), samples["bkg32"], samples["rms32"]):
            if g is None:
                sky, rms = float(np.nanmedian(np.asarray(b_))), float(np.nanmedian(np.asarray(r_)))
                est[key] = sky / rms**2 if sky > 3 * rms and rms > 0 else None
        warnings.warn(
            "no gain known for " + " and ".join(est) + ": "
            + ", ".join(f"{k}: effective gain {v:.3g} e-/ADU from sky / rms^2 (assumes a photon-noise-limited, "
                        "bias-free sky)" if v else f"{k}: no source Poisson noise in the variance (sky too low to "
                        "estimate a gain), S_corr is overestimated on bright stars" for k, v in est.items())
            + "; pass new_gain=/ref_gain= (e-/ADU)",
            FallbackWarning,
            stacklevel=3,
        )
        gain_n = est.get("new", gain_n) if gain_n is None else gain_n
        gain_r = est.get("ref", gain_r) if gain_r is None else gain_r
    if rin is None:
        VN = _user_var(new_var, new, shape, gc, "new_var")
        if VN is None:
            VN = nz.variance_map(N, rms_n, gain_n)
        VR = _user_var(ref_var, ref, shape, gc, "ref_var")
        if VR is None:
            VR = nz.variance_map(R, rms_r, gain_r)
        VN, VR = dask.persist(VN.rechunk(gc), VR.rechunk(gc))
    else:
        rVN = Region(_var_region, {"img": rN, "rms": rrms_n, "gain": gain_n})
        rVR = Region(_var_region, {"img": rR, "rms": rrms_r, "gain": gain_r})
        VN = VR = bad = None

    _tick("persist")
    # ------------- map: stars of every tile + per-tile noise, in one compute
    sat_n = new.attrs.get("saturation")
    sat_r = ref.attrs.get("saturation")
    r_ap = float(np.clip(2.0 * max(fwhm_n, fwhm_r), 4.0, half - 1))
    star_grid = TileGrid(shape, nx=nx, ny=ny, overlap=tuple(max(o, half + 2) if n > 1 else 0 for o, n in zip(ov, (ny, nx))))
    sky64 = [_median_finite(b) for b in samples["bkg64"]]
    star_kw = dict(
        fwhm_new=fwhm_n, fwhm_ref=fwhm_r, half=half, r_aper=r_ap,
        saturation_new=None if sat_n is None else float(sat_n) - sky64[0],
        saturation_ref=None if sat_r is None else float(sat_r) - sky64[1],
    )
    if rin is None:
        stok = dask.base.tokenize(star_grid.overlap, star_kw, N, R, VN, VR, bad, rms_n, rms_r)
        sname = f"zogy-stars-{stok}"
        dsk: dict[Any, Any] = {}
        for t, refs in zip(star_grid.tiles, _tile_chunk_keys([N, R, VN, VR, bad], star_grid)):
            dsk[(sname, t.index)] = (apply, _stars_task, [star_grid, t.index, star_kw, refs], {})
        for k, a in enumerate((rms_n, rms_r)):  # per-tile noise: the median of the tile's rms
            for t in grid.tiles:
                dsk[(sname + "-noise", k, t.index)] = (_median_finite, (a.name, t.iy, t.ix))
        dsk[sname] = (tuple, [[(sname, t.index) for t in star_grid.tiles],
                              [(sname + "-noise", k, t.index) for k in range(2) for t in grid.tiles]])
        sgraph = HighLevelGraph.from_collections(sname, dsk, dependencies=[N, R, VN, VR, bad, rms_n, rms_r])
        (tables, noises) = dask.compute(Delayed(sname, sgraph))[0]
    else:
        regions5 = [rN, rR, rVN, rVR, rbad]
        tables, regions5 = map_windows(_stars_window, regions5, [t.outer_box for t in star_grid.tiles],
                                       [{"index": t.index} for t in star_grid.tiles], grid=star_grid, kw=star_kw)
    stars = merge_tables(tables)
    rn_tiles = [float(v) for v in noises[:grid.ntiles]]
    rr_tiles = [float(v) for v in noises[grid.ntiles:]]
    sigma_n, sigma_r = (_median_finite(v) for v in samples["noise"])
    log.info("ZOGY: %d stars measured for the global fits", len(stars))
    _tick("stars")
    # ------------------------------------------------- reduce: PSF models
    psf_source = {"new": "given", "ref": "given"}
    for key, f_given in (("new", f_new), ("ref", f_ref)):
        if f_given is not None:
            continue
        model = None
        if psf_method in ("auto", "model"):
            model = _try_build_psf(new if key == "new" else ref, psf_method)
        if model is not None:
            psf_source[key] = "build_psf"
        else:
            st = stars[(stars["flux_new"] / stars["err_new"] > 20) & (stars["flux_ref"] / stars["err_ref"] > 20)] if len(stars) else stars
            if len(st) < 3:
                raise ValueError(
                    f"cannot estimate the {key} PSF: fewer than 3 bright isolated unsaturated stars found; "
                    f"pass {key}_psf= (a 2-D stamp, a callable (x, y) -> stamp or a PSF model)"
                )
            col = "stamp_new" if key == "new" else "stamp_ref"
            snr = np.asarray(st["flux_" + key]) / np.asarray(st["err_" + key])
            model = EmpiricalPSF(np.asarray(st[col]), np.asarray(st["x"]), np.asarray(st["y"]),
                                 np.minimum(snr, 200.0) ** 2, shape)
            psf_source[key] = repr(model)
        if key == "new":
            f_new = as_psf_function(model, "new PSF model")
        else:
            f_ref = as_psf_function(model, "ref PSF model")
    centres = [((t.core[1].start + t.core[1].stop - 1) / 2.0, (t.core[0].start + t.core[0].stop - 1) / 2.0) for t in grid.tiles]
    psfs_new = [f_new(x, y) for x, y in centres]
    psfs_ref = [f_ref(x, y) for x, y in centres]
    size = max(p.shape[0] for p in psfs_new + psfs_ref)
    size = max(size, 2 * half + 1)
    psfs_new = [_odd_stamp(_embed(p, size), "new PSF") for p in psfs_new]
    psfs_ref = [_odd_stamp(_embed(p, size), "ref PSF") for p in psfs_ref]
    varying = nx * ny > 1 and not (
        all(np.array_equal(p, psfs_new[0]) for p in psfs_new) and all(np.array_equal(p, psfs_ref[0]) for p in psfs_ref)
    )
    _tick("psfs")
    # ----------------------------------------- reduce: flux scale and shift
    tix = np.asarray(stars["tile"], dtype=int) if len(stars) else np.zeros(0, int)
    fit: dict[str, Any] = {}
    if scale is not None:
        scale_v = check_positive("scale", scale)
        fit["scale_source"] = "given"
    elif fit_scale:
        if len(stars) == 0:
            raise ValueError("no stars found to fit the flux scale; pass scale= (flux ratio new/ref)")
        een = np.array([_ee(p, r_ap) for p in psfs_new])[tix]
        eer = np.array([_ee(p, r_ap) for p in psfs_ref])[tix]
        fs = nz.fit_flux_scale(stars, ee_new=een, ee_ref=eer)
        if not np.isfinite(fs["scale"]):
            raise ValueError("the flux scale fit failed (no usable stars); pass scale= (flux ratio new/ref)")
        scale_v = fs["scale"]
        fit.update(scale_err=fs["scale_err"], scale_nstars=fs["n"], scale_source="fit")
    else:
        scale_v = 1.0
        fit["scale_source"] = "default 1"
    if shift is not None:
        sx, sy = (float(v) for v in shift)
        fit["shift_source"] = "given"
    elif fit_shift and len(stars):
        offs_n = np.array([_window_offset(p, fwhm_n) for p in psfs_new])[tix]
        offs_r = np.array([_window_offset(p, fwhm_r) for p in psfs_ref])[tix]
        sh = nz.fit_shift(stars, offset_new=offs_n, offset_ref=offs_r)
        sx, sy = sh["dx"], sh["dy"]
        fit.update(shift_err=[sh["dx_err"], sh["dy_err"]], shift_nstars=sh["n"], shift_source="fit")
    else:
        sx, sy = 0.0, 0.0
        fit["shift_source"] = "none"
    cidx = grid.ntiles // 2
    shift_on = "new" if _stamp_fwhm(psfs_new[cidx]) >= _stamp_fwhm(psfs_ref[cidx]) else "ref"
    frame_offset = [float(sx), float(sy)] if shift_on == "new" else [0.0, 0.0]
    params = dict(scale=scale_v, sigma_new=sigma_n, sigma_ref=sigma_r, shift=(sx, sy), shift_on=shift_on,
                  dx=float(dx), dy=float(dy),
                  precision=precision)
    _tick("fits")
    # ------------------------------------------------------------ feather
    fe = fe0 if (varying or feather is not None) else 0
    if fe > 0:
        room = min([o - support for o, n in zip(grid.overlap, (ny, nx)) if n > 1] or [fe])
        lim = max(0, min(fe, room, min(grid.min_core) // 2))
        if lim < fe:
            warnings.warn(
                f"feather reduced from {fe} to {lim} px: the halo ({grid.overlap} px) must cover the kernel support "
                f"({support} px) plus the feather, and the feather half a core; use overlap >= {support + fe}",
                OverlapWarning, stacklevel=3)
            fe = lim
    pad = support
    fcorr = bool(flux_correction and not _is_constant(f_new, shape))
    outs = _map(N, R, VN, VR, bad, grid, psfs_new, psfs_ref, fe, pad, params, f_new if fcorr else None, fcorr,
                regions=None if rin is None else regions5)
    _tick("graph")
    pds = np.stack([psf_d_stamp(pn, pr, scale=scale_v, sigma_new=sigma_n, sigma_ref=sigma_r, shift=(sx, sy),
                                shift_on=shift_on)
                    for pn, pr in zip(psfs_new, psfs_ref)]).astype(np.float32)
    f_d = 1.0 / np.sqrt(sigma_n**2 + (scale_v * sigma_r) ** 2)
    data = {k: (("y", "x"), v) for k, v in zip(OUTPUTS[:-1], outs[:-1])}
    data["mask"] = (("y", "x"), outs[-1] > 0)
    data["diff_psf"] = (("tile", "py", "px"), pds)
    coords = {
        "tile": np.arange(grid.ntiles),
        "tile_x0": ("tile", np.array([t.core[1].start for t in grid.tiles])),
        "tile_x1": ("tile", np.array([t.core[1].stop for t in grid.tiles])),
        "tile_y0": ("tile", np.array([t.core[0].start for t in grid.tiles])),
        "tile_y1": ("tile", np.array([t.core[0].stop for t in grid.tiles])),
    }
    attrs = {
        "header": list(new.attrs.get("header", [])),
        "bunit": new.attrs.get("bunit", "adu"),
        "method": "zogy",
        "reference": "Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27",
        "flux_scale": float(scale_v),
        "shift": [float(sx), float(sy)],
        "shift_on": shift_on,
        "frame_offset": frame_offset,
        "astrometric_noise": [float(dx), float(dy)],
        "sigma_new": sigma_n,
        "sigma_ref": sigma_r,
        "f_d": float(f_d),
        "noise_new_tiles": rn_tiles,
        "noise_ref_tiles": rr_tiles,
        "diff_noise": float(1.0 / f_d),
        "grid": {"nx": nx, "ny": ny, "overlap": list(grid.overlap), "y_edges": grid.y_edges.tolist(),
                 "x_edges": grid.x_edges.tolist()},
        "feather": int(fe),
        "varying_psf": bool(varying),
        "psf_source": psf_source,
        "background": bmeth,
        "fwhm_new": fwhm_n,
        "fwhm_ref": fwhm_r,
        "gain_new": gain_n,
        "gain_ref": gain_r,
        "precision": precision,
        "nstars_fit": int(len(stars)),
    }
    attrs.update(fit)
    for k in ("gain", "saturation"):
        if k in new.attrs:
            attrs[k] = new.attrs[k]
    # The outputs' graphs refer to the persisted inputs by key.  dask.compute(res["diff"].data) hands the
    # persisted futures to the scheduler, but xarray's compute (res.compute(), res["diff"].values) optimises
    # them out of the graph: without another reference, a distributed cluster would release the inputs
    # as soon as this function returns ("lost dependencies").  Each output array holds them.
    if rin is None:
        keep = (N, R, VN, VR, bad)
        for _, v in data.values():
            if isinstance(v, da.Array):
                v._tilepipe_inputs = keep
    res = xr.Dataset(data, coords=coords, attrs=attrs)
    # carry the inputs for cutouts (lazy, no cost unless used)
    res["new"] = (("y", "x"), N)
    res["ref"] = (("y", "x"), R)
    return res


def _is_constant(f: Callable[[float, float], np.ndarray], shape: tuple[int, int]) -> bool:
    h, w = shape
    a = f(0.0, 0.0)
    return all(np.array_equal(a, f(x, y)) for x, y in ((w - 1, h - 1), (w - 1, 0.0), (0.0, h - 1), (w / 2, h / 2)))


def _embed(p: np.ndarray, size: int) -> np.ndarray:
    if p.shape[0] == size:
        return p
    if p.shape[0] > size:
        c = p.shape[0] // 2
        h = size // 2
        return p[c - h:c + h + 1, c - h:c + h + 1]
    out = np.zeros((size, size))
    o = (size - p.shape[0]) // 2
    out[o:o + p.shape[0], o:o + p.shape[1]] = p
    return out


def _ee(p: np.ndarray, r: float | None) -> float:
    if r is None:
        return 1.0
    c = p.shape[0] // 2
    yy, xx = np.mgrid[-c:c + 1, -c:c + 1]
    return float(p[(xx * xx + yy * yy) <= r * r].sum())


def _background(ds: xr.Dataset, *, mesh: int, nx: int, ny: int) -> tuple[da.Array, da.Array, da.Array, Any]:
    """The mesh background of :func:`tilepipe.estimate_background` of one image, left lazy.

    Returns :func:`tilepipe.background.mesh_background_lazy`'s ``(background,
    rms, solved, check)``: computed in the same graph as the first pass over
    the pixels, not one compute per image.  An image smaller than one mesh
    gets a mesh cut to its size, with a :class:`FallbackWarning`.
    """
    from ..background import mesh_background_lazy

    m, nx, ny, message = fit_mesh_to_image(ds["image"].shape, mesh, nx, ny)
    if message:
        warnings.warn(message, FallbackWarning, stacklevel=4)
    return mesh_background_lazy(ds, m, nx=nx, ny=ny)


def _user_var(var: Any, ds: xr.Dataset, shape: tuple[int, int], chunks: Any, name: str) -> da.Array | None:
    if var is None:
        return None
    if isinstance(var, str) and var == "dataset":
        return ds["variance"].data.astype(np.float32)
    if isinstance(var, xr.DataArray):
        var = var.data
    a = var if isinstance(var, da.Array) else da.from_array(np.asarray(var, dtype=np.float32), chunks=chunks)
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape} (the image shape)")
    return a.astype(np.float32)


def _try_build_psf(ds: xr.Dataset, psf_method: str) -> Any:
    try:
        from ..psf import build_psf  # type: ignore[attr-defined]
    except ImportError:
        if psf_method == "model":
            raise ValueError("psf_method='model' needs tilepipe.build_psf (the psf module), which is not available") from None
        return None
    try:
        model = build_psf(ds)
        if not hasattr(model, "at"):
            raise TypeError("build_psf returned an object without .at(x, y)")
        return model
    except Exception as exc:
        if psf_method == "model":
            raise
        warnings.warn(f"tilepipe.build_psf failed ({type(exc).__name__}: {exc}); using the empirical PSF fallback",
                      FallbackWarning, stacklevel=4)
        return None


def _zogy_tile_delayed(parts, grid, index, **kw):
    blocks = _outer_blocks(grid, index, parts)
    return _zogy_tile(*blocks, tile=grid.tile(index), tgrid=grid, **kw)


def _neighbour_chunks(grid: TileGrid, index: int) -> list[tuple[int, int]]:
    """``(iy, ix)`` of the 3 x 3 chunks (tile cores) around tile ``index`` that exist."""
    t = grid.tile(index)
    return [(iy, ix) for iy in (t.iy - 1, t.iy, t.iy + 1) for ix in (t.ix - 1, t.ix, t.ix + 1)
            if 0 <= iy < grid.ny and 0 <= ix < grid.nx]


def _outer_blocks(grid: TileGrid, index: int, parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Inside a task: build the outer boxes of tile ``index`` from its neighbours' core chunks.

    ``parts[k][a]`` is array ``a``'s core chunk at the ``k``-th neighbour
    listed by :func:`_neighbour_chunks` (the halo never exceeds a neighbour's
    core, which :meth:`TileGrid._check_engine` guarantees).
    """
    t = grid.tile(index)
    oy, ox = t.outer
    nbs = _neighbour_chunks(grid, index)
    out = []
    for a in range(len(parts[0])):
        box = np.empty((oy.stop - oy.start, ox.stop - ox.start), dtype=np.asarray(parts[0][a]).dtype)
        for (iy, ix), nb in zip(nbs, parts):
            cy, cx = grid.tile(iy * grid.nx + ix).core
            y0, y1 = max(cy.start, oy.start), min(cy.stop, oy.stop)
            x0, x1 = max(cx.start, ox.start), min(cx.stop, ox.stop)
            if y1 > y0 and x1 > x0:
                box[y0 - oy.start:y1 - oy.start, x0 - ox.start:x1 - ox.start] = np.asarray(nb[a])[
                    y0 - cy.start:y1 - cy.start, x0 - cx.start:x1 - cx.start]
        out.append(box)
    return out


def _tile_chunk_keys(arrays: list[da.Array], grid: TileGrid) -> list[list[list[Any]]]:
    """Per tile, per neighbour chunk, the chunk keys of every array (for :func:`_outer_blocks`).

    One task per tile reads its neighbours' chunks directly (no per-slice
    overlap tasks).  On a cluster of several workers whole neighbour chunks
    travel; cutting the halo strips first where the chunks live (as
    :func:`tilepipe.detect_sources` does) was measured and not faster here:
    ZOGY tiles have five input arrays, so the strips cost 8 extra tasks per
    tile against a few MB of transfer.  The tasks are written into the graph
    with these keys directly: passing ``to_delayed()`` chunks to
    ``dask.delayed`` calls merged every chunk's graph per call (~0.4 s of
    client time for a 4x4 grid).  Every array must be chunked on the grid's
    cores.
    """
    grid._check_engine()
    for a in arrays:
        if a.chunks != grid.chunks:
            raise ValueError("internal: arrays must be chunked on the tile cores")
    return [[[(a.name, iy, ix) for a in arrays] for iy, ix in _neighbour_chunks(grid, t.index)] for t in grid.tiles]


# ------------------------------------------------------------------ regions
#: Whether :func:`zogy_subtract` reads each tile's box straight from the files when both images (and
#: masks) can be read by rectangle (FITS files opened lazily) and the variances are the default ones:
#: None (default) on a distributed cluster only, True always, False never (tests compare the paths).
#: In one process the chunk path is used: it evaluates the background maps once per chunk, while each
#: box task evaluates them again (BLAS products whose own thread pool, outside dask's workers, competed
#: with the second thread of dask's threaded scheduler: 2 threads ran the 2k pair slower than 1).
_USE_REGIONS: contextvars.ContextVar[bool | None] = contextvars.ContextVar("tilepipe_zogy_regions", default=None)


def _use_regions() -> bool:
    use = _USE_REGIONS.get()
    return uses_distributed() if use is None else bool(use)


def _sub_region(ys: slice, xs: slice, *, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a - b`` as float32 (the background-subtracted image of the chunk path, on any rectangle)."""
    return (a - b).astype(np.float32, copy=False)


def _pair_bad_region(ys: slice, xs: slice, *, mn: np.ndarray, mr: np.ndarray, a: np.ndarray,
                     b: np.ndarray) -> np.ndarray:
    """Bad in either image: either mask, or a non-finite pixel in either image."""
    return mn | mr | ~np.isfinite(a) | ~np.isfinite(b)


def _var_region(ys: slice, xs: slice, *, img: np.ndarray, rms: np.ndarray, gain: float | None) -> np.ndarray:
    """:func:`tilepipe.subtract.noise.variance_map` on any rectangle."""
    return nz._variance_block(img, rms, gain)


def _pair_regions(new: xr.Dataset, ref: xr.Dataset, new_var: Any, ref_var: Any) -> dict[str, Region] | None:
    """The file regions of both images and masks, or None when any input cannot be read by rectangle."""
    if new_var is not None or ref_var is not None:
        return None
    out = {k: region_of(ds[v]) for k, ds, v in (("img_n", new, "image"), ("mask_n", new, "mask"),
                                                  ("img_r", ref, "image"), ("mask_r", ref, "mask"))}
    return None if any(r is None for r in out.values()) else out


def _core_stats(bad: np.ndarray, rn: np.ndarray, rr: np.ndarray, *, window: tuple[int, int, int, int]
                ) -> tuple[float, float, float]:
    """Per tile core (region path): the good-pixel fraction and the noise medians of new and ref."""
    return _good_fraction(bad), _median_finite(rn), _median_finite(rr)


def _map_samples(solved: list[np.ndarray], mesh: tuple[int, int], shape: tuple[int, int],
                 step: int) -> dict[str, list[np.ndarray]]:
    """The strided samples of both images' background (plane 0) and rms (plane 1) maps, from their solved
    mesh grids (small: evaluated on the strided pixels only): ``rms[::step, ::step]`` for the global noise,
    ``background, rms [::32, ::32]`` for the effective gain, ``background[::64, ::64]`` for the saturation."""
    from ..background import _eval_solved_region

    def sample(g: np.ndarray, plane: int, k: int) -> np.ndarray:
        return _eval_solved_region(slice(0, shape[0], k), slice(0, shape[1], k), solved=g, plane=plane, mesh=mesh)

    return {"noise": [sample(g, 1, step) for g in solved], "bkg32": [sample(g, 0, 32) for g in solved],
            "rms32": [sample(g, 1, 32) for g in solved], "bkg64": [sample(g, 0, 64) for g in solved]}


def _stars_window(n, r, vn, vr, bad, *, window, grid, index, kw):
    """The stars of star tile ``index`` measured on its outer box (``window``, unused here: the region path
    passes it; the chunk path's :func:`_stars_task` builds the box from chunks)."""
    return _tile_table(nz.measure_pair_stars, grid, index, kw, "x", "y", n, r, vn, vr, bad)


def _zogy_region_tile(regions: list[Region], grid: TileGrid, index: int, **kw: Any) -> np.ndarray:
    """:func:`_zogy_tile` on tile ``index``, its outer box computed straight from the files."""
    t = grid.tile(index)
    blocks = evaluate_regions(regions, *t.outer)
    return _zogy_tile(*blocks, tile=t, tgrid=grid, **kw)


def _stars_task(grid, index, kw, parts):
    """:func:`_stars_window` on a star tile's outer box built from its neighbours' chunks (chunk path)."""
    return _stars_window(*_outer_blocks(grid, index, parts), window=None, grid=grid, index=index, kw=kw)


def _map(N, R, VN, VR, bad, grid, psfs_new, psfs_ref, feather, pad, params, f_new, flux_correction,
         regions=None):
    """The ZOGY map: one computation per tile, stitched (feather 0) or blended (feather > 0).

    One task per tile reads its neighbours' core chunks (or, with
    ``regions``, computes its outer box straight from the files) and
    computes ZOGY on its outer box once.  Without feathering its core is the
    output chunk; with feathering each output core is the weighted sum of
    the (up to 9) blend regions that cover it (:func:`_assemble_core`).  No
    task holds the whole image (unless there is one tile).
    """
    kw = dict(psfs_new=psfs_new, psfs_ref=psfs_ref, feather=feather, pad=pad, params=params, f_new=f_new,
              flux_correction=flux_correction)
    dsk: dict[Any, Any] = {}
    if regions is None:
        tok = dask.base.tokenize(grid.shape, grid.chunks, grid.overlap, psfs_new, psfs_ref, feather, pad, params,
                                 flux_correction, N, R, VN, VR, bad)
        tname, aname = f"zogy-tile-{tok}", f"zogy-{tok}"
        for t, refs in zip(grid.tiles, _tile_chunk_keys([N, R, VN, VR, bad], grid)):
            dsk[(tname, t.index)] = (apply, _zogy_tile_delayed, [refs, grid, t.index], kw)
        deps = [N, R, VN, VR, bad]
    else:  # every tile task reads its own box: no task depends on another before the blend
        tok = uuid.uuid4().hex
        tname, aname = f"zogy-tile-{tok}", f"zogy-{tok}"
        spec = f"zogy-regions-{tok}"
        dsk[spec] = (list, list(regions))
        for t in grid.tiles:
            dsk[(tname, t.index)] = (apply, _zogy_region_tile, [spec, grid, t.index], kw)
        deps = []
    strips = several_workers()  # in one process or one worker nothing travels: no cut tasks (a few ms each)
    for t in grid.tiles:
        if feather > 0:  # the output core: the weighted sum of the blend regions that cover it
            parts = []
            for j, src, _, _ in _blend_parts(grid, t.index, feather):
                if j == t.index or not strips:  # a result where this task runs: a view
                    parts.append((operator.getitem, (tname, j), (slice(None),) + src))
                    continue
                # a neighbour's strip, cut where its result lives: only the strip travels between workers
                dsk[(tname + "-part", t.index, j)] = (_cut_part, (tname, j), src)
                parts.append((tname + "-part", t.index, j))
            dsk[(aname, 0, t.iy, t.ix)] = (_assemble_core, grid, t.index, feather, *parts)
        else:
            dsk[(aname, 0, t.iy, t.ix)] = (tname, t.index)
    graph = HighLevelGraph.from_collections(aname, dsk, dependencies=deps)
    stacked = da.Array(graph, aname, chunks=((6,),) + tuple(grid.chunks), dtype=np.float32,
                       meta=np.empty((0, 0, 0), np.float32))
    return tuple(stacked[i] for i in range(6))
