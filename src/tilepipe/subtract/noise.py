"""Noise models and global fits shared by the subtraction methods (ZOGY, SFFT).

Everything here follows the **map -> reduce -> map** rule of DESIGN.md:
per-tile measurements run in parallel (mesh statistics, star measurements),
one small solve happens on the client (background spline, flux scale,
sub-pixel shift), and the global model is then evaluated per tile.  No model
is ever fitted independently per tile, so there is nothing to stitch.

Conventions: arrays ``[y, x]``, 0-based pixel centres at integers, mask True =
bad, variances in image units squared.

Public helpers
--------------
robust_std, sigma_clipped_stats
    MAD-based scale and sigma-clipped (mean, median, std).
variance_map
    ``rms**2 + max(image - background, 0) / gain`` (lazy).
measure_pair_stars
    Tile function (for :func:`tilepipe.map_tiles_table`): centroids, aperture
    fluxes and PSF stamps of bright isolated stars in both images.
fit_flux_scale, fit_shift
    Robust global fits of the flux ratio ``new/ref`` and the sub-pixel shift
    ``new - ref`` from the merged star table.
"""

from __future__ import annotations

import logging
from typing import Any

import dask.array as da
import numpy as np
from astropy.table import Table
from scipy import ndimage

log = logging.getLogger(__name__)

__all__ = [
    "robust_std",
    "sigma_clipped_stats",
    "variance_map",
    "estimate_fwhm",
    "window_centroid",
    "measure_pair_stars",
    "fit_flux_scale",
    "fit_shift",
]

MAD_TO_SIGMA = 1.482602218505602


# --------------------------------------------------------------------- robust
def robust_std(values: Any) -> float:
    """MAD-based standard deviation of the finite values (1.4826 x MAD)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    return float(MAD_TO_SIGMA * np.median(np.abs(v - np.median(v))))


def sigma_clipped_stats(values: Any, nsigma: float = 3.0, maxiter: int = 10,
                        weights: Any = None) -> tuple[float, float, float, int]:
    """Iteratively sigma-clipped ``(mean, median, std, n_kept)`` of finite values.

    The clip uses the median and the MAD-based std; ``mean`` is
    weighted by ``weights`` when given (e.g. inverse variances).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    w = None if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    ok = np.isfinite(v) if w is None else np.isfinite(v) & np.isfinite(w) & (w > 0)
    for _ in range(maxiter):
        if ok.sum() < 3:
            break
        med = np.median(v[ok])
        sig = MAD_TO_SIGMA * np.median(np.abs(v[ok] - med))
        if not np.isfinite(sig) or sig == 0:
            break
        new = ok & (np.abs(v - med) <= nsigma * sig)
        if new.sum() == ok.sum():
            break
        ok = new
    if ok.sum() == 0:
        return float("nan"), float("nan"), float("nan"), 0
    vv = v[ok]
    mean = float(np.average(vv, weights=None if w is None else w[ok]))
    med = float(np.median(vv))
    std = float(np.std(vv)) if vv.size > 1 else float("nan")
    return mean, med, std, int(ok.sum())


# ----------------------------------------------------------------- background
def _variance_block(img: np.ndarray, rms: np.ndarray, gain: float | None) -> np.ndarray:
    var = rms.astype(np.float32) ** 2
    if gain:
        var = var + np.clip(np.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0), 0, None).astype(np.float32) / np.float32(gain)
    return var.astype(np.float32)


def variance_map(image_bs: Any, rms: Any, gain: float | None) -> da.Array:
    """Per-pixel variance ``rms**2 + max(image - background, 0) / gain``.

    ``image_bs`` is the background-subtracted image (ADU), ``rms`` the
    background rms map (ADU), ``gain`` in e-/ADU (None: background only).
    """
    a = image_bs if isinstance(image_bs, da.Array) else da.asarray(image_bs)
    r = rms if isinstance(rms, da.Array) else da.asarray(rms)
    r = r.rechunk(a.chunks)
    return da.map_blocks(_variance_block, a, r, gain, dtype=np.float32, meta=np.empty((0, 0), np.float32))


# ------------------------------------------------------------ star measures
def window_centroid(stamp: np.ndarray, sigma: float, x0: float, y0: float, niter: int = 10) -> tuple[float, float]:
    """SExtractor-style windowed centroid (XWIN) of a background-subtracted stamp.

    Iterates ``x <- x + 2 sum(w I (x_i - x)) / sum(w I)`` with a Gaussian
    window of ``sigma`` px centred on the current estimate.  Returns local
    stamp coordinates (0-based).
    """
    h, w = stamp.shape
    yy, xx = np.mgrid[0:h, 0:w]
    x, y = float(x0), float(y0)
    for _ in range(niter):
        wgt = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma * sigma)) * stamp
        s = wgt.sum()
        if not np.isfinite(s) or s <= 0:
            return float("nan"), float("nan")
        dxs = 2 * (wgt * (xx - x)).sum() / s
        dys = 2 * (wgt * (yy - y)).sum() / s
        dxs = float(np.clip(dxs, -1.0, 1.0))
        dys = float(np.clip(dys, -1.0, 1.0))
        x += dxs
        y += dys
        if abs(dxs) < 1e-4 and abs(dys) < 1e-4:
            break
    if abs(x - x0) > 3 or abs(y - y0) > 3:
        return float("nan"), float("nan")
    return x, y


def _moments_fwhm(stamp: np.ndarray) -> float:
    h, w = stamp.shape
    yy, xx = np.mgrid[0:h, 0:w]
    s = np.clip(stamp, 0, None)
    tot = s.sum()
    if tot <= 0:
        return float("nan")
    xc = (s * xx).sum() / tot
    yc = (s * yy).sum() / tot
    var = (s * ((xx - xc) ** 2 + (yy - yc) ** 2)).sum() / tot / 2.0
    return float(2.3548 * np.sqrt(max(var, 1e-6)))


def estimate_fwhm(image: np.ndarray, mask: np.ndarray | None = None, nmax: int = 40) -> float:
    """Rough FWHM (px) of the point sources of a background-subtracted image.

    Median second-moment FWHM (iterated with a window of 3 x FWHM) of the
    brightest isolated unmasked peaks.  Used only to size windows when the
    Dataset carries no ``fwhm`` attribute.
    """
    img = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if mask is not None:
        img = np.where(mask, 0.0, img)
    noise = robust_std(img[img != 0]) if np.any(img != 0) else 1.0
    sm = ndimage.gaussian_filter(img, 1.5)
    peaks = (sm == ndimage.maximum_filter(sm, size=9)) & (sm > 20 * noise / 3.0)
    ys, xs = np.nonzero(peaks)
    if ys.size == 0:
        return 3.0
    order = np.argsort(sm[ys, xs])[::-1]
    fw = []
    h, w = img.shape
    for k in order[: 4 * nmax]:
        y, x = ys[k], xs[k]
        r = 12
        if y < r or x < r or y >= h - r or x >= w - r:
            continue
        st = img[y - r:y + r + 1, x - r:x + r + 1]
        if mask is not None and mask[y - r:y + r + 1, x - r:x + r + 1].any():
            continue
        f = 3.0
        for _ in range(5):
            yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
            win = (xx * xx + yy * yy) <= (1.5 * f) ** 2
            f2 = _moments_fwhm(np.where(win, st, 0.0))
            if not np.isfinite(f2):
                break
            f = float(np.clip(f2 * 1.1, 1.0, 8.0))  # a hard window truncates wings: mild correction
        if np.isfinite(f):
            fw.append(f)
        if len(fw) >= nmax:
            break
    return float(np.median(fw)) if fw else 3.0


def _fourier_shift_stamps(stamps: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Shift each stamp ``k`` by ``(dy[k], dx[k])`` px with a Fourier phase ramp (sub-pixel)."""
    f = np.fft.fft2(stamps, axes=(1, 2))
    ky = np.fft.fftfreq(stamps.shape[1])[None, :, None]
    kx = np.fft.fftfreq(stamps.shape[2])[None, None, :]
    ph = np.exp(-2j * np.pi * (ky * np.asarray(dy)[:, None, None] + kx * np.asarray(dx)[:, None, None]))
    return np.real(np.fft.ifft2(f * ph, axes=(1, 2)))


def window_centroids(stamps: np.ndarray, sigma: float, niter: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`window_centroid` of a stack of stamps ``(k, s, s)`` started at their centres.

    Returns local ``(x, y)`` arrays; NaN where the window flux is not positive
    or the centroid wandered more than 3 px.
    """
    k, h, w = stamps.shape
    yy, xx = np.mgrid[0:h, 0:w]
    x = np.full(k, (w - 1) / 2.0)
    y = np.full(k, (h - 1) / 2.0)
    x0, y0 = x.copy(), y.copy()
    ok = np.ones(k, bool)
    for _ in range(niter):
        ddx = xx[None] - x[:, None, None]
        ddy = yy[None] - y[:, None, None]
        gx = np.exp(-(np.arange(w)[None, :] - x[:, None]) ** 2 / (2 * sigma * sigma))
        gy = np.exp(-(np.arange(h)[None, :] - y[:, None]) ** 2 / (2 * sigma * sigma))
        wgt = gy[:, :, None] * gx[:, None, :] * stamps  # separable Gaussian window
        s = wgt.sum(axis=(1, 2))
        ok &= np.isfinite(s) & (s > 0)
        s = np.where(ok, s, 1.0)
        sx = np.clip(2 * (wgt * ddx).sum(axis=(1, 2)) / s, -1, 1)
        sy = np.clip(2 * (wgt * ddy).sum(axis=(1, 2)) / s, -1, 1)
        x = x + np.where(ok, sx, 0)
        y = y + np.where(ok, sy, 0)
        if np.all(np.abs(sx[ok]) < 1e-4) and np.all(np.abs(sy[ok]) < 1e-4):
            break
    ok &= (np.abs(x - x0) <= 3) & (np.abs(y - y0) <= 3)
    return np.where(ok, x, np.nan), np.where(ok, y, np.nan)


def measure_pair_stars(
    new: np.ndarray,
    ref: np.ndarray,
    var_new: np.ndarray,
    var_ref: np.ndarray,
    bad: np.ndarray,
    *,
    tile: Any,
    fwhm_new: float,
    fwhm_ref: float,
    nsigma: float = 10.0,
    half: int = 12,
    r_aper: float = 8.0,
    max_stars: int = 80,
    saturation_new: float | None = None,
    saturation_ref: float | None = None,
) -> Table:
    """Tile function: measure bright isolated stars in both images.

    For :func:`tilepipe.map_tiles_table` (coordinates local to the outer
    box).  Peaks are found on the noise-normalised, Gaussian-smoothed sum of
    both background-subtracted images; for each isolated peak whose
    aperture holds no bad pixel: windowed centroids in each image
    (``x_new, y_new``, ``x_ref, y_ref``), aperture fluxes of radius
    ``r_aper`` px with their errors from the variance maps, and
    flux-normalised stamps of ``2 half + 1`` px re-centred on the centroid
    (for an empirical PSF model).

    Returns
    -------
    astropy.table.Table
        ``x, y`` (the ref centroid: reference point for ownership),
        ``x_new, y_new, x_ref, y_ref, flux_new, flux_ref, err_new, err_ref,
        peak_new, peak_ref, stamp_new, stamp_ref``.
    """
    n = np.nan_to_num(np.asarray(new, dtype=np.float64))
    r = np.nan_to_num(np.asarray(ref, dtype=np.float64))
    vn = np.asarray(var_new, dtype=np.float64)
    vr = np.asarray(var_ref, dtype=np.float64)
    badm = np.asarray(bad, dtype=bool) | ~np.isfinite(vn) | ~np.isfinite(vr)
    h, w = n.shape
    size = 2 * half + 1
    cols = ["x", "y", "x_new", "y_new", "x_ref", "y_ref", "flux_new", "flux_ref", "err_new", "err_ref",
            "peak_new", "peak_ref"]
    empty = Table({c: np.zeros(0) for c in cols})
    empty["stamp_new"] = np.zeros((0, size, size), np.float32)
    empty["stamp_ref"] = np.zeros((0, size, size), np.float32)
    if h < size or w < size:
        return empty
    anybad = bool(badm.any())
    good_s = ~badm[::2, ::2] if anybad else slice(None)
    if anybad and not good_s.any():
        return empty
    # noise scales and the detection image in float32 (a detection map: 7 digits are plenty)
    sn = np.sqrt(np.median(vn[::2, ::2][good_s]))
    sr = np.sqrt(np.median(vr[::2, ::2][good_s]))
    det = (n * (1.0 / sn) + r * (1.0 / sr)).astype(np.float32)
    if anybad:
        det[badm] = 0
    sm = ndimage.gaussian_filter(det, max(1.0, 0.42 * min(fwhm_new, fwhm_ref)))
    noise = robust_std(sm[::2, ::2][good_s])  # a quarter of the pixels: ample for a MAD
    if not np.isfinite(noise) or noise <= 0:
        return empty
    iso = max(int(np.ceil(r_aper)), 3)
    # candidate peaks: 5x5 maxima above 3 sigma (few pixels; also the neighbours of the isolation
    # test below), then the (2 iso + 1)^2 maximum test on the candidates only
    low = (sm == ndimage.maximum_filter(sm, size=5)) & (sm > 3 * noise)
    ly, lx = np.nonzero(low)
    lv = sm[ly, lx]
    strong = lv > nsigma * noise
    ys, xs = ly[strong], lx[strong]
    inside = (ys >= half) & (xs >= half) & (ys < h - half) & (xs < w - half)
    ys, xs = ys[inside], xs[inside]
    if ys.size:  # a peak is the maximum of its (2 iso + 1)^2 window
        off = np.arange(-iso, iso + 1)
        win = sm[np.clip(ys[:, None, None] + off[None, :, None], 0, h - 1),
                 np.clip(xs[:, None, None] + off[None, None, :], 0, w - 1)]
        top = win.reshape(ys.size, -1).max(axis=1) <= sm[ys, xs]
        ys, xs = ys[top], xs[top]
    if anybad and ys.size:
        badd = ndimage.binary_dilation(badm, iterations=int(np.ceil(r_aper)) + 1)
        keep = ~badd[ys, xs]
        ys, xs = ys[keep], xs[keep]
    # isolation: no other peak above 3 sigma and 5% of this one within 1.5 r_aper
    if ys.size and ly.size:
        from scipy.spatial import cKDTree

        tree = cKDTree(np.c_[ly, lx])
        ok = np.ones(ys.size, bool)
        for i, nb in enumerate(tree.query_ball_point(np.c_[ys, xs], 1.5 * r_aper)):
            vals = [sm[ly[j], lx[j]] for j in nb if (ly[j], lx[j]) != (ys[i], xs[i])]
            ok[i] = not vals or max(vals) <= 0.05 * sm[ys[i], xs[i]]
        ys, xs = ys[ok], xs[ok]
    order = np.argsort(sm[ys, xs])[::-1][: 2 * max_stars]
    ys, xs = ys[order], xs[order]
    if ys.size == 0:
        return empty
    off = np.arange(-half, half + 1)
    iy = ys[:, None, None] + off[None, :, None]
    ix = xs[:, None, None] + off[None, None, :]
    st_n, st_r = n[iy, ix], r[iy, ix]
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    ap = (xx * xx + yy * yy) <= r_aper * r_aper
    fn = st_n[:, ap].sum(axis=1)
    fr = st_r[:, ap].sum(axis=1)
    en = np.sqrt(vn[iy, ix][:, ap].sum(axis=1))
    er = np.sqrt(vr[iy, ix][:, ap].sum(axis=1))
    pn = st_n.max(axis=(1, 2))
    pr = st_r.max(axis=(1, 2))
    good = (fn > 0) & (fr > 0)
    if saturation_new is not None:
        good &= pn <= 0.8 * saturation_new
    if saturation_ref is not None:
        good &= pr <= 0.8 * saturation_ref
    cxn, cyn = window_centroids(st_n, max(fwhm_new, 1.0) / 2.3548)
    cxr, cyr = window_centroids(st_r, max(fwhm_ref, 1.0) / 2.3548)
    good &= np.isfinite(cxn) & np.isfinite(cyn) & np.isfinite(cxr) & np.isfinite(cyr)
    idx = np.nonzero(good)[0][:max_stars]
    if idx.size == 0:
        return empty
    x0, y0 = xs[idx] - half, ys[idx] - half
    t = Table({
        "x": cxr[idx] + x0, "y": cyr[idx] + y0,
        "x_new": cxn[idx] + x0, "y_new": cyn[idx] + y0, "x_ref": cxr[idx] + x0, "y_ref": cyr[idx] + y0,
        "flux_new": fn[idx], "flux_ref": fr[idx], "err_new": en[idx], "err_ref": er[idx],
        "peak_new": pn[idx], "peak_ref": pr[idx],
    })
    t["stamp_new"] = (_fourier_shift_stamps(st_n[idx], half - cyn[idx], half - cxn[idx]) / fn[idx, None, None]).astype(np.float32)
    t["stamp_ref"] = (_fourier_shift_stamps(st_r[idx], half - cyr[idx], half - cxr[idx]) / fr[idx, None, None]).astype(np.float32)
    return t


def fit_flux_scale(
    stars: Table, *, ee_new: Any = 1.0, ee_ref: Any = 1.0, min_snr: float = 20.0, nsigma: float = 3.0
) -> dict[str, float]:
    """Robust global flux scale ``new / ref`` from bright unsaturated stars.

    ``ratio_i = (flux_new_i / ee_new_i) / (flux_ref_i / ee_ref_i)`` where
    ``ee_*`` are the encircled-energy (aperture) corrections of each image's
    PSF in the measurement aperture (scalars or one value per star).  Stars
    with S/N < ``min_snr`` in either image are ignored; the ratios are
    sigma-clipped at ``nsigma`` (median/MAD) and combined with
    inverse-variance weights.

    Returns
    -------
    dict
        ``scale``, ``scale_err`` (standard error of the weighted mean), ``n``.
    """
    if len(stars) == 0:
        return {"scale": float("nan"), "scale_err": float("nan"), "n": 0}
    fn = np.asarray(stars["flux_new"], float) / np.asarray(ee_new, float)
    fr = np.asarray(stars["flux_ref"], float) / np.asarray(ee_ref, float)
    en = np.asarray(stars["err_new"], float) / np.asarray(ee_new, float)
    er = np.asarray(stars["err_ref"], float) / np.asarray(ee_ref, float)
    good = (fn / en > min_snr) & (fr / er > min_snr)
    if good.sum() < 3:
        good = (fn / en > 5) & (fr / er > 5)
    q = fn / fr
    sq = q * np.sqrt((en / fn) ** 2 + (er / fr) ** 2)
    q = np.where(good, q, np.nan)
    mean, med, std, nk = sigma_clipped_stats(q, nsigma=nsigma, weights=1.0 / sq**2)
    if nk == 0:
        return {"scale": float("nan"), "scale_err": float("nan"), "n": 0}
    err = std / np.sqrt(nk) if nk > 1 else float("nan")
    return {"scale": float(mean), "scale_err": float(err), "n": int(nk)}


def fit_shift(
    stars: Table, *, offset_new: Any = (0.0, 0.0), offset_ref: Any = (0.0, 0.0), min_snr: float = 20.0,
    nsigma: float = 3.0,
) -> dict[str, float]:
    """Robust global sub-pixel shift ``(dx, dy) = position_new - position_ref``.

    Windowed centroids are corrected by the windowed centroid of each image's
    own PSF model (``offset_* = (ox, oy)`` px, scalars or per star), so a
    lopsided PSF does not masquerade as a shift.  Sigma-clipped,
    flux-weighted mean over all stars of all tiles.

    Returns
    -------
    dict
        ``dx, dy`` (px), their standard errors ``dx_err, dy_err``, ``n``.
    """
    if len(stars) == 0:
        return {"dx": 0.0, "dy": 0.0, "dx_err": float("nan"), "dy_err": float("nan"), "n": 0}
    n = len(stars)
    on = np.broadcast_to(np.asarray(offset_new, float).reshape(-1, 2), (n, 2))
    orf = np.broadcast_to(np.asarray(offset_ref, float).reshape(-1, 2), (n, 2))
    ddx = (np.asarray(stars["x_new"]) - on[:, 0]) - (np.asarray(stars["x_ref"]) - orf[:, 0])
    ddy = (np.asarray(stars["y_new"]) - on[:, 1]) - (np.asarray(stars["y_ref"]) - orf[:, 1])
    snr = np.minimum(np.asarray(stars["flux_new"]) / np.asarray(stars["err_new"]),
                     np.asarray(stars["flux_ref"]) / np.asarray(stars["err_ref"]))
    good = snr > min_snr
    if good.sum() < 3:
        good = snr > 5
    wgt = np.minimum(snr, 300.0) ** 2
    out = {}
    for key, d in (("dx", ddx), ("dy", ddy)):
        mean, med, std, nk = sigma_clipped_stats(np.where(good, d, np.nan), nsigma=nsigma, weights=wgt)
        out[key] = float(mean) if nk else 0.0
        out[key + "_err"] = float(std / np.sqrt(nk)) if nk > 1 else float("nan")
        out["n"] = int(nk)
    return out
