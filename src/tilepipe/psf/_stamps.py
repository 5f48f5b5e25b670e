"""Stamp machinery shared by star selection, PSF building and PSF photometry.

* :func:`extract_stamps`: the **map** step: every tile reads its outer box
  (image, mask, variance and ``background`` when present) and cuts the stamps
  of the stars it owns; the stamps are gathered on the client.
* :func:`fourier_shift`: sub-pixel shifts (and their derivatives) by the
  Fourier shift theorem, exact for band-limited stamps.
* :func:`windowed_centroid`, :func:`local_background`, :func:`half_max_fwhm`,
  :func:`monomials`: small measurements on stamps.

Conventions: 0-based pixels, pixel centres at integers, arrays ``[y, x]``,
mask True = bad.  A stamp of odd side ``n`` cut around integer pixel
``(ix, iy)`` has that pixel at index ``(n // 2, n // 2)``.
"""

from __future__ import annotations

import logging
from typing import Any

import dask
import numpy as np

log = logging.getLogger(__name__)

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


# ----------------------------------------------------------------- extraction
def _cut_tile(img, msk, var, bkg, origin, xs, ys, half):
    """Cut ``(2 half + 1)^2`` stamps around ``round(x), round(y)`` (global) from one outer box."""
    img = np.asarray(img, dtype=np.float32)
    msk = np.asarray(msk, dtype=bool)
    var = np.asarray(var, dtype=np.float32)
    if bkg is not None:
        bkg = np.asarray(bkg, dtype=np.float32)
        img = img - bkg
    n = 2 * half + 1
    k = len(xs)
    out_i = np.zeros((k, n, n), np.float32)
    out_b = np.zeros((k, n, n), np.float32)
    out_m = np.ones((k, n, n), bool)
    out_v = np.zeros((k, n, n), np.float32)
    inside = np.zeros(k, bool)
    y0, x0 = origin
    h, w = img.shape
    for j in range(k):
        cx = int(np.floor(xs[j] + 0.5)) - x0
        cy = int(np.floor(ys[j] + 0.5)) - y0
        xa, xb = cx - half, cx + half + 1
        ya, yb = cy - half, cy + half + 1
        sxa, sxb, sya, syb = max(xa, 0), min(xb, w), max(ya, 0), min(yb, h)
        if sxa >= sxb or sya >= syb:
            continue
        out_i[j, sya - ya:syb - ya, sxa - xa:sxb - xa] = img[sya:syb, sxa:sxb]
        out_m[j, sya - ya:syb - ya, sxa - xa:sxb - xa] = msk[sya:syb, sxa:sxb]
        out_v[j, sya - ya:syb - ya, sxa - xa:sxb - xa] = var[sya:syb, sxa:sxb]
        if bkg is not None:
            out_b[j, sya - ya:syb - ya, sxa - xa:sxb - xa] = bkg[sya:syb, sxa:sxb]
        inside[j] = (xa >= 0) and (ya >= 0) and (xb <= w) and (yb <= h)
    bad = ~np.isfinite(out_i) | ~np.isfinite(out_v) | (out_v <= 0)
    out_m |= bad
    out_i[bad] = 0.0
    out_v[bad] = np.inf
    out_v[out_m] = np.inf
    return out_i, out_m, out_v, out_b, inside


def extract_stamps(ds: Any, x: np.ndarray, y: np.ndarray, half: int, *, nx: int = 1, ny: int | None = None,
                   overlap: int | None = None) -> dict[str, np.ndarray]:
    """Cut stamps around ``(x, y)`` tile by tile and gather them (map -> reduce).

    Each tile reads only its outer box and cuts the stamps of the stars it
    owns (half-open core rule), so no task holds the whole image.  With
    ``overlap >= half`` the stamps do not depend on the tiling.

    Returns a dict with ``image`` (background-subtracted when the Dataset has a
    ``background`` variable; 0 at bad pixels), ``background`` (the subtracted
    background stamps, image units; 0 without a ``background`` variable, so
    ``image + background`` is the raw image at good pixels), ``mask``,
    ``variance`` (inf where masked), ``complete`` (stamp fully inside the
    image), ``ix, iy`` (integer centres).
    """
    from ..tiling import TileGrid

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    shape = tuple(ds["image"].shape)
    if overlap is None:
        overlap = half + 1
    grid = TileGrid(shape, nx=nx, ny=ny, overlap=overlap)
    if grid.nx > 1 or grid.ny > 1:
        grid._check_engine()
    n = 2 * half + 1
    N = len(x)
    res_i = np.zeros((N, n, n), np.float32)
    res_m = np.ones((N, n, n), bool)
    res_v = np.full((N, n, n), np.inf, np.float32)
    res_b = np.zeros((N, n, n), np.float32)
    complete = np.zeros(N, bool)
    owner = grid.owner(x, y) if N else np.zeros(0, int)
    img = ds["image"].data
    msk = ds["mask"].data
    var = ds["variance"].data
    bkg = ds["background"].data if "background" in ds else None
    tasks, groups = [], []
    cut = dask.delayed(_cut_tile, pure=True)
    for t in grid.tiles:
        idx = np.nonzero(owner == t.index)[0]
        if idx.size == 0:
            continue
        b = bkg[t.outer] if bkg is not None else None
        tasks.append(cut(img[t.outer], msk[t.outer], var[t.outer], b, t.origin, x[idx], y[idx], half))
        groups.append((t, idx))
    results = dask.compute(*tasks) if tasks else []
    for (t, idx), (si, sm, sv, sb, ins) in zip(groups, results):
        res_i[idx], res_m[idx], res_v[idx], res_b[idx] = si, sm, sv, sb
        # a stamp cut by the outer box but not by the image edge means overlap < half
        oy0, ox0 = t.origin
        oh, ow = t.outer_shape
        ix = np.floor(x[idx] + 0.5).astype(int)
        iy = np.floor(y[idx] + 0.5).astype(int)
        in_image = (ix - half >= 0) & (iy - half >= 0) & (ix + half < shape[1]) & (iy + half < shape[0])
        complete[idx] = ins & in_image
        if np.any(~ins & in_image):
            log.warning("%d stamps cut by the halo of tile %d: use overlap >= %d", int(np.sum(~ins & in_image)),
                        t.index, half)
    return {
        "image": res_i,
        "mask": res_m,
        "variance": res_v,
        "background": res_b,
        "complete": complete,
        "ix": np.floor(x + 0.5).astype(np.int64),
        "iy": np.floor(y + 0.5).astype(np.int64),
    }


# -------------------------------------------------------------------- shifts
def _freqs(n: int) -> np.ndarray:
    f = np.fft.fftfreq(n)
    if n % 2 == 0:
        f[n // 2] = 0.0  # drop the ambiguous Nyquist phase for even sizes
    return f


def fourier_shift(stamps: np.ndarray, dx: Any, dy: Any, *, derivatives: bool = False):
    """Shift stamp content by ``(dx, dy)`` pixels (positive moves it to +x/+y).

    Uses the Fourier shift theorem (sinc interpolation: exact for band-limited,
    i.e. Nyquist-sampled, images; periodic at the borders, so stamps should
    fade to ~0 at their edges).  ``stamps`` is ``(..., h, w)``; ``dx, dy``
    broadcast against the leading axes.  With ``derivatives=True`` also
    returns ``d shifted / d dx`` and ``d shifted / d dy``.
    """
    s = np.asarray(stamps, dtype=np.float64)
    h, w = s.shape[-2:]
    fy = _freqs(h)[:, None]
    fx = _freqs(w)[None, :]
    dx = np.asarray(dx, dtype=np.float64)[..., None, None]
    dy = np.asarray(dy, dtype=np.float64)[..., None, None]
    F = np.fft.fft2(s)
    phase = np.exp(-2j * np.pi * (fx * dx + fy * dy))
    G = F * phase
    out = np.fft.ifft2(G).real
    if not derivatives:
        return out
    ddx = np.fft.ifft2(G * (-2j * np.pi * fx)).real
    ddy = np.fft.ifft2(G * (-2j * np.pi * fy)).real
    return out, ddx, ddy


def upsample(stamp: np.ndarray, factor: int, deconvolve_pixel: bool = False) -> np.ndarray:
    """Fourier (sinc) upsampling of an odd-sized stamp by an integer factor.

    The output has side ``n * factor`` (adjusted to odd) with the input's
    central pixel at the output's central pixel; values are intensities per
    input pixel (not renormalised).  With ``deconvolve_pixel`` the pixel
    response (a unit box, transfer function ``sinc(k)``) is divided out, giving
    the continuous profile (stable for Nyquist-sampled stamps: ``sinc >= 2/pi``
    inside the band).
    """
    n = stamp.shape[-1]
    m = n * factor
    if m % 2 == 0:
        m -= 1
    c_in = n // 2
    c_out = m // 2
    u = (np.arange(m) - c_out) / factor  # output sample offsets in input pixels
    # separable sinc interpolation via DFT matrices (periodic, exact for band-limited)
    k = np.fft.fftfreq(n)
    idx = np.arange(n) - c_in
    # M[u, j] = (1/n) sum_k exp(2 pi i k (u - idx_j))
    E = np.exp(2j * np.pi * np.outer(u, k))  # (m, n)
    Finv = np.exp(-2j * np.pi * np.outer(k, idx)) / n  # (n, n)
    if deconvolve_pixel:
        Finv = Finv / np.sinc(k)[:, None]
    M = (E @ Finv).real
    return M @ stamp @ M.T


# ------------------------------------------------------------- measurements
def local_background(stamps: np.ndarray, masks: np.ndarray, width: int = 2) -> np.ndarray:
    """Sigma-clipped median of each stamp's border ring of ``width`` pixels."""
    n = stamps.shape[-1]
    ring = np.zeros((n, n), bool)
    ring[:width] = ring[-width:] = True
    ring[:, :width] = ring[:, -width:] = True
    vals = np.where(masks[:, ring], np.nan, stamps[:, ring]).astype(np.float64)
    out = np.zeros(len(stamps))
    for _ in range(3):
        med = np.nanmedian(vals, axis=1) if vals.size else out
        mad = 1.4826 * np.nanmedian(np.abs(vals - med[:, None]), axis=1) if vals.size else out
        mad = np.where(np.isfinite(mad) & (mad > 0), mad, np.inf)
        vals = np.where(np.abs(vals - med[:, None]) > 3 * mad[:, None], np.nan, vals)
        out = med
    return np.where(np.isfinite(out), out, 0.0)


def windowed_centroid(stamps: np.ndarray, masks: np.ndarray, sigma: Any, x0: Any = None, y0: Any = None,
                      niter: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-windowed centroids (SExtractor ``XWIN``-like, iterative).

    ``stamps`` ``(N, h, w)`` background-subtracted; ``sigma`` the window width
    (px, scalar or per stamp).  Returns ``(xc, yc)`` in stamp pixel coordinates.
    """
    N, h, w = stamps.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    xc = np.full(N, (w - 1) / 2.0) if x0 is None else np.asarray(x0, np.float64).copy()
    yc = np.full(N, (h - 1) / 2.0) if y0 is None else np.asarray(y0, np.float64).copy()
    sig = np.broadcast_to(np.asarray(sigma, np.float64), (N,))
    data = np.where(masks, 0.0, stamps).astype(np.float64)
    for _ in range(niter):
        r2 = (xx[None] - xc[:, None, None]) ** 2 + (yy[None] - yc[:, None, None]) ** 2
        wgt = np.exp(-0.5 * r2 / sig[:, None, None] ** 2) * data
        s = wgt.sum(axis=(1, 2))
        ok = s > 0
        nxc = np.where(ok, (wgt * xx).sum(axis=(1, 2)) / np.where(ok, s, 1), xc)
        nyc = np.where(ok, (wgt * yy).sum(axis=(1, 2)) / np.where(ok, s, 1), yc)
        # windowed centroid converges to the true centre with the 2x correction of SExtractor
        nxc = xc + 2.0 * (nxc - xc)
        nyc = yc + 2.0 * (nyc - yc)
        nxc = np.clip(nxc, 0, w - 1)
        nyc = np.clip(nyc, 0, h - 1)
        done = np.max(np.abs(nxc - xc), initial=0) < 1e-4 and np.max(np.abs(nyc - yc), initial=0) < 1e-4
        xc, yc = nxc, nyc
        if done:
            break
    return xc, yc


def moments(stamps: np.ndarray, masks: np.ndarray, xc: np.ndarray, yc: np.ndarray, radius: float):
    """Second moments within a circular aperture: returns ``a, b, theta`` (px, px, rad)."""
    N, h, w = stamps.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dx = xx[None] - xc[:, None, None]
    dy = yy[None] - yc[:, None, None]
    inap = (dx * dx + dy * dy) <= radius * radius
    d = np.where(masks | ~inap, 0.0, np.clip(stamps, 0, None)).astype(np.float64)
    s = d.sum(axis=(1, 2))
    s = np.where(s > 0, s, np.nan)
    mxx = (d * dx * dx).sum(axis=(1, 2)) / s
    myy = (d * dy * dy).sum(axis=(1, 2)) / s
    mxy = (d * dx * dy).sum(axis=(1, 2)) / s
    t1 = (mxx + myy) / 2
    t2 = np.sqrt(((mxx - myy) / 2) ** 2 + mxy**2)
    a = np.sqrt(np.clip(t1 + t2, 0, None))
    b = np.sqrt(np.clip(t1 - t2, 0, None))
    theta = 0.5 * np.arctan2(2 * mxy, mxx - myy)
    return a, b, theta


def half_max_fwhm(stamp: np.ndarray, up: int = 8, deconvolve_pixel: bool = True) -> float:
    """FWHM (px) of a pixel-sampled stamp: ``2 sqrt(A / pi)`` of its half-maximum area.

    The stamp is Fourier-upsampled ``up`` times first, by default with the
    pixel response divided out, so the value is the FWHM of the continuous
    (pre-pixel) profile; for an elliptical profile it is the geometric mean
    ``sqrt(fwhm_major * fwhm_minor)``.
    """
    s = np.asarray(stamp, np.float64)
    n = s.shape[-1]
    c = n // 2
    r = min(c, max(6, c // 2 + 3))
    core = s[c - r:c + r + 1, c - r:c + r + 1]
    fine = upsample(core, up, deconvolve_pixel)
    peak = fine.max()
    if not np.isfinite(peak) or peak <= 0:
        return float("nan")
    above = fine >= 0.5 * peak
    # keep the connected region around the centre only
    from scipy import ndimage

    lab, _ = ndimage.label(above)
    cc = lab[fine.shape[0] // 2, fine.shape[1] // 2]
    if cc == 0:
        cc = lab.flat[np.argmax(fine)]
    area = np.count_nonzero(lab == cc) / float(up * up)
    return float(2.0 * np.sqrt(area / np.pi))


# -------------------------------------------------------------- polynomials
def monomials(xn: Any, yn: Any, degree: int) -> np.ndarray:
    """Monomials ``xn^i yn^j`` with ``i + j <= degree``, shape ``(N, n_terms)``.

    Order: degree by degree, ``x`` powers decreasing (1, x, y, x^2, xy, y^2...).
    """
    xn = np.atleast_1d(np.asarray(xn, np.float64))
    yn = np.atleast_1d(np.asarray(yn, np.float64))
    cols = []
    for d in range(degree + 1):
        for j in range(d + 1):
            cols.append(xn ** (d - j) * yn**j)
    return np.stack(cols, axis=-1)


def n_terms(degree: int) -> int:
    """Number of monomials of total degree <= ``degree``."""
    return (degree + 1) * (degree + 2) // 2
