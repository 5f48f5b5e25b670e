"""Seeded synthetic images with known truth: star fields and image pairs.

Used by the tests, the demo and the benchmarks.  Everything here is
deterministic for a given ``seed`` and every ingredient of the image is
returned as truth:

* stars with a power-law flux distribution ``dN/dF ∝ F**-flux_slope``
  between ``flux_range`` (total ADU), uniformly placed at least ``edge``
  pixels from the image border;
* a spatially varying PSF (:class:`TruePSF`): FWHM, ellipticity and position
  angle vary smoothly across the field; an elliptical Gaussian (default) or an
  elliptical Moffat, **integrated over pixels by sub-sampling**, truncated to
  a ``(2R+1)²`` pixel box around the star's nearest pixel and normalised to
  sum 1 there, so each star puts exactly ``flux`` ADU into the image (when it
  is not cut by the image edge);
* a sky with a planar gradient;
* Poisson noise on the electrons (``gain`` e-/ADU) plus Gaussian read noise
  (``read_noise`` e-), returned in ADU as float32;
* optional saturation (clip + mask + ``saturated`` truth column), dead
  columns (value ``bad_column_value``, masked) and cosmic rays (sharp tracks,
  not masked, listed in ``attrs["truth_cosmic_rays"]``);
* for pairs: a flux-scale ratio, a sub-pixel shift (star positions are
  *rendered* shifted, never interpolated), different seeing, and transients
  injected only in ``new`` at a chosen optimal S/N.

Conventions: pixel coordinates are 0-based, the centre of pixel ``[0, 0]`` is
``(x, y) = (0, 0)``, arrays are indexed ``[y, x]``, mask True = bad, images in
ADU.  The position angle ``theta`` of the PSF major axis is measured in radians
counter-clockwise from the +x axis (sep/SExtractor convention).

The per-pixel ``variance`` of every image is the *true* one, computed from the
noiseless model ``m`` (sky + stars + transients, in ADU)::

    variance = m / gain + (read_noise / gain)**2          [ADU²]

S/N of a star or transient (``snr`` truth columns) is the optimal PSF-fit S/N
against the background and the source's own Poisson noise in its image::

    snr = F * sqrt( sum_p P_p**2 / V_p ),
    V_p = (sky_p + F * P_p) / gain + (read_noise / gain)**2

(``P`` the pixel-integrated PSF stamp, sum 1; ``F`` the flux in ADU; neighbours
and cosmic rays are ignored).  This is the inverse of the Cramér–Rao bound of
the linear PSF-fit flux estimator, e.g. Zackay, Ofek & Gal-Yam (2016, ApJ 830,
27) eq. 41 for the single-image case.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, NamedTuple, Sequence

import numpy as np
import xarray as xr
from astropy.table import Table

from ._validate import check_choice, check_int, check_positive
from .image import make_dataset

log = logging.getLogger(__name__)

__all__ = ["Field", "Pair", "TruePSF", "make_field", "make_pair", "true_psf"]

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548
_EMAX = 0.9  # largest ellipticity 1 - b/a the model allows
_TRUTH_VERSION = 1


class Field(NamedTuple):
    """A synthetic star field (see :func:`make_field`)."""

    image: xr.Dataset
    """The image Dataset (ADU): ``image``, ``mask``, ``variance`` (true)."""
    stars: Table
    """Truth: ``id, x, y, flux, fwhm, ellipticity, theta, peak, snr, saturated``."""
    sky: np.ndarray
    """Noiseless background (ADU, float32, ``[y, x]``)."""


class Pair(NamedTuple):
    """A synthetic new/reference pair (see :func:`make_pair`)."""

    new: xr.Dataset
    ref: xr.Dataset
    stars: Table
    """Truth of the static stars (reference-frame and new-frame positions)."""
    transients: Table
    """Truth of the transients, present only in ``new`` (new-frame positions)."""
    new_sky: np.ndarray
    ref_sky: np.ndarray


# =================================================================== the PSF
def _poly2d(coeffs: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``sum_ij c[i, j] u**i v**j``."""
    return np.polynomial.polynomial.polyval2d(u, v, np.asarray(coeffs, dtype=np.float64))


class TruePSF:
    """The exact PSF used to render a synthetic image, at any position.

    Built from the JSON-able parameter dict stored in
    ``ds.attrs["truth_psf"]`` (see :func:`true_psf`).  The FWHM ``f``,
    ellipticity ``e = 1 - b/a`` and angle ``theta`` vary smoothly across the
    field as quadratic/linear polynomials of the normalised coordinates
    ``u = (x - cx) / hx``, ``v = (y - cy) / hy`` (both in [-1, 1])::

        f(u, v)     = sum c_ij u^i v^j                       (pixels)
        e1, e2      = linear polynomials;  e = min(hypot(e1, e2), 0.9)
        theta       = atan2(e2, e1) / 2

    ``f`` is the FWHM of the continuous (pre-pixel) profile, geometric mean of
    the major- and minor-axis FWHMs (``f_a = f / sqrt(1 - e)``,
    ``f_b = f * sqrt(1 - e)``).  Profiles: elliptical Gaussian
    ``exp(-q / 2)`` with ``q = (x'/σ_a)² + (y'/σ_b)²``, ``σ = f / 2.3548``; or
    elliptical Moffat ``(1 + q)**-β`` with ``q = (x'/α_a)² + (y'/α_b)²``,
    ``α = f / (2 sqrt(2**(1/β) - 1))``.  A pixelated Gaussian star has
    second-moment width ``sqrt(σ² + 1/12)``.

    Attributes
    ----------
    params : dict
        The JSON-able parameters (``model``, ``beta``, ``shape``, ``fwhm``,
        ``e1``, ``e2`` coefficient arrays, ``radius`` R, ``subsample``).
    radius : int
        Half-size R of the ``(2R+1)²`` box a star is rendered into.
    """

    def __init__(self, params: dict[str, Any] | str) -> None:
        if isinstance(params, str):
            params = json.loads(params)
        if not isinstance(params, dict) or "fwhm" not in params:
            raise ValueError(
                "truth_psf parameters must be the dict stored in ds.attrs['truth_psf'] by tilepipe.datasets; "
                f"got {type(params).__name__}"
            )
        self.params = params
        self.model = str(params["model"])
        self.beta = float(params.get("beta", 3.0))
        ny, nx = params["shape"]
        self.shape = (int(ny), int(nx))
        self._cx, self._cy = (nx - 1) / 2.0, (ny - 1) / 2.0
        self._hx, self._hy = max(self._cx, 0.5), max(self._cy, 0.5)
        self._cf = np.asarray(params["fwhm"], dtype=np.float64)
        self._ce1 = np.asarray(params["e1"], dtype=np.float64)
        self._ce2 = np.asarray(params["e2"], dtype=np.float64)
        self.radius = int(params["radius"])
        self.subsample = int(params["subsample"])

    # ------------------------------------------------------------ shape params
    def _uv(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        return (x - self._cx) / self._hx, (y - self._cy) / self._hy

    def fwhm(self, x: Any, y: Any) -> Any:
        """FWHM (pixels) of the continuous profile at ``(x, y)``; arrays broadcast."""
        u, v = self._uv(x, y)
        out = _poly2d(self._cf, u, v)
        return float(out) if np.ndim(out) == 0 else out

    def shape_params(self, x: Any, y: Any) -> tuple[Any, Any, Any]:
        """``(fwhm, ellipticity, theta)`` at ``(x, y)`` (pixels, 1 - b/a, radians)."""
        u, v = self._uv(x, y)
        f = _poly2d(self._cf, u, v)
        e1 = _poly2d(self._ce1, u, v)
        e2 = _poly2d(self._ce2, u, v)
        e = np.minimum(np.hypot(e1, e2), _EMAX)
        theta = 0.5 * np.arctan2(e2, e1)
        if np.ndim(f) == 0:
            return float(f), float(e), float(theta)
        return f, e, theta

    def ellipticity(self, x: Any, y: Any) -> Any:
        """Ellipticity ``1 - b/a`` at ``(x, y)``."""
        return self.shape_params(x, y)[1]

    def theta(self, x: Any, y: Any) -> Any:
        """Position angle of the major axis (radians, counter-clockwise from +x)."""
        return self.shape_params(x, y)[2]

    def _axes(self, f: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scale lengths along the major and minor axes (σ or α)."""
        if self.model == "gaussian":
            s = f / _FWHM_PER_SIGMA
        else:
            s = f / (2.0 * np.sqrt(2.0 ** (1.0 / self.beta) - 1.0))
        r = np.sqrt(1.0 - e)
        return s / r, s * r

    def _profile(self, q: np.ndarray) -> np.ndarray:
        if self.model == "gaussian":
            return np.exp(np.float32(-0.5) * q)
        return (np.float32(1.0) + q) ** np.float32(-self.beta)

    def _quad(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coefficients of ``q = A dx² + 2B dx dy + C dy²`` for stars at (x, y)."""
        f, e, th = self.shape_params(np.atleast_1d(x), np.atleast_1d(y))
        sa, sb = self._axes(f, e)
        c, s = np.cos(th), np.sin(th)
        ia, ib = 1.0 / sa**2, 1.0 / sb**2
        a = c * c * ia + s * s * ib
        b = c * s * (ia - ib)
        cc = s * s * ia + c * c * ib
        return a, b, cc

    # -------------------------------------------------------------- rendering
    def _stamps(self, x: np.ndarray, y: np.ndarray, fx: np.ndarray, fy: np.ndarray,
                npix: int, step: float, nsub: int) -> np.ndarray:
        """Pixel-integrated, un-normalised stamps ``(N, npix, npix)``.

        Sample ``k`` of a stamp covers offsets ``[(k - c) - 1/2, (k - c) + 1/2] * step``
        from the stamp centre ``c = (npix - 1) / 2``; the source sits at
        ``(fx, fy)`` (in units of pixels) from that centre.  Each sample is
        the mean of ``nsub × nsub`` evaluations of the profile.
        """
        a, b, c = (v.astype(np.float32)[:, None, None, None, None] for v in self._quad(x, y))
        centre = (npix - 1) / 2.0
        k = (np.arange(npix) - centre) * step
        s = ((np.arange(nsub) + 0.5) / nsub - 0.5) * step
        off = (k[:, None] + s[None, :]).ravel().astype(np.float64)  # (npix*nsub,)
        dx = (off[None, :] - fx[:, None]).astype(np.float32).reshape(len(x), npix, nsub)
        dy = (off[None, :] - fy[:, None]).astype(np.float32).reshape(len(x), npix, nsub)
        X = dx[:, None, None, :, :]
        Y = dy[:, :, :, None, None]
        q = a * X * X + c * Y * Y
        q += np.float32(2.0) * b * X * Y
        prof = self._profile(q)
        return prof.mean(axis=(2, 4), dtype=np.float32)

    def stamp(self, x: float, y: float) -> tuple[np.ndarray, tuple[int, int]]:
        """The exact pixel stamp used to render a unit-flux star at ``(x, y)``.

        Returns
        -------
        stamp : numpy.ndarray (float64), shape ``(2R+1, 2R+1)``, sum 1
            Pixel-integrated profile at the star's sub-pixel phase.
        origin : (int, int)
            Image index ``(y0, x0)`` of ``stamp[0, 0]``: the box is centred on
            the pixel nearest to the star, ``x0 = floor(x + 0.5) - R``.  The box
            may extend beyond the image; those pixels are simply not rendered.
        """
        R = self.radius
        ix, iy = math.floor(float(x) + 0.5), math.floor(float(y) + 0.5)
        st = self._stamps(np.atleast_1d(float(x)), np.atleast_1d(float(y)), np.atleast_1d(float(x) - ix),
                          np.atleast_1d(float(y) - iy), 2 * R + 1, 1.0, self.subsample)[0].astype(np.float64)
        return st / st.sum(), (iy - R, ix - R)

    def at(self, x: float, y: float, size: int = 25, oversampling: int = 1) -> np.ndarray:
        """The true PSF stamp at image position ``(x, y)``, source at the stamp centre.

        Parameters
        ----------
        x, y : float
            Image position (pixels, 0-based) where the PSF shape is evaluated.
        size : int
            Stamp side in image pixels.
        oversampling : int
            Samples per image pixel; the stamp has ``size * oversampling``
            samples per side, each integrating the profile over its own
            ``1/oversampling``-pixel cell.

        Returns
        -------
        numpy.ndarray (float64), sum 1
            The source sits at the geometric centre of the array (the centre
            of the middle pixel for odd ``size * oversampling``).  With
            ``oversampling=1`` and ``size >= 2 * radius + 1`` this is exactly
            the stamp used to render a star centred on a pixel; a smaller
            stamp is the same profile renormalised to sum 1.
        """
        size = check_int("size", size, lower=1)
        oversampling = check_int("oversampling", oversampling, lower=1)
        n = size * oversampling
        nsub = max(1, int(math.ceil(self.subsample / oversampling)))
        z = np.zeros(1)
        st = self._stamps(np.atleast_1d(float(x)), np.atleast_1d(float(y)), z, z, n, 1.0 / oversampling, nsub)[0]
        st = st.astype(np.float64)
        # truncate to the star's (2R+1)^2 box, as rendered stars are
        off = np.abs((np.arange(n) - (n - 1) / 2.0) / oversampling)
        inside = off <= self.radius + 0.5
        st *= inside[:, None] & inside[None, :]
        total = st.sum()
        return st / total

    def __repr__(self) -> str:
        f0 = self.fwhm(self._cx, self._cy)
        return f"TruePSF(model={self.model!r}, shape={self.shape}, fwhm_centre={f0:.3f}, radius={self.radius})"


def true_psf(ds: xr.Dataset | dict | str) -> TruePSF:
    """Rebuild the true PSF of a synthetic image from ``ds.attrs["truth_psf"]``.

    Works after a Zarr round trip (the parameters are JSON).  Accepts the
    Dataset, the parameter dict, or its JSON string.
    """
    if isinstance(ds, xr.Dataset):
        if "truth_psf" not in ds.attrs:
            raise ValueError(
                "the Dataset has no attrs['truth_psf']; only images made by tilepipe.datasets.make_field/"
                "make_pair (or stores written from them) carry their true PSF"
            )
        return TruePSF(ds.attrs["truth_psf"])
    return TruePSF(ds)


def _psf_params(shape: tuple[int, int], rng: np.random.Generator, *, fwhm: float, psf_variation: float,
                ellipticity: float, model: str, beta: float, radius: int | None,
                subsample: int | None) -> dict[str, Any]:
    """Draw the smooth PSF-variation pattern and return JSON-able truth parameters."""
    # FWHM: a bowl plus a seeded tilt, scaled so that its peak-to-peak over the
    # field is psf_variation * fwhm and its field mean is fwhm.
    ta, tb = rng.uniform(-1.0, 1.0, 2)
    g = np.zeros((3, 3))
    g[2, 0] = g[0, 2] = 0.5
    g[1, 0], g[0, 1] = 0.35 * ta, 0.35 * tb
    grid = np.linspace(-1.0, 1.0, 65)
    uu, vv = np.meshgrid(grid, grid)
    gv = _poly2d(g, uu, vv)
    span = float(gv.max() - gv.min())
    g /= span
    gmean = float(gv.mean() / span)
    cf = g * (psf_variation * fwhm)
    cf[0, 0] += fwhm * (1.0 - psf_variation * gmean)
    # ellipticity components: constant part at a random angle + linear terms
    th0 = rng.uniform(0.0, math.pi)
    lin = rng.uniform(-1.0, 1.0, 4)
    ce1 = np.zeros((2, 2))
    ce2 = np.zeros((2, 2))
    ce1[0, 0] = ellipticity * math.cos(2 * th0)
    ce2[0, 0] = ellipticity * math.sin(2 * th0)
    ce1[1, 0], ce1[0, 1] = ellipticity * psf_variation * lin[0], ellipticity * psf_variation * lin[1]
    ce2[1, 0], ce2[0, 1] = ellipticity * psf_variation * lin[2], ellipticity * psf_variation * lin[3]
    fv = _poly2d(cf, uu, vv)
    if fv.min() <= 0.5:
        raise ValueError(
            f"fwhm={fwhm} with psf_variation={psf_variation} makes the FWHM drop to {fv.min():.2f} px "
            "somewhere in the field; use a larger fwhm or a smaller psf_variation"
        )
    ev = np.minimum(np.hypot(_poly2d(ce1, uu, vv), _poly2d(ce2, uu, vv)), _EMAX)
    fmax_a = float((fv / np.sqrt(1.0 - ev)).max())
    fmin_b = float((fv * np.sqrt(1.0 - ev)).min())
    if radius is None:
        if model == "gaussian":
            radius = int(math.ceil(5.0 * fmax_a / _FWHM_PER_SIGMA))
        else:
            radius = int(math.ceil(4.0 * fmax_a))
        radius = max(radius, 3)
    if subsample is None:
        # about 6 samples per minor-axis FWHM (midpoint-rule error << 1e-3)
        subsample = int(min(9, max(3, math.ceil(6.0 / fmin_b))))
    return {
        "version": _TRUTH_VERSION,
        "model": model,
        "beta": float(beta),
        "shape": [int(shape[0]), int(shape[1])],
        "fwhm": cf.tolist(),
        "e1": ce1.tolist(),
        "e2": ce2.tolist(),
        "radius": int(radius),
        "subsample": int(subsample),
    }


# ================================================================ rendering
def _render_sources(shape: tuple[int, int], psf: TruePSF, x: np.ndarray, y: np.ndarray,
                    flux: np.ndarray, sky: np.ndarray, gain: float, read_noise: float,
                    max_elements: int = 3_000_000) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render point sources (vectorised in batches) and their truth quantities.

    Returns the flat source image (float64, ``ny*nx``) and per-source
    ``peak``, ``snr`` and ``skypeak`` (model sky + own source at the brightest
    pixel).
    """
    ny, nx = shape
    n = len(x)
    out = {"peak": np.zeros(n), "snr": np.zeros(n), "maxval": np.zeros(n)}
    if n == 0:
        return np.zeros(ny * nx), out
    R = psf.radius
    npix = 2 * R + 1
    ns = psf.subsample
    batch = max(1, max_elements // (npix * npix * ns * ns))
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    fx = x - ix
    fy = y - iy
    k = np.arange(-R, R + 1)
    rn2 = (read_noise / gain) ** 2
    sky_flat = sky.ravel()
    idx_parts, w_parts = [], []
    for start in range(0, n, batch):
        sl = slice(start, min(n, start + batch))
        st = psf._stamps(x[sl], y[sl], fx[sl], fy[sl], npix, 1.0, ns).astype(np.float64)
        st /= st.sum(axis=(1, 2), keepdims=True)
        px = ix[sl, None, None] + k[None, None, :]
        py = iy[sl, None, None] + k[None, :, None]
        inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        flat = np.where(inside, py * nx + px, 0)
        f = flux[sl, None, None]
        src = f * st
        skyp = np.where(inside, sky_flat[flat], np.nan)
        var = (skyp + src) / gain + rn2
        out["snr"][sl] = flux[sl] * np.sqrt(np.nansum(np.where(inside, st * st / var, 0.0), axis=(1, 2)))
        out["peak"][sl] = src.max(axis=(1, 2))
        out["maxval"][sl] = np.nanmax(skyp + src, axis=(1, 2))
        idx_parts.append(flat[inside])
        w_parts.append(src[inside])
    img = np.bincount(np.concatenate(idx_parts), weights=np.concatenate(w_parts), minlength=ny * nx)
    return img, out


def _sky_model(shape: tuple[int, int], rng: np.random.Generator, sky: float, gradient: float) -> np.ndarray:
    """Planar sky: ``sky * (1 + gradient/2 * (cos φ u + sin φ v))``, u, v in [-1, 1]."""
    ny, nx = shape
    phi = rng.uniform(0.0, 2.0 * math.pi)
    u = (np.arange(nx) - (nx - 1) / 2.0) / max((nx - 1) / 2.0, 0.5)
    v = (np.arange(ny) - (ny - 1) / 2.0) / max((ny - 1) / 2.0, 0.5)
    plane = 0.5 * gradient * (math.cos(phi) * u[None, :] + math.sin(phi) * v[:, None])
    out = sky * (1.0 + plane)
    if out.min() < 0:
        raise ValueError(f"sky_gradient={gradient} makes the sky negative somewhere; use |sky_gradient| < 2")
    return out


def _power_law(rng: np.random.Generator, n: int, fmin: float, fmax: float, slope: float) -> np.ndarray:
    """Fluxes with ``dN/dF ∝ F**-slope`` on ``[fmin, fmax]`` (inverse-CDF sampling)."""
    u = rng.uniform(0.0, 1.0, n)
    if abs(slope - 1.0) < 1e-12:
        return fmin * (fmax / fmin) ** u
    p = 1.0 - slope
    return (fmin**p + u * (fmax**p - fmin**p)) ** (1.0 / p)


def _add_noise(model: np.ndarray, rng: np.random.Generator, gain: float, read_noise: float) -> np.ndarray:
    """Poisson(gain * model) electrons + N(0, read_noise) e-, back to ADU (float32)."""
    electrons = rng.poisson(np.clip(model, 0.0, None) * gain).astype(np.float32)
    if read_noise > 0:
        electrons += rng.standard_normal(model.shape, dtype=np.float32) * np.float32(read_noise)
    electrons *= np.float32(1.0 / gain)
    return electrons


def _bad_columns(rng: np.random.Generator, nx: int, n: int) -> np.ndarray:
    n = min(n, nx)
    return np.sort(rng.choice(nx, size=n, replace=False)) if n else np.zeros(0, dtype=np.int64)


def _cosmic_rays(rng: np.random.Generator, shape: tuple[int, int], n: int, gain: float) -> list[list[float]]:
    """Sharp cosmic-ray tracks: ``[[x, y, adu], ...]`` pixels (1-6 px long, 300-20000 e- each)."""
    ny, nx = shape
    hits: dict[tuple[int, int], float] = {}
    x0 = rng.uniform(0, nx, n)
    y0 = rng.uniform(0, ny, n)
    length = rng.integers(1, 7, n)
    ang = rng.uniform(0, 2 * math.pi, n)
    amp = 10.0 ** rng.uniform(math.log10(300.0), math.log10(20000.0), n) / gain
    for i in range(n):
        for t in range(int(length[i])):
            px = int(math.floor(x0[i] + t * math.cos(ang[i])))
            py = int(math.floor(y0[i] + t * math.sin(ang[i])))
            if 0 <= px < nx and 0 <= py < ny:
                hits[(px, py)] = hits.get((px, py), 0.0) + float(amp[i])
    return [[float(px), float(py), a] for (px, py), a in sorted(hits.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


def _check_shape(shape: Any) -> tuple[int, int]:
    try:
        ny, nx = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise TypeError(f"shape must be a (ny, nx) pair of ints; got {shape!r}") from None
    if ny < 16 or nx < 16:
        raise ValueError(f"shape must be at least (16, 16); got {shape!r}")
    return ny, nx


def _check_range(name: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (min, max) pair of numbers; got {value!r}") from None
    if not (0 < lo <= hi and np.isfinite(hi)):
        raise ValueError(f"{name} must satisfy 0 < min <= max; got {value!r}")
    return lo, hi


def _header(kind: str, seed: int, gain: float, read_noise: float, sky: float, fwhm: float,
            saturation: float | None) -> list[list[Any]]:
    cards = [
        ["OBJECT", f"tilepipe synthetic {kind}", "tilepipe.datasets"],
        ["GAIN", float(gain), "[e-/ADU]"],
        ["RDNOISE", float(read_noise), "[e-] read noise"],
        ["SKYLEVEL", float(sky), "[ADU] mean sky of the model"],
        ["FWHM", float(fwhm), "[pix] median true PSF FWHM"],
        ["SEED", int(seed), "tilepipe.datasets seed"],
    ]
    if saturation is not None:
        cards.insert(3, ["SATURATE", float(saturation), "[ADU] saturation level"])
    return cards


def _finish_image(model: np.ndarray, rng_noise: np.random.Generator, rng_bad: np.random.Generator,
                  rng_cr: np.random.Generator, *, gain: float, read_noise: float, saturation: float | None,
                  bad_columns: int, bad_column_value: float, cosmic_rays: int,
                  header: list, psf_params: dict, fwhm_med: float, chunks: Any,
                  extra_attrs: dict[str, Any]) -> xr.Dataset:
    """Noise, defects, variance and the Dataset for one noiseless model (ADU)."""
    shape = model.shape
    variance = (model / gain + (read_noise / gain) ** 2).astype(np.float32)
    img = _add_noise(model, rng_noise, gain, read_noise)
    crs = _cosmic_rays(rng_cr, shape, int(cosmic_rays), gain) if cosmic_rays else []
    for px, py, a in crs:
        img[int(py), int(px)] += np.float32(a)
    if saturation is not None:
        np.minimum(img, np.float32(saturation), out=img)
    cols = _bad_columns(rng_bad, shape[1], int(bad_columns))
    mask = np.zeros(shape, dtype=bool)
    if cols.size:
        img[:, cols] = np.float32(bad_column_value)
        mask[:, cols] = True
    ds = make_dataset(img, mask=mask, variance=variance, header=header, gain=gain, saturation=saturation,
                      fwhm=fwhm_med, bunit="adu", chunks=chunks)
    ds.attrs["read_noise"] = float(read_noise)
    ds.attrs["truth_psf"] = psf_params
    ds.attrs["truth_bad_columns"] = [int(c) for c in cols]
    ds.attrs["truth_cosmic_rays"] = crs
    ds.attrs.update(extra_attrs)
    return ds


def _validate_common(shape, seed, fwhm_values, psf_variation, ellipticity, sky, sky_gradient, gain, read_noise,
                     flux_range, flux_slope, saturation, bad_columns, cosmic_rays, edge, psf_model, beta):
    shape = _check_shape(shape)
    seed = check_int("seed", seed, lower=0)
    for name, val in fwhm_values.items():
        check_positive(name, val)
    check_positive("psf_variation", psf_variation, allow_zero=True)
    if psf_variation >= 2:
        raise ValueError(f"psf_variation is the relative peak-to-peak FWHM change and must be < 2; got {psf_variation}")
    check_positive("ellipticity", ellipticity, allow_zero=True)
    if ellipticity > 0.8:
        raise ValueError(f"ellipticity (1 - b/a) must be <= 0.8; got {ellipticity}")
    check_positive("sky", sky, allow_zero=True)
    if not np.isfinite(sky_gradient):
        raise ValueError(f"sky_gradient must be finite; got {sky_gradient!r}")
    check_positive("gain", gain)
    check_positive("read_noise", read_noise, allow_zero=True)
    flux_range = _check_range("flux_range", flux_range)
    check_positive("flux_slope", flux_slope)
    if saturation is not None:
        check_positive("saturation", saturation)
    check_int("bad_columns", bad_columns, lower=0)
    check_int("cosmic_rays", cosmic_rays, lower=0)
    if edge is not None:
        check_positive("edge", edge, allow_zero=True)
    check_choice("psf_model", psf_model, ("gaussian", "moffat"))
    check_positive("beta", beta)
    if psf_model == "moffat" and beta <= 1:
        raise ValueError(f"beta must be > 1 for a Moffat PSF (finite flux); got {beta}")
    if edge is not None and 2 * edge >= min(shape) - 1:
        raise ValueError(f"edge={edge} leaves no room for stars in an image of shape {shape}; use a smaller edge")
    return shape, seed, flux_range


def _default_n_stars(shape: tuple[int, int], n_stars: int | None) -> int:
    if n_stars is None:
        return max(1, int(round(shape[0] * shape[1] / 2000.0)))
    return check_int("n_stars", n_stars, lower=0)


def _star_table(cols: dict[str, np.ndarray], order: np.ndarray) -> Table:
    t = Table({k: np.asarray(v)[order] for k, v in cols.items()})
    t.add_column(np.arange(1, len(t) + 1, dtype=np.int64), name="id", index=0)
    return t


# ================================================================== public
def make_field(
    shape: Sequence[int] = (1024, 1024),
    seed: int = 0,
    *,
    n_stars: int | None = None,
    fwhm: float = 3.0,
    psf_variation: float = 0.3,
    ellipticity: float = 0.1,
    sky: float = 200.0,
    sky_gradient: float = 0.2,
    gain: float = 2.0,
    read_noise: float = 5.0,
    flux_range: tuple[float, float] = (100.0, 3e5),
    flux_slope: float = 1.5,
    saturation: float | None = None,
    bad_columns: int = 0,
    bad_column_value: float = 0.0,
    cosmic_rays: int = 0,
    edge: float = 8.0,
    psf_model: str = "gaussian",
    beta: float = 3.0,
    psf_radius: int | None = None,
    chunks: Any = None,
) -> Field:
    """Make a seeded synthetic star field with known truth.

    Parameters
    ----------
    shape : (ny, nx)
        Image shape in pixels.
    seed : int
        Random seed; the same seed and options give bit-identical output.
        Stars, PSF pattern, sky, noise, bad columns and cosmic rays use
        independent streams, so e.g. adding cosmic rays does not move stars.
    n_stars : int, optional
        Number of stars; default one per 2000 pixels² (not crowded).
    fwhm : float
        Field-mean FWHM of the PSF (pixels, geometric mean of the axes).
    psf_variation : float
        Peak-to-peak relative FWHM change across the field (0 = constant PSF);
        it also scales the variation of the ellipticity components.
    ellipticity : float
        Typical ellipticity ``1 - b/a``; the angle varies across the field.
    sky : float
        Mean sky level (ADU per pixel).
    sky_gradient : float
        Planar sky gradient: ``sky * (1 + g/2 * (cos φ u + sin φ v))`` with
        ``u, v`` from -1 to 1 across the field and a seeded direction ``φ``:
        ``sky * (1 ± g/2)`` at the middles of the edges along ``φ``, up to
        ``sky * (1 ± g/2 (|cos φ| + |sin φ|))`` (at most ``± g/√2``) at the
        corners.
    gain : float
        e-/ADU; Poisson noise is drawn on electrons.
    read_noise : float
        Read noise (e- rms).
    flux_range : (float, float)
        Total star fluxes (ADU) are drawn from ``dN/dF ∝ F**-flux_slope`` on
        this range.
    flux_slope : float
        Power-law index of the differential flux distribution.  The default
        1.5 (``N(>F) ∝ F**-0.5``, d log N / dm = 0.2, like high-latitude star
        counts) keeps enough bright, isolated stars per tile for PSF and
        photometry work; 2.5 is the Euclidean slope.
    saturation : float, optional
        Saturation level (ADU): pixels are clipped there and masked; stars
        whose noiseless peak pixel (with sky) reaches it get ``saturated``.
    bad_columns : int
        Number of dead columns, set to ``bad_column_value`` and masked.
    bad_column_value : float
        Value (ADU) of the dead columns (``numpy.nan`` allowed).
    cosmic_rays : int
        Number of cosmic-ray hits (sharp 1-6 px tracks, 300-20000 e- per
        pixel, added after the Poisson noise, *not* masked); their pixels are
        listed in ``image.attrs["truth_cosmic_rays"]`` as ``[x, y, adu]``.
    edge : float
        Minimum distance (pixels) of a star centre from the image border.
        A star closer than the stamp radius R (``true_psf(ds).radius``) to the
        border loses the part of its stamp outside the image (``flux`` stays
        the total flux); ``edge=None`` uses R, so every star is wholly inside.
    psf_model : {"gaussian", "moffat"}
        Radial profile of the PSF (see :class:`TruePSF`).
    beta : float
        Moffat index (``psf_model="moffat"`` only).
    psf_radius : int, optional
        Half-size R of the star stamps (default: 5 σ of the widest axis for a
        Gaussian, 4 FWHM for a Moffat).
    chunks : int or tuple, optional
        Dask chunks of the Dataset.

    Returns
    -------
    Field
        ``image`` (Dataset: ``image``, ``mask``, true ``variance``; attrs
        ``gain``, ``saturation``, ``fwhm`` (median), ``read_noise``,
        ``truth_psf``, ``truth_bad_columns``, ``truth_cosmic_rays``),
        ``stars`` (Table: ``id, x, y, flux, fwhm, ellipticity, theta, peak,
        snr, saturated``; sorted by (y, x); ``flux`` total ADU, ``peak`` the
        star's brightest noiseless pixel above sky), ``sky`` (noiseless sky).
    """
    shape, seed, flux_range = _validate_common(
        shape, seed, {"fwhm": fwhm}, psf_variation, ellipticity, sky, sky_gradient, gain, read_noise, flux_range,
        flux_slope, saturation, bad_columns, cosmic_rays, edge, psf_model, beta)
    n = _default_n_stars(shape, n_stars)
    ny, nx = shape
    ss = np.random.SeedSequence([seed, 1])
    r_star, r_psf, r_sky, r_noise, r_bad, r_cr = (np.random.default_rng(s) for s in ss.spawn(6))

    params = _psf_params(shape, r_psf, fwhm=fwhm, psf_variation=psf_variation, ellipticity=ellipticity,
                         model=psf_model, beta=beta, radius=psf_radius, subsample=None)
    psf = TruePSF(params)
    if edge is None:
        edge = min(float(psf.radius), 0.25 * (min(shape) - 1))
    x = r_star.uniform(edge, nx - 1 - edge, n)
    y = r_star.uniform(edge, ny - 1 - edge, n)
    flux = _power_law(r_star, n, *flux_range, flux_slope)
    skym = _sky_model(shape, r_sky, sky, sky_gradient)
    src, info = _render_sources(shape, psf, x, y, flux, skym, gain, read_noise)
    model = skym + src.reshape(shape)
    f, e, th = psf.shape_params(x, y)
    fwhm_med = float(np.median(psf.fwhm(*np.meshgrid(np.linspace(0, nx - 1, 33), np.linspace(0, ny - 1, 33)))))
    header = _header("field", seed, gain, read_noise, sky, fwhm_med, saturation)
    ds = _finish_image(model, r_noise, r_bad, r_cr, gain=gain, read_noise=read_noise, saturation=saturation,
                       bad_columns=bad_columns, bad_column_value=bad_column_value, cosmic_rays=cosmic_rays,
                       header=header, psf_params=params, fwhm_med=fwhm_med, chunks=chunks,
                       extra_attrs={"truth_sky": float(sky), "truth_sky_gradient": float(sky_gradient)})
    sat = info["maxval"] >= saturation if saturation is not None else np.zeros(n, dtype=bool)
    order = np.lexsort((x, y))
    stars = _star_table({"x": x, "y": y, "flux": flux, "fwhm": np.atleast_1d(f), "ellipticity": np.atleast_1d(e),
                         "theta": np.atleast_1d(th), "peak": info["peak"], "snr": info["snr"],
                         "saturated": sat}, order)
    stars.meta.update({"seed": seed, "gain": gain, "read_noise": read_noise, "generator": "tilepipe.datasets.make_field"})
    return Field(ds, stars, skym.astype(np.float32))


def _snr_to_flux(psf: TruePSF, x: np.ndarray, y: np.ndarray, target: np.ndarray, sky: np.ndarray,
                 gain: float, read_noise: float) -> np.ndarray:
    """Solve ``snr(F) = target`` (formula in the module docstring) by bisection in log F."""
    ny, nx = sky.shape
    R = psf.radius
    npix = 2 * R + 1
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    st = psf._stamps(x, y, x - ix, y - iy, npix, 1.0, psf.subsample).astype(np.float64)
    st /= st.sum(axis=(1, 2), keepdims=True)
    k = np.arange(-R, R + 1)
    px = np.clip(ix[:, None, None] + k[None, None, :], 0, nx - 1)
    py = np.clip(iy[:, None, None] + k[None, :, None], 0, ny - 1)
    skyp = sky[py, px]
    rn2 = (read_noise / gain) ** 2
    lo = np.full(len(x), -5.0)
    hi = np.full(len(x), 12.0)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        F = 10.0**mid
        var = (skyp + F[:, None, None] * st) / gain + rn2
        snr = F * np.sqrt((st * st / var).sum(axis=(1, 2)))
        up = snr < target
        lo = np.where(up, mid, lo)
        hi = np.where(up, hi, mid)
    return 10.0 ** (0.5 * (lo + hi))


def make_pair(
    shape: Sequence[int] = (1024, 1024),
    seed: int = 0,
    *,
    fwhm_new: float = 3.5,
    fwhm_ref: float = 2.5,
    psf_variation: float = 0.3,
    flux_scale: float = 1.1,
    shift: tuple[float, float] = (0.3, -0.2),
    n_transients: int = 20,
    transient_snr: tuple[float, float] = (8.0, 50.0),
    n_stars: int | None = None,
    ellipticity: float = 0.1,
    sky: float = 200.0,
    sky_ref: float | None = None,
    sky_gradient: float = 0.2,
    gain: float = 2.0,
    read_noise: float = 5.0,
    flux_range: tuple[float, float] = (100.0, 3e5),
    flux_slope: float = 1.5,
    saturation: float | None = None,
    bad_columns: int = 0,
    bad_column_value: float = 0.0,
    cosmic_rays: int = 0,
    edge: float = 8.0,
    psf_model: str = "gaussian",
    beta: float = 3.0,
    psf_radius: int | None = None,
    chunks: Any = None,
) -> Pair:
    """Make a seeded new/reference image pair with transients in ``new``.

    The same stars are rendered in both images: at ``(x, y)`` in the reference
    and at ``(x + dx, y + dy)`` in the new image (``shift = (dx, dy)``, pixels;
    positions are rendered shifted, the image is never interpolated), with
    ``flux_new = flux_scale * flux_ref``.  Each image has its own spatially
    varying PSF (field-mean FWHM ``fwhm_new`` / ``fwhm_ref``, independent
    variation patterns), sky gradient direction, noise, bad columns and cosmic
    rays.  ``n_transients`` point sources are added to ``new`` only, at
    positions at least ``2 * fwhm_new`` from every star, with an optimal S/N
    (module docstring; measured against the *new* image's noise only, not the
    difference image's) drawn log-uniformly in ``transient_snr``.

    Parameters
    ----------
    fwhm_new, fwhm_ref : float
        Field-mean FWHM (pixels) of the two images.
    flux_scale : float
        Photometric ratio new / ref of every static star.
    shift : (dx, dy)
        Sub-pixel (or larger) shift of the new frame, pixels.
    n_transients : int
        Number of transients in ``new``.
    transient_snr : (min, max)
        Range of the transients' optimal S/N in ``new``.
    sky_ref : float, optional
        Mean sky of the reference (default: ``sky``).
    other parameters
        As in :func:`make_field` (shared by both images; ``flux_range`` is in
        reference ADU).

    Returns
    -------
    Pair
        ``new``, ``ref`` (Datasets as in :func:`make_field`; ``new`` also has
        attrs ``truth_shift``, ``truth_flux_scale``), ``stars`` (Table:
        ``id, x, y, x_new, y_new, flux_ref, flux_new, fwhm_ref, fwhm_new, peak_ref,
        peak_new, snr_ref, snr_new, saturated_ref, saturated_new``; sorted by
        reference (y, x)), ``transients`` (Table: ``id, x, y, flux, snr, fwhm,
        peak`` in the new frame, ADU of ``new``), ``new_sky``, ``ref_sky``.
    """
    shape, seed, flux_range = _validate_common(
        shape, seed, {"fwhm_new": fwhm_new, "fwhm_ref": fwhm_ref}, psf_variation, ellipticity, sky, sky_gradient,
        gain, read_noise, flux_range, flux_slope, saturation, bad_columns, cosmic_rays, edge, psf_model, beta)
    check_positive("flux_scale", flux_scale)
    try:
        dx, dy = (float(s) for s in shift)
    except (TypeError, ValueError):
        raise TypeError(f"shift must be a (dx, dy) pair of numbers (pixels); got {shift!r}") from None
    if not (np.isfinite(dx) and np.isfinite(dy)):
        raise ValueError(f"shift must be finite; got {shift!r}")
    n_tr = check_int("n_transients", n_transients, lower=0)
    snr_lo, snr_hi = _check_range("transient_snr", transient_snr)
    sky_ref = sky if sky_ref is None else check_positive("sky_ref", sky_ref, allow_zero=True)
    n = _default_n_stars(shape, n_stars)
    ny, nx = shape
    ss = np.random.SeedSequence([seed, 2])
    (r_star, r_psf_n, r_psf_r, r_sky_n, r_sky_r, r_noise_n, r_noise_r, r_bad_n, r_bad_r, r_cr_n, r_cr_r,
     r_tr) = (np.random.default_rng(s) for s in ss.spawn(12))

    kw = dict(psf_variation=psf_variation, ellipticity=ellipticity, model=psf_model, beta=beta,
              radius=psf_radius, subsample=None)
    p_new = _psf_params(shape, r_psf_n, fwhm=fwhm_new, **kw)
    p_ref = _psf_params(shape, r_psf_r, fwhm=fwhm_ref, **kw)
    psf_new, psf_ref = TruePSF(p_new), TruePSF(p_ref)
    if edge is None:
        edge = min(float(max(psf_new.radius, psf_ref.radius)), 0.25 * (min(shape) - 1) - max(abs(dx), abs(dy)))
        edge = max(edge, 0.0)
    margin_x = edge + abs(dx)
    margin_y = edge + abs(dy)
    if 2 * max(margin_x, margin_y) >= min(shape) - 1:
        raise ValueError(f"shift={shift!r} with edge={edge} leaves no room for stars in shape {shape}")
    # reference positions such that both frames keep `edge` from the border
    x = r_star.uniform(max(edge, edge - dx), min(nx - 1 - edge, nx - 1 - edge - dx), n)
    y = r_star.uniform(max(edge, edge - dy), min(ny - 1 - edge, ny - 1 - edge - dy), n)
    flux_ref = _power_law(r_star, n, *flux_range, flux_slope)
    flux_new = flux_scale * flux_ref
    xn, yn = x + dx, y + dy

    sky_n = _sky_model(shape, r_sky_n, sky, sky_gradient)
    sky_r = _sky_model(shape, r_sky_r, sky_ref, sky_gradient)

    # transients: isolated positions in the new frame
    from scipy.spatial import cKDTree

    tx = np.zeros(0)
    ty = np.zeros(0)
    tree = cKDTree(np.column_stack([xn, yn])) if n else None
    min_sep = 2.0 * fwhm_new
    tries = 0
    while len(tx) < n_tr:
        tries += 1
        if tries > 200:
            raise ValueError(
                f"could not place {n_tr} isolated transients (>= {min_sep:.1f} px from every star); "
                "use fewer stars or transients, or a larger image"
            )
        cx = r_tr.uniform(edge, nx - 1 - edge, 4 * n_tr)
        cy = r_tr.uniform(edge, ny - 1 - edge, 4 * n_tr)
        ok = np.ones(len(cx), dtype=bool)
        if tree is not None:
            d, _ = tree.query(np.column_stack([cx, cy]))
            ok &= d >= min_sep
        cx, cy = cx[ok], cy[ok]
        # keep transients apart from each other as well
        for xi, yi in zip(cx, cy):
            if len(tx) >= n_tr:
                break
            if len(tx) == 0 or np.min(np.hypot(tx - xi, ty - yi)) >= min_sep:
                tx = np.append(tx, xi)
                ty = np.append(ty, yi)
    t_snr = np.exp(r_tr.uniform(math.log(snr_lo), math.log(snr_hi), n_tr))
    t_flux = _snr_to_flux(psf_new, tx, ty, t_snr, sky_n, gain, read_noise) if n_tr else np.zeros(0)

    src_n, info_n = _render_sources(shape, psf_new, np.concatenate([xn, tx]), np.concatenate([yn, ty]),
                                    np.concatenate([flux_new, t_flux]), sky_n, gain, read_noise)
    src_r, info_r = _render_sources(shape, psf_ref, x, y, flux_ref, sky_r, gain, read_noise)
    model_n = sky_n + src_n.reshape(shape)
    model_r = sky_r + src_r.reshape(shape)
    grid = np.meshgrid(np.linspace(0, nx - 1, 33), np.linspace(0, ny - 1, 33))
    fmed_n = float(np.median(psf_new.fwhm(*grid)))
    fmed_r = float(np.median(psf_ref.fwhm(*grid)))
    common = dict(gain=gain, read_noise=read_noise, saturation=saturation, bad_columns=bad_columns,
                  bad_column_value=bad_column_value, cosmic_rays=cosmic_rays, chunks=chunks)
    new = _finish_image(model_n, r_noise_n, r_bad_n, r_cr_n, header=_header("pair: new", seed, gain, read_noise, sky,
                        fmed_n, saturation), psf_params=p_new, fwhm_med=fmed_n,
                        extra_attrs={"truth_shift": [dx, dy], "truth_flux_scale": float(flux_scale),
                                     "truth_sky": float(sky), "truth_sky_gradient": float(sky_gradient)}, **common)
    ref = _finish_image(model_r, r_noise_r, r_bad_r, r_cr_r, header=_header("pair: ref", seed, gain, read_noise,
                        sky_ref, fmed_r, saturation), psf_params=p_ref, fwhm_med=fmed_r,
                        extra_attrs={"truth_sky": float(sky_ref), "truth_sky_gradient": float(sky_gradient)},
                        **common)

    if saturation is not None:
        sat_n = info_n["maxval"][:n] >= saturation
        sat_r = info_r["maxval"] >= saturation
    else:
        sat_n = sat_r = np.zeros(n, dtype=bool)
    order = np.lexsort((x, y))
    stars = _star_table({
        "x": x, "y": y, "x_new": xn, "y_new": yn, "flux_ref": flux_ref, "flux_new": flux_new,
        "fwhm_ref": np.atleast_1d(psf_ref.fwhm(x, y)), "fwhm_new": np.atleast_1d(psf_new.fwhm(xn, yn)),
        "peak_ref": info_r["peak"], "peak_new": info_n["peak"][:n],
        "snr_ref": info_r["snr"], "snr_new": info_n["snr"][:n],
        "saturated_ref": sat_r, "saturated_new": sat_n,
    }, order)
    stars.meta.update({"seed": seed, "shift": [dx, dy], "flux_scale": float(flux_scale),
                       "generator": "tilepipe.datasets.make_pair"})
    torder = np.lexsort((tx, ty))
    transients = _star_table({
        "x": tx, "y": ty, "flux": t_flux, "snr": info_n["snr"][n:],
        "fwhm": np.atleast_1d(psf_new.fwhm(tx, ty)) if n_tr else np.zeros(0),
        "peak": info_n["peak"][n:],
    }, torder)
    transients.meta.update({"seed": seed, "frame": "new", "snr_definition": "optimal PSF-fit S/N in new"})
    return Pair(new, ref, stars, transients, sky_n.astype(np.float32), sky_r.astype(np.float32))
