"""PSF star selection: a documented chain of cuts, with the reason of every rejection."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from astropy.table import Table
from scipy.special import ndtr

from .._validate import check_int, check_positive
from ._stamps import FWHM_PER_SIGMA, extract_stamps, half_max_fwhm, local_background, moments, windowed_centroid

__all__ = ["select_stars", "REASONS"]

log = logging.getLogger(__name__)

#: rejection reasons, in the order the chain tests them
REASONS = (
    "dropped",      # index in drop=
    "edge",         # stamp cut by the image edge
    "flags",        # non-zero catalog flags
    "saturated",    # a central pixel reaches the saturation level
    "bad_pixels",   # too many masked pixels near the centre
    "faint",        # flux <= 0, below flux_threshold * mean flux, or S/N < min_snr
    "elongated",    # b/a < q_min
    "fwhm",         # FWHM off the median by more than n_sigma_fwhm robust sigmas (or outside fwhm_range)
    "crowded",      # neighbours put more than `isolate` of the light in the size x size box
    "no_refcat",    # no reference-catalog star within 1.5 FWHM
)


def _positions(ds, stars) -> Table:
    """User star positions (x/y or ra/dec table, or (N, 2) x/y array) as a Table with x, y."""
    if isinstance(stars, Table):
        if {"x", "y"} <= set(stars.colnames):
            return Table({"x": np.asarray(stars["x"], float), "y": np.asarray(stars["y"], float)})
        if {"ra", "dec"} <= set(stars.colnames):
            from ..image import radec_to_pixel, wcs

            px, py = radec_to_pixel(wcs(ds), stars["ra"], stars["dec"])
            return Table({"x": np.asarray(px, float), "y": np.asarray(py, float),
                          "ra": np.asarray(stars["ra"], float), "dec": np.asarray(stars["dec"], float)})
        raise ValueError(f"stars must have x, y (pixels) or ra, dec (degrees) columns; it has {stars.colnames}")
    arr = np.asarray(stars, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise TypeError("stars must be a Table (x, y or ra, dec) or an (N, 2) array of (x, y) pixel positions")
    return Table({"x": arr[:, 0], "y": arr[:, 1]})


def _read_refcat(ds, refcat) -> np.ndarray:
    """Reference-catalog pixel positions ``(M, 2)`` from a file path or Table (x/y or ra/dec)."""
    if isinstance(refcat, (str, os.PathLike)):
        if not os.path.exists(refcat):
            raise ValueError(f"refcat file {refcat!r} does not exist (no network access is attempted)")
        ref = Table.read(refcat)
    elif isinstance(refcat, Table):
        ref = refcat
    else:
        raise TypeError("refcat must be a catalog file path or an astropy Table with x/y or ra/dec columns")
    cols = {c.lower(): c for c in ref.colnames}
    if "x" in cols and "y" in cols:
        return np.column_stack([np.asarray(ref[cols["x"]], float), np.asarray(ref[cols["y"]], float)])
    for ra, dec in (("ra", "dec"), ("raj2000", "dej2000"), ("ra_icrs", "de_icrs")):
        if ra in cols and dec in cols:
            from ..image import radec_to_pixel, wcs

            px, py = radec_to_pixel(wcs(ds), ref[cols[ra]], ref[cols[dec]])
            return np.column_stack([px, py])
    raise ValueError(f"refcat needs x, y or ra, dec columns; it has {ref.colnames}")


def select_stars(
    ds: Any,
    cat: Table | None,
    size: int = 25,
    *,
    flux_threshold: float = 0.02,
    min_snr: float = 20.0,
    q_min: float = 0.6,
    n_sigma_fwhm: float = 3.0,
    fwhm_range: tuple[float, float] | None = None,
    isolate: float = 0.02,
    central_tol: int = 0,
    stars: Any = None,
    drop: Any = None,
    refcat: Any = None,
    plot: str | os.PathLike | None = None,
    saturation: float | None = None,
    nx: int = 1,
    ny: int | None = None,
    overlap: int | None = None,
) -> Table:
    """Select PSF stars from a catalog and say why every other source was rejected.

    Parameters
    ----------
    ds : Dataset, array or path
        The image (:func:`tilepipe.open_image`).
    cat : Table or None
        Sources with global pixel ``x, y`` (0-based); optional ``flux, a, b,
        fwhm, flags, peak`` are used when present, otherwise measured on the
        stamps (local sky from the stamp border, Gaussian-windowed centroid,
        flux within ``size / 2``, second moments, half-maximum FWHM).  May be
        ``None`` when ``stars`` is given.
    size : int
        Stamp side (pixels) used for the cuts (the PSF size).
    flux_threshold : float
        Keep sources brighter than ``flux_threshold * mean flux`` of the
        candidates that passed the edge/flag/saturation/bad-pixel cuts.
    min_snr : float
        And with S/N (flux over the noise of the ``size / 2`` aperture) above this.
    q_min : float
        Smallest axis ratio ``b / a``.
    n_sigma_fwhm : float
        Keep FWHMs within ``n_sigma_fwhm`` robust sigmas (1.4826 MAD) of the median.
    fwhm_range : (float, float), optional
        Explicit FWHM range (pixels), replacing the ``n_sigma_fwhm`` cut.
    isolate : float
        Largest fraction of the light in the ``size x size`` box contributed
        by catalog neighbours (Gaussian profiles of their FWHM, exact box
        integrals).
    central_tol : int
        Most masked pixels allowed within ``0.25 * size`` of the centre.
    stars : Table or (N, 2) array, optional
        User star positions (``x, y`` pixels or ``ra, dec`` degrees with a
        WCS) overriding detection: they are the candidates and only the
        edge, saturation and bad-pixel cuts apply to them.
    drop : sequence of int, optional
        Row indices (of ``cat``, or of ``stars``) to reject (``"dropped"``).
    refcat : path or Table, optional
        A reference catalog (e.g. a Gaia extract; no network): keep only
        sources with a reference star within ``1.5 * FWHM``.
    plot : path, optional
        Write a PNG of kept and rejected stamps (with reasons).
    saturation : float, optional
        Saturation level (image units, raw pixel values as read, i.e. before
        any ``background`` variable is subtracted); default
        ``ds.attrs["saturation"]``.  A source is ``"saturated"`` when a pixel
        within ``0.25 * size`` of its centre reaches ``0.999 * saturation``.
    nx, ny, overlap : int
        Tiles used to cut the stamps (map -> gather); ``overlap`` defaults to
        ``size // 2 + 1``.

    Returns
    -------
    Table
        The input rows (or the user stars) with the measured columns added
        when missing (``flux, a, b, fwhm, peak``) plus ``xc, yc`` (windowed
        centroid), ``sky``, ``snr``, ``q``, ``contamination``, ``keep`` (bool)
        and ``reason`` (``""`` when kept; see :data:`REASONS`, tested in that order).
    """
    from ..image import as_dataset

    ds = as_dataset(ds)
    size = check_int("size", size, lower=3)
    half = size // 2
    flux_threshold = check_positive("flux_threshold", flux_threshold, allow_zero=True)
    min_snr = check_positive("min_snr", min_snr, allow_zero=True)
    q_min = check_positive("q_min", q_min, allow_zero=True)
    n_sigma_fwhm = check_positive("n_sigma_fwhm", n_sigma_fwhm)
    isolate = check_positive("isolate", isolate)
    central_tol = check_int("central_tol", central_tol, lower=0)
    if saturation is None:
        saturation = ds.attrs.get("saturation")
    user = stars is not None
    if user:
        t = _positions(ds, stars)
    else:
        if cat is None:
            raise ValueError("select_stars needs a catalog (cat) or user star positions (stars=)")
        if not isinstance(cat, Table):
            cat = Table(cat)
        if not {"x", "y"} <= set(cat.colnames):
            raise ValueError(f"cat must have 'x' and 'y' columns (global pixels); it has {cat.colnames}")
        t = Table(cat, copy=True)
    n = len(t)
    reason = np.full(n, "", dtype="U12")

    def reject(cond, why):
        cond = np.asarray(cond, bool) & (reason == "")
        reason[cond] = why

    if n == 0:
        t["keep"] = np.zeros(0, bool)
        t["reason"] = reason
        return t
    x = np.asarray(t["x"], float)
    y = np.asarray(t["y"], float)
    st = extract_stamps(ds, x, y, half, nx=nx, ny=ny, overlap=overlap)
    img, msk, var = st["image"].astype(np.float64), st["mask"], st["variance"].astype(np.float64)
    sky = local_background(img, msk)
    sub = img - sky[:, None, None]
    fwhm0 = None
    if "fwhm" in t.colnames:
        f = np.asarray(t["fwhm"], float)
        f = f[np.isfinite(f) & (f > 0)]
        fwhm0 = float(np.median(f)) if f.size else None
    if fwhm0 is None:
        fwhm0 = float(ds.attrs.get("fwhm") or 3.0)
    xc, yc = windowed_centroid(sub, msk, fwhm0 / FWHM_PER_SIGMA)
    yy, xx = np.mgrid[0:size, 0:size]
    rr = np.hypot(xx[None] - half, yy[None] - half)
    ap = rr <= half
    good_pix = ~msk & ap
    flux_m = np.where(good_pix, sub, 0.0).sum(axis=(1, 2))
    noise = np.sqrt(np.where(good_pix & np.isfinite(var), var, 0.0).sum(axis=(1, 2)))
    snr = np.where(noise > 0, flux_m / np.where(noise > 0, noise, 1), 0.0)
    if "flux" not in t.colnames:
        t["flux"] = flux_m
    if "a" not in t.colnames or "b" not in t.colnames:
        a, b, _ = moments(sub, msk, xc, yc, max(3.0, 2.0 * fwhm0))
        t["a"], t["b"] = a, b
    if "fwhm" not in t.colnames:
        cen = np.where(msk, 0.0, sub)
        t["fwhm"] = [half_max_fwhm(s, up=4) if np.isfinite(s).all() and s.max() > 0 else np.nan for s in cen]
    if "peak" not in t.colnames:
        t["peak"] = sub[:, half - 1:half + 2, half - 1:half + 2].max(axis=(1, 2))
    t["xc"] = st["ix"] + (xc - half)
    t["yc"] = st["iy"] + (yc - half)
    t["sky"] = sky
    t["snr"] = snr
    flux = np.asarray(t["flux"], float)
    a_ = np.asarray(t["a"], float)
    b_ = np.asarray(t["b"], float)
    q = np.where(a_ > 0, b_ / np.where(a_ > 0, a_, 1), 0.0)
    t["q"] = q
    fw = np.asarray(t["fwhm"], float)

    # 1-5: hard cuts
    if drop is not None:
        d = np.zeros(n, bool)
        idx = np.asarray(drop, dtype=int).ravel()
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise ValueError(f"drop indices must be within 0..{n - 1}; got {idx.tolist()}")
        d[idx] = True
        reject(d, "dropped")
    reject(~st["complete"], "edge")
    if not user and "flags" in t.colnames:
        reject(np.asarray(t["flags"]) != 0, "flags")
    r_c = 0.25 * size
    central = (rr <= r_c)[0]
    if saturation is not None:
        # raw pixel values (image units): extract_stamps subtracted ds["background"] when present,
        # and the saturation level applies to the pixels as read, so add it back
        raw = img[:, central] + st["background"][:, central].astype(np.float64)
        sat = np.nanmax(np.where(np.isfinite(raw), raw, -np.inf), axis=1) >= 0.999 * float(saturation)
        reject(sat, "saturated")
    if "saturated" in t.colnames:
        reject(np.asarray(t["saturated"], bool), "saturated")
    nbad = msk[:, central].sum(axis=1)
    reject(nbad > central_tol, "bad_pixels")

    if not user:
        alive = reason == ""
        reject(~(flux > 0) | ~np.isfinite(flux), "faint")
        alive = reason == ""
        if alive.any():
            mean_flux = float(np.mean(flux[alive]))
            reject(flux < flux_threshold * mean_flux, "faint")
        reject(snr < min_snr, "faint")
        reject(~np.isfinite(q) | (q < q_min), "elongated")
        alive = (reason == "") & np.isfinite(fw)
        reject(~np.isfinite(fw), "fwhm")
        if fwhm_range is not None:
            lo, hi = float(fwhm_range[0]), float(fwhm_range[1])
            if not 0 <= lo < hi:
                raise ValueError(f"fwhm_range must be (low, high) with 0 <= low < high pixels; got {fwhm_range!r}")
            reject((fw < lo) | (fw > hi), "fwhm")
        elif alive.sum() >= 3:
            med = float(np.median(fw[alive]))
            sig = 1.4826 * float(np.median(np.abs(fw[alive] - med)))
            sig = max(sig, 0.02 * med)
            reject(np.abs(fw - med) > n_sigma_fwhm * sig, "fwhm")

    # isolation: light of catalog neighbours falling into the star's box
    contam = np.zeros(n)
    nb = cat if (user and cat is not None) else (None if user else t)
    if nb is not None and len(nb) > 1:
        nbx = np.asarray(nb["x"], float)
        nby = np.asarray(nb["y"], float)
        nbf = np.asarray(nb["flux"], float) if "flux" in nb.colnames else np.ones(len(nb))
        nbw = np.asarray(nb["fwhm"], float) if "fwhm" in nb.colnames else np.full(len(nb), fwhm0)
        nbw = np.where(np.isfinite(nbw) & (nbw > 0), nbw, fwhm0)
        nbf = np.where(np.isfinite(nbf) & (nbf > 0), nbf, 0.0)
        from scipy.spatial import cKDTree

        tree = cKDTree(np.column_stack([nbx, nby]))
        reach = half * np.sqrt(2) + 4 * float(np.max(nbw)) / FWHM_PER_SIGMA + 1
        lists = tree.query_ball_point(np.column_stack([x, y]), r=reach)
        for i, js in enumerate(lists):
            js = np.asarray(js, int)
            d2 = (nbx[js] - x[i]) ** 2 + (nby[js] - y[i]) ** 2
            js = js[d2 > 0.25]  # the star itself
            if js.size == 0:
                continue
            s = nbw[js] / FWHM_PER_SIGMA
            fxr = ndtr((x[i] + half + 0.5 - nbx[js]) / s) - ndtr((x[i] - half - 0.5 - nbx[js]) / s)
            fyr = ndtr((y[i] + half + 0.5 - nby[js]) / s) - ndtr((y[i] - half - 0.5 - nby[js]) / s)
            c = float(np.sum(nbf[js] * fxr * fyr))
            own = max(flux[i], 0.0) if np.isfinite(flux[i]) else 0.0
            contam[i] = c / (c + own) if c + own > 0 else 1.0
        if not user:
            reject(contam > isolate, "crowded")
    t["contamination"] = contam

    if refcat is not None:
        ref = _read_refcat(ds, refcat)
        alive = reason == ""
        fwm = float(np.median(fw[alive & np.isfinite(fw)])) if np.any(alive & np.isfinite(fw)) else fwhm0
        radius = 1.5 * fwm
        if len(ref):
            from scipy.spatial import cKDTree

            dist, _ = cKDTree(ref).query(np.column_stack([x, y]), k=1)
        else:
            dist = np.full(n, np.inf)
        reject(dist > radius, "no_refcat")

    t["keep"] = reason == ""
    t["reason"] = reason
    log.info("select_stars: kept %d of %d sources", int(t["keep"].sum()), n)
    if plot is not None:
        _plot_selection(plot, sub, t)
    return t


def _plot_selection(path, stamps, t, max_each: int = 40) -> None:
    """PNG of up to ``max_each`` kept and rejected stamps, titled with their reason."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keep = np.nonzero(np.asarray(t["keep"]))[0][:max_each]
    rej = np.nonzero(~np.asarray(t["keep"]))[0][:max_each]
    items = [(i, True) for i in keep] + [(i, False) for i in rej]
    ncol = 10
    nrow = max(1, -(-len(items) // ncol))
    fig = Figure(figsize=(ncol * 1.2, nrow * 1.35))
    FigureCanvasAgg(fig)
    for k, (i, kept) in enumerate(items):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        s = stamps[i]
        lo, hi = np.nanpercentile(s, [5, 99.5]) if np.isfinite(s).any() else (0, 1)
        ax.imshow(np.arcsinh((s - lo) / max(hi - lo, 1e-9) * 10), origin="lower", cmap="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        for sp in ax.spines.values():
            sp.set_color("lime" if kept else "red")
            sp.set_linewidth(2)
        ax.set_title("kept" if kept else str(t["reason"][i]), fontsize=6, color="green" if kept else "red")
    if not items:
        fig.text(0.5, 0.5, "no sources", ha="center")
    fig.suptitle(f"PSF star selection: {len(np.nonzero(np.asarray(t['keep']))[0])} kept (green), "
                 f"{int((~np.asarray(t['keep'])).sum())} rejected (red)", fontsize=8)
    fig.savefig(os.fspath(path), dpi=90)
