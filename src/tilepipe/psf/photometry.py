"""PSF-fit photometry per tile, with neighbours fitted together.

For every group of sources whose fitting boxes overlap (found once, globally,
on the client), the model ``sky + sum_k flux_k * PSF_k(x - x_k, y - y_k)`` is
fitted to the group's pixels: fluxes and sky by linear least squares and, with
``fit_position=True``, positions by Gauss-Newton, the PSF of each source being
the local model ``psf.at(x_k, y_k)`` shifted by a Fourier (sinc) shift.  Each
group is fitted in the tile that owns its brightest member (DESIGN.md
ownership rule), reading only that tile's outer box, so the result does not
depend on the tiling as long as ``overlap`` covers the group.

Weights are uniform within a group (the least-squares estimate is then linear
in the data and unbiased, whatever the noise); the uncertainties are the
sandwich covariance ``(J^T J)^-1 J^T V J (J^T J)^-1`` with ``V`` the
``variance`` map (Stetson 1987, PASP 99, 191 for the grouped fit).
"""

from __future__ import annotations

import logging
from typing import Any

import dask
import numpy as np
from astropy.table import Table

from .._validate import check_int
from ._fit import render_one
from ._stamps import fourier_shift  # noqa: F401  (documented dependency of render)
from .base import load_psf

__all__ = ["psf_photometry", "FLAG_EDGE", "FLAG_MASKED", "FLAG_POSITION", "FLAG_HALO", "FLAG_FAILED"]

log = logging.getLogger(__name__)

FLAG_EDGE = 1       #: the fitting box is cut by the image edge
FLAG_MASKED = 2     #: masked pixels within 1 FWHM of the centre
FLAG_POSITION = 4   #: the position fit wandered off (> max_shift); position kept fixed
FLAG_HALO = 8       #: the group is cut by the tile halo (overlap too small)
FLAG_FAILED = 16    #: singular fit; flux is NaN


def _fit_group(img, msk, var, origin, xs, ys, f0, psf, box, fit_position, max_shift, maxiter):
    """Fit one group inside an outer box.  Returns per-star arrays."""
    K = len(xs)
    y0, x0 = origin
    h, w = img.shape
    half = box // 2
    n = psf.size
    c = n // 2
    os = psf.oversampling if hasattr(psf, "efine") else 1
    flags = np.zeros(K, np.int32)
    # group pixel set: union of boxes, within the outer box
    lx = xs - x0
    ly = ys - y0
    ix = np.floor(lx + 0.5).astype(int)
    iy = np.floor(ly + 0.5).astype(int)
    xa = max(int(ix.min()) - half, 0)
    xb = min(int(ix.max()) + half + 1, w)
    ya = max(int(iy.min()) - half, 0)
    yb = min(int(iy.max()) + half + 1, h)
    if xb <= xa or yb <= ya:
        # no pixel of the group's boxes in this outer box (psf_photometry never sends such a group)
        nan = np.full(K, np.nan)
        return dict(x=xs.copy(), y=ys.copy(), flux=nan, flux_err=nan.copy(), x_err=nan.copy(), y_err=nan.copy(),
                    sky=nan.copy(), chi2=nan.copy(), npix=np.zeros(K, np.int32),
                    flags=np.full(K, FLAG_EDGE | FLAG_FAILED, np.int32))
    region = np.zeros((yb - ya, xb - xa), bool)
    for k in range(K):
        ra, rb = max(iy[k] - half, ya), min(iy[k] + half + 1, yb)
        ca, cb = max(ix[k] - half, xa), min(ix[k] + half + 1, xb)
        region[ra - ya:rb - ya, ca - xa:cb - xa] = True
        if (iy[k] - half < 0) or (ix[k] - half < 0) or (iy[k] + half + 1 > h) or (ix[k] + half + 1 > w):
            flags[k] |= FLAG_EDGE
    D = img[ya:yb, xa:xa + region.shape[1]].astype(np.float64)
    M = msk[ya:yb, xa:xb]
    V = var[ya:yb, xa:xb].astype(np.float64)
    use = region & ~M & np.isfinite(D) & np.isfinite(V) & (V > 0)
    for k in range(K):
        ra, rb = max(iy[k] - 1, ya), min(iy[k] + 2, yb)
        ca, cb = max(ix[k] - 1, xa), min(ix[k] + 2, xb)
        if M[ra - ya:rb - ya, ca - xa:cb - xa].any():
            flags[k] |= FLAG_MASKED
    npix = int(use.sum())
    nparam = K + 1 + (2 * K if fit_position else 0)
    out_nan = dict(x=xs.copy(), y=ys.copy(), flux=np.full(K, np.nan), flux_err=np.full(K, np.nan),
                   x_err=np.full(K, np.nan), y_err=np.full(K, np.nan), sky=np.full(K, np.nan),
                   chi2=np.full(K, np.nan), npix=np.zeros(K, np.int32), flags=flags | FLAG_FAILED)
    if npix <= nparam:
        return out_nan
    d = D[use]
    v = V[use]
    gy, gx = np.nonzero(use)
    gy = gy + ya
    gx = gx + xa
    x = lx.astype(np.float64).copy()
    y = ly.astype(np.float64).copy()
    x_init, y_init = x.copy(), y.copy()
    fixed = np.zeros(K, bool)

    # the PSF shape changes negligibly over the sub-pixel moves of the fit: evaluate it once
    if hasattr(psf, "efine"):
        fines = psf.efine(xs, ys)
    else:
        fines = np.stack([psf.at(xs[k], ys[k]) for k in range(K)])

    def design(x, y, deriv):
        cols = np.zeros((npix, K))
        dcx = np.zeros((npix, K)) if deriv else None
        dcy = np.zeros((npix, K)) if deriv else None
        for k in range(K):
            jx = int(np.floor(x[k] + 0.5))
            jy = int(np.floor(y[k] + 0.5))
            P, gxk, gyk = render_one(fines[k], x[k] - jx, y[k] - jy, os, n)
            px = gx - (jx - c)
            py = gy - (jy - c)
            inside = (px >= 0) & (px < n) & (py >= 0) & (py < n)
            cols[inside, k] = P[py[inside], px[inside]]
            if deriv:
                dcx[inside, k] = gxk[py[inside], px[inside]]
                dcy[inside, k] = gyk[py[inside], px[inside]]
        return cols, dcx, dcy

    def lsq(J, r):
        A = J.T @ J
        return np.linalg.solve(A + 1e-12 * np.trace(A) / len(A) * np.eye(len(A)), J.T @ r)

    def linear(cols):
        sol = lsq(np.column_stack([cols, np.ones(npix)]), d)
        return sol[:K], sol[K]

    try:
        cols, _, _ = design(x, y, False)
        flux, sky = linear(cols)
        if fit_position:
            for _ in range(maxiter):
                cols, dcx, dcy = design(x, y, True)
                fr = np.where(fixed, 0.0, flux)
                J = np.column_stack([cols, np.ones(npix), dcx * fr, dcy * fr])
                r = d - cols @ flux - sky
                free = np.r_[np.ones(K + 1, bool), ~fixed, ~fixed]
                step = np.zeros(J.shape[1])
                step[free] = lsq(J[:, free], r)
                sdx = np.clip(step[K + 1:2 * K + 1], -0.5, 0.5)
                sdy = np.clip(step[2 * K + 1:], -0.5, 0.5)
                flux = flux + step[:K]
                sky = sky + step[K]
                x += sdx
                y += sdy
                far = (np.hypot(x - x_init, y - y_init) > max_shift) | ~(flux > 0)
                far &= ~fixed
                if far.any():
                    x[far], y[far] = x_init[far], y_init[far]
                    fixed |= far
                    flags[far] |= FLAG_POSITION
                if max(np.max(np.abs(sdx)), np.max(np.abs(sdy))) < 1e-3:
                    break
        # final linear solve at the converged positions, and the sandwich covariance
        cols, dcx, dcy = design(x, y, True)
        flux, sky = linear(cols)
        fr = np.where(fixed, 0.0, flux)
        if fit_position and (~fixed).any():
            J = np.column_stack([cols, np.ones(npix), (dcx * fr)[:, ~fixed], (dcy * fr)[:, ~fixed]])
        else:
            J = np.column_stack([cols, np.ones(npix)])
        JtJ_inv = np.linalg.inv(J.T @ J)
        cov = JtJ_inv @ (J.T * v) @ J @ JtJ_inv
    except np.linalg.LinAlgError:
        return out_nan
    err = np.sqrt(np.clip(np.diag(cov), 0, None))
    flux_err = err[:K]
    x_err = np.full(K, np.nan)
    y_err = np.full(K, np.nan)
    if fit_position and (~fixed).any():
        nf = int((~fixed).sum())
        x_err[~fixed] = err[K + 1:K + 1 + nf]
        y_err[~fixed] = err[K + 1 + nf:K + 1 + 2 * nf]
    resid = d - cols @ flux - sky
    chi2 = np.full(K, np.nan)
    npk = np.zeros(K, np.int32)
    for k in range(K):
        inb = (np.abs(gx - (ix[k])) <= half) & (np.abs(gy - (iy[k])) <= half)
        npk[k] = int(inb.sum())
        if npk[k] > 0:
            chi2[k] = float(np.sum(resid[inb] ** 2 / v[inb]) / max(npk[k] - (nparam / K), 1))
    return dict(x=x + x0, y=y + y0, flux=flux, flux_err=flux_err, x_err=x_err, y_err=y_err,
                sky=np.full(K, sky), chi2=chi2, npix=npk, flags=flags)


def _photometry_tile(img, msk, var, bkg, origin, shape_outer, groups, xs, ys, f0, psf, box, fit_position,
                     max_shift, maxiter, halo_ok):
    img = np.asarray(img, dtype=np.float32)
    if bkg is not None:
        img = img - np.asarray(bkg, dtype=np.float32)
    msk = np.asarray(msk, bool)
    var = np.asarray(var, np.float32)
    results = []
    for gi, members in enumerate(groups):
        r = _fit_group(img, msk, var, origin, xs[members], ys[members], f0[members], psf, box, fit_position,
                       max_shift, maxiter)
        if not halo_ok[gi]:
            r["flags"] = r["flags"] | FLAG_HALO
        results.append((members, r))
    return results


def psf_photometry(
    ds: Any,
    cat: Any,
    psf: Any,
    fit_position: bool = True,
    *,
    nx: int = 1,
    ny: int | None = None,
    overlap: int | None = None,
    box: int | None = None,
    max_shift: float | None = None,
    maxiter: int = 10,
) -> Table:
    """PSF-fit photometry of the sources of ``cat`` with the local PSF of ``psf``.

    Parameters
    ----------
    ds : Dataset, array or path
        The image (:func:`tilepipe.open_image`); its ``variance`` gives the
        errors, ``mask`` (True = bad) pixels are ignored and a ``background``
        variable is subtracted when present.  A constant local sky is fitted
        with every group anyway.
    cat : Table or (N, 2) array
        Sources with global pixel ``x, y`` (0-based); ``flux`` is used as a
        first guess when present.
    psf : PSFModel, GaussianPSF, MoffatPSF, FITS path or attrs dict
        Anything with ``at(x, y)``; the PSF is evaluated at every source.
    fit_position : bool
        Fit positions (Gauss-Newton, sub-pixel Fourier shifts of the PSF) as
        well as fluxes; otherwise positions are held at ``x, y``.
    nx, ny, overlap : int
        Tiling.  ``overlap`` defaults to ``2 * box + psf.size // 2``; groups
        that do not fit inside the halo are flagged ``FLAG_HALO`` (8).
    box : int, optional
        Side of each source's fitting box (px, odd); default ``2 ceil(2 FWHM) + 1``.
        Sources whose boxes overlap are fitted together.
    max_shift : float, optional
        Largest position change (px) before a position is held fixed
        (``FLAG_POSITION``); default one FWHM.
    maxiter : int
        Gauss-Newton iterations at most.

    Returns
    -------
    Table
        One row per input source, in input order: ``x_fit, y_fit, x_err,
        y_err`` (px), ``flux, flux_err`` (image units: total flux of the
        normalised PSF), ``sky`` (fitted local sky), ``chi2`` (reduced, over
        the source's box), ``npix``, ``group``, ``tile``, ``flags`` (bits:
        1 edge, 2 masked centre, 4 position held, 8 cut by halo, 16 failed),
        followed by the input columns (input ``flux, flux_err, flags, chi2``
        renamed with a ``_in`` suffix).

        A row off the image (``floor(x + 0.5), floor(y + 0.5)`` outside it,
        the rule of :func:`tilepipe.aperture_photometry`) is not measured:
        NaN ``flux, flux_err, x_err, y_err, sky, chi2``, ``x_fit, y_fit`` =
        the input position, ``npix`` 0, ``tile`` -1 and ``flags`` =
        ``FLAG_EDGE | FLAG_FAILED`` (17; bit 16 is also the edge flag of
        :func:`tilepipe.aperture_photometry`).  If its fitting box still
        reaches the image it is fitted with its neighbours, so that its
        light on the image is modelled, but its own result is discarded; if
        the box misses the image it takes no part in any fit.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    from ..image import as_dataset
    from ..tiling import TileGrid

    ds = as_dataset(ds)
    psf = load_psf(psf)
    if isinstance(cat, Table):
        if not {"x", "y"} <= set(cat.colnames):
            raise ValueError(f"cat must have 'x' and 'y' columns (global pixels); it has {cat.colnames}")
        t_in = Table(cat, copy=True)
    else:
        arr = np.asarray(cat, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise TypeError("cat must be an astropy Table with x, y columns or an (N, 2) array of (x, y)")
        t_in = Table({"x": arr[:, 0], "y": arr[:, 1]})
    shape = tuple(ds["image"].shape)
    xs = np.asarray(t_in["x"], np.float64)
    ys = np.asarray(t_in["y"], np.float64)
    N = len(xs)
    if not np.all(np.isfinite(xs) & np.isfinite(ys)):
        raise ValueError("cat has non-finite x/y positions; drop those rows first")
    fw = psf.fwhm((shape[1] - 1) / 2, (shape[0] - 1) / 2)
    if box is None:
        box = 2 * int(np.ceil(2.0 * fw)) + 1
    box = check_int("box", box, lower=3)
    box += 1 - box % 2
    if max_shift is None:
        max_shift = max(1.0, fw)
    maxiter = check_int("maxiter", maxiter, lower=1)
    if overlap is None:
        overlap = 2 * box + psf.size // 2
    grid = TileGrid(shape, nx=nx, ny=ny, overlap=overlap)
    if grid.ntiles > 1:
        grid._check_engine()
    f0 = np.asarray(t_in["flux"], float) if "flux" in t_in.colnames else np.ones(N)
    f0 = np.where(np.isfinite(f0), f0, 0.0)

    # rows off the image (rounded centre outside it) are not measured; rows whose fitting box has
    # no pixel on the image cannot be fitted at all and take no part in the grouping either
    half = box // 2
    ixr = np.floor(xs + 0.5)
    iyr = np.floor(ys + 0.5)
    off_image = (ixr < 0) | (ixr > shape[1] - 1) | (iyr < 0) | (iyr > shape[0] - 1)
    no_pixels = ((ixr + half < 0) | (ixr - half > shape[1] - 1) | (iyr + half < 0) | (iyr - half > shape[0] - 1))
    fit_rows = np.flatnonzero(~no_pixels)
    # groups: connected components of overlapping boxes (Chebyshev distance < box)
    label = np.arange(N)  # rows without pixels: a group of their own
    if fit_rows.size:
        M = fit_rows.size
        pairs = cKDTree(np.column_stack([xs[fit_rows], ys[fit_rows]])).query_pairs(r=box, p=np.inf,
                                                                                   output_type="ndarray")
        adj = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(M, M)) if len(pairs) else \
            coo_matrix((M, M))
        _, sub_label = connected_components(adj, directed=False)
        label[fit_rows] = fit_rows[np.unique(sub_label, return_index=True)[1]][sub_label]
    # number the groups 0.. in order of their first row (the labels are first-row indices)
    label = np.unique(label, return_inverse=True)[1].reshape(-1)
    ngroups = int(label.max()) + 1 if N else 0
    members_of = [[] for _ in range(ngroups)]
    for i, g in enumerate(label):
        members_of[g].append(i)
    # each group goes to the tile owning its brightest member
    owner = grid.owner(xs, ys) if N else np.zeros(0, int)
    tile_groups: dict[int, list[np.ndarray]] = {}
    tile_halo: dict[int, list[bool]] = {}
    for g, mem in enumerate(members_of):
        mem = np.asarray(mem, int)
        if off_image[mem].all():
            continue  # nothing on the image to measure (filled in below)
        ref = mem[np.argmax(f0[mem])] if len(mem) > 1 else mem[0]
        t = int(owner[ref])
        if t < 0:
            t = int(grid.owner(np.clip(xs[ref], 0, shape[1] - 1), np.clip(ys[ref], 0, shape[0] - 1)))
        tile = grid.tile(t)
        ixs = np.floor(xs[mem] + 0.5)
        iys = np.floor(ys[mem] + 0.5)
        oy, ox = tile.outer
        inside = (((ixs - half >= ox.start) | (ox.start == 0)) & ((ixs + half < ox.stop) | (ox.stop == shape[1]))
                  & ((iys - half >= oy.start) | (oy.start == 0)) & ((iys + half < oy.stop) | (oy.stop == shape[0])))
        tile_groups.setdefault(t, []).append(mem)
        tile_halo.setdefault(t, []).append(bool(inside.all()))

    img = ds["image"].data
    msk = ds["mask"].data
    var = ds["variance"].data
    bkg = ds["background"].data if "background" in ds else None
    fn = dask.delayed(_photometry_tile, pure=True)
    tasks, order = [], []
    for t, groups in tile_groups.items():
        tile = grid.tile(t)
        tasks.append(fn(img[tile.outer], msk[tile.outer], var[tile.outer],
                        bkg[tile.outer] if bkg is not None else None, tile.origin, tile.outer_shape, groups,
                        xs, ys, f0, psf, box, bool(fit_position), float(max_shift), maxiter, tile_halo[t]))
        order.append(t)
    results = dask.compute(*tasks) if tasks else []

    out = {k: np.full(N, np.nan) for k in ("x_fit", "y_fit", "x_err", "y_err", "flux", "flux_err", "sky", "chi2")}
    out["npix"] = np.zeros(N, np.int32)
    out["flags"] = np.zeros(N, np.int32)
    out["group"] = label.astype(np.int64) + 1 if N else np.zeros(0, np.int64)
    out["tile"] = np.full(N, -1, np.int32)
    for t, res in zip(order, results):
        for members, r in res:
            out["x_fit"][members] = r["x"]
            out["y_fit"][members] = r["y"]
            for k in ("x_err", "y_err", "flux", "flux_err", "sky", "chi2"):
                out[k][members] = r[k]
            out["npix"][members] = r["npix"]
            out["flags"][members] = r["flags"]
            out["tile"][members] = t
    # rows off the image: not measured (a box reaching the image was fitted only to model its light)
    for k in ("x_err", "y_err", "flux", "flux_err", "sky", "chi2"):
        out[k][off_image] = np.nan
    out["x_fit"][off_image] = xs[off_image]
    out["y_fit"][off_image] = ys[off_image]
    out["npix"][off_image] = 0
    out["flags"][off_image] = FLAG_EDGE | FLAG_FAILED
    out["tile"][off_image] = -1
    res_t = Table()
    for k in ("x_fit", "y_fit", "x_err", "y_err", "flux", "flux_err", "sky", "chi2", "npix", "group", "tile", "flags"):
        res_t[k] = out[k]
    for name in t_in.colnames:
        new = f"{name}_in" if name in res_t.colnames else name
        res_t[new] = t_in[name]
    res_t.meta.update(dict(t_in.meta))
    res_t.meta["psf_photometry"] = {"box": box, "fit_position": bool(fit_position), "nx": grid.nx, "ny": grid.ny,
                                    "overlap": list(grid.overlap)}
    return res_t
