"""Mosaics: reproject many exposures onto one celestial grid, tile by tile, out of core.

Plan
----
1. Every input must have a celestial WCS.  The output grid is ``wcs_out`` (+
   ``shape_out``) or the optimal TAN grid covering all input footprints
   (:func:`reproject.mosaicking.find_optimal_celestial_wcs`, at
   ``resolution`` or the finest input pixel scale).
2. The output is cut into regular tiles of ``tile_size`` pixels (one Zarr chunk
   each).  For every tile and input, the tile's outer box (core + halo) is
   mapped into the input's pixel frame (its border and a coarse interior grid
   through the two WCSs) to get the input region that overlaps it (+ a margin
   for the interpolation kernel).  A task reads only those regions.
3. **Background matching** (map → reduce → map), when ``match_background``:
   per 512 x 512 block of the output (a fixed grid, so the result does not
   depend on ``tile_size``), every pair of inputs ``(i, k)`` overlapping there contributes
   the median of ``r_i - r_k`` over their common valid pixels (``r`` the
   reprojected images) and the pixel count; the reduce step averages the
   per-tile medians weighted by counts into ``d_ik`` and solves the weighted
   least-squares system ``b_i - b_k = d_ik`` (weights √n_ik) with the gauge
   ``b_reference = 0`` (or ``Σ b_i = 0`` over each connected group of
   overlapping inputs when ``reference`` is None); ``b_i`` is then subtracted
   from input ``i``.  Only additive offsets are matched: a sky gradient common
   to all exposures stays (subtract it first with
   :func:`tilepipe.subtract_background` if unwanted).
4. Per tile: resample every overlapping region with
   :func:`reproject.reproject_interp` (``order``) onto the tile's outer box,
   subtract the offsets and combine: ``mean`` (inverse-variance weighted mean
   with one noise level ``σ_i`` per input), ``median``, or ``proper``
   (Zackay & Ofek 2017, as :func:`tilepipe.coadd`, with Gaussian PSFs from the
   inputs' ``fwhm`` scaled to output pixels, or ``psfs=`` given in output
   pixels).  Keep the core.
5. The lazily assembled Dataset (``image``, ``variance``, ``mask``,
   ``coverage``) is written straight to Zarr (:func:`tilepipe.io.write_zarr`,
   local or any fsspec URL), chunk by chunk from the workers, so no process
   ever holds the whole mosaic.

Pixel values are interpolated (surface brightness is preserved; to preserve
total flux per pixel multiply by the ratio of pixel areas).  ``variance`` is
``Σ w_i² σ_i² / (Σ w_i)²`` from the inputs' global noise levels: it ignores
the noise correlation introduced by resampling.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Any, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr

from ._validate import check_choice, check_int
from .image import has_wcs, header_to_cards, open_image, wcs as _wcs
from .tiling import TileGrid

log = logging.getLogger(__name__)

__all__ = ["mosaic", "plan_mosaic", "solve_offsets"]

#: side (output pixels) of the fixed grid on which background-offset statistics are gathered
_STATS_TILE = 512
_MARGIN = {"nearest-neighbor": 2, "bilinear": 3, "biquadratic": 4, "bicubic": 5}


# ------------------------------------------------------------------ geometry
def _input_box(w_in: Any, in_shape: tuple[int, int], w_out: Any, box: tuple[int, int, int, int], margin: int,
               step: int = 16) -> tuple[int, int, int, int] | None:
    """Input pixel box ``(y0, y1, x0, x1)`` covering output box ``box``, or None when they do not overlap."""
    y0, y1, x0, x1 = box
    xs = np.unique(np.r_[np.arange(x0, x1, step), x1 - 1]).astype(float)
    ys = np.unique(np.r_[np.arange(y0, y1, step), y1 - 1]).astype(float)
    # border at pixel edges, plus a coarse interior grid
    ex = np.r_[xs, np.full(ys.size, x0 - 0.5), np.full(ys.size, x1 - 0.5), xs]
    ey = np.r_[np.full(xs.size, y0 - 0.5), ys, ys, np.full(xs.size, y1 - 0.5)]
    gx, gy = np.meshgrid(xs[:: max(1, xs.size // 8)], ys[:: max(1, ys.size // 8)])
    px = np.r_[ex, gx.ravel()]
    py = np.r_[ey, gy.ravel()]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        lon, lat = w_out.pixel_to_world_values(px, py)
        ix, iy = w_in.world_to_pixel_values(lon, lat)
    ix, iy = np.asarray(ix, float), np.asarray(iy, float)
    ok = np.isfinite(ix) & np.isfinite(iy)
    if not ok.any():
        return None
    h, w = in_shape
    bx0 = int(math.floor(ix[ok].min())) - margin
    bx1 = int(math.ceil(ix[ok].max())) + margin + 1
    by0 = int(math.floor(iy[ok].min())) - margin
    by1 = int(math.ceil(iy[ok].max())) + margin + 1
    bx0, by0 = max(bx0, 0), max(by0, 0)
    bx1, by1 = min(bx1, w), min(by1, h)
    if bx1 <= bx0 or by1 <= by0:
        return None
    return by0, by1, bx0, bx1


def _slice_wcs(w: Any, y0: int, x0: int) -> Any:
    """The WCS of the sub-array starting at pixel ``[y0, x0]`` (CRPIX shifted; SIP handled by astropy)."""
    return w.slice((slice(int(y0), None), slice(int(x0), None)))


def plan_mosaic(inputs_wcs: Sequence[Any], in_shapes: Sequence[tuple[int, int]], w_out: Any, grid: TileGrid,
                margin: int) -> list[list[tuple[int, tuple[int, int, int, int]]]]:
    """For every tile of ``grid``: the list of ``(input index, input box)`` overlapping its outer box."""
    plan = []
    for t in grid.tiles:
        box = (t.outer[0].start, t.outer[0].stop, t.outer[1].start, t.outer[1].stop)
        entries = []
        for i, (w, s) in enumerate(zip(inputs_wcs, in_shapes)):
            b = _input_box(w, s, w_out, box, margin)
            if b is not None:
                entries.append((i, b))
        plan.append(entries)
    return plan


# --------------------------------------------------------------- tile worker
def _reproject_regions(regions: Sequence[tuple[np.ndarray, np.ndarray]], wcs_in: Sequence[Any],
                       w_tile: Any, shape: tuple[int, int], order: str) -> list[np.ndarray]:
    from reproject import reproject_interp

    out = []
    for (img, bad), w in zip(regions, wcs_in):
        arr = np.asarray(img, dtype=np.float64).copy()
        arr[np.asarray(bad, bool) | ~np.isfinite(arr)] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep, fp = reproject_interp((arr, w), w_tile, shape_out=shape, order=order, return_footprint=True)
        rep = np.where((fp > 0) & np.isfinite(rep), rep, np.nan)
        out.append(rep)
    return out


def _stats_task(regions: Sequence[Any], idx: Sequence[int], wcs_in: Sequence[Any], w_tile: Any,
                shape: tuple[int, int], order: str, min_pixels: int = 25) -> list[tuple[int, int, float, int]]:
    reps = _reproject_regions(regions, wcs_in, w_tile, shape, order)
    res = []
    for a in range(len(reps)):
        for b in range(a + 1, len(reps)):
            common = np.isfinite(reps[a]) & np.isfinite(reps[b])
            npx = int(common.sum())
            if npx >= min_pixels:
                res.append((int(idx[a]), int(idx[b]), float(np.median(reps[a][common] - reps[b][common])), npx))
    return res


def _combine_task(regions: Sequence[Any], idx: Sequence[int], wcs_in: Sequence[Any], w_tile: Any, tile: Any,
                  order: str, offsets: np.ndarray, F: np.ndarray, sig: np.ndarray, combine: str,
                  psfs: Sequence[Any] | None, G: int) -> np.ndarray:
    from .coadd import _coadd_tile

    shape = tile.outer_shape
    cy, cx = tile.core_shape
    if not idx:
        out = np.zeros((4, cy, cx), np.float32)
        out[2] = 1.0  # mask
        return out
    reps = _reproject_regions(regions, wcs_in, w_tile, shape, order)
    ii = list(idx)
    imgs = [r - offsets[i] for r, i in zip(reps, ii)]
    masks = [~np.isfinite(r) for r in imgs]
    varis = [np.full(shape, sig[i] ** 2) for i in ii]
    method = {"mean": "weighted", "median": "median", "proper": "proper"}[combine]
    img, var, bad, nexp = _coadd_tile(
        *imgs, *masks, *varis, tile=tile, n=len(ii), method=method, F=F[ii], sig=sig[ii], bkg=[0.0] * len(ii),
        n_bkg_arr=0, psfs=[psfs[i] for i in ii] if psfs is not None else None, G=G,
    )
    sl = tile.inner
    return np.stack([img[sl], var[sl], bad[sl].astype(np.float32), nexp[sl].astype(np.float32)]).astype(np.float32)


# ------------------------------------------------------------------- solve
def solve_offsets(pairs: Sequence[tuple[int, int, float, int]], n: int, reference: int | None = None) -> np.ndarray:
    """Additive offsets ``b`` from pairwise differences ``d_ik ≈ b_i - b_k`` (weighted least squares).

    ``pairs``: ``(i, k, d_ik, n_ik)``.  Gauge: ``b_reference = 0`` or, with
    ``reference=None``, ``Σ b = 0`` over each connected group of inputs.
    Inputs overlapping nothing get 0.
    """
    rows, rhs = [], []
    adj: dict[int, set[int]] = {i: set() for i in range(n)}
    for i, k, d, npx in pairs:
        wgt = math.sqrt(max(npx, 1))
        r = np.zeros(n)
        r[i], r[k] = wgt, -wgt
        rows.append(r)
        rhs.append(wgt * d)
        adj[i].add(k)
        adj[k].add(i)
    seen: set[int] = set()
    big = 1e3 * max([math.sqrt(max(p[3], 1)) for p in pairs] + [1.0])
    for s in range(n):
        if s in seen:
            continue
        comp, stack = [], [s]
        seen.add(s)
        while stack:
            u = stack.pop()
            comp.append(u)
            for v in adj[u]:
                if v not in seen:
                    seen.add(v)
                    stack.append(v)
        r = np.zeros(n)
        if reference is not None and reference in comp:
            r[reference] = big
        else:
            r[comp] = big
        rows.append(r)
        rhs.append(0.0)
    A = np.asarray(rows)
    b = np.asarray(rhs)
    sol, *_ = np.linalg.lstsq(A, b, rcond=None)
    return sol


# ---------------------------------------------------------------------- API
def _pixel_scale_arcsec(w: Any) -> float:
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(w)) * 3600.0)


def _noise(ds: xr.Dataset, max_side: int = 1024) -> float:
    from .cutout import _clipped_stats

    h, w = ds["image"].shape
    y0, x0 = max(0, h // 2 - max_side // 2), max(0, w // 2 - max_side // 2)
    sl = (slice(y0, min(h, y0 + max_side)), slice(x0, min(w, x0 + max_side)))
    img, bad = dask.compute(ds["image"].data[sl], ds["mask"].data[sl])
    img = np.asarray(img, float)
    return _clipped_stats(img[~np.asarray(bad) & np.isfinite(img)])[1]


def mosaic(
    inputs: Sequence[Any],
    wcs_out: Any = None,
    resolution: Any = None,
    combine: str = "mean",
    match_background: bool = True,
    *,
    shape_out: tuple[int, int] | None = None,
    output: str | os.PathLike | None = None,
    storage_options: dict[str, Any] | None = None,
    output_storage_options: dict[str, Any] | None = None,
    tile_size: int = 1024,
    order: str = "bilinear",
    reference: int | None = None,
    fluxes: Sequence[float] | None = None,
    psfs: Sequence[Any] | None = None,
    hdu: int | str | None = None,
    chunks: Any = 1024,
    overwrite: bool = False,
) -> xr.Dataset:
    """Reproject exposures with a WCS onto one grid and combine them, one task per output tile.

    Parameters
    ----------
    inputs : sequence
        Images with a celestial WCS: FITS or Zarr paths / fsspec URLs
        (``s3://...``) or Datasets.  Their ``mask`` is honoured (masked
        pixels are not used).
    wcs_out : astropy WCS or Header, optional
        Output grid.  Needs ``shape_out`` unless the WCS carries its
        ``array_shape``.  Default: the optimal celestial TAN grid over all
        inputs (:func:`reproject.mosaicking.find_optimal_celestial_wcs`).
    resolution : float or Quantity, optional
        Output pixel scale (float = arcsec) when ``wcs_out`` is None.
    combine : {"mean", "median", "proper"}
        Inverse-variance weighted mean (one noise level per input), median, or
        Zackay & Ofek (2017) proper coaddition (see :mod:`tilepipe.coadd`).
    match_background : bool
        Solve and subtract additive offsets between overlapping inputs (see
        the module docstring).
    output : str, optional
        Zarr store (local path or fsspec URL) written chunk by chunk; the
        returned Dataset is then opened lazily from it.
    storage_options, output_storage_options : dict, optional
        fsspec options of the inputs and of the output (default: the same).
    tile_size : int
        Side of the output tiles = Zarr chunks (pixels).  Memory per task is
        about ``(tile_size + 2·halo)² × 8 bytes × (3 + 2 × overlapping inputs)``.
    order : str
        Interpolation order of :func:`reproject.reproject_interp`.
    reference : int, optional
        Input whose background level is kept (offset 0); default: the mean
        offset of each connected group of inputs is 0.
    fluxes : sequence of float, optional
        Flux scales ``F_i`` (inputs are divided by them; default 1).
    psfs : sequence, optional
        For ``combine="proper"``: per input a PSF (stamp / callable /
        ``.at(x, y)``) *in output pixels*; default Gaussians of each input's
        ``fwhm`` attribute scaled by the pixel-scale ratio.
    chunks : int
        Dask chunks used to open the inputs.

    Returns
    -------
    xarray.Dataset
        ``image`` (float32), ``variance`` (float32), ``mask`` (bool, True = no
        data), ``coverage`` (int16, number of inputs used per pixel) on
        ``("y", "x")``; attrs ``header`` (the output WCS as cards),
        ``background_offsets``, ``sigmas``, ``combine``, ``inputs``.

    Raises
    ------
    ValueError
        An input without a celestial WCS (named), an empty input list, a
        ``wcs_out`` without a shape.
    """
    check_choice("combine", combine, ("mean", "median", "proper"))
    check_choice("order", order, tuple(_MARGIN))
    tile_size = check_int("tile_size", tile_size, lower=16)
    if isinstance(inputs, (str, bytes, os.PathLike)) or not isinstance(inputs, Sequence):
        raise TypeError("inputs must be a list of images (paths, URLs or Datasets)")
    if len(inputs) == 0:
        raise ValueError("inputs is empty; give at least one image with a WCS")
    dss, names = [], []
    for i, inp in enumerate(inputs):
        ds = open_image(inp, hdu=hdu, chunks=chunks, storage_options=storage_options) if not isinstance(inp, xr.Dataset) else open_image(inp)
        name = os.fspath(inp) if isinstance(inp, (str, os.PathLike)) else f"<Dataset #{i}>"
        if not has_wcs(ds):
            raise ValueError(
                f"input #{i} ({name}) has no celestial WCS (CTYPE1/CTYPE2 sky axes); a mosaic needs every input "
                "astrometrically calibrated: solve it first (e.g. astrometry.net) or leave it out"
            )
        dss.append(ds)
        names.append(name)
    n = len(dss)
    if reference is not None:
        reference = check_int("reference", reference, lower=0)
        if reference >= n:
            raise ValueError(f"reference={reference} but only {n} inputs were given")
    wins = [_wcs(d) for d in dss]
    shapes = [tuple(int(v) for v in d["image"].shape) for d in dss]
    # ---- output grid
    if wcs_out is None:
        from reproject.mosaicking import find_optimal_celestial_wcs

        res_q = None
        if resolution is not None:
            import astropy.units as u

            res_q = resolution if hasattr(resolution, "unit") else float(resolution) * u.arcsec
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w_out, shp = find_optimal_celestial_wcs([(s, w) for s, w in zip(shapes, wins)], resolution=res_q)
        shape_out = (int(shp[0]), int(shp[1]))
    else:
        from astropy.io import fits as _fits
        from astropy.wcs import WCS

        if isinstance(wcs_out, (_fits.Header, list)):
            w_out = _wcs(wcs_out)
        elif isinstance(wcs_out, WCS):
            w_out = wcs_out.celestial if wcs_out.has_celestial else None
            if w_out is None:
                raise ValueError("wcs_out has no celestial axes; give a celestial WCS (e.g. RA---TAN/DEC--TAN)")
        else:
            raise TypeError(f"wcs_out must be an astropy WCS or a FITS Header; got {type(wcs_out).__name__}")
        if shape_out is None:
            if w_out.array_shape is None:
                raise ValueError("wcs_out has no array shape; pass shape_out=(ny, nx)")
            shape_out = tuple(int(v) for v in w_out.array_shape)
    shape_out = (int(shape_out[0]), int(shape_out[1]))
    if min(shape_out) < 1:
        raise ValueError(f"shape_out must be positive; got {shape_out}")
    # ---- noise, flux scales, PSFs
    sig = np.array([_noise(d) for d in dss], dtype=np.float64)
    for i, s in enumerate(sig):
        if not np.isfinite(s) or s <= 0:
            raise ValueError(f"input #{i} ({names[i]}) has no measurable background noise (rms = {s}); is it empty?")
    F = np.ones(n) if fluxes is None else np.asarray([float(f) for f in fluxes], dtype=np.float64)
    if F.size != n or not np.all(F > 0):
        raise ValueError(f"fluxes must hold {n} positive numbers; got {fluxes!r}")
    sig = sig / F  # noise of the flux-scaled inputs
    G = 1
    if combine == "proper":
        from .coadd import GaussianStamp, _stamp

        scale_out = _pixel_scale_arcsec(w_out)
        if psfs is None:
            psfs = []
            for i, d in enumerate(dss):
                f = d.attrs.get("fwhm")
                if f is None:
                    raise ValueError(f"combine='proper' needs a PSF: input #{i} ({names[i]}) has no fwhm; pass psfs=")
                psfs.append(GaussianStamp(float(f) * _pixel_scale_arcsec(wins[i]) / scale_out))
        if len(psfs) != n:
            raise ValueError(f"psfs has {len(psfs)} entries for {n} inputs")
        smax = max(max(_stamp(p, 0.0, 0.0, j).shape) for j, p in enumerate(psfs))
        G = 2 * smax + 1
    halo = G // 2 if combine == "proper" else 0
    nxt = max(1, -(-shape_out[1] // tile_size))
    nyt = max(1, -(-shape_out[0] // tile_size))
    grid = TileGrid(shape_out, nx=nxt, ny=nyt, overlap=halo, align=tile_size)
    margin = _MARGIN[order]
    plan = plan_mosaic(wins, shapes, w_out, grid, margin)
    tile_wcs = [_slice_wcs(w_out, t.outer[0].start, t.outer[1].start) for t in grid.tiles]

    def regions_for(entries: Sequence[Any], scale: np.ndarray | None = None) -> tuple[list[Any], list[int], list[Any]]:
        regs, idx, wl = [], [], []
        for i, (y0, y1, x0, x1) in entries:
            img = dss[i]["image"].data[y0:y1, x0:x1]
            if F[i] != 1.0:
                img = img / F[i]
            regs.append((img, dss[i]["mask"].data[y0:y1, x0:x1]))
            idx.append(i)
            wl.append(_slice_wcs(wins[i], y0, x0))
        return regs, idx, wl

    # ---- background offsets (map -> reduce -> solve)
    offsets = np.zeros(n)
    if match_background and n > 1:
        # statistics on a fixed 512-px grid, so the offsets do not depend on tile_size
        sgrid = TileGrid(shape_out, nx=max(1, -(-shape_out[1] // _STATS_TILE)), ny=max(1, -(-shape_out[0] // _STATS_TILE)),
                         align=_STATS_TILE)
        splan = plan_mosaic(wins, shapes, w_out, sgrid, margin)
        swcs = [_slice_wcs(w_out, t.outer[0].start, t.outer[1].start) for t in sgrid.tiles]
        tasks = []
        for t, entries, wt in zip(sgrid.tiles, splan, swcs):
            if len(entries) < 2:
                continue
            regs, idx, wl = regions_for(entries)
            tasks.append(dask.delayed(_stats_task, pure=True)(regs, idx, wl, wt, t.outer_shape, order))
        per_tile = dask.compute(*tasks)
        acc: dict[tuple[int, int], list[float]] = {}
        for lst in per_tile:
            for i, k, d, npx in lst:
                a = acc.setdefault((i, k), [0.0, 0])
                a[0] += d * npx
                a[1] += npx
        pairs = [(i, k, s / c, c) for (i, k), (s, c) in acc.items() if c > 0]
        offsets = solve_offsets(pairs, n, reference)
        log.info("mosaic: background offsets %s", offsets)
    # ---- combine, lazily, one task per output tile
    blocks = []
    for t, entries, wt in zip(grid.tiles, plan, tile_wcs):
        regs, idx, wl = regions_for(entries)
        d = dask.delayed(_combine_task, pure=True)(regs, idx, wl, wt, t, order, offsets, F * 0 + 1.0, sig, combine,
                                                   psfs, G)
        blocks.append(da.from_delayed(d, shape=(4,) + t.core_shape, dtype=np.float32))
    rows = [da.concatenate(blocks[iy * grid.nx : (iy + 1) * grid.nx], axis=2) for iy in range(grid.ny)]
    stack = da.concatenate(rows, axis=1)
    hdr_cards = header_to_cards(w_out.to_header(relax=True))
    attrs = {
        "header": hdr_cards,
        "combine": combine,
        "background_offsets": [float(v) for v in offsets],
        "sigmas": [float(v) for v in sig],
        "fluxes": [float(v) for v in F],
        "inputs": names,
        "tile_size": tile_size,
        "bunit": dss[0].attrs.get("bunit", "adu"),
    }
    out = xr.Dataset(
        {
            "image": (("y", "x"), stack[0]),
            "variance": (("y", "x"), stack[1]),
            "mask": (("y", "x"), stack[2] > 0.5),
            "coverage": (("y", "x"), stack[3].astype(np.int16)),
        },
        attrs=attrs,
    )
    if output is None:
        return out
    from .io import read_zarr, write_zarr

    out_opts = storage_options if output_storage_options is None else output_storage_options
    write_zarr(out, os.fspath(output), overwrite=overwrite, storage_options=out_opts)
    return read_zarr(os.fspath(output), storage_options=out_opts)
