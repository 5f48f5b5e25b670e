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
3. **Resampling** (the convention of :func:`reproject.reproject_interp`,
   ``order``): the exact output-pixel → sky → input-pixel transform (with
   reproject's round-trip check) is evaluated on nodes every ``coord_step``
   output pixels of a grid anchored at output pixel (0, 0) and interpolated
   bilinearly in between (error < 1e-4 px for ``coord_step=16`` on TAN/TPV
   grids a few degrees apart; ``coord_step=1`` = exact at every pixel); the
   input region is then interpolated with :func:`scipy.ndimage.map_coordinates`
   (pixel values at pixel centres, half a pixel of border extrapolation, NaN
   beyond; masked pixels give no value).  Each pixel's value depends only on
   its global position, so the result does not depend on the tiling.  This
   replaces per-pixel WCS calls (about 90 % of the time of a
   ``reproject_interp`` call) by a few thousand per tile.
4. **Background matching** (map → reduce → map), when ``match_background``:
   per 1024 x 1024 block of the output (a fixed grid, so the result does not
   depend on ``tile_size``), every pair of inputs ``(i, k)`` overlapping there
   contributes the median of ``r_i - r_k`` over their common valid pixels
   (``r`` the resampled images, evaluated only where two or more inputs
   overlap) and the pixel count; the reduce step averages the per-block
   medians weighted by counts into ``d_ik`` and solves the weighted
   least-squares system ``b_i - b_k = d_ik`` (weights √n_ik) with the gauge
   ``b_reference = 0`` (or ``Σ b_i = 0`` over each connected group of
   overlapping inputs when ``reference`` is None); ``b_i`` is then subtracted
   from input ``i``.  Only additive offsets are matched: a sky gradient common
   to all exposures stays (subtract it first with
   :func:`tilepipe.subtract_background` if unwanted).
5. Per tile: resample every overlapping region onto the tile's outer box,
   subtract the offsets and combine: ``mean`` (inverse-variance weighted mean
   with one noise level ``σ_i`` per input, accumulated one input at a time),
   ``median``, or ``proper`` (Zackay & Ofek 2017, as :func:`tilepipe.coadd`,
   with Gaussian PSFs from the inputs' ``fwhm`` scaled to output pixels, or
   ``psfs=`` given in output pixels).  Keep the core.
6. The lazily assembled Dataset (``image``, ``variance``, ``mask``,
   ``coverage``) is written straight to Zarr (:func:`tilepipe.io.write_zarr`,
   local or any fsspec URL), chunk by chunk from the workers, so no process
   ever holds the whole mosaic.

Pixel values are interpolated (surface brightness is preserved; to preserve
total flux per pixel multiply by the ratio of pixel areas).  ``variance`` is
``Σ w_i² σ_i² / (Σ w_i)²`` from the inputs' global noise levels ``σ_i``
(for ``proper``: propagated exactly through the ZO17 filters, see
:mod:`tilepipe.coadd`): it ignores the noise correlation introduced by
resampling.  ``σ_i`` is measured on a strided sample of the input's central
region from the clipped MAD of differences of pixels at least 4 px apart
(÷ √2, :func:`tilepipe.image._sky_and_noise`), so sky gradients and sources
do not count as noise.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
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
_STATS_TILE = 1024
_MARGIN = {"nearest-neighbor": 2, "bilinear": 3, "biquadratic": 4, "bicubic": 5}
_ORDER = {"nearest-neighbor": 0, "bilinear": 1, "biquadratic": 2, "bicubic": 3}


# ------------------------------------------------------------------ geometry
def _same_sky_axes(a: Any, b: Any) -> bool:
    """Whether two celestial WCSs give world values in the same frame and axis order (then raw world values
    can be passed from one to the other)."""
    wa, wb = a.wcs, b.wcs
    eq = (wa.equinox, wb.equinox)
    return ((wa.lng, wa.lat) == (wb.lng, wb.lat) and [c[:4] for c in wa.ctype] == [c[:4] for c in wb.ctype]
            and wa.radesys == wb.radesys and (eq[0] == eq[1] or all(np.isnan(v) for v in eq)))


def _sky_map(w_from: Any, w_to: Any, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of ``w_from`` → pixels of ``w_to`` through the sky.

    Raw world values when both WCSs share frame and axis order (fast), else
    through :class:`~astropy.coordinates.SkyCoord` (an input in galactic or
    FK4 coordinates, or with latitude first, onto an ICRS output).
    """
    if _same_sky_axes(w_from, w_to):
        px, py = w_to.world_to_pixel_values(*w_from.pixel_to_world_values(x, y))
    else:
        px, py = w_to.world_to_pixel(w_from.pixel_to_world(x, y))
    return np.asarray(px, np.float64), np.asarray(py, np.float64)


def _map_points(w_out: Any, w_in: Any, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Output pixel ``(x, y)`` → input pixel through the sky; NaN where the round trip back misses by > 1 px.

    The round-trip test is the one of :func:`reproject.reproject_interp`
    (``roundtrip_coords=True``): points that do not map back (far side of the
    sky, outside a projection's domain) get no value.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    with np.errstate(all="ignore"):
        ix, iy = _sky_map(w_out, w_in, x, y)
        ix = np.array(ix, np.float64, copy=True)
        iy = np.array(iy, np.float64, copy=True)
        bx, by = _sky_map(w_in, w_out, ix, iy)
        miss = ~(np.abs(np.asarray(bx) - x) <= 1.0) | ~(np.abs(np.asarray(by) - y) <= 1.0)
    ix[miss] = np.nan
    iy[miss] = np.nan
    return ix, iy


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
    with np.errstate(all="ignore"):
        ix, iy = _sky_map(w_out, w_in, px, py)
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


def _footprint_box(w_in: Any, in_shape: tuple[int, int], w_out: Any, shape_out: tuple[int, int],
                   pad: int = 4, step: int = 16) -> tuple[int, int, int, int] | None:
    """Output pixel box holding input ``w_in``'s footprint (its border mapped to the output), clipped to the
    output; the whole output when part of the border has no output position; None when disjoint."""
    h, w = in_shape
    xs = np.unique(np.r_[np.arange(0, w, step), w - 1]).astype(float)
    ys = np.unique(np.r_[np.arange(0, h, step), h - 1]).astype(float)
    bx = np.r_[xs, np.full(ys.size, -0.5), np.full(ys.size, w - 0.5), xs]
    by = np.r_[np.full(xs.size, -0.5), ys, ys, np.full(xs.size, h - 0.5)]
    with np.errstate(all="ignore"):
        ox, oy = _sky_map(w_in, w_out, bx, by)
    if not (np.isfinite(ox).all() and np.isfinite(oy).all()):
        return 0, shape_out[0], 0, shape_out[1]
    y0 = max(int(math.floor(oy.min())) - pad, 0)
    y1 = min(int(math.ceil(oy.max())) + pad + 1, shape_out[0])
    x0 = max(int(math.floor(ox.min())) - pad, 0)
    x1 = min(int(math.ceil(ox.max())) + pad + 1, shape_out[1])
    if y1 <= y0 or x1 <= x0:
        return None
    return y0, y1, x0, x1


def plan_mosaic(inputs_wcs: Sequence[Any], in_shapes: Sequence[tuple[int, int]], w_out: Any, grid: TileGrid,
                margin: int) -> list[list[tuple[int, tuple[int, int, int, int]]]]:
    """For every tile of ``grid``: the list of ``(input index, input box)`` overlapping its outer box.

    Input boxes are ``(y0, y1, x0, x1)`` in the input's pixels, grown by
    ``margin`` for the interpolation kernel and clipped to the input.
    """
    feet = [_footprint_box(w, s, w_out, grid.shape) for w, s in zip(inputs_wcs, in_shapes)]
    plan = []
    for t in grid.tiles:
        box = t.outer_box
        entries = []
        for i, (w, s, f) in enumerate(zip(inputs_wcs, in_shapes, feet)):
            if f is None or f[1] <= box[0] or box[1] <= f[0] or f[3] <= box[2] or box[3] <= f[2]:
                continue
            b = _input_box(w, s, w_out, box, margin)
            if b is not None:
                entries.append((i, b))
        plan.append(entries)
    return plan


# ------------------------------------------------- pixel mapping and sampling
def _node_range(a0: int, a1: int, step: int) -> tuple[int, int]:
    """First and last node index (inclusive) whose nodes enclose pixels ``a0 .. a1-1`` (nodes at ``k·step``)."""
    return a0 // step, (a1 - 1) // step + 1


def _lerp_weights(a0: int, a1: int, k0: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Left node index (relative to ``k0``) and weight of the right node for pixels ``a0 .. a1-1``.

    Computed from the global pixel index only, so a pixel gets the same
    interpolated coordinate whatever tile it is in (tile invariance).
    """
    p = np.arange(a0, a1)
    k = p // step
    return k - k0, (p - k * step) / float(step)


class _Work:
    """Per-task scratch buffers, reused for every input of a task.

    Large temporaries are expensive on dask workers: distributed sets
    ``MALLOC_TRIM_THRESHOLD_``, which makes glibc map and unmap (and the kernel
    zero) every large array afresh.  Tasks therefore allocate a few buffers of
    the tile size once and work in place.
    """

    def __init__(self, npix: int) -> None:
        self.npix = npix
        self._f64 = np.empty(3 * npix)
        self._f32 = np.empty(npix, np.float32)
        self._b = np.empty(2 * npix, bool)

    def coords(self, shape: tuple[int, int]) -> np.ndarray:
        return self._f64[: 2 * shape[0] * shape[1]].reshape((2,) + shape)

    def scratch(self, shape: tuple[int, int]) -> np.ndarray:
        return self._f64[2 * self.npix : 2 * self.npix + shape[0] * shape[1]].reshape(shape)

    def values(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._f32[: int(np.prod(shape))].reshape(shape)

    def mask(self, k: int, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
        return self._b[k * self.npix : k * self.npix + n].reshape(shape)


def _interp_nodes(nodes: np.ndarray, ky0: int, kx0: int, box: tuple[int, int, int, int], step: int,
                  out: np.ndarray, scratch: np.ndarray) -> None:
    """Bilinear interpolation of node values (at global output pixels ``(ky0+i, kx0+j)·step``) onto ``box``."""
    y0, y1, x0, x1 = box
    j, t = _lerp_weights(x0, x1, kx0, step)
    i, v = _lerp_weights(y0, y1, ky0, step)
    rows = nodes[:, j] * (1.0 - t) + nodes[:, j + 1] * t
    np.take(rows, i, axis=0, out=out)
    out *= (1.0 - v)[:, None]
    np.take(rows, i + 1, axis=0, out=scratch)
    scratch *= v[:, None]
    out += scratch


def _pixel_map(w_out: Any, w_in: Any, in_shape: tuple[int, int], box: tuple[int, int, int, int],
               step: int, work: _Work | None = None) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """Input pixel coordinates ``(2, ny, nx)`` = ``(y, x)`` of the output pixels of ``box`` (global pixels).

    Exact WCS → sky → WCS transforms (:func:`_map_points`) are evaluated on
    nodes every ``step`` output pixels, on a grid anchored at output pixel
    (0, 0), and interpolated bilinearly in between (``step=1``: exact at
    every pixel).  Returns the sub-box of ``box`` that can land inside the
    input (cells whose four nodes all lie beyond one edge of the input are
    dropped; cells with a node that failed the round trip too) and the
    coordinates there (a view into ``work``'s buffer), or None when no pixel
    of ``box`` lands in the input.
    """
    y0, y1, x0, x1 = box
    ky0, ky1 = _node_range(y0, y1, step)
    kx0, kx1 = _node_range(x0, x1, step)
    gx, gy = np.meshgrid(np.arange(kx0, kx1 + 1) * float(step), np.arange(ky0, ky1 + 1) * float(step))
    nx_, ny_ = _map_points(w_out, w_in, gx, gy)
    h, w = in_shape
    eps = 1e-3

    def all4(m: np.ndarray) -> np.ndarray:
        return m[:-1, :-1] & m[1:, :-1] & m[:-1, 1:] & m[1:, 1:]

    bad = ~(np.isfinite(nx_) & np.isfinite(ny_))
    with np.errstate(invalid="ignore"):
        out = (all4(nx_ < -0.5 - eps) | all4(nx_ > w - 0.5 + eps) | all4(ny_ < -0.5 - eps)
               | all4(ny_ > h - 0.5 + eps))
    out |= ~all4(~bad)
    cells = ~out
    if not cells.any():
        return None
    rows = np.flatnonzero(cells.any(axis=1))
    cols = np.flatnonzero(cells.any(axis=0))
    sub = (max(y0, (ky0 + int(rows[0])) * step), min(y1, (ky0 + int(rows[-1]) + 1) * step),
           max(x0, (kx0 + int(cols[0])) * step), min(x1, (kx0 + int(cols[-1]) + 1) * step))
    if sub[1] <= sub[0] or sub[3] <= sub[2]:
        return None
    shape = (sub[1] - sub[0], sub[3] - sub[2])
    if work is None:
        coords, scratch = np.empty((2,) + shape), np.empty(shape)
    else:
        coords, scratch = work.coords(shape), work.scratch(shape)
    _interp_nodes(ny_, ky0, kx0, sub, step, coords[0], scratch)
    _interp_nodes(nx_, ky0, kx0, sub, step, coords[1], scratch)
    return sub, coords


def _inside(coords: np.ndarray, in_shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose input coordinates fall on the input (pixel edges at -0.5 and n - 0.5)."""
    h, w = in_shape
    return (coords[0] >= -0.5) & (coords[0] <= h - 0.5) & (coords[1] >= -0.5) & (coords[1] <= w - 0.5)


def _sample(region: np.ndarray, origin: tuple[int, int], in_shape: tuple[int, int], coords: np.ndarray,
            order: int, out: np.ndarray | None = None,
            masks: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Interpolate the input region (starting at input pixel ``origin``; NaN = no data) at ``coords``.

    ``coords`` (input pixels ``(y, x)`` of the whole input, shape ``(2, ...)``)
    is modified in place; ``out`` (float32) and ``masks`` (two bool arrays)
    are optional buffers of the shape of ``coords[0]``; on return
    ``masks[0]`` is True where the result is finite.  Same convention as
    :func:`reproject.reproject_interp`: pixel values sit at pixel centres,
    coordinates within half a pixel outside the input's border take the
    border value, farther ones (and NaN coordinates) get NaN; NaN pixels give
    NaN wherever they enter the interpolation.  Coordinates that would need
    pixels beyond an interior edge of the region get NaN too (the region is
    cut with a margin, so this does not happen).  Returns float32.
    """
    from scipy.ndimage import map_coordinates

    data = np.asarray(region, dtype=np.float32)
    shape = coords.shape[1:]
    if masks is None:
        masks = (np.empty(shape, bool), np.empty(shape, bool))
    ok, tmp = masks
    ok[...] = True
    for d, n, o, nr in zip((0, 1), in_shape, origin, data.shape):
        c = coords[d]
        c -= o
        lo = -0.5 if o == 0 else 0.0
        hi = nr - 0.5 if o + nr >= n else nr - 1.0
        np.greater_equal(c, lo, out=tmp)
        ok &= tmp
        np.less_equal(c, hi, out=tmp)
        ok &= tmp
    np.nan_to_num(coords, copy=False, nan=-1.0)  # NaN coordinates are outside (ok is False there)
    if out is None:
        out = np.empty(shape, np.float32)
    # "nearest" extends the border pixels by half a pixel as reproject does; farther pixels are blanked below
    if order <= 1:
        map_coordinates(data, coords, output=out, order=order, mode="nearest", prefilter=False)
    else:
        # splines: the prefilter would spread NaN over whole rows, so fill, interpolate, and blank every
        # output pixel whose bilinear footprint touches a missing input pixel
        bad = np.isnan(data)
        map_coordinates(np.where(bad, np.float32(0.0), data), coords, output=out, order=order, mode="nearest")
        if bad.any():
            hit = map_coordinates(bad.astype(np.float32), coords, output=np.float32, order=1, mode="nearest",
                                  prefilter=False)
            ok &= hit == 0
    np.logical_not(ok, out=tmp)
    np.copyto(out, np.float32(np.nan), where=tmp)
    np.isfinite(out, out=ok)  # on return: True where a value was interpolated
    return out


def _local(sub: tuple[int, int, int, int], box: tuple[int, int, int, int]) -> tuple[slice, slice]:
    return slice(sub[0] - box[0], sub[1] - box[0]), slice(sub[2] - box[2], sub[3] - box[2])


# --------------------------------------------------------------- tile workers
# Tasks get the WCS objects as shared graph keys and work on private copies (astropy WCS objects are not
# documented as thread-safe); everything else is plain numpy, so the tasks are thread-safe and warning-free.
def _stats_task(box: tuple[int, int, int, int], regions: Sequence[np.ndarray], origins: Sequence[tuple[int, int]],
                idx: Sequence[int], w_out: Any, wins: Sequence[Any], in_shapes: Sequence[tuple[int, int]],
                scales: Sequence[float], order: int, step: int,
                min_pixels: int = 25) -> list[tuple[int, int, float, int]]:
    """Pairwise median differences ``(i, k, median(r_i - r_k), n)`` on the output pixels of ``box``.

    Only pixels covered by at least two inputs are interpolated.
    """
    w_out = w_out.deepcopy()
    shape = (box[1] - box[0], box[3] - box[2])
    count = np.zeros(shape, np.int16)
    maps = []
    for e, k in enumerate(idx):
        pm = _pixel_map(w_out, wins[e].deepcopy(), in_shapes[e], box, step)
        if pm is None:
            continue
        sub, coords = pm
        inb = _inside(coords, in_shapes[e])
        count[_local(sub, box)] += inb
        maps.append((e, sub, coords, inb))
    both = count >= 2
    n_both = int(both.sum())
    if n_both < min_pixels or len(maps) < 2:
        return []
    pos = np.full(shape, -1, np.int64)
    pos[both] = np.arange(n_both)
    vals = np.full((len(maps), n_both), np.nan, np.float32)
    for row, (e, sub, coords, inb) in enumerate(maps):
        ls = _local(sub, box)
        sel = both[ls] & inb
        if not sel.any():
            continue
        v = _sample(regions[e], origins[e], in_shapes[e], coords[:, sel], order)
        vals[row, pos[ls][sel]] = v / np.float32(scales[e]) if scales[e] != 1.0 else v
    res = []
    for a in range(len(maps)):
        for b in range(a + 1, len(maps)):
            common = np.isfinite(vals[a]) & np.isfinite(vals[b])
            npx = int(common.sum())
            if npx >= min_pixels:
                d = vals[a][common] - vals[b][common]
                res.append((int(idx[maps[a][0]]), int(idx[maps[b][0]]), float(np.median(d)), npx))
    return res


def _combine_task(tile: Any, regions: Sequence[np.ndarray], origins: Sequence[tuple[int, int]],
                  idx: Sequence[int], w_out: Any, wins: Sequence[Any], in_shapes: Sequence[tuple[int, int]],
                  scales: Sequence[float], order: int, step: int, offsets: np.ndarray, sig: np.ndarray,
                  combine: str, psfs: Sequence[Any] | None, G: int) -> tuple[np.ndarray, ...]:
    """One output tile (core): image (float32), variance (float32), mask (bool, True = no data), coverage (int16)."""
    box = tile.outer_box
    shape = tile.outer_shape
    sl = tile.inner
    w_out = w_out.deepcopy()
    work = _Work(shape[0] * shape[1])
    mean = combine == "mean"
    if mean:
        # inverse-variance weighted mean with one noise level per input (w_i = 1 / σ_i², variance 1 / Σ w_i),
        # accumulated in place one input at a time
        num = np.zeros(shape)
        wsum = np.zeros(shape)
    nexp = np.zeros(shape, np.int16)
    reps = []  # median / proper: (input index, sub-box, resampled values)
    for e, k in enumerate(idx):
        pm = _pixel_map(w_out, wins[e].deepcopy(), in_shapes[e], box, step, work)
        if pm is None:
            continue
        sub, coords = pm
        sshape = coords.shape[1:]
        ok, tmp = work.mask(0, sshape), work.mask(1, sshape)
        r = _sample(regions[e], origins[e], in_shapes[e], coords, order,
                    out=work.values(sshape) if mean else None, masks=(ok, tmp))
        if scales[e] != 1.0:
            r /= np.float32(scales[e])
        ls = _local(sub, box)
        np.add(nexp[ls], 1, out=nexp[ls], where=ok, casting="unsafe")
        if mean:
            wk = 1.0 / sig[k] ** 2
            r -= np.float32(offsets[k])
            np.nan_to_num(r, copy=False, nan=0.0)
            np.multiply(r, wk, out=r, casting="same_kind")
            num[ls] += r
            np.add(wsum[ls], wk, out=wsum[ls], where=ok)
        else:
            reps.append((int(k), sub, r))
    cy, cx = tile.core_shape
    if not nexp.any():
        return (np.zeros((cy, cx), np.float32), np.zeros((cy, cx), np.float32), np.ones((cy, cx), bool),
                np.zeros((cy, cx), np.int16))
    if mean:
        any_ok = nexp[sl] > 0
        img = np.zeros((cy, cx), np.float32)
        var = np.zeros((cy, cx), np.float32)
        np.divide(num[sl], wsum[sl], out=img, where=any_ok, casting="same_kind")
        np.divide(1.0, wsum[sl], out=var, where=any_ok, casting="same_kind")
        return img, var, ~any_ok, nexp[sl].copy()
    from .coadd import _coadd_tile

    del work
    ii = [k for k, _, _ in reps]
    imgs = []
    for k, sub, r in reps:
        full = np.full(shape, np.nan, np.float32)
        full[_local(sub, box)] = r - np.float32(offsets[k])
        imgs.append(full)
    del reps
    masks = [~np.isfinite(m) for m in imgs]
    varis = [np.full(shape, sig[i] ** 2, np.float32) for i in ii]
    method = {"median": "median", "proper": "proper"}[combine]
    img, var, bad, nexp = _coadd_tile(
        *imgs, *masks, *varis, tile=tile, n=len(ii), method=method, F=np.ones(len(ii)), sig=sig[ii],
        bkg=[0.0] * len(ii), n_bkg_arr=0, psfs=[psfs[i] for i in ii] if psfs is not None else None, G=G,
    )
    return (np.ascontiguousarray(img[sl], np.float32), np.ascontiguousarray(var[sl], np.float32),
            np.ascontiguousarray(bad[sl], bool), np.ascontiguousarray(nexp[sl], np.int16))


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


def _noise_of(img: np.ndarray, bad: np.ndarray, stride: int) -> float:
    """Background noise of a strided sample (every ``stride``-th pixel): :func:`tilepipe.image._sky_and_noise`.

    The noise comes from the clipped MAD of differences of sample pixels at
    least 4 image pixels apart (÷ √2), so sky gradients and sources do not
    count as noise (a MAD of the raw values would count them).
    """
    from .image import _sky_and_noise

    img = np.array(img, np.float64)
    img[np.asarray(bad, bool)] = np.nan
    return float(_sky_and_noise(img, stride)[1])


def _noises(dss: Sequence[xr.Dataset], max_side: int = 1024, max_pixels: int = 256 * 256) -> np.ndarray:
    """Robust background noise of each input (:func:`_noise_of`) from its central ``max_side``² box, every
    ``s``-th pixel in each direction so that at most ``max_pixels`` are sorted; one task per input."""
    todo = []
    for ds in dss:
        h, w = ds["image"].shape
        y0, x0 = max(0, h // 2 - max_side // 2), max(0, w // 2 - max_side // 2)
        y1, x1 = min(h, y0 + max_side), min(w, x0 + max_side)
        s = max(1, int(math.ceil(math.sqrt((y1 - y0) * (x1 - x0) / max_pixels))))
        sl = (slice(y0, y1, s), slice(x0, x1, s))
        todo.append(dask.delayed(_noise_of, pure=True)(ds["image"].data[sl], ds["mask"].data[sl], s))
    return np.array(dask.compute(*todo), dtype=np.float64)


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
    coord_step: int = 16,
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
        Side of the output tiles = Zarr chunks (pixels).  Memory per task for
        ``mean`` is about ``(tile_size + 2·halo)² × 80 bytes`` plus the input
        regions (float32); ``median``/``proper`` add ``13 bytes`` per pixel and
        overlapping input.
    order : str
        Interpolation order (names of :func:`reproject.reproject_interp`).
    coord_step : int
        Spacing (output pixels) of the nodes where the WCS → WCS transform is
        evaluated exactly; bilinear in between (see the module docstring).
        1 = exact transform at every pixel (slow: about 90 % of the run time).
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
    coord_step = check_int("coord_step", coord_step, lower=1)
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
    sig = _noises(dss)
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
                    raise ValueError(
                        f"combine='proper' needs a PSF: input #{i} ({names[i]}) has no fwhm; pass psfs= (one PSF "
                        "per input), or give every input a FWHM in pixels (a FWHM, SEEING_PIX or PSF_FWHM header "
                        "card, or tilepipe.open_image(..., fwhm=)), or use combine='mean'/'median'")
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
    # the WCSs enter the graph once each (shared keys), not once per task
    token = uuid.uuid4().hex[:12]
    w_out_d = dask.delayed(w_out, name=f"mosaic-wcs-out-{token}")
    wins_d = [dask.delayed(w, name=f"mosaic-wcs-{i}-{token}") for i, w in enumerate(wins)]
    iorder = _ORDER[order]
    # one float32 array per input with NaN = no data (masked or non-finite): one region per task and input
    nan_coded = [da.where(d["mask"].data, np.float32(np.nan), d["image"].data.astype(np.float32)) for d in dss]

    def task_args(entries: Sequence[Any]) -> tuple[list[Any], ...]:
        regs, origins, idx, wl, shp, sc = [], [], [], [], [], []
        for i, (y0, y1, x0, x1) in entries:
            regs.append(nan_coded[i][y0:y1, x0:x1])
            origins.append((y0, x0))
            idx.append(i)
            wl.append(wins_d[i])
            shp.append(shapes[i])
            sc.append(float(F[i]))
        return regs, origins, idx, wl, shp, sc

    # ---- background offsets (map -> reduce -> solve)
    offsets = np.zeros(n)
    if match_background and n > 1:
        # statistics on a fixed grid of _STATS_TILE-px blocks, so the offsets do not depend on tile_size
        sgrid = TileGrid(shape_out, nx=max(1, -(-shape_out[1] // _STATS_TILE)), ny=max(1, -(-shape_out[0] // _STATS_TILE)),
                         align=_STATS_TILE)
        splan = plan_mosaic(wins, shapes, w_out, sgrid, margin)
        tasks = []
        for t, entries in zip(sgrid.tiles, splan):
            if len(entries) < 2:
                continue
            regs, origins, idx, wl, shp, sc = task_args(entries)
            box = t.outer_box
            tasks.append(dask.delayed(_stats_task)(box, regs, origins, idx, w_out_d, wl, shp, sc, iorder, coord_step,
                                                   dask_key_name=f"mosaic-stats-{token}-{t.index}"))
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
    parts: list[list[Any]] = [[], [], [], []]
    dtypes = (np.float32, np.float32, bool, np.int16)
    for t, entries in zip(grid.tiles, plan):
        regs, origins, idx, wl, shp, sc = task_args(entries)
        d = dask.delayed(_combine_task, nout=4)(t, regs, origins, idx, w_out_d, wl, shp, sc, iorder, coord_step,
                                                offsets, sig, combine, psfs, G,
                                                dask_key_name=f"mosaic-tile-{token}-{t.index}")
        for j in range(4):
            parts[j].append(da.from_delayed(d[j], shape=t.core_shape, dtype=dtypes[j]))

    def assemble(blocks: list[Any]) -> Any:
        return da.concatenate([da.concatenate(blocks[iy * grid.nx : (iy + 1) * grid.nx], axis=1)
                               for iy in range(grid.ny)], axis=0)

    image, variance, nomask, coverage = (assemble(p) for p in parts)
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
            "image": (("y", "x"), image),
            "variance": (("y", "x"), variance),
            "mask": (("y", "x"), nomask),
            "coverage": (("y", "x"), coverage),
        },
        attrs=attrs,
    )
    if output is None:
        return out
    from .io import read_zarr, write_zarr

    out_opts = storage_options if output_storage_options is None else output_storage_options
    write_zarr(out, os.fspath(output), overwrite=overwrite, storage_options=out_opts)
    return read_zarr(os.fspath(output), storage_options=out_opts)
