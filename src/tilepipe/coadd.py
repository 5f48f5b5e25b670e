"""Coaddition of aligned images: proper (Zackay & Ofek 2017), weighted mean, median.

Proper coaddition
-----------------
Zackay & Ofek (2017, ApJ 836, 188, "How to coadd images? II", arXiv:1512.06879)
show that, for background-dominated noise, the image

.. math::

    \\hat R = \\frac{\\sum_j \\frac{F_j}{\\sigma_j^2}\\,\\overline{\\hat P_j}\\,\\hat M_j}
                  {\\sqrt{\\sum_j \\frac{F_j^2}{\\sigma_j^2}\\,|\\hat P_j|^2}}
    \\qquad \\text{(their Eq. 8)}

is a sufficient statistic for any measurement on the constant sky: its noise
is white with unit variance, its PSF is

.. math::

    \\hat P_R = \\frac{1}{F_R}\\sqrt{\\sum_j \\frac{F_j^2}{\\sigma_j^2}|\\hat P_j|^2}
    \\qquad \\text{(Eq. 10)}, \\qquad
    F_R = \\sqrt{\\sum_j \\frac{F_j^2}{\\sigma_j^2}} \\qquad \\text{(Eq. 11)},

and matched-filtering ``R`` with ``P_R`` gives the optimal detection
statistic of their Paper I.  Hats are 2-D Fourier transforms, ``M_j`` the
background-subtracted images, ``P_j`` their PSFs (sum 1), ``F_j`` their flux
scales (transparency × exposure × gain relative to the reference image) and
``σ_j`` their background noise.  tilepipe returns ``coadd = R / F_R``: the
same image in the flux units of the reference image (``F = 1``), with noise
variance ``1 / F_R² = 1 / Σ_j F_j²/σ_j²`` (that of the inverse-variance
weighted mean) and PSF ``P_R``.

Implementation: per tile, the PSFs are evaluated at the tile centre and the
per-image filters ``k_j = F⁻¹[(F_j/σ_j²) conj(P̂_j) / sqrt(Σ F²/σ² |P̂|²)]`` are
built on a ``G x G`` grid (``G = 2·s + 1`` for PSF stamps of side ``s``) and
applied by zero-padded FFT convolution (the spectra of all terms summed
before one inverse FFT, :func:`_sum_of_convolutions`), so nothing wraps
around; the halo needed is ``G // 2`` pixels.  With PSFs that do not vary
across the image the tiled coadd equals the whole-image one to
floating-point precision.

Masks
-----
A masked pixel of image ``j`` carries zero weight: for ``weighted`` and
``median`` it is left out of that pixel's combination; for ``proper`` (a
convolution, which cannot drop single pixels) it is replaced before filtering
by ``F_j`` times the inverse-variance weighted mean of the *other* images at
that pixel, so it adds no information of its own.  Where every image is
masked the coadd is 0 and ``mask`` is True.  ``nexp`` counts the valid
images per pixel.

Variance
--------
``variance`` is the exact propagation of the inputs' ``variance`` maps
(pixels independent) through the linear operator that makes the coadd.
A filled pixel is a linear combination of the *other* images' pixels, not
an independent draw, so input ``i``'s pixel ``y`` enters output pixel ``x``
with the total weight ``A_i(x, y) = Σ_j k_j(x - y) B_ji(y)``, where
``B_ji = δ_ij v_j + (1 - v_j) F_j c_i`` (``v`` the validity maps,
``c_i = (F_i/σ_i²) v_i / Σ_l (F_l²/σ_l²) v_l`` the weighted-mean weights),
and ``variance = Σ_i Σ_y var_i(y) A_i(x, y)² / F_R²``.  Expanded, this is
``Σ_j k_j² * Q_jj + 2 Σ_{j<l} (k_j k_l) * Q_jl`` with per-pixel maps
``Q_jl = Σ_i var_i B_ji B_li`` (see ``_proper_variance``): the cross terms
are convolutions with products of kernels and vanish where no image is
masked, where the result is ZO17's ``1 / F_R²`` for ``var_j = σ_j²``.  It
ignores only the uncertainty of the backgrounds, flux scales and PSFs.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr

from ._validate import check_choice, check_int, check_positive
from .exceptions import FallbackWarning
from .image import open_image
from .tiling import TileGrid, map_tiles

log = logging.getLogger(__name__)

__all__ = ["coadd", "GaussianStamp", "proper_kernels", "estimate_scales"]

_FWHM2SIG = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_RADII = (2.0, 3.0, 4.0, 6.0, 8.0, 11.0, 15.0, 20.0)
_ANNULUS = (2.0, 6.0)  # sky annulus from R_max + 2 to R_max + 6


class GaussianStamp:
    """A circular Gaussian PSF: ``.at(x, y)`` returns a ``size x size`` stamp (sum 1, centred).

    Parameters
    ----------
    fwhm : float
        FWHM in pixels.
    size : int, optional
        Odd stamp side; default ``2 * ceil(3 * fwhm) + 1``.
    """

    def __init__(self, fwhm: float, size: int | None = None) -> None:
        self.fwhm = check_positive("fwhm", fwhm)
        if size is None:
            size = 2 * int(math.ceil(3.0 * self.fwhm)) + 1
        size = check_int("size", size, lower=3)
        self.size = size + (1 - size % 2)

    def at(self, x: float = 0.0, y: float = 0.0) -> np.ndarray:
        r = self.size // 2
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        s = self.fwhm * _FWHM2SIG
        p = np.exp(-0.5 * (xx**2 + yy**2) / s**2)
        return p / p.sum()

    def __repr__(self) -> str:
        return f"GaussianStamp(fwhm={self.fwhm:.3f}, size={self.size})"


# ------------------------------------------------------------------ PSF input
def _stamp(psf: Any, x: float, y: float, j: int) -> np.ndarray:
    if hasattr(psf, "at"):
        s = psf.at(x, y)
    elif callable(psf):
        s = psf(x, y)
    else:
        s = psf
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"psfs[{j}] must give a 2-D stamp; got shape {s.shape}")
    if s.shape[0] % 2 == 0 or s.shape[1] % 2 == 0:  # make odd: pad one row/column at the end
        s = np.pad(s, ((0, 1 - s.shape[0] % 2), (0, 1 - s.shape[1] % 2)))
    tot = s.sum()
    if not np.isfinite(tot) or tot <= 0:
        raise ValueError(f"psfs[{j}] stamp at ({x:.1f}, {y:.1f}) has a non-positive or non-finite sum")
    return s / tot


def _pad_to(s: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, n))
    cy, cx = s.shape[0] // 2, s.shape[1] // 2
    c = n // 2
    ys0, xs0 = max(0, cy - c), max(0, cx - c)
    ys1, xs1 = min(s.shape[0], cy + c + 1), min(s.shape[1], cx + c + 1)
    out[c - (cy - ys0) : c + (ys1 - cy), c - (cx - xs0) : c + (xs1 - cx)] = s[ys0:ys1, xs0:xs1]
    return out


def proper_kernels(
    stamps: Sequence[np.ndarray], fluxes: Sequence[float], sigmas: Sequence[float], size: int
) -> tuple[list[np.ndarray], np.ndarray, float]:
    """Real-space proper-coaddition filters, the coadd PSF and ``F_R`` (ZO17 II Eqs. 8, 10, 11).

    Parameters
    ----------
    stamps : list of 2-D arrays
        PSF of each image (sum 1, centred on the central pixel).
    fluxes, sigmas : sequences of float
        ``F_j`` and ``σ_j``.
    size : int
        Odd side ``G`` of the filter grid.

    Returns
    -------
    kernels : list of (G, G) arrays
        ``k_j`` such that ``R = Σ_j k_j * M_j`` (convolution).
    psf : (G, G) array
        ``P_R`` (sum 1).
    F_R : float
    """
    G = int(size)
    F = np.asarray(fluxes, dtype=np.float64)
    S = np.asarray(sigmas, dtype=np.float64)
    ph = [np.fft.fft2(np.fft.ifftshift(_pad_to(np.asarray(s, float), G))) for s in stamps]
    d2 = np.zeros((G, G))
    for Fj, Sj, P in zip(F, S, ph):
        d2 += (Fj**2 / Sj**2) * (P.real**2 + P.imag**2)
    D = np.sqrt(d2)
    FR = float(np.sqrt(np.sum(F**2 / S**2)))
    safe = np.where(D > 1e-300, D, np.inf)
    kernels = [np.fft.fftshift(np.fft.ifft2((Fj / Sj**2) * np.conj(P) / safe).real) for Fj, Sj, P in zip(F, S, ph)]
    psf = np.fft.fftshift(np.fft.ifft2(D / FR).real)
    return kernels, psf, FR


# ------------------------------------------------------------ star statistics
def _star_tile(*blocks: np.ndarray, tile: Any, n: int, ref: int, bkg: Sequence[Any], sig_ref: float, n_bkg_arr: int,
               grid: TileGrid) -> dict[str, np.ndarray]:
    from scipy import ndimage

    imgs = [np.asarray(b, np.float64) for b in blocks[:n]]
    masks = [np.asarray(b, bool) for b in blocks[n : 2 * n]]
    barr = list(blocks[2 * n : 2 * n + n_bkg_arr])
    subs = []
    k = 0
    for j in range(n):
        if bkg[j] is None:
            subs.append(imgs[j] - barr[k])
            k += 1
        else:
            subs.append(imgs[j] - float(bkg[j]))
    anybad = np.zeros(imgs[0].shape, bool)
    for j in range(n):
        anybad |= masks[j] | ~np.isfinite(imgs[j])
    ref_img = np.where(anybad, 0.0, subs[ref])
    smooth = ndimage.uniform_filter(ref_img, 3, mode="constant")
    peak = ndimage.maximum_filter(smooth, size=21, mode="constant")
    thr = 20.0 * sig_ref / 3.0
    ys, xs = np.nonzero((smooth == peak) & (smooth > thr))
    rmax = _RADII[-1] + _ANNULUS[1]
    h, w = ref_img.shape
    m = int(math.ceil(rmax)) + 1
    keep = (ys >= m) & (ys < h - m) & (xs >= m) & (xs < w - m)
    y0, x0 = tile.origin
    gy, gx = ys + y0, xs + x0
    cy, cx = tile.core
    keep &= (gy >= cy.start) & (gy < cy.stop) & (gx >= cx.start) & (gx < cx.stop)
    ys, xs = ys[keep], xs[keep]
    yy, xx = np.mgrid[-m : m + 1, -m : m + 1]
    rr = np.hypot(yy, xx)
    ann = (rr >= _RADII[-1] + _ANNULUS[0]) & (rr <= rmax)
    fluxes, fwhms = [], []
    for y, x in zip(ys, xs):
        sl = (slice(y - m, y + m + 1), slice(x - m, x + m + 1))
        if anybad[sl].any():
            continue
        frow, wrow = [], []
        for j in range(n):
            st = subs[j][sl]
            st = st - np.median(st[ann])
            frow.append([st[rr <= r].sum() for r in _RADII])
            wrow.append(_adaptive_fwhm(st, xx, yy, rr))
        fluxes.append(frow)
        fwhms.append(wrow)
    return {"flux": np.asarray(fluxes, float).reshape(-1, n, len(_RADII)), "fwhm": np.asarray(fwhms, float).reshape(-1, n)}


def _adaptive_fwhm(st: np.ndarray, xx: np.ndarray, yy: np.ndarray, rr: np.ndarray) -> float:
    """FWHM from Gaussian-weighted adaptive second moments (the weight converges to the star's own sigma).

    With a circular Gaussian weight of width ``s_w`` a Gaussian star of width
    ``s`` shows the weighted variance ``s_m² = s² s_w² / (s² + s_w²)``, so
    ``s² = s_m² s_w² / (s_w² - s_m²)``; iterating ``s_w <- s`` converges to
    ``s_w = s``.
    """
    sw = 2.0
    s = float("nan")
    for _ in range(20):
        wgt = st * np.exp(-0.5 * rr**2 / sw**2)
        tot = wgt.sum()
        if not tot > 0:
            return float("nan")
        mx, my = (wgt * xx).sum() / tot, (wgt * yy).sum() / tot
        sm2 = (wgt * ((xx - mx) ** 2 + (yy - my) ** 2)).sum() / tot / 2.0
        if not 0 < sm2 < sw**2:
            return float("nan")
        s_new = math.sqrt(sm2 * sw**2 / (sw**2 - sm2))
        if not np.isfinite(s_new) or s_new > 30:
            return float("nan")
        if abs(s_new - sw) < 1e-4 * sw:
            s = s_new
            break
        sw = s = s_new
    return 2.3548200450309493 * s


def _robust_median(v: np.ndarray) -> float:
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    for _ in range(5):
        med = np.median(v)
        mad = 1.4826 * np.median(np.abs(v - med))
        if not mad > 0:
            break
        keep = np.abs(v - med) <= 3 * mad
        if keep.all():
            break
        v = v[keep]
    return float(np.median(v))


def estimate_scales(
    dss: Sequence[xr.Dataset], backgrounds: Sequence[Any], sig_ref: float, ref: int = 0, tile_size: int = 1024
) -> dict[str, Any]:
    """Flux scales ``F_j`` (relative to image ``ref``) and FWHMs from bright isolated stars (map → reduce).

    Per tile (in parallel), local maxima of the reference image above 20σ
    (3 x 3 mean), isolated within 10 px, away from masked pixels in every
    image, are measured in every image: aperture fluxes (radii 2...20 px, sky
    from an annulus) and an iterated second-moment FWHM.  On the client the
    FWHM of each image is the clipped median over stars, the aperture radius
    is the smallest of the set ≥ 2.5 × the largest FWHM, and ``F_j`` is the
    clipped median of ``flux_j / flux_ref``.  Returns ``{"flux": F, "fwhm":
    fwhm, "n_stars": n}``.
    """
    n = len(dss)
    shape = tuple(dss[0]["image"].shape)
    m = int(math.ceil(_RADII[-1] + _ANNULUS[1])) + 1
    nx = max(1, -(-shape[1] // tile_size))
    ny = max(1, -(-shape[0] // tile_size))
    grid = TileGrid(shape, nx=nx, ny=ny, overlap=m)  # slices are taken by hand: no engine limit
    bkg_scalar = [None if isinstance(b, (da.Array, np.ndarray)) else b for b in backgrounds]
    barrs = [b for b in backgrounds if isinstance(b, (da.Array, np.ndarray))]
    tasks = []
    f = dask.delayed(_star_tile, pure=True)
    for t in grid.tiles:
        blocks = [d["image"].data[t.outer] for d in dss] + [d["mask"].data[t.outer] for d in dss]
        blocks += [b[t.outer] for b in barrs]
        tasks.append(f(*blocks, tile=t, n=n, ref=ref, bkg=bkg_scalar, sig_ref=sig_ref, n_bkg_arr=len(barrs), grid=grid))
    res = dask.compute(*tasks)
    flux = np.concatenate([r["flux"] for r in res], axis=0) if res else np.zeros((0, n, len(_RADII)))
    fwhm = np.concatenate([r["fwhm"] for r in res], axis=0) if res else np.zeros((0, n))
    nstar = flux.shape[0]
    fw = np.array([_robust_median(fwhm[:, j]) for j in range(n)]) if nstar else np.full(n, np.nan)
    scales = np.ones(n)
    if nstar >= 3 and np.all(np.isfinite(fw)):
        rneed = 2.5 * float(np.nanmax(fw))
        ir = next((i for i, r in enumerate(_RADII) if r >= rneed), len(_RADII) - 1)
        ref_flux = flux[:, ref, ir]
        good = ref_flux > 0
        for j in range(n):
            scales[j] = _robust_median(flux[good, j, ir] / ref_flux[good]) if good.sum() >= 3 else np.nan
    return {"flux": scales, "fwhm": fw, "n_stars": nstar}


# -------------------------------------------------------------------- tiling
def _proper_variance(kernels: Sequence[np.ndarray], valid: Sequence[np.ndarray], varis: Sequence[np.ndarray],
                     F: np.ndarray, w: np.ndarray, wsum: np.ndarray, wvar: np.ndarray) -> np.ndarray:
    """Exact per-pixel variance of ``R = Σ_j k_j * m_j`` with masked pixels filled from the other images.

    ``k_j`` are the proper-coaddition filters of Zackay & Ofek (2017, ApJ 836,
    188, Eq. 8; :func:`proper_kernels`); ``R / F_R`` is the coadd.

    A filled pixel ``m_j(y) = F_j Σ_i c_i(y) M_i(y)`` (``c_i = w_i v_i / (F_i Σ_l w_l v_l)``,
    ``v_i`` the validity maps, ``w_i = F_i²/σ_i²``) is a copy of the other
    images' noise, not an independent draw, so ``m_j = Σ_i B_ji M_i`` with
    ``B_ji = δ_ij v_j + (1 - v_j) F_j c_i`` and, for independent input pixels
    of variance ``var_i``,

    .. math::

        V(x) = \\sum_i \\sum_y var_i(y) A_i(x, y)^2, \\qquad
        A_i(x, y) = \\sum_j k_j(x - y) B_{ji}(y)

    .. math::

        V = \\sum_j k_j^2 * Q_{jj} + 2 \\sum_{j<l} (k_j k_l) * Q_{jl}, \\qquad
        Q_{jl} = \\sum_i var_i B_{ji} B_{li}

    (``*`` convolution, ``k_j k_l`` the pixel-wise product of the kernels):
    ``Q_jj = v_j var_j + (1 - v_j) F_j² wvar`` and, for ``j ≠ l``,
    ``Q_jl = v_j (1 - v_l) F_l c_j var_j + v_l (1 - v_j) F_j c_l var_l
    + (1 - v_j)(1 - v_l) F_j F_l wvar`` with ``wvar = Σ_i c_i² var_i``.  The
    cross terms vanish where both images are valid; pairs with no masked
    pixel in the tile cost nothing.
    """
    n = len(kernels)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = np.where(wsum > 0, 1.0 / np.where(wsum > 0, wsum, 1.0), 0.0)
    c = [w[i] * valid[i] * inv / F[i] for i in range(n)]

    def terms() -> Any:  # one tile-sized map alive at a time
        for j in range(n):
            yield np.where(valid[j], varis[j], F[j] ** 2 * wvar), kernels[j] ** 2
        for j in range(n):
            for k in range(j + 1, n):
                if valid[j].all() and valid[k].all():
                    continue
                q = (valid[j] & ~valid[k]) * (F[k] * c[j] * varis[j])
                q = q + (valid[k] & ~valid[j]) * (F[j] * c[k] * varis[k])
                q = q + (~valid[j] & ~valid[k]) * (F[j] * F[k] * wvar)
                if q.any():
                    yield 2.0 * q, kernels[j] * kernels[k]

    return _sum_of_convolutions(terms(), valid[0].shape, kernels[0].shape)


def _sum_of_convolutions(terms: Any, shape: tuple[int, ...], kshape: tuple[int, ...]) -> np.ndarray:
    """``Σ fftconvolve(a, k, mode="same")`` over the ``(a, k)`` pairs of an iterable (``a`` of ``shape``,
    ``k`` of ``kshape``).

    The products of the spectra are summed and transformed back once (one
    inverse FFT instead of one per term); zero-padded, so nothing wraps.
    """
    import scipy.fft as sfft

    (h, w), (kh, kw) = shape, kshape
    fshape = (sfft.next_fast_len(h + kh - 1), sfft.next_fast_len(w + kw - 1, real=True))
    acc = 0
    for a, k in terms:
        acc = acc + sfft.rfft2(a, fshape) * sfft.rfft2(k, fshape)
    full = sfft.irfft2(acc, fshape)
    y0, x0 = (kh - 1) // 2, (kw - 1) // 2  # fftconvolve's "same": the centre of the full convolution
    return full[y0 : y0 + h, x0 : x0 + w]


def _coadd_tile(*blocks: np.ndarray, tile: Any, n: int, method: str, F: np.ndarray, sig: np.ndarray,
                bkg: Sequence[Any], n_bkg_arr: int, psfs: Sequence[Any], G: int) -> tuple[np.ndarray, ...]:
    imgs = [np.asarray(b, np.float64) for b in blocks[:n]]
    masks = [np.asarray(b, bool) for b in blocks[n : 2 * n]]
    varis = [np.asarray(b, np.float64) for b in blocks[2 * n : 3 * n]]
    barr = list(blocks[3 * n : 3 * n + n_bkg_arr])
    k = 0
    M, valid = [], []
    for j in range(n):
        if bkg[j] is None:
            b = np.asarray(barr[k], np.float64)
            k += 1
        else:
            b = float(bkg[j])
        mj = imgs[j] - b
        vj = ~masks[j] & np.isfinite(mj) & np.isfinite(varis[j])
        M.append(np.where(vj, mj, 0.0))
        varis[j] = np.where(vj, varis[j], 0.0)
        valid.append(vj)
    w = F**2 / sig**2
    nexp = np.sum(valid, axis=0).astype(np.int16)
    wsum = np.zeros(imgs[0].shape)
    num = np.zeros(imgs[0].shape)
    vnum = np.zeros(imgs[0].shape)
    for j in range(n):
        wsum += w[j] * valid[j]
        num += w[j] * valid[j] * M[j] / F[j]
        vnum += w[j] ** 2 * valid[j] * varis[j] / F[j] ** 2
    any_ok = nexp > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        wmean = np.where(any_ok, num / np.where(any_ok, wsum, 1.0), 0.0)
        wvar = np.where(any_ok, vnum / np.where(any_ok, wsum, 1.0) ** 2, 0.0)
    if method == "weighted":
        out, var = wmean, wvar
    elif method == "median":
        stack = np.stack([np.where(valid[j], M[j] / F[j], np.nan) for j in range(n)])
        # uncovered pixels: give them a value instead of silencing nanmedian's warning
        # (warnings.catch_warnings is not thread-safe, and tiles run on threads)
        stack[:, ~np.isfinite(stack).any(axis=0)] = 0.0
        out = np.nanmedian(stack, axis=0)
        vs = np.stack([np.where(valid[j], varis[j] / F[j] ** 2, 0.0) for j in range(n)]).sum(axis=0)
        var = np.where(any_ok, (math.pi / 2.0) * vs / np.maximum(nexp, 1) ** 2, 0.0)
    else:
        cy, cx = tile.core
        xc, yc = (cx.start + cx.stop - 1) / 2.0, (cy.start + cy.stop - 1) / 2.0
        stamps = [_stamp(p, xc, yc, j) for j, p in enumerate(psfs)]
        kernels, _, FR = proper_kernels(stamps, F, sig, G)
        R = _sum_of_convolutions(((np.where(valid[j], M[j], F[j] * wmean), kernels[j]) for j in range(n)),
                                 imgs[0].shape, kernels[0].shape)
        V = _proper_variance(kernels, valid, varis, F, w, wsum, wvar)
        out = R / FR
        var = np.clip(V, 0, None) / FR**2
        out = np.where(any_ok, out, 0.0)
    return out.astype(np.float32), var.astype(np.float32), ~any_ok, nexp


# ----------------------------------------------------------------------- API
def _sample_stats(dss: Sequence[xr.Dataset], backgrounds: Sequence[Any], max_sample: int = 1_000_000) -> list[tuple[float, float]]:
    """Global robust (sky, sigma) of each image from a strided sample (one compute).

    :func:`tilepipe.image._sky_and_noise`: ``sky`` the sigma-clipped median
    of the sample (0 for a given background), ``sigma`` from differences of
    sample pixels at least 4 px apart, so a sky gradient left in the image
    (a constant background) is not counted as noise.
    """
    from .image import _sky_and_noise

    shape = dss[0]["image"].shape
    stride = max(1, int(math.ceil(math.sqrt(shape[0] * shape[1] / max_sample))))
    todo = []
    for d, b in zip(dss, backgrounds):
        sub = d["image"].data[::stride, ::stride]
        bad = d["mask"].data[::stride, ::stride]
        bs = b[::stride, ::stride] if isinstance(b, (da.Array, np.ndarray)) else None
        todo.append((sub, bad, bs))
    computed = dask.compute(*todo)
    out = []
    for (sub, bad, bs), b in zip(computed, backgrounds):
        sub = np.asarray(sub, np.float64)
        ok = ~np.asarray(bad) & np.isfinite(sub)
        if bs is not None:
            sub = sub - np.asarray(bs, np.float64)
        sky, sigma = (float(v) for v in _sky_and_noise(np.where(ok, sub, np.nan), stride))
        out.append((0.0 if bs is not None else sky, sigma))
    return out


def coadd(
    images: Sequence[Any],
    psfs: Sequence[Any] | Any | None = None,
    method: str = "proper",
    *,
    fluxes: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
    backgrounds: Sequence[Any] | None = None,
    fwhm: Sequence[float] | float | None = None,
    reference: int = 0,
    nx: int = 1,
    ny: int | None = None,
    overlap: int | None = None,
    chunks: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> xr.Dataset:
    """Coadd aligned images of the same shape: proper (ZO17), weighted mean or median.

    Parameters
    ----------
    images : sequence
        Two or more aligned images (anything :func:`tilepipe.open_image`
        accepts: FITS/Zarr paths or URLs, arrays, Datasets), all of the same
        shape.  Their ``variance`` and ``mask`` variables are used.
    psfs : sequence, optional
        One PSF per image: a 2-D stamp (sum 1, centred), a callable
        ``f(x, y) -> stamp`` or an object with ``.at(x, y)`` (e.g. a
        :class:`tilepipe.PSFModel`), evaluated at each tile's centre.  Default:
        a circular Gaussian (:class:`GaussianStamp`) of the FWHM from
        ``fwhm=``, the image's ``fwhm`` attribute, or measured on bright stars.
        Only ``proper`` filters with the PSFs; the others use them to report
        the coadd PSF.
    method : {"proper", "weighted", "median"}
        ``proper``: ZO17 II (see the module docstring).  ``weighted``:
        ``Σ w_j M_j/F_j / Σ w_j`` with ``w_j = F_j²/σ_j²``.  ``median``: median
        of ``M_j/F_j`` over the valid images (variance ≈ π/2 × that of the
        equal-weight mean; its PSF, reported as the mean PSF, is approximate).
    fluxes : sequence of float, optional
        Flux scales ``F_j`` (the coadd is in the units of an image with
        ``F = 1``).  Default: measured on bright stars, relative to
        ``images[reference]`` (global, one number per image).
    sigmas : sequence of float, optional
        Background noise ``σ_j`` (image units).  Default: the robust rms of
        differences of pixels at least 4 px apart (÷ √2) in a strided sample
        of the background-subtracted image (insensitive to sky gradients).
    backgrounds : sequence, optional
        Per image a constant or a 2-D array subtracted first.  Default: the
        Dataset's ``background`` variable when it has one, else a global
        sigma-clipped median.
    fwhm : float or sequence, optional
        FWHM (pixels) of the Gaussian PSFs used when ``psfs`` is None.
    reference : int
        Index of the flux reference image.
    nx, ny, overlap : int
        Tiles; ``overlap`` defaults to the filter half-size ``G // 2`` for
        ``proper`` and 0 otherwise (a smaller one warns).

    Returns
    -------
    xarray.Dataset
        Lazy ``coadd`` (float32), ``variance`` (float32, per pixel, propagated
        exactly from the inputs' ``variance`` through the linear filters,
        masked-pixel filling included: see the module docstring), ``mask``
        (True where no image is valid), ``nexp`` (int16) on ``("y", "x")``;
        ``psf`` on ``("tile", "py", "px")``: the coadd PSF at each tile centre
        (coordinates ``tile_x``, ``tile_y``).  attrs: ``method``, ``fluxes``,
        ``sigmas``, ``backgrounds`` (scalars), ``fwhm_inputs``, ``F_R``,
        ``header`` (of the reference image), ``fwhm`` (of the coadd PSF).
    """
    check_choice("method", method, ("proper", "weighted", "median"))
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise TypeError("images must be a sequence (list) of images to coadd")
    n = len(images)
    if n < 1:
        raise ValueError("images is empty; give at least one image to coadd")
    reference = check_int("reference", reference, lower=0)
    if reference >= n:
        raise ValueError(f"reference={reference} but only {n} images were given")
    dss = [open_image(im, chunks=chunks, storage_options=storage_options) for im in images]
    shapes = [tuple(d["image"].shape) for d in dss]
    if len(set(shapes)) != 1:
        raise ValueError(
            f"images must all have the same shape (aligned on one pixel grid); got {shapes}. "
            "Resample them first (tilepipe.mosaic with a common wcs_out)"
        )
    shape = shapes[0]
    for name, seq in (("fluxes", fluxes), ("sigmas", sigmas), ("backgrounds", backgrounds)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} images; give one per image")
    if psfs is not None and (isinstance(psfs, np.ndarray) and psfs.ndim == 2 or hasattr(psfs, "at") or callable(psfs)):
        psfs = [psfs] * n
    if psfs is not None and len(psfs) != n:
        raise ValueError(f"psfs has {len(psfs)} entries for {n} images; give one per image (or None)")
    # ---- backgrounds
    bk: list[Any] = []
    for j, d in enumerate(dss):
        if backgrounds is not None and backgrounds[j] is not None:
            b = backgrounds[j]
            if np.ndim(b) == 0:
                bk.append(float(b))
            else:
                b = b.data if isinstance(b, xr.DataArray) else b
                if tuple(np.shape(b)) != shape:
                    raise ValueError(f"backgrounds[{j}] has shape {np.shape(b)}, the images {shape}")
                bk.append(b if isinstance(b, da.Array) else da.from_array(np.asarray(b), chunks=d["image"].data.chunks))
        elif "background" in d:
            bk.append(d["background"].data)
        else:
            bk.append(None)  # measured below
    stats = _sample_stats(dss, [b if b is not None else 0.0 for b in bk]) if (sigmas is None or any(b is None for b in bk)) else None
    if stats is not None:
        for j in range(n):
            if bk[j] is None:
                bk[j] = stats[j][0]
    sig = np.array([float(s) for s in sigmas] if sigmas is not None else [s[1] for s in stats], dtype=np.float64)
    for j, s in enumerate(sig):
        if not np.isfinite(s) or s <= 0:
            raise ValueError(f"the background noise of image {j} is {s}; pass sigmas= (positive, image units)")
    # ---- flux scales and FWHM
    fw_in: list[float | None]
    if fwhm is not None:
        fw_in = [float(f) for f in (fwhm if np.ndim(fwhm) else [fwhm] * n)]
        if len(fw_in) != n:
            raise ValueError(f"fwhm has {len(fw_in)} entries for {n} images")
    else:
        fw_in = [d.attrs.get("fwhm") for d in dss]
    need_stars = (fluxes is None and n > 1) or (psfs is None and any(f is None for f in fw_in))
    star = None
    if need_stars:
        star = estimate_scales(dss, bk, float(sig[reference]), ref=reference)
    if fluxes is not None:
        F = np.array([float(f) for f in fluxes], dtype=np.float64)
    elif n == 1:
        F = np.ones(1)
    else:
        F = np.asarray(star["flux"], float)
        if not np.all(np.isfinite(F) & (F > 0)):
            warnings.warn(
                f"coadd: could not measure the flux scales on stars (found {star['n_stars']} usable stars); "
                "using F = 1 for every image. Pass fluxes= to set them",
                FallbackWarning,
                stacklevel=2,
            )
            F = np.ones(n)
    for j, f in enumerate(F):
        if not np.isfinite(f) or f <= 0:
            raise ValueError(f"fluxes[{j}] = {f}; flux scales must be positive numbers")
    if psfs is None:
        plist = []
        for j in range(n):
            f = fw_in[j]
            if f is None:
                f = float(star["fwhm"][j]) if star is not None else float("nan")
                if not np.isfinite(f) or f <= 0:
                    raise ValueError(
                        f"no PSF for image {j}: no psfs=, no fwhm attribute and no usable stars to measure it; "
                        "pass psfs= or fwhm="
                    )
                fw_in[j] = f
            plist.append(GaussianStamp(float(f)))
        psfs = plist
    # ---- filter size and grid
    cx0, cy0 = (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0
    stamps0 = [_stamp(p, cx0, cy0, j) for j, p in enumerate(psfs)]
    smax = max(max(s.shape) for s in stamps0)
    G = 2 * smax + 1
    halo = G // 2 if method == "proper" else 0
    if overlap is None:
        overlap = halo
    grid = TileGrid(shape, nx=nx, ny=ny, overlap=overlap)
    if method == "proper":
        grid.check_overlap(halo, "proper coaddition (filter half-size)")
    barrs = [b for b in bk if isinstance(b, (da.Array, np.ndarray))]
    bscal = [None if isinstance(b, (da.Array, np.ndarray)) else float(b) for b in bk]
    arrays = [d["image"].data for d in dss] + [d["mask"].data for d in dss] + [d["variance"].data for d in dss] + barrs
    out, var, mask, nexp = map_tiles(
        _coadd_tile, *arrays, grid=grid, dtype=[np.float32, np.float32, bool, np.int16], n_out=4, name=f"coadd-{method}",
        n=n, method=method, F=F, sig=sig, bkg=bscal, n_bkg_arr=len(barrs), psfs=list(psfs), G=G,
    )
    # ---- coadd PSF per tile (client side, small)
    psf_stack, txs, tys = [], [], []
    FR = float(np.sqrt(np.sum(F**2 / sig**2)))
    w = F**2 / sig**2
    for t in grid.tiles:
        cy, cx = t.core
        xc, yc = (cx.start + cx.stop - 1) / 2.0, (cy.start + cy.stop - 1) / 2.0
        st = [_stamp(p, xc, yc, j) for j, p in enumerate(psfs)]
        if method == "proper":
            _, pr, FR = proper_kernels(st, F, sig, G)
        elif method == "weighted":
            pr = sum(w[j] * _pad_to(st[j], G) for j in range(n)) / w.sum()
        else:
            pr = sum(_pad_to(s, G) for s in st) / n
        psf_stack.append(pr.astype(np.float32))
        txs.append(xc)
        tys.append(yc)
    psf_arr = np.stack(psf_stack)
    centre = psf_arr[len(psf_arr) // 2].astype(np.float64)
    yy, xx = np.mgrid[: G, : G] - G // 2
    pos = np.clip(centre, 0, None)
    fwhm_out = float(2.3548200450309493 * math.sqrt((pos * (xx**2 + yy**2)).sum() / pos.sum() / 2.0))
    ref_ds = dss[reference]
    attrs = {
        "method": method,
        "fluxes": [float(v) for v in F],
        "sigmas": [float(v) for v in sig],
        "backgrounds": [None if b is None else float(b) for b in bscal],
        "fwhm_inputs": [None if f is None else float(f) for f in fw_in],
        "F_R": FR,
        "reference": reference,
        "filter_size": G,
        "overlap": list(grid.overlap),
        "header": list(ref_ds.attrs.get("header", [])),
        "fwhm": fwhm_out,
        "bunit": ref_ds.attrs.get("bunit", "adu"),
        "reference_paper": "Zackay & Ofek 2017, ApJ 836, 188 (arXiv:1512.06879), Eqs. 8, 10, 11",
    }
    if star is not None:
        attrs["n_stars"] = int(star["n_stars"])
    return xr.Dataset(
        {
            "coadd": (("y", "x"), out),
            "variance": (("y", "x"), var),
            "mask": (("y", "x"), mask),
            "nexp": (("y", "x"), nexp),
            "psf": (("tile", "py", "px"), psf_arr),
        },
        coords={"tile_x": ("tile", np.asarray(txs)), "tile_y": ("tile", np.asarray(tys))},
        attrs=attrs,
    )
