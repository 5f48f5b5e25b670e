"""Transient candidates from a subtraction result, merged across tiles by ownership.

:func:`find_transients` works on the output of both methods of
:func:`tilepipe.subtract`:

* detection image: ``scorr`` (ZOGY's S_corr, Zackay et al. 2016 Eq. 25) when
  present, else ``scaled`` (SFFT's noise-normalised difference);
* flux: ``fpsf`` / ``fpsf_err`` (ZOGY Eqs. 41-43) at the peak pixel when
  present, else a PSF-weighted flux on ``diff`` with its ``noise`` map, using
  ``diff_psf`` of the tile when present and a Gaussian of the image FWHM
  otherwise.

Peaks are local extrema of the detection image with ``|value| >= nsigma``
(positive: brighter in new; negative: brighter in ref).  Each tile finds the
peaks of its outer box; the engine (:func:`tilepipe.map_tiles_table`) keeps
those whose peak pixel lies in the tile's core, so each candidate appears
once.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import xarray as xr
from astropy.table import Table
from scipy import ndimage

from .._validate import check_int, check_positive
from ..tiling import TileGrid, map_tiles_table

log = logging.getLogger(__name__)

__all__ = ["find_transients", "plot_candidates"]

#: flag bits of the ``flags`` column
FLAG_MASKED = 1  #: a masked (bad) pixel lies within ``radius`` px of the peak
FLAG_EDGE = 2  #: the peak is within ``radius`` px of the image edge
FLAG_NEGATIVE = 4  #: negative candidate (brighter in the reference)


def _gauss_stamp(fwhm: float) -> np.ndarray:
    s = max(fwhm, 0.8) / 2.3548
    r = int(np.ceil(3 * s))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    p = np.exp(-(xx * xx + yy * yy) / (2 * s * s))
    return p / p.sum()


def _subpixel(det: np.ndarray, y: int, x: int) -> tuple[float, float]:
    """Parabolic sub-pixel refinement of an extremum of ``det`` at ``[y, x]``."""
    h, w = det.shape
    out = []
    for (a, b, c), lim in (((det[y - 1, x], det[y, x], det[y + 1, x]) if 0 < y < h - 1 else (0, 0, 0), y),
                           ((det[y, x - 1], det[y, x], det[y, x + 1]) if 0 < x < w - 1 else (0, 0, 0), x)):
        d = a - 2 * b + c
        off = 0.5 * (a - c) / d if np.isfinite(d) and d != 0 else 0.0
        out.append(float(np.clip(off, -0.5, 0.5)) if np.isfinite(off) else 0.0)
    return y + out[0], x + out[1]


def _find_block(det, a, b, mask, *, tile, nsigma, radius, mode, psfs, shape):
    """Tile function: candidates of one outer box (local coordinates)."""
    det = np.asarray(det, dtype=np.float64)
    bad = np.asarray(mask, dtype=bool) | ~np.isfinite(det)
    d = np.where(bad, 0.0, det)
    size = 2 * radius + 1
    rows = []
    y0, x0 = tile.origin
    for sign in (1.0, -1.0):
        sd = sign * d
        peaks = (sd >= nsigma) & (sd == ndimage.maximum_filter(sd, size=size, mode="constant", cval=-np.inf))
        ys, xs = np.nonzero(peaks)
        for y, x in zip(ys, xs):
            yf, xf = _subpixel(sd, y, x)
            if mode == "fpsf":
                flux, err = _peak_value(np.asarray(a, dtype=np.float64), y, x), float(b[y, x])
            else:
                p = psfs[tile.index] if psfs is not None else None
                flux, err = _psf_flux(a, b, bad, y, x, p)
            flags = 0
            win = bad[max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1]
            if np.asarray(mask, dtype=bool)[max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1].any() or win.sum() > 1:
                flags |= FLAG_MASKED
            gy, gx = y + y0, x + x0
            if gy < radius or gx < radius or gy >= shape[0] - radius or gx >= shape[1] - radius:
                flags |= FLAG_EDGE
            if sign < 0:
                flags |= FLAG_NEGATIVE
            snr = flux / err if err > 0 and np.isfinite(err) else float("nan")
            rows.append((xf, yf, float(det[y, x]), flux, err, snr, flags))
    cols = ("x", "y", "scorr_peak", "flux", "flux_err", "snr", "flags")
    if not rows:
        t = Table({c: np.zeros(0) for c in cols})
        t["flags"] = t["flags"].astype(np.int32)
        return t
    arr = list(zip(*rows))
    t = Table({c: np.asarray(v) for c, v in zip(cols, arr)})
    t["flags"] = t["flags"].astype(np.int32)
    return t


def _peak_value(img: np.ndarray, y: int, x: int) -> float:
    """Value at the sub-pixel extremum of ``img`` near ``[y, x]`` (separable parabola through 3x3).

    ``Fpsf = S / F_S`` peaks at the source position; sampled at the nearest
    pixel it is biased low by up to a few percent (pixel phase), so the peak
    of the interpolating parabola along each axis is used.
    """
    h, w = img.shape
    v = float(img[y, x])
    if not np.isfinite(v):
        return v
    # the detection peak can sit one pixel off the flux peak (noise, variance map): move to the
    # extremum of ``img`` (same sign) within the 3x3 neighbourhood first
    win = img[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
    if np.isfinite(win).all():
        k = np.argmax(win) if v >= 0 else np.argmin(win)
        y, x = max(0, y - 1) + k // win.shape[1], max(0, x - 1) + k % win.shape[1]
        v = float(img[y, x])
    corr = 0.0
    for a, c in (((img[y - 1, x], img[y + 1, x]) if 0 < y < h - 1 else (np.nan, np.nan)),
                 ((img[y, x - 1], img[y, x + 1]) if 0 < x < w - 1 else (np.nan, np.nan))):
        d = a - 2 * v + c
        if np.isfinite(d) and d != 0 and np.sign(d) == -np.sign(v):
            off = 0.5 * (a - c) / d
            if abs(off) <= 0.5:
                corr += -(a - c) ** 2 / (8 * d)
    return v + corr


def _psf_flux(diff: np.ndarray, noise: np.ndarray, bad: np.ndarray, y: int, x: int, p: np.ndarray) -> tuple[float, float]:
    """PSF-weighted flux ``sum(P d / s^2) / sum(P^2 / s^2)`` on a stamp around ``[y, x]``."""
    r = p.shape[0] // 2
    h, w = diff.shape
    ya, yb, xa, xb = max(0, y - r), min(h, y + r + 1), max(0, x - r), min(w, x + r + 1)
    pp = p[ya - y + r:yb - y + r, xa - x + r:xb - x + r]
    dd = np.asarray(diff[ya:yb, xa:xb], dtype=np.float64)
    ss = np.asarray(noise[ya:yb, xa:xb], dtype=np.float64) ** 2
    ok = ~bad[ya:yb, xa:xb] & np.isfinite(dd) & np.isfinite(ss) & (ss > 0)
    if not ok.any():
        return float("nan"), float("nan")
    wgt = np.where(ok, pp / np.where(ok, ss, 1.0), 0.0)
    norm = float((wgt * pp).sum())
    if norm <= 0:
        return float("nan"), float("nan")
    flux = float((wgt * np.where(ok, dd, 0.0)).sum() / norm)
    return flux, float(1.0 / np.sqrt(norm))


def _res_grid(res: xr.Dataset, overlap: int) -> TileGrid:
    shape = res["diff"].shape
    g = res.attrs.get("grid")
    if isinstance(g, dict) and "nx" in g:
        nx, ny = int(g["nx"]), int(g["ny"])
    else:
        chunks = getattr(res["diff"].data, "chunks", None)
        ny, nx = (len(chunks[0]), len(chunks[1])) if chunks else (1, 1)
    while nx > 1 and shape[1] // nx < 2 * overlap:
        nx -= 1
    while ny > 1 and shape[0] // ny < 2 * overlap:
        ny -= 1
    return TileGrid(shape, nx=nx, ny=ny, overlap=overlap)


def find_transients(
    res: xr.Dataset,
    nsigma: float = 5.0,
    *,
    radius: int | None = None,
    flag_masked: bool = True,
    plot: str | None = None,
    max_plot: int = 40,
    new: Any = None,
    ref: Any = None,
) -> Table:
    """Transient candidates (positive and negative) of a subtraction result.

    Parameters
    ----------
    res : xarray.Dataset
        Output of :func:`tilepipe.subtract` (ZOGY: ``scorr``, ``fpsf``,
        ``fpsf_err``; SFFT: ``scaled``, ``diff``, ``noise``).
    nsigma : float
        Detection threshold on ``|scorr|`` (or ``|scaled|``), in sigma.
    radius : int, optional
        Minimum separation of two candidates and the radius of the mask and
        edge checks, px (default: the larger FWHM of the pair, at least 2).
    flag_masked : bool
        Keep candidates next to masked pixels, with flag bit 1 (True), or
        drop them (False).
    plot : str, optional
        Path of a PNG with (new, ref, diff) cutouts of the candidates (at most
        ``max_plot``, strongest first).
    new, ref : array-like, optional
        Images for the cutouts (default: ``res["new"]``/``res["ref"]`` when
        present).

    Returns
    -------
    astropy.table.Table
        ``id, x, y`` (global 0-based px in the new image's frame: the
        sub-pixel peak of the detection image plus ``res.attrs["frame_offset"]``), ``ra, dec`` (deg; NaN without WCS), ``scorr_peak`` (signed
        peak value), ``flux, flux_err`` (new image units), ``snr``,
        ``flags`` (1 masked nearby, 2 image edge, 4 negative), ``tile``.
        Sorted by (y, x); meta holds the threshold and method.
    """
    if not isinstance(res, xr.Dataset):
        raise TypeError(f"res must be the Dataset returned by tilepipe.subtract; got {type(res).__name__}")
    nsigma = check_positive("nsigma", nsigma)
    if "scorr" in res:
        det_name = "scorr"
    elif "scaled" in res:
        det_name = "scaled"
    else:
        raise ValueError(f"res has neither 'scorr' nor 'scaled' (it has {list(res.data_vars)}); pass the output of tilepipe.subtract")
    fw = max(float(res.attrs.get("fwhm_new", 0) or 0), float(res.attrs.get("fwhm_ref", 0) or 0),
             float(res.attrs.get("fwhm", 0) or 0))
    if fw <= 0:
        fw = 3.0
    radius = max(2, int(round(fw))) if radius is None else check_int("radius", radius, lower=1)
    psfs = None
    if "fpsf" in res and "fpsf_err" in res:
        mode = "fpsf"
        a, b = res["fpsf"].data, res["fpsf_err"].data
    else:
        if "diff" not in res or "noise" not in res:
            raise ValueError("res needs 'fpsf'/'fpsf_err' or 'diff'/'noise' for the candidates' fluxes")
        mode = "psf"
        a, b = res["diff"].data, res["noise"].data
    mask = res["mask"].data if "mask" in res else np.zeros(res[det_name].shape, bool)
    halo = radius + 2
    if mode == "psf":
        if "diff_psf" in res:
            psfs = [np.asarray(p, dtype=np.float64) for p in np.asarray(res["diff_psf"].values)]
            halo = max(halo, psfs[0].shape[0] // 2 + 1)
        else:
            psfs = None
    grid = _res_grid(res, halo)
    if mode == "psf" and (psfs is None or len(psfs) != grid.ntiles):
        psfs = [_gauss_stamp(fw)] * grid.ntiles
    shape = tuple(res[det_name].shape)
    t = map_tiles_table(_find_block, res[det_name].data, a, b, mask, grid=grid, nsigma=float(nsigma),
                        radius=radius, mode=mode, psfs=psfs, shape=shape)
    if len(t) == 0:
        t = Table({c: np.zeros(0) for c in ("id", "x", "y", "scorr_peak", "flux", "flux_err", "snr", "flags", "tile")})
        t["id"] = t["id"].astype(np.int64)
        t["flags"] = t["flags"].astype(np.int32)
        t["tile"] = t["tile"].astype(np.int32)
    off = res.attrs.get("frame_offset", [0.0, 0.0])
    if len(t) and (off[0] or off[1]):
        t["x"] = np.asarray(t["x"], dtype=np.float64) + float(off[0])
        t["y"] = np.asarray(t["y"], dtype=np.float64) + float(off[1])
    if not flag_masked and len(t):
        t = t[(np.asarray(t["flags"]) & FLAG_MASKED) == 0]
        t["id"] = np.arange(1, len(t) + 1)
    ra = np.full(len(t), np.nan)
    dec = np.full(len(t), np.nan)
    from ..image import has_wcs, pixel_to_radec, wcs

    if len(t) and has_wcs(res):
        ra, dec = pixel_to_radec(wcs(res), t["x"], t["y"])
    t.add_column(ra, name="ra", index=3)
    t.add_column(dec, name="dec", index=4)
    t.meta.update({"nsigma": float(nsigma), "detection": det_name, "flux_from": mode, "radius": radius,
                   "flags": "1=masked pixel nearby, 2=image edge, 4=negative"})
    log.info("find_transients: %d candidates at %.1f sigma", len(t), nsigma)
    if plot is not None:
        plot_candidates(res, t, plot, max_plot=max_plot, new=new, ref=ref)
    return t


def plot_candidates(res: xr.Dataset, cands: Table, path: str, *, max_plot: int = 40, half: int = 15,
                    new: Any = None, ref: Any = None) -> str:
    """Write a PNG of (new, ref, diff) cutouts of the strongest candidates.

    Cutouts are ``2 half + 1`` px, read lazily from the result (only the
    windows are computed).  Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    new = res["new"].data if new is None and "new" in res else new
    ref = res["ref"].data if ref is None and "ref" in res else ref
    panels = [("new", new), ("ref", ref), ("diff", res["diff"].data)]
    panels = [(n, v) for n, v in panels if v is not None]
    order = np.argsort(-np.abs(np.asarray(cands["scorr_peak"], dtype=float)))[:max_plot] if len(cands) else []
    nrow = max(1, len(order))
    fig, axes = plt.subplots(nrow, len(panels), figsize=(2.2 * len(panels), 2.2 * nrow), squeeze=False)
    h, w = res["diff"].shape
    import dask

    windows = []
    for k in order:
        xc, yc = int(round(float(cands["x"][k]))), int(round(float(cands["y"][k])))
        ys, xs = slice(max(0, yc - half), min(h, yc + half + 1)), slice(max(0, xc - half), min(w, xc + half + 1))
        windows.append([arr[ys, xs] for _, arr in panels])
    windows = dask.compute(windows)[0] if windows else []  # one pass over the graph for all cutouts
    for r_i, k in enumerate(order):
        for c_i, (name, _) in enumerate(panels):
            cut = np.asarray(windows[r_i][c_i], dtype=float)
            ax = axes[r_i, c_i]
            finite = cut[np.isfinite(cut)]
            lo, hi = (np.percentile(finite, [1, 99.5]) if finite.size else (0, 1))
            ax.imshow(cut, origin="lower", cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r_i == 0:
                ax.set_title(name)
            if c_i == 0:
                ax.set_ylabel(f"#{int(cands['id'][k])} S={float(cands['scorr_peak'][k]):.1f}", fontsize=7)
    if not len(order):
        axes[0, 0].text(0.5, 0.5, "no candidates", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
