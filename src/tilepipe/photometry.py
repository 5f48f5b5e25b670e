"""Aperture and Gaussian-PSF photometry, tile by tile.

Both functions measure each catalog row on the outer box of the tile that
owns it (half-open core rule on ``floor(x + 0.5), floor(y + 0.5)``, see
:meth:`tilepipe.TileGrid.owner`), with a halo at least the measurement's
support radius.  Every pixel a measurement touches is then the same pixel
value as in a whole-image run, so the result does not depend on ``nx, ny``
(bit-identical sums).  The empirical-PSF :func:`tilepipe.psf_photometry` lives
in :mod:`tilepipe.psf`.

Conventions: 0-based pixels, pixel centres at integers, arrays ``[y, x]``,
mask True = bad, fluxes in image units (ADU) summed over pixels.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Sequence

import dask.array as da
import numpy as np
import xarray as xr
from astropy.table import Table

from ._validate import check_choice, check_int, check_positive
from .detect import _MESH, _f32, _meta, _positions, _SEP_LOCK, rows_per_tile
from .exceptions import FallbackWarning
from .tiling import make_grid

__all__ = ["aperture_photometry", "gaussian_psf_photometry", "FLAG_EDGE", "FLAG_MASKED", "FLAG_NO_SIGMA"]

log = logging.getLogger(__name__)

#: the aperture (or fitting box) extends beyond the image edge
FLAG_EDGE = 16
#: the aperture / box contains masked pixels (aperture sums: filled with the mean of the unmasked
#: aperture pixels, flux_err the noise of that estimate, see :func:`aperture_photometry`;
#: Gaussian photometry: left out of the fit)
FLAG_MASKED = 32
#: no positive second-moment width could be measured (Gaussian photometry)
FLAG_NO_SIGMA = 512

_MEDIAN_VAR = math.pi / 2.0  # variance of a median / variance of a mean, Gaussian noise, large n


def _background_map(ds: xr.Dataset, background: Any, need_global: bool, nx: int, ny: int | None) -> Any:
    """Background to subtract: ``None``/auto, Dataset, array or number (see the callers)."""
    from .detect import _dask2d

    shape = ds["image"].shape
    if background is None:
        if "background" in ds:
            return ds["background"].data
        if not need_global:
            return None
        from .background import estimate_background, fit_mesh_to_image

        # as detect_sources: the mesh background's maps do not depend on its tiling (capped to what the mesh
        # allows), and an image smaller than one mesh gets a smaller mesh with a warning
        mesh, bnx, bny, message = fit_mesh_to_image(shape, _MESH, nx, ny if ny is not None else nx)
        if message:
            warnings.warn(message, FallbackWarning, stacklevel=3)
        return estimate_background(ds, mesh, nx=bnx, ny=bny)["background"].data
    if isinstance(background, xr.Dataset):
        if "background" not in background:
            raise ValueError("the background Dataset has no 'background' variable; pass tilepipe.estimate_background(ds)")
        return _dask2d(background["background"], shape, "background")
    if np.isscalar(background) and not isinstance(background, (str, bytes)):
        v = float(background)  # type: ignore[arg-type]
        if not np.isfinite(v):
            raise ValueError(f"background must be finite; got {background!r}")
        return None if v == 0.0 else da.full(shape, v, dtype=np.float32, chunks=ds["image"].data.chunks)
    return _dask2d(background, shape, "background")


def _prep(img: np.ndarray, bkg: np.ndarray | None, var: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
    data = _f32(img)
    if bkg is not None:
        data = data - _f32(bkg)
    v = _f32(var)
    bad = np.asarray(mask, dtype=bool) | ~np.isfinite(data) | ~np.isfinite(v) | (v < 0)
    data = np.where(bad, np.float32(0), data).astype(np.float32)
    v = np.where(bad, np.float32(0), v).astype(np.float32)
    return np.ascontiguousarray(data), np.ascontiguousarray(v), np.ascontiguousarray(bad)


def _quadrant_area(x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed area of the disc of radius ``r`` (centred on 0) inside ``[0, x] x [0, y]`` (pixels^2).

    ``F(x, y) = int_0^x int_0^y 1[u^2 + v^2 < r^2] dv du``, odd in ``x`` and in ``y``
    (the disc is symmetric), so the area inside any rectangle follows from
    its four corners (:func:`_circle_overlap`).
    """
    ax = np.minimum(np.abs(x), r)
    ay = np.minimum(np.abs(y), r)
    r2 = r * r
    # up to t1 the chord height sqrt(r^2 - t^2) exceeds ay: the rectangle; beyond, the circular segment
    t1 = np.minimum(ax, np.sqrt(np.maximum(r2 - ay * ay, 0.0)))

    def segment(a: np.ndarray) -> np.ndarray:  # int_0^a sqrt(r^2 - t^2) dt, 0 <= a <= r
        return 0.5 * (a * np.sqrt(np.maximum(r2 - a * a, 0.0)) + r2 * np.arcsin(np.clip(a / r, -1.0, 1.0)))

    return np.sign(x) * np.sign(y) * (ay * t1 + segment(ax) - segment(t1))


def _circle_overlap(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Exact area of the unit pixel centred at ``(dx, dy)`` inside the circle of radius ``r`` around 0."""
    x0, x1, y0, y1 = dx - 0.5, dx + 0.5, dy - 0.5, dy + 0.5
    return (_quadrant_area(x1, y1, r) - _quadrant_area(x0, y1, r) - _quadrant_area(x1, y0, r)
            + _quadrant_area(x0, y0, r))


def _aperture_weights(dx: np.ndarray, dy: np.ndarray, r: float, subpix: int) -> np.ndarray:
    """sep's ``sum_circle`` pixel weights ``w`` for pixel centres at offsets ``dx, dy`` from the centre.

    The same rules as sep (``aperture.i``): ``w = 1`` for a pixel whose
    centre is within ``r - 0.7072`` of the aperture centre, 0 beyond
    ``r + 0.7072``, and in between the fraction of ``subpix x subpix``
    sub-pixel centres inside the circle (``subpix = 0``: the exact
    pixel/circle overlap area).  So ``sum w_i f_i`` is ``sep.sum_circle``'s
    unmasked sum (to rounding, tested); used for ``sum w_i^2 var_i``, which
    sep does not offer.
    """
    dx, dy = np.broadcast_arrays(np.asarray(dx, dtype=np.float64), np.asarray(dy, dtype=np.float64))
    rin = r - 0.7072
    rin2 = rin * rin if rin > 0.0 else 0.0
    rout2 = (r + 0.7072) ** 2
    rpix2 = dx * dx + dy * dy
    w = (rpix2 < rout2).astype(np.float64)
    part = (rpix2 < rout2) & (rpix2 > rin2)
    if not part.any():
        return w
    px, py = dx[part], dy[part]
    if subpix == 0:
        w[part] = _circle_overlap(px, py, r)
        return w
    scale = 1.0 / subpix
    offset = 0.5 * (scale - 1.0)
    r2 = r * r
    count = np.zeros(px.shape)
    sy = py + offset
    for _ in range(subpix):  # the sub-pixel grid, stepped like sep's loops
        dy2 = sy * sy
        sx = px + offset
        for _ in range(subpix):
            count += sx * sx + dy2 < r2
            sx = sx + scale
        sy = sy + scale
    w[part] = count * (scale * scale)
    return w


def _aperture_sums(v: np.ndarray, bad: np.ndarray, lx: np.ndarray, ly: np.ndarray, r: float,
                   subpix: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position, over the circle of radius ``r`` (``w``: :func:`_aperture_weights`, sep's weights):
    ``A = sum_i w_i``, ``A_good`` the same over unmasked pixels, and ``sum_i w_i^2 v_i``.

    ``v`` is the block's variance with masked pixels already 0; pixels off the
    block count as 0 (the block edge is the image edge, see the caller).
    """
    h, w = v.shape
    half = int(math.ceil(r)) + 1
    off = np.arange(-half, half + 1)
    area, area_good, w2var = np.zeros(lx.size), np.zeros(lx.size), np.zeros(lx.size)
    step = max(1, 2_000_000 // off.size ** 2)  # positions per batch: bounded memory
    for a in range(0, lx.size, step):
        bx, by = lx[a:a + step], ly[a:a + step]
        xs = np.floor(bx + 0.5).astype(np.int64)[:, None, None] + off[None, None, :]
        ys = np.floor(by + 0.5).astype(np.int64)[:, None, None] + off[None, :, None]
        wts = _aperture_weights(xs - bx[:, None, None], ys - by[:, None, None], r, subpix)
        wts[(xs < 0) | (xs >= w) | (ys < 0) | (ys >= h)] = 0.0
        pix = (np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1))
        area[a:a + step] = wts.sum(axis=(1, 2))
        area_good[a:a + step] = np.where(bad[pix], 0.0, wts).sum(axis=(1, 2))
        w2var[a:a + step] = (wts * wts * v[pix]).sum(axis=(1, 2))
    return area, area_good, w2var


def _aperture_block(img, var, mask, *maybe_bkg, x, y, origin, shape, radii, annulus, annulus_stat, subpix):
    import sep

    bkg = maybe_bkg[0] if maybe_bkg else None
    data, v, bad = _prep(img, bkg, var, mask)
    y0, x0 = origin
    lx = np.ascontiguousarray(x - x0, dtype=np.float64)
    ly = np.ascontiguousarray(y - y0, dtype=np.float64)
    n = lx.size
    out: dict[str, np.ndarray] = {}
    flags = np.zeros(n, dtype=np.int32)
    sky = np.zeros(n)
    sky_var = np.zeros(n)
    if annulus is not None:
        r_in, r_out = annulus
        half = int(math.ceil(r_out)) + 1
        off = np.arange(-half, half + 1)
        px = np.floor(lx + 0.5).astype(np.int64)
        py = np.floor(ly + 0.5).astype(np.int64)
        h, w = data.shape
        nann = np.zeros(n, dtype=np.int64)
        for i in range(n):
            ys = py[i] + off
            xs = px[i] + off
            ys = ys[(ys >= 0) & (ys < h)]
            xs = xs[(xs >= 0) & (xs < w)]
            r = np.hypot(xs[None, :] - lx[i], ys[:, None] - ly[i])
            sel = (r >= r_in) & (r < r_out) & ~bad[np.ix_(ys, xs)]
            vals = data[np.ix_(ys, xs)][sel].astype(np.float64)
            vv = v[np.ix_(ys, xs)][sel].astype(np.float64)
            nann[i] = vals.size
            if vals.size == 0:
                sky[i] = np.nan
                sky_var[i] = np.nan
                continue
            if annulus_stat == "median":
                sky[i] = np.median(vals)
                sky_var[i] = _MEDIAN_VAR * vv.sum() / vals.size ** 2
            else:
                sky[i] = vals.mean()
                sky_var[i] = vv.sum() / vals.size ** 2
        out["annulus_sky"] = sky
        out["annulus_npix"] = nann
    for r in radii:
        # the block edge is only reached at the image edge because overlap >= support, so sep's
        # truncation flag means the image edge.  With masked pixels sep scales the sum of the
        # unmasked ones by A / A_good (see aperture_photometry).
        with _SEP_LOCK:
            s, _, f = sep.sum_circle(data, lx, ly, float(r), mask=bad, subpix=int(subpix))
        # A: the area the sums cover, sep's pixel weights (subpix sampling, cut by the image edge), not
        # pi r^2, so that a flat annulus sky cancels exactly; A_good: the same over unmasked pixels.  The
        # variance of S = (A / A_good) sum_good w f for independent pixels (no gain term: the variance map
        # already holds the Poisson noise); v is 0 at masked pixels.  Without an annulus sky = sky_var = 0.
        area, area_good, w2var = _aperture_sums(v, bad, lx, ly, float(r), int(subpix))
        with np.errstate(divide="ignore", invalid="ignore"):
            fill = np.where(area_good > 0, area / area_good, np.nan)
        flux = np.asarray(s, dtype=np.float64) - area * sky
        err = np.sqrt(fill * fill * w2var + area * area * sky_var)
        flux = np.where(area_good > 0, flux, np.nan)
        flags |= np.asarray(f, dtype=np.int32)
        key = _fmt(r)
        out[f"flux_{key}"] = flux
        out[f"flux_err_{key}"] = err
    out["flags"] = flags
    return out


def _output_table(cat: Any, x: np.ndarray, y: np.ndarray, clash: Sequence[str]) -> Table:
    """Copy of the input catalog; its columns named like outputs get the suffix ``_in``."""
    if not isinstance(cat, Table):
        return Table({"x": x, "y": y})
    out = Table(cat, copy=True)
    for k in clash:
        if k in out.colnames:
            out.rename_column(k, f"{k}_in")
    return out


def _fmt(r: float) -> str:
    return f"{r:g}".replace(".", "p")


def aperture_photometry(
    ds: Any,
    cat: Any,
    radii: float | Sequence[float],
    annulus: tuple[float, float] | None = None,
    *,
    background: Any = None,
    annulus_stat: str = "median",
    subpix: int = 5,
    nx: int = 1,
    ny: int | None = None,
    overlap: int | None = None,
) -> Table:
    """Circular-aperture photometry with errors, optional local sky annulus, tiled.

    The sum of the (background-subtracted) image in a circle of radius ``r``
    around each position, with pixel/circle overlap weights (sep's
    ``sum_circle``, ``subpix`` sub-sampling at the boundary)::

        flux = S - A * sky,                   S = (A / A_good) sum_{i good} w_i f_i
        flux_err^2 = V + A^2 var(sky),        V = (A / A_good)^2 sum_{i good} w_i^2 var_i

    where ``w_i`` is the pixel's fractional overlap with the aperture
    (dimensionless, 0 to 1), ``A = sum_i w_i`` over the aperture's pixels on
    the image (pixels; ``pi r^2`` up to the ``subpix`` sampling, less where
    the image edge cuts the aperture, ``FLAG_EDGE``), ``A_good`` the same
    sum over the unmasked ones, ``f_i`` and ``var_i`` the pixel values (ADU)
    and variances (ADU^2), and ``sky`` the local annulus level (ADU per
    pixel; 0 without ``annulus``).

    ``V`` is the exact variance of ``S`` for independent pixel noise: ``S``
    is linear in the ``f_i`` with coefficients ``(A / A_good) w_i``.  Note
    ``w_i^2``, not sep's own error sum ``(A / A_good) sum w_i var_i``: that
    counts a boundary pixel's noise in proportion to its area although its
    whole value enters with weight ``w_i`` (a few % too large an error
    without masked pixels), and with masked pixels it lacks one factor
    ``A / A_good`` (too small by up to ``sqrt(A / A_good)``).  The weights
    ``w_i`` are sep's (same sub-pixel grid, or the exact overlap area for
    ``subpix=0``), recomputed here because sep offers no ``w^2`` sum.  Noise
    correlated between pixels (resampled images) is not modelled.
    ``var(sky)`` assumes the annulus pixels are independent of the aperture
    pixels (``r_in >= r``).

    Masked pixels (``mask`` True, or a non-finite image or variance, or a
    negative variance) set ``FLAG_MASKED`` (32) and are **not** simply left
    out: their values are ignored and sep scales the sum of the unmasked
    pixels by ``A / A_good``, i.e. they are filled with the mean (per unit
    area) of the unmasked aperture pixels.  A flat sky is then still
    subtracted exactly, and ``flux_err`` is the noise of this estimator (a
    Monte-Carlo test checks it), but the source flux is biased when the
    masked pixels are brighter or fainter than the aperture mean (a masked
    core under-, a masked wing over-estimates it); ``flux_err`` does not
    include that bias.  Treat ``FLAG_MASKED`` rows accordingly.  With every
    aperture pixel masked the flux and its error are NaN.

    Parameters
    ----------
    ds : Dataset, array or path
        Image with ``variance`` (and ``mask``).  The variance must include the
        sources' Poisson noise (the default one of :func:`tilepipe.open_image`
        does when ``gain`` is known).
    cat : Table (``x, y``) or (N, 2) array
        Positions, global 0-based pixels.
    radii : float or sequence of float
        Aperture radii (pixels).  Columns ``flux_<r>, flux_err_<r>`` per radius
        (``r`` written with ``p`` for the decimal point, e.g. ``flux_7p5``);
        ``flux, flux_err`` repeat the first radius.
    annulus : (r_in, r_out), optional
        Local sky annulus (pixels): pixels whose centres satisfy ``r_in <= r <
        r_out`` and are not masked.  ``sky`` is their median
        (``annulus_stat="median"``, robust to neighbours; ``var(sky) = (pi/2)
        sum(var) / n^2``) or mean (``var(sky) = sum(var) / n^2``).
    background : None, Dataset, array or float
        Global background subtracted first.  ``None``: ``ds["background"]`` if
        present; otherwise, without ``annulus``, :func:`tilepipe.estimate_background`
        (same ``nx, ny``), and with an ``annulus`` nothing (the annulus takes
        the sky).  ``0`` means the image is already sky-subtracted.
    annulus_stat : {"median", "mean"}
    subpix : int
        Sub-pixel sampling of the aperture boundary (sep; 0 = exact overlap).
    nx, ny : int
        Tiles; each row is measured on the tile that owns its position.
    overlap : int, optional
        Halo (pixels); default ``ceil(max(radii, r_out)) + 2``, the support.

    Returns
    -------
    Table
        Input columns (for a Table) plus ``flux, flux_err``, ``flux_<r>,
        flux_err_<r>`` per radius, ``annulus_sky, annulus_npix`` (with an
        annulus) and ``flags`` (sep aperture bits; ``FLAG_EDGE`` = 16 aperture
        cut by the image edge or position off the image (then NaN fluxes),
        ``FLAG_MASKED`` = 32 masked pixels in the aperture, see above).
    """
    from .image import as_dataset

    ds = as_dataset(ds)
    r_list = [check_positive("radii", r) for r in np.atleast_1d(np.asarray(radii, dtype=np.float64)).tolist()]
    if not r_list:
        raise ValueError("radii must hold at least one radius")
    if annulus is not None:
        if len(annulus) != 2:
            raise ValueError(f"annulus must be (r_in, r_out); got {annulus!r}")
        r_in = check_positive("annulus[0]", annulus[0], allow_zero=True)
        r_out = check_positive("annulus[1]", annulus[1])
        if r_out <= r_in:
            raise ValueError(f"annulus must have r_in < r_out; got {annulus!r}")
        annulus = (r_in, r_out)
    check_choice("annulus_stat", annulus_stat, ("median", "mean"))
    subpix = check_int("subpix", subpix, lower=0)
    x, y = _positions(cat, "cat")
    support = int(math.ceil(max(max(r_list), annulus[1] if annulus else 0.0))) + 2
    grid = make_grid(ds["image"].shape, None, nx, ny, support if overlap is None else overlap)
    grid.check_overlap(support, "aperture_photometry")
    bkg = _background_map(ds, background, annulus is None, grid.nx, grid.ny)
    arrays = [ds["image"].data, ds["variance"].data, ds["mask"].data] + ([bkg] if bkg is not None else [])
    cols: dict[str, Any] = {"flags": (np.int32, FLAG_EDGE)}
    for r in r_list:
        cols[f"flux_{_fmt(r)}"] = (np.float64, np.nan)
        cols[f"flux_err_{_fmt(r)}"] = (np.float64, np.nan)
    if annulus is not None:
        cols["annulus_sky"] = (np.float64, np.nan)
        cols["annulus_npix"] = (np.int64, 0)
    res = rows_per_tile(_aperture_block, arrays, x, y, grid, cols, radii=r_list, annulus=annulus,
                        annulus_stat=annulus_stat, subpix=subpix)
    out = _output_table(cat, x, y, ("flux", "flux_err", "flags"))
    k0 = _fmt(r_list[0])
    out["flux"] = res[f"flux_{k0}"]
    out["flux_err"] = res[f"flux_err_{k0}"]
    for r in r_list:
        out[f"flux_{_fmt(r)}"] = res[f"flux_{_fmt(r)}"]
        out[f"flux_err_{_fmt(r)}"] = res[f"flux_err_{_fmt(r)}"]
    if annulus is not None:
        out["annulus_sky"] = res["annulus_sky"]
        out["annulus_npix"] = res["annulus_npix"]
    out["flags"] = res["flags"]
    out.meta.update(_meta())
    out.meta.update({"radii": r_list, "annulus": list(annulus) if annulus else None, "annulus_stat": annulus_stat,
                     "nx": grid.nx, "ny": grid.ny, "overlap": list(grid.overlap)})
    return out


# ---------------------------------------------------------------------------
# Gaussian PSF photometry
# ---------------------------------------------------------------------------
def _pixel_gaussian(off: np.ndarray, dx: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """1-D pixel-integrated unit Gaussian: ``P(pixel k)`` for centres at ``dx`` (N, box)."""
    from scipy.special import erf

    s = np.sqrt(2.0) * sigma[:, None]
    u = off[None, :] - dx[:, None]
    return 0.5 * (erf((u + 0.5) / s) - erf((u - 0.5) / s))


def _gauss_block(img, var, mask, *maybe_bkg, x, y, origin, shape, box, sigma, sky):
    from .detect import _moments_block, _sky_subtract, _stamps

    bkg = maybe_bkg[0] if maybe_bkg else None
    data, v, bad = _prep(img, bkg, var, mask)
    half = box // 2
    n = x.size
    px = np.floor(x + 0.5).astype(np.int64)
    py = np.floor(y + 0.5).astype(np.int64)
    inside = (px - half >= 0) & (py - half >= 0) & (px + half <= shape[1] - 1) & (py + half <= shape[0] - 1)
    flux = np.full(n, np.nan)
    ferr = np.full(n, np.nan)
    sig = np.full(n, np.nan)
    flags = np.where(inside, 0, 16).astype(np.int32)
    idx = np.flatnonzero(inside)
    if idx.size == 0:
        return {"flux": flux, "flux_err": ferr, "sigma": sig, "flags": flags}
    dat = np.where(bad, np.nan, data).astype(np.float64)
    if sigma is None:
        m = _moments_block(dat, x=x[idx], y=y[idx], origin=origin, shape=shape, box=box, sky=sky, has_mask=False)
        s = np.sqrt(0.5 * (m["sigma_x"] ** 2 + m["sigma_y"] ** 2))
    else:
        s = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (n,))[idx].copy()
    sig[idx] = s
    ok = np.isfinite(s) & (s > 0)
    flags[idx[~ok]] |= FLAG_NO_SIGMA
    if not ok.any():
        return {"flux": flux, "flux_err": ferr, "sigma": sig, "flags": flags}
    j = idx[ok]
    st = _stamps(dat, px[j], py[j], half, origin)
    if sky is not None:
        st = _sky_subtract(st, sky)
    vs = _stamps(v.astype(np.float64), px[j], py[j], half, origin)
    bs = _stamps(bad, px[j], py[j], half, origin)
    off = np.arange(-half, half + 1, dtype=np.float64)
    gx = _pixel_gaussian(off, x[j] - px[j], s[ok])
    gy = _pixel_gaussian(off, y[j] - py[j], s[ok])
    p = gy[:, :, None] * gx[:, None, :]  # normalised over the plane: sum -> 1 for an infinite box
    good = ~bs
    st = np.where(good, st, 0.0)
    p = np.where(good, p, 0.0)
    sp2 = (p * p).sum(axis=(1, 2))
    flux[j] = (st * p).sum(axis=(1, 2)) / sp2
    ferr[j] = np.sqrt((p * p * vs).sum(axis=(1, 2))) / sp2
    flags[j] |= np.where(bs.any(axis=(1, 2)), FLAG_MASKED, 0).astype(np.int32)
    return {"flux": flux, "flux_err": ferr, "sigma": sig, "flags": flags}


def gaussian_psf_photometry(
    ds: Any,
    cat: Any,
    box: int | None = None,
    *,
    sigma: float | np.ndarray | None = None,
    background: Any = None,
    sky: Any = None,
    nx: int = 1,
    ny: int | None = None,
    overlap: int | None = None,
) -> Table:
    """Optimal (matched-filter) photometry with a circular Gaussian PSF per star.

    For each star a unit-flux circular Gaussian ``p_i`` (pixel-integrated,
    centred on the catalog position) of width ``sigma`` -- the star's
    second-moment width ``sqrt((sigma_x^2 + sigma_y^2) / 2)`` from
    :func:`tilepipe.second_moments` unless ``sigma`` is given -- is fitted by
    linear least squares to the ``box x box`` pixels ``f_i``::

        flux     = sum_i f_i p_i / sum_i p_i^2
        flux_err = sqrt(sum_i p_i^2 var_i) / sum_i p_i^2

    Derivation: minimising ``sum_i (f_i - F p_i)^2`` gives the first line; it
    is linear in the data, ``F = sum_i w_i f_i`` with ``w_i = p_i / sum p^2``,
    so ``Var F = sum_i w_i^2 var_i``, the second line (exact for independent
    pixels with any variances; with equal weights it is unbiased for a
    Gaussian star of that width, and Naylor 1998, MNRAS 296, 339 shows it is
    close to optimal in the sky-dominated regime).  Masked pixels are left
    out of both sums.

    Parameters
    ----------
    ds : Dataset, array or path
    cat : Table (``x, y``) or (N, 2) array
        Star positions (centroids), global 0-based pixels.
    box : int, optional
        Odd fitting box (pixels); default ``2 * ceil(2 * fwhm) + 1`` with
        ``fwhm`` from ``ds.attrs["fwhm"]`` or the catalog's median ``fwhm``
        column, else 3 px (at least 7).
    sigma : float or array, optional
        Gaussian sigma (pixels) for all / each star, instead of measuring it.
    background : see :func:`aperture_photometry` (``None``: ``ds["background"]``
        or :func:`tilepipe.estimate_background`).
    sky : None, "perimeter" or float
        Extra local sky subtracted in each box (default none).
    nx, ny, overlap : tiling; default overlap ``box // 2 + 2``.

    Returns
    -------
    Table
        Input columns plus ``flux, flux_err, sigma`` (pixels) and ``flags``
        (16: box off the image, 32: masked pixels in the box, 512: no width).
    """
    from .image import as_dataset

    ds = as_dataset(ds)
    x, y = _positions(cat, "cat")
    if box is None:
        fwhm = ds.attrs.get("fwhm")
        if not fwhm and isinstance(cat, Table) and "fwhm" in cat.colnames and len(cat):
            fwhm = float(np.nanmedian(np.asarray(cat["fwhm"], dtype=np.float64)))
        fwhm = float(fwhm) if fwhm and np.isfinite(fwhm) else 3.0
        box = max(7, 2 * int(math.ceil(2.0 * fwhm)) + 1)
    box = check_int("box", box, lower=3)
    if box % 2 == 0:
        raise ValueError(f"box must be odd; got {box}")
    if sigma is not None:
        sarr = np.asarray(sigma, dtype=np.float64)
        if sarr.ndim not in (0, 1) or (sarr.ndim == 1 and sarr.size != x.size):
            raise ValueError(f"sigma must be a number or one value per catalog row ({x.size}); got shape {sarr.shape}")
        if not np.all(np.isfinite(sarr) & (sarr > 0)):
            raise ValueError("sigma must be finite and positive")
        sigma = np.broadcast_to(sarr, x.shape).copy()
    support = box // 2 + 2
    grid = make_grid(ds["image"].shape, None, nx, ny, support if overlap is None else overlap)
    grid.check_overlap(support, "gaussian_psf_photometry")
    bkg = _background_map(ds, background, True, grid.nx, grid.ny)
    arrays = [ds["image"].data, ds["variance"].data, ds["mask"].data] + ([bkg] if bkg is not None else [])
    cols = {"flux": (np.float64, np.nan), "flux_err": (np.float64, np.nan), "sigma": (np.float64, np.nan),
            "flags": (np.int32, FLAG_EDGE)}
    res = rows_per_tile(_gauss_block, arrays, x, y, grid, cols, row_kwargs={"sigma": sigma} if sigma is not None else None,
                        box=box, sky=sky, **({"sigma": None} if sigma is None else {}))
    out = _output_table(cat, x, y, ("flux", "flux_err", "sigma", "flags"))
    for k in ("flux", "flux_err", "sigma", "flags"):
        out[k] = res[k]
    out.meta.update(_meta())
    out.meta.update({"box": box, "nx": grid.nx, "ny": grid.ny, "overlap": list(grid.overlap),
                     "method": "Gaussian PSF, flux = sum(f p)/sum(p^2)"})
    return out
