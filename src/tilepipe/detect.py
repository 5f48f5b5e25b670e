"""Source detection per tile (sep / SExtractor) and the teaching-lab peak tools.

Detection (:func:`detect_sources`)
----------------------------------
The background-subtracted image is searched with :func:`sep.extract`
(Bertin & Arnouts 1996, A&AS 117, 393; Barbary 2016, JOSS 1, 58) tile by tile
on the halo tiles of :class:`tilepipe.TileGrid`:

* threshold ``nsigma * rms`` per pixel, where ``rms`` is the background noise
  map of :func:`tilepipe.estimate_background` (or ``sqrt(variance)`` when no
  rms map is available);
* **ownership by the peak pixel**: a source belongs to the tile whose
  half-open core holds its (unconvolved) peak pixel ``(xpeak, ypeak)``.  The
  peak is an integer pixel, so ownership cannot flip between a tiled and a
  whole-image run through rounding of a float centroid;
* an object whose connected footprint (its whole deblending group) comes within
  the filter half-width of the outer edge of its tile's halo (not the image
  edge) was possibly cut: only a **window around that group** (its bounding
  box inside the core plus a halo of ``max(4 * overlap, 32)`` px, 4x larger at
  every further round, up to ``max_regrow`` rounds) is measured again, and the
  window's sources replace the tile's sources in that box.  Objects still cut
  after that keep flag bit :data:`FLAG_HALO_CUT` (1024) and an
  :class:`~tilepipe.exceptions.OverlapWarning` is issued;
* ids are assigned after the merge, sorted by ``(y, x)``.

Peak tools
----------
:func:`find_peaks`, :func:`centroids`, :func:`second_moments`,
:func:`remove_close`: the steps of a teaching-lab photometric pipeline
(maximum filter, light-weighted centroids, Gaussian widths from second
moments, rejection of multiple peaks on one star), vectorised and tiled.

Conventions: 0-based pixel coordinates, pixel centres at integers, arrays
indexed ``[y, x]``, mask True = bad.
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
import warnings
from typing import Any, Callable, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr
from astropy.table import Table

from ._validate import as_pair, check_choice, check_int, check_positive
from .exceptions import FallbackWarning, NoDetectionsWarning, OverlapWarning
from .tiling import (Region, Tile, TileGrid, _constant_region, make_grid, map_windows, merge_tables, region_of,
                     register_region, several_workers)

__all__ = [
    "detect_sources",
    "find_peaks",
    "centroids",
    "second_moments",
    "remove_close",
    "gaussian_kernel",
    "FLAG_HALO_CUT",
    "SEP_FLAGS",
]

log = logging.getLogger(__name__)

#: flag bit set on a source whose footprint still touches the outer edge of its
#: tile's halo after the tile was re-run with larger halos (measurement cut).
FLAG_HALO_CUT = 1024

#: meaning of the bits of the ``flags`` column (sep's own bits plus ours)
SEP_FLAGS = {
    1: "OBJ_MERGED: object was deblended from a blend",
    2: "OBJ_TRUNC: object touches the image edge or a masked region",
    4: "OBJ_DOVERFLOW: deblending overflow",
    8: "OBJ_SINGU: singular moments",
    FLAG_HALO_CUT: "HALO_CUT: footprint cut by a tile's halo edge (tiled measurement may differ)",
}

#: sep's process-global limits are set and used under this lock, so tile
#: functions stay thread-safe (sep holds the GIL anyway: no parallelism lost).
_SEP_LOCK = threading.Lock()
#: sep's first pixel stack per box (pixels); a box that overflows it is extracted again with the full
#: stack (``max(300000, box pixels / 8)``), which gives the same objects
_PIXSTACK_FIRST = 32_768

_GAUSS_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # FWHM / sigma


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _f32(a: Any) -> np.ndarray:
    """Native-endian, C-contiguous float32 copy/view (what sep needs)."""
    return np.ascontiguousarray(np.asarray(a), dtype=np.float32)


def _meta() -> dict[str, Any]:
    import astropy
    import sep

    from . import __version__

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        "versions": {"tilepipe": __version__, "sep": sep.__version__, "numpy": np.__version__,
                     "astropy": astropy.__version__},
    }


def gaussian_kernel(fwhm: float) -> np.ndarray:
    """A normalised 2-D Gaussian filter kernel of the given FWHM (pixels).

    The kernel is ``2 * ceil(1.5 * fwhm) + 1`` pixels square (truncated at
    about 3.5 sigma), float32, summing to 1.
    """
    fwhm = check_positive("filter_fwhm", fwhm)
    sigma = fwhm / _GAUSS_SIGMA
    half = max(1, int(math.ceil(1.5 * fwhm)))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    k = np.exp(-(xx * xx + yy * yy) / (2.0 * sigma * sigma))
    return (k / k.sum()).astype(np.float32)


_DEFAULT_KERNEL = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float32)


def _kernel(filter_fwhm: float | None) -> np.ndarray | None:
    if filter_fwhm is None:
        return _DEFAULT_KERNEL
    if filter_fwhm is False or filter_fwhm == 0:
        return None
    return gaussian_kernel(filter_fwhm)


def _dask2d(arr: Any, shape: tuple[int, int], name: str) -> da.Array:
    if isinstance(arr, xr.DataArray):
        arr = arr.data
    if not isinstance(arr, da.Array):
        a = np.asarray(arr)
        if a.dtype.kind == "f" and not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
        arr = da.from_array(a, chunks=-1)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape} but the image has shape {tuple(shape)}; they must match")
    return arr


#: Mesh size and good-pixel fraction of the default background (tilepipe.estimate_background's defaults)
_MESH = 64
_MIN_VALID_FRAC = 0.5


def _resolve_background(ds: xr.Dataset, background: Any, nx: int, ny: int | None,
                        chunks: tuple[tuple[int, ...], ...],
                        lazy: bool = False, warn: Callable[[str, type[Warning]], None] | None = None,
                        ) -> tuple[da.Array, da.Array, Any]:
    """Background and threshold-noise maps (lazy, with the tile grid's ``chunks``) for ``ds``.

    ``background`` may be None (run :func:`tilepipe.estimate_background`), a
    Dataset with ``background`` (and optionally ``rms``), an array/DataArray
    (background; noise from ``sqrt(variance)``) or a number (constant).  With
    ``lazy`` and ``background=None`` the mesh statistics are not computed
    here (:func:`tilepipe.background.mesh_background_lazy`): the third value
    is then a function of the computed ``solved`` mesh grids returning the
    bad-mesh warning text (or None), else None.  ``warn(message, category)``
    reports a fallback (default :func:`warnings.warn`).
    """
    shape = tuple(ds["image"].shape)
    var = _lazy2d(ds["variance"].data, shape, "variance", chunks)
    if background is None:
        from .background import fit_mesh_to_image

        # the mesh background's maps do not depend on its tiling: the detection grid's nx, ny capped to
        # what the mesh allows, and an image smaller than one mesh gets a smaller mesh
        mesh, nx, ny, message = fit_mesh_to_image(shape, _MESH, nx, ny if ny is not None else nx)
        if message:
            (warn or warnings.warn)(message, FallbackWarning)
    if background is None and lazy:
        from .background import mesh_background_lazy

        b, r, _, check = mesh_background_lazy(ds, mesh, nx=nx, ny=ny, min_valid_frac=_MIN_VALID_FRAC)
        return _lazy2d(b, shape, "background", chunks), _lazy2d(r, shape, "rms", chunks), check
    if background is None:
        from .background import estimate_background

        bk = estimate_background(ds, mesh, nx=nx, ny=ny, min_valid_frac=_MIN_VALID_FRAC)
        return (_lazy2d(bk["background"], shape, "background", chunks), _lazy2d(bk["rms"], shape, "rms", chunks),
                None)
    if isinstance(background, xr.Dataset):
        if "background" not in background:
            raise ValueError(
                f"the background Dataset has no 'background' variable (it has {list(background.data_vars)}); "
                "pass the result of tilepipe.estimate_background"
            )
        b = _lazy2d(background["background"], shape, "background", chunks)
        r = _lazy2d(background["rms"], shape, "rms", chunks) if "rms" in background else _sqrt(var)
        return b, r, None
    if np.isscalar(background) and not isinstance(background, (str, bytes)):
        value = float(background)  # type: ignore[arg-type]
        if not np.isfinite(value):
            raise ValueError(f"background must be finite; got {background!r}")
        b = _lazy2d(np.broadcast_to(np.float32(value), shape), shape, "background", chunks)
        register_region(b, Region(_constant_region, {"value": np.float32(value), "dtype": np.float32}))
        return b, _sqrt(var), None
    return _lazy2d(background, shape, "background", chunks), _sqrt(var), None


def _sqrt_region(ys: slice, xs: slice, *, a: np.ndarray) -> np.ndarray:
    return np.sqrt(a)


def _sqrt(var: da.Array) -> da.Array:
    """``sqrt(var)``, keeping the variance's region (:class:`~tilepipe.tiling.Region`)."""
    r = region_of(var)
    return register_region(da.sqrt(var), None if r is None else Region(_sqrt_region, {"a": r}))


class _Rows:
    """One box's catalog rows: plain numpy columns (:data:`_COLUMNS`, plus ``tile`` once merged) and ``meta``
    (``status``; ``cut_boxes``: the halo-cut groups' boxes).  What tile tasks return instead of an astropy
    Table: building a Table of 23 columns costs ~2 ms and unpickling one ~1 ms, per tile, against a few
    microseconds for these; :func:`detect_sources` builds the one catalog Table at the end."""

    __slots__ = ("cols", "meta")

    def __init__(self, cols: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.cols = cols
        self.meta = meta

    def __len__(self) -> int:
        return len(self.cols["x"])

    def take(self, sel: np.ndarray) -> "_Rows":
        return _Rows({k: v[sel] for k, v in self.cols.items()}, dict(self.meta))

    @staticmethod
    def concat(parts: Sequence["_Rows"], meta: dict[str, Any]) -> "_Rows":
        return _Rows({k: np.concatenate([p.cols[k] for p in parts]) for k in parts[0].cols}, meta)


def _empty_catalog(status: str = "ok") -> _Rows:
    return _Rows({name: np.zeros(0, dtype=dt) for name, dt in _COLUMNS}, {"status": status})


_COLUMNS = [
    ("x", np.float64), ("y", np.float64), ("flux", np.float64), ("flux_err", np.float64),
    ("a", np.float64), ("b", np.float64), ("theta", np.float64), ("fwhm", np.float64),
    ("ellipticity", np.float64), ("peak", np.float64), ("npix", np.int64), ("flags", np.int32),
    ("x2", np.float64), ("y2", np.float64), ("xy", np.float64), ("cflux", np.float64),
    ("xpeak", np.int64), ("ypeak", np.int64),
    ("xmin", np.int64), ("xmax", np.int64), ("ymin", np.int64), ("ymax", np.int64),
]


# ---------------------------------------------------------------------------
# detection: the tile function
# ---------------------------------------------------------------------------
def _sep_extract(data: np.ndarray, err: np.ndarray, bad: np.ndarray, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One sep.extract call with the process-global limits set (under the lock)."""
    import sep

    size = int(p["pixstack"]) if p["pixstack"] else min(max(300_000, data.size // 8), max(data.size, 1024))
    # sep writes its whole pixel stack before it starts: try a smaller one first (most boxes need far
    # less; ~8 MB fewer pages to touch per 1k tile) and the full size only if that one overflows
    first = size if p["pixstack"] else min(size, max(_PIXSTACK_FIRST, data.size // 64))
    data = np.ascontiguousarray(data, dtype=np.float32)
    err = np.ascontiguousarray(err, dtype=np.float32)
    mask = np.ascontiguousarray(bad).view(np.uint8) if bad is not None and bad.any() else None

    def extract(stack: int) -> tuple[np.ndarray, np.ndarray]:
        with _SEP_LOCK:
            sep.set_extract_pixstack(stack)
            sep.set_sub_object_limit(int(p["sub_object_limit"]))
            return sep.extract(
                data, float(p["nsigma"]), err=err, mask=mask,
                minarea=int(p["minarea"]), filter_kernel=p["kernel"], filter_type=p["filter_type"],
                deblend_nthresh=int(p["deblend_nthresh"]), deblend_cont=float(p["deblend_cont"]),
                clean=bool(p["clean"]), clean_param=float(p["clean_param"]), segmentation_map=True,
            )

    try:
        return extract(first)
    except Exception as exc:  # sep raises a bare Exception for a full pixel stack
        if first == size or "pixel buffer full" not in str(exc):
            raise
    return extract(size)


def _rows(objs: np.ndarray, seg: np.ndarray, var: np.ndarray, dy: int = 0, dx: int = 0) -> dict[str, np.ndarray]:
    """Catalog columns from sep objects; coordinates shifted by ``(dy, dx)``.

    ``flux_err`` is ``sqrt`` of the variance summed over each object's
    segmentation pixels (segmented pixels are never bad, so ``var`` is
    finite there).
    """
    n = len(objs)
    seg = seg.ravel()
    on = np.flatnonzero(seg)  # the object pixels only (a small fraction of a tile)
    flux_var = np.bincount(seg[on], weights=var.ravel()[on], minlength=n + 1)[1:n + 1]
    a = np.asarray(objs["a"], dtype=np.float64)
    b = np.asarray(objs["b"], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ell = np.where(a > 0, 1.0 - b / a, np.nan)
    f8 = lambda k: np.asarray(objs[k], dtype=np.float64)  # noqa: E731
    i8 = lambda k: np.asarray(objs[k], dtype=np.int64)  # noqa: E731
    return {
        "x": f8("x") + dx, "y": f8("y") + dy, "flux": f8("flux"), "flux_err": np.sqrt(flux_var),
        "a": a, "b": b, "theta": f8("theta"), "fwhm": _GAUSS_SIGMA * np.sqrt(0.5 * (a * a + b * b)),
        "ellipticity": ell, "peak": f8("peak"), "npix": i8("npix"),
        "flags": np.asarray(objs["flag"], dtype=np.int32), "x2": f8("x2"), "y2": f8("y2"), "xy": f8("xy"),
        "cflux": f8("cflux"), "xpeak": i8("xpeak") + dx, "ypeak": i8("ypeak") + dy,
        "xmin": i8("xmin") + dx, "xmax": i8("xmax") + dx, "ymin": i8("ymin") + dy, "ymax": i8("ymax") + dy,
    }


def _lazy2d(arr: Any, shape: tuple[int, int], name: str, chunks: tuple[tuple[int, ...], ...]) -> da.Array:
    """A dask array with the tile grid's ``chunks`` (numpy arrays wrapped as views: no copy, no hashing).

    The views are safe: :func:`detect_sources` computes everything before it
    returns.
    """
    import uuid

    if isinstance(arr, xr.DataArray):
        arr = arr.data
    if isinstance(arr, da.Array):
        if arr.shape != tuple(shape):
            raise ValueError(f"{name} has shape {arr.shape} but the image has shape {tuple(shape)}; they must match")
        if arr.chunks == tuple(chunks):
            return arr
        return register_region(arr.rechunk(chunks), region_of(arr))  # same values, any chunks
    a = np.asarray(arr)
    if a.dtype.kind == "f" and not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape} but the image has shape {tuple(shape)}; they must match")
    key = f"tilepipe-detect-{name}-{uuid.uuid4().hex}"
    ye = np.concatenate([[0], np.cumsum(chunks[0])]).astype(int)
    xe = np.concatenate([[0], np.cumsum(chunks[1])]).astype(int)
    dsk = {(key, i, j): a[ye[i]:ye[i + 1], xe[j]:xe[j + 1]]
           for i in range(len(chunks[0])) for j in range(len(chunks[1]))}
    return da.Array(dsk, key, chunks, dtype=a.dtype, meta=np.empty((0, 0), dtype=a.dtype))


def _bundle_block(img: np.ndarray, bkg: np.ndarray, rms: np.ndarray, var: np.ndarray, mask: np.ndarray,
                  out: np.ndarray | None = None) -> np.ndarray:
    """One chunk of the detection inputs as a ``(3, h, w)`` float32 stack, ready for sep.

    Plane 0: ``image - background``; plane 1: the threshold noise; plane 2:
    the variance (0 where not finite).  Bad pixels (mask, non-finite image,
    background or noise, noise <= 0) have data 0, noise 1 and variance NaN:
    the variance plane doubles as the bad-pixel mask, so a tile task hands
    the planes to sep without copying them.  One array instead of five keeps
    the graph small (one halo exchange per tile, not five).
    """
    if out is None:
        out = np.empty((3,) + np.shape(img), dtype=np.float32)
    data, err, v = out[0], out[1], out[2]
    np.subtract(_f32(img), _f32(bkg), out=data)
    np.copyto(err, np.asarray(rms), casting="unsafe")
    np.copyto(v, np.asarray(var), casting="unsafe")
    good = np.isfinite(data)
    good &= err > 0
    good &= err < np.inf  # NaN fails both comparisons
    m = np.asarray(mask)
    if m.dtype != bool or m.any():
        good &= ~m.astype(bool, copy=False)
    vbad = ~np.isfinite(v)
    if vbad.any():
        np.copyto(v, np.float32(0.0), where=vbad)
    if not good.all():  # most tiles have no bad pixel: skip three masked passes
        bad = ~good
        np.copyto(data, np.float32(0.0), where=bad)
        np.copyto(err, np.float32(1.0), where=bad)
        np.copyto(v, np.float32(np.nan), where=bad)
    return out


def _in_box(y: np.ndarray, x: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """``(y, x)`` inside the half-open global box ``(y0, y1, x0, x1)``."""
    return (y >= box[0]) & (y < box[1]) & (x >= box[2]) & (x < box[3])


def _extract(
    bundle: np.ndarray,
    *,
    origin: tuple[int, int],
    shape: tuple[int, int],
    own: tuple[int, int, int, int],
    **params: Any,
) -> Table:
    """sep extraction on one box (a tile's outer box or a re-measurement window).  Pure and thread-safe.

    ``bundle`` is the ``(3, h, w)`` stack of :func:`_bundle_block` for the box
    whose global origin is ``origin``.  Returns the sources whose peak pixel
    lies in the global half-open box ``own = (y0, y1, x0, x1)``, in global
    pixels.  Sources whose deblending group comes within the filter
    half-width + 1 of an edge of the box that is not the image edge get
    :data:`FLAG_HALO_CUT`; ``meta["cut_boxes"]`` lists the bounding boxes of
    those groups clipped to ``own`` (global, half-open), ``meta["status"]``
    is ``"ok"``, ``"masked"`` or ``"failed: ..."``.

    Deblended groups are re-extracted alone on a cutout (other groups masked):
    sep allocates the pixels of a blend to its children with a random number
    generator that restarts at every ``sep.extract`` call, so a blend's
    measurement would otherwise depend on how many blends were processed
    before it in the same call, i.e. on the tiling.  Only the groups that can
    hold an owned source (bounding box meeting ``own``) are re-extracted.
    """
    from scipy import ndimage

    data, err, v = bundle[0], bundle[1], bundle[2]  # read only: the planes may be shared with other tasks
    bad = np.isnan(v)
    if bad.all():
        return _empty_catalog("masked")
    try:
        objs, seg = _sep_extract(data, err, bad, params)
    except Exception as exc:  # sep raises bare Exceptions (pixel stack, deblending overflow, memory)
        return _empty_catalog(f"failed: {exc}")
    if len(objs) == 0:
        return _empty_catalog("ok")
    h, w = data.shape
    y0, x0 = origin
    ly0, ly1, lx0, lx1 = own[0] - y0, own[1] - y0, own[2] - x0, own[3] - x0  # own box, local pixels
    rows = _rows(objs, seg, v)
    # deblending groups = 8-connected components of the segmentation
    groups, ngroups = ndimage.label(seg > 0, structure=np.ones((3, 3), dtype=bool))
    obj_group = groups[rows["ypeak"], rows["xpeak"]].astype(np.int64)
    missing = obj_group == 0  # peak outside its own segment (should not happen): use the segment
    if missing.any():
        obj_group[missing] = np.asarray(
            ndimage.maximum(groups, labels=seg, index=np.flatnonzero(missing) + 1), dtype=np.int64)
    # ystart, ystop, xstart, xstop per group (local): a group is the union of its objects' pixels, so its
    # bounding box is the union of theirs (no pass over the tile as with ndimage.find_objects)
    gb = np.zeros((ngroups + 1, 4), dtype=np.int64)
    gb[:, 0] = gb[:, 2] = np.iinfo(np.int64).max
    np.minimum.at(gb[:, 0], obj_group, rows["ymin"])
    np.maximum.at(gb[:, 1], obj_group, rows["ymax"] + 1)
    np.minimum.at(gb[:, 2], obj_group, rows["xmin"])
    np.maximum.at(gb[:, 3], obj_group, rows["xmax"] + 1)
    gb[gb[:, 0] == np.iinfo(np.int64).max] = 0
    # groups that can hold an owned source: bounding box meets the own box
    relevant = (gb[:, 0] < ly1) & (gb[:, 1] > ly0) & (gb[:, 2] < lx1) & (gb[:, 3] > lx0)
    relevant[0] = False
    kernel = params["kernel"]
    margin = (0 if kernel is None else kernel.shape[0] // 2) + 1
    active = (y0 > 0, y0 + h < shape[0], x0 > 0, x0 + w < shape[1])  # bottom, top, left, right
    cut_group = (
        (active[0] & (gb[:, 0] <= margin)) | (active[1] & (gb[:, 1] - 1 >= h - 1 - margin))
        | (active[2] & (gb[:, 2] <= margin)) | (active[3] & (gb[:, 3] - 1 >= w - 1 - margin))
    ) & relevant
    # keep only the objects of relevant groups, then re-extract their blends one group at a time
    keep = relevant[obj_group]
    rows = {k: c[keep] for k, c in rows.items()}
    obj_group = obj_group[keep]
    nmemb = np.bincount(obj_group, minlength=ngroups + 1)
    merged = np.bincount(obj_group, weights=(rows["flags"] & 1).astype(np.float64), minlength=ngroups + 1)
    redo = np.flatnonzero(((nmemb > 1) | (merged > 0)) & ~cut_group & relevant)
    if redo.size:
        keep = ~np.isin(obj_group, redo)
        parts = [{k: c[keep] for k, c in rows.items()}]
        groups_out = [obj_group[keep]]
        for g in redo:
            sy = slice(max(0, gb[g, 0] - 2 * margin), min(h, gb[g, 1] + 2 * margin))
            sx = slice(max(0, gb[g, 2] - 2 * margin), min(w, gb[g, 3] + 2 * margin))
            gsub = groups[sy, sx]
            cbad = bad[sy, sx] | ((gsub > 0) & (gsub != g))
            try:
                cobjs, cseg = _sep_extract(data[sy, sx], err[sy, sx], cbad, params)
            except Exception as exc:
                return _empty_catalog(f"failed: {exc}")
            if len(cobjs) == 0:
                continue
            crow = _rows(cobjs, cseg, v[sy, sx], sy.start, sx.start)
            mine = groups[crow["ypeak"], crow["xpeak"]] == g
            parts.append({k: c[mine] for k, c in crow.items()})
            groups_out.append(np.full(int(mine.sum()), g, dtype=np.int64))
        rows = {k: np.concatenate([p_[k] for p_ in parts]) for k in rows}
        obj_group = np.concatenate(groups_out)
    rows["flags"] = np.where(cut_group[obj_group], rows["flags"] | FLAG_HALO_CUT, rows["flags"]).astype(np.int32)
    owned = _in_box(rows["ypeak"], rows["xpeak"], (ly0, ly1, lx0, lx1))
    cols = {}
    for name, dt in _COLUMNS:
        col = np.asarray(rows[name])[owned].astype(dt, copy=False)
        if name in ("x", "xmin", "xmax", "xpeak"):
            col = col + (np.float64(x0) if dt == np.float64 else x0)
        elif name in ("y", "ymin", "ymax", "ypeak"):
            col = col + (np.float64(y0) if dt == np.float64 else y0)
        cols[name] = col
    cuts = np.flatnonzero(cut_group)
    cut_boxes = [
        (max(int(gb[g, 0]) + y0, own[0]), min(int(gb[g, 1]) + y0, own[1]),
         max(int(gb[g, 2]) + x0, own[2]), min(int(gb[g, 3]) + x0, own[3]))
        for g in cuts
    ]
    return _Rows(cols, {"cut_boxes": cut_boxes, "status": "ok"})


def _merge_boxes(boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Union-bounding-boxes of intersecting half-open boxes, until they are disjoint."""
    out = [tuple(b) for b in boxes]
    changed = True
    while changed:
        changed = False
        res: list[tuple[int, int, int, int]] = []
        for b in out:
            for i, r in enumerate(res):
                if b[0] < r[1] and r[0] < b[1] and b[2] < r[3] and r[2] < b[3]:
                    res[i] = (min(b[0], r[0]), max(b[1], r[1]), min(b[2], r[2]), max(b[3], r[3]))
                    changed = True
                    break
            else:
                res.append(b)
        out = res
    return out


#: Per-thread scratch buffer for assembling a tile's outer box from its chunk pieces: reusing it saves
#: faulting in ~15 MB of fresh pages per 1k tile (a third of the tile's non-sep time on a worker).
#: Boxes larger than ``_SCRATCH_MAX`` floats (rare re-measurement windows) get a fresh array instead,
#: so a thread never keeps more than 64 MB.
_SCRATCH = threading.local()
_SCRATCH_MAX = 16 * 2**20


def _scratch(h: int, w: int) -> np.ndarray:
    """A ``(3, h, w)`` float32 array in this thread's scratch buffer (valid until the next call)."""
    n = 3 * h * w
    buf = getattr(_SCRATCH, "buf", None)
    if n > _SCRATCH_MAX:
        buf = np.empty(n, dtype=np.float32)
    elif buf is None or buf.size < n:
        buf = _SCRATCH.buf = np.empty(n, dtype=np.float32)
    return buf[:n].reshape(3, h, w)


def _assemble(blocks: list[list[np.ndarray]]) -> np.ndarray:
    """The ``(3, h, w)`` box made of ``blocks[iy][ix]``, in this thread's scratch buffer (valid until the next call).

    sep copies its inputs, and :func:`_extract` returns only new arrays, so reusing the buffer is safe.
    """
    h = sum(row[0].shape[1] for row in blocks)
    w = sum(b.shape[2] for b in blocks[0])
    out = _scratch(h, w)
    y = 0
    for row in blocks:
        x = 0
        for b in row:
            out[:, y:y + b.shape[1], x:x + b.shape[2]] = b
            x += b.shape[2]
        y += row[0].shape[1]
    return out


def _extract_pieces(blocks: list[list[np.ndarray]], cuts: list[list[tuple[slice, slice]]], **kwargs: Any) -> Table:
    """:func:`_extract` on the box made of ``blocks[iy][ix][:, cuts[iy][ix]]`` (chunks and their cut pieces)."""
    if len(blocks) == 1 and len(blocks[0]) == 1:
        return _extract(blocks[0][0][(slice(None),) + cuts[0][0]], **kwargs)
    pieces = [[b[(slice(None),) + c] for b, c in zip(brow, crow)] for brow, crow in zip(blocks, cuts)]
    return _extract(_assemble(pieces), **kwargs)  # _extract keeps no reference to the scratch buffer


def _extract_tasks(bundle: da.Array, jobs: list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]],
                   kwargs: dict[str, Any]) -> list[Table]:
    """Compute :func:`_extract` for each ``(window, own)`` pair of global boxes, as one dask graph.

    ``bundle`` must be optimised already (``dask.optimize``); a chunk shared
    by several windows is computed once.  Each window task cuts its pieces
    from the chunks it overlaps.  On a cluster of several workers, the pieces
    that are only part of a chunk (the halo strips) are cut by small tasks
    first, so only strips travel between workers; in one process (or one
    worker), where nothing travels, the window task takes the chunks
    themselves: a scheduled task costs a few ms, more than cutting a strip.
    """
    import operator
    import uuid

    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph
    from dask.utils import apply

    ye = np.concatenate([[0], np.cumsum(bundle.chunks[1])]).astype(int)
    xe = np.concatenate([[0], np.cumsum(bundle.chunks[2])]).astype(int)
    bname = bundle.name
    name = f"tilepipe-extract-{uuid.uuid4().hex}"
    strips = several_workers()
    dsk: dict[Any, Any] = {}
    for i, (w, own) in enumerate(jobs):
        iys = range(int(np.searchsorted(ye, w[0], "right")) - 1, int(np.searchsorted(ye, w[1], "left")))
        ixs = range(int(np.searchsorted(xe, w[2], "right")) - 1, int(np.searchsorted(xe, w[3], "left")))
        keys, cuts = [], []
        for iy in iys:
            krow, crow = [], []
            for ix in ixs:
                cut = (slice(max(w[0], ye[iy]) - ye[iy], min(w[1], ye[iy + 1]) - ye[iy]),
                       slice(max(w[2], xe[ix]) - xe[ix], min(w[3], xe[ix + 1]) - xe[ix]))
                key = (bname, 0, iy, ix)
                whole = cut[0].stop - cut[0].start == ye[iy + 1] - ye[iy] and cut[1].stop - cut[1].start == xe[ix + 1] - xe[ix]
                if strips and not whole:
                    piece = (name + "-piece", i, iy, ix)
                    dsk[piece] = (operator.getitem, key, (slice(None),) + cut)
                    key, cut = piece, (slice(None), slice(None))
                krow.append(key)
                crow.append(cut)
            keys.append(krow)
            cuts.append(crow)
        dsk[(name, i)] = (apply, _extract_pieces, [keys, cuts], {**kwargs, "origin": (w[0], w[2]), "own": own})
    dsk[name] = (list, [(name, i) for i in range(len(jobs))])
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[bundle])
    (tables,) = dask.compute(Delayed(name, graph), optimize_graph=False)
    return list(tables)


def _extract_window(img: np.ndarray, bkg: np.ndarray, rms: np.ndarray, var: np.ndarray, mask: np.ndarray, *,
                    window: tuple[int, int, int, int], **kwargs: Any) -> Table:
    """:func:`_extract` on a window whose inputs were computed straight from their sources
    (:func:`tilepipe.tiling.map_windows`), its stack built in this thread's scratch buffer."""
    stack = _bundle_block(img, bkg, rms, var, mask, out=_scratch(window[1] - window[0], window[3] - window[2]))
    del img, bkg, rms, var, mask
    return _extract(stack, origin=(window[0], window[2]), **kwargs)  # keeps no reference to the scratch buffer


#: Whether :func:`detect_sources` reads each tile's window straight from the sources when every input
#: has a region (files opened lazily, the default variance, the mesh background): set to False to
#: force the chunk-exchange path (tests compare the two).
_USE_REGIONS: contextvars.ContextVar[bool] = contextvars.ContextVar("tilepipe_detect_regions", default=True)


#: When set (by internal callers that treat the catalog as a by-product, e.g. PSF star detection),
#: :func:`detect_sources` logs its own warnings at INFO instead of issuing them.  A context
#: variable, not ``warnings.catch_warnings`` (process-global filters are not thread-safe).
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("tilepipe_detect_quiet", default=False)


def _default_overlap(fwhm: float, kernel: np.ndarray | None) -> int:
    kh = 0 if kernel is None else kernel.shape[0] // 2
    return int(max(16, math.ceil(5.0 * fwhm) + kh + 2))


def detect_sources(
    ds: Any,
    nsigma: float = 1.5,
    minarea: int = 5,
    filter_fwhm: float | None = None,
    deblend_nthresh: int = 32,
    deblend_cont: float = 0.005,
    background: Any = None,
    *,
    nx: int = 1,
    ny: int | None = None,
    overlap: int | Sequence[int] | None = None,
    filter_type: str = "conv",
    clean: bool = False,
    clean_param: float = 1.0,
    pixstack: int | None = None,
    sub_object_limit: int = 4096,
    max_regrow: int = 3,
) -> Table:
    """Detect sources with sep per tile and merge them into one catalog.

    Parameters
    ----------
    ds : Dataset, array or path
        The image (anything :func:`tilepipe.open_image` accepts).  ``mask``
        (True = bad) pixels are excluded; ``variance`` gives ``flux_err``.
    nsigma : float
        Detection threshold in units of the per-pixel background noise
        (``rms`` of the background, else ``sqrt(variance)``).
    minarea : int
        Minimum number of connected pixels above threshold.
    filter_fwhm : float, optional
        FWHM (pixels) of the Gaussian matched filter; ``None``: sep's default
        3x3 kernel; ``0``: no filtering.
    deblend_nthresh, deblend_cont : int, float
        SExtractor deblending: number of sub-thresholds and minimum contrast.
    background : None, Dataset, array or float
        ``None`` runs :func:`tilepipe.estimate_background` with the same
        ``nx, ny``; a Dataset with ``background`` (and ``rms``), an array
        (background; noise from ``sqrt(variance)``) or a constant are used as
        given.
    nx, ny : int
        Tiles along x and y (``ny`` defaults to ``nx``).
    overlap : int or (int, int), optional
        Halo width (pixels).  Default: ``max(16, ceil(5 * fwhm) + filter
        half-width + 2)`` with ``fwhm`` from ``ds.attrs["fwhm"]``,
        ``filter_fwhm`` or 3 px, clipped to the smallest tile core.  Objects
        larger than the halo are recovered by re-running their tile with a
        4x larger halo (see ``max_regrow``).
    filter_type, clean, clean_param : see :func:`sep.extract`.
    pixstack : int, optional
        sep's pixel stack per tile (default ``max(300000, outer-box pixels / 8)``;
        with the default each box is tried first with a small stack, then with
        that one if the small one overflows: the same objects).  An overflow
        turns the tile into an empty, flagged tile with a
        :class:`~tilepipe.exceptions.FallbackWarning`.
    sub_object_limit : int
        sep's deblending sub-object limit (set inside every task).
    max_regrow : int
        How many rounds of re-measurement of objects cut by their tile's halo
        edge: each round measures a window around each cut group (its
        bounding box in the tile core plus a halo of ``max(4 * overlap, 32)``
        px, 4x larger every round).  Objects still cut get flag
        :data:`FLAG_HALO_CUT` (1024) and an ``OverlapWarning`` is issued.

    Returns
    -------
    astropy.table.Table
        One row per source, sorted by ``(y, x)``: ``id`` (from 1), ``x, y``
        (isophotal barycentre, global 0-based pixels), ``flux, flux_err``
        (isophotal sum of the background-subtracted image and
        ``sqrt(sum(variance))`` over the same pixels), ``a, b, theta``
        (isophotal second-moment ellipse: sigma along the axes, pixels; theta
        in radians counter-clockwise from +x), ``fwhm = 2.3548 *
        sqrt((a^2 + b^2) / 2)``, ``ellipticity = 1 - b/a``, ``peak``,
        ``npix``, ``flags`` (:data:`SEP_FLAGS`), ``tile``, ``xpeak, ypeak``
        (the ownership pixel), bbox ``xmin..ymax``, ``x2, y2, xy, cflux``,
        and ``ra, dec`` (ICRS degrees, whatever the header's axis order and frame) when the image has a celestial WCS.
        ``meta`` holds parameters, per-tile status and package versions.

    Notes
    -----
    Tile invariance: with ``overlap`` at least the radius of the largest
    object plus the filter half-width, the catalog equals the whole-image
    catalog (same rows; positions and fluxes to float rounding) whenever the
    same ``background`` is used.  See ``docs/detection.md``.
    """
    from .image import as_dataset, has_wcs, pixel_to_radec, wcs

    def warn(message: str, category: type[Warning], stacklevel: int = 3) -> None:
        if _QUIET.get():
            log.info("%s: %s", category.__name__, message)
        else:
            warnings.warn(message, category, stacklevel=stacklevel)  # the caller of detect_sources

    ds = as_dataset(ds)
    nsigma = check_positive("nsigma", nsigma)
    minarea = check_int("minarea", minarea, lower=1)
    deblend_nthresh = check_int("deblend_nthresh", deblend_nthresh, lower=1)
    deblend_cont = check_positive("deblend_cont", deblend_cont, allow_zero=True)
    sub_object_limit = check_int("sub_object_limit", sub_object_limit, lower=1)
    max_regrow = check_int("max_regrow", max_regrow, lower=0)
    check_choice("filter_type", filter_type, ("matched", "conv"))
    if pixstack is not None:
        pixstack = check_int("pixstack", pixstack, lower=1000)
    kernel = _kernel(filter_fwhm)
    shape = tuple(ds["image"].shape)
    fwhm = float(ds.attrs.get("fwhm") or (filter_fwhm or 3.0))
    support = _default_overlap(fwhm, kernel)
    probe = TileGrid(shape, nx=nx, ny=ny, overlap=0)
    if overlap is None:
        my, mx = probe.min_core
        ov = (min(support, my) if probe.ny > 1 else 0, min(support, mx) if probe.nx > 1 else 0)
    else:
        ov = as_pair("overlap", overlap, lower=0)
    grid = make_grid(shape, None, nx, ny, ov)
    if overlap is not None:  # through warn(): quiet when asked, pointing at the caller of detect_sources
        grid.check_overlap(support, f"detect_sources (objects of FWHM {fwhm:g} px + filter)",
                           warn=lambda m, c: warn(m, c, stacklevel=5))

    chunks = grid.chunks
    # every input computable on any rectangle (a file read lazily, the default variance, the mesh
    # background): each tile task reads its own window, with no halo exchange between tasks, and the mesh
    # statistics are computed in the same graph as the windows
    lazy = _USE_REGIONS.get() and all(region_of(_lazy2d(ds[k].data, shape, k, chunks)) is not None
                                      for k in ("image", "variance", "mask"))
    bkg, rms, mesh_check = _resolve_background(ds, background, grid.nx, grid.ny, chunks, lazy=lazy,
                                               warn=lambda m, c: warn(m, c, stacklevel=5))
    kwargs = dict(
        shape=shape, nsigma=nsigma, minarea=minarea, kernel=kernel, filter_type=filter_type,
        deblend_nthresh=deblend_nthresh, deblend_cont=deblend_cont, clean=clean, clean_param=clean_param,
        pixstack=pixstack, sub_object_limit=sub_object_limit,
    )
    arrays = [_lazy2d(a, shape, n, chunks) for a, n in
              ((ds["image"].data, "image"), (bkg, "background"), (rms, "rms"), (ds["variance"].data, "variance"),
               (ds["mask"].data, "mask"))]
    regions = [region_of(a) for a in arrays]
    if lazy and all(r is not None for r in regions):
        state = {"regions": regions}

        def run(jobs: list[Any]) -> list[Table]:
            tables, state["regions"] = map_windows(_extract_window, state["regions"], [w for w, _ in jobs],
                                                   [{"own": own} for _, own in jobs], **kwargs)
            return tables
    else:
        bundle = da.map_blocks(_bundle_block, *arrays, new_axis=0, chunks=((3,),) + tuple(chunks), dtype=np.float32,
                               meta=np.empty((0, 0, 0), dtype=np.float32))
        (bundle,) = dask.optimize(bundle)  # fuse the per-chunk chain (read, mask, variance, maps) once

        def run(jobs: list[Any]) -> list[Table]:
            return _extract_tasks(bundle, jobs, kwargs)

    tables = run([(t.outer_box, t.core_box) for t in grid.tiles])
    if mesh_check is not None:  # the mesh statistics were computed with the windows: report bad meshes now
        message = mesh_check(state["regions"][1].kwargs["solved"])
        if message:
            warn(message, FallbackWarning)

    # objects cut by a halo edge: re-measure only windows around their groups, growing the halo 4x per round
    regrown: dict[int, int] = {}
    H = max(4 * max(grid.overlap), 32)
    todo = {k: _merge_boxes(t.meta.get("cut_boxes", [])) for k, t in enumerate(tables)}
    for _ in range(max_regrow):
        todo = {k: b for k, b in todo.items() if b}
        if not todo:
            break
        jobs, owners = [], []
        for k, boxes in todo.items():
            for r in boxes:
                w = (max(0, r[0] - H), min(shape[0], r[1] + H), max(0, r[2] - H), min(shape[1], r[3] + H))
                jobs.append((w, r))
                owners.append(k)
            regrown[k] = regrown.get(k, 0) + 1
        results = run(jobs)
        nxt: dict[int, list[tuple[int, int, int, int]]] = {}
        for k in todo:
            mine = [(r, res) for (_, r), o, res in zip(jobs, owners, results) if o == k]
            if any(res.meta.get("status", "ok").startswith("failed") for _, res in mine):
                # keep the flagged first-pass rows of this tile (the final OverlapWarning reports them)
                log.warning("detect_sources: re-measuring cut objects of tile %d failed: %s", k,
                            [res.meta.get("status") for _, res in mine])
                continue
            t = tables[k]
            out = np.zeros(len(t), dtype=bool)
            for r, _ in mine:
                out |= _in_box(t.cols["ypeak"], t.cols["xpeak"], r)
            tables[k] = _Rows.concat([t.take(~out)] + [res for _, res in mine if len(res)],
                                     {"status": t.meta.get("status", "ok")})
            nxt[k] = _merge_boxes([b for _, res in mine for b in res.meta.get("cut_boxes", [])])
        todo = nxt
        H *= 4
    statuses = {k: t.meta.get("status", "ok") for k, t in enumerate(tables)}
    if all(s == "masked" for s in statuses.values()):
        raise ValueError(
            "every pixel of the image is masked (mask, non-finite image, background or noise); "
            "nothing can be detected. Check the mask and the input image."
        )
    masked = [k for k, s in statuses.items() if s == "masked"]
    if masked:
        warn(
            f"detect_sources: tiles {masked} are entirely masked (mask, NaN image or undefined background/noise); "
            "they contribute no sources",
            FallbackWarning,
        )
    for k, s in statuses.items():
        if s.startswith("failed"):
            warn(
                f"detect_sources: tile {k} ({grid.tile(k).core}) was left empty because sep failed: "
                f"{s[len('failed: '):]}. Increase pixstack= / sub_object_limit=, raise nsigma, "
                "or check the background subtraction.",
                FallbackWarning,
            )
    # one catalog Table: the tiles' rows, sorted by (y, x), ids from 1, "tile" after "flags"
    cols: dict[str, np.ndarray] = {}
    for name, dt in _COLUMNS:
        cols[name] = np.concatenate([t.cols[name] for t in tables]).astype(dt, copy=False)
        if name == "flags":
            cols["tile"] = np.concatenate([np.full(len(t), k, dtype=np.int32) for k, t in enumerate(tables)])
    order = np.lexsort((cols["x"], cols["y"]))
    cat = Table({"id": np.arange(1, order.size + 1, dtype=np.int64), **{k: v[order] for k, v in cols.items()}},
                copy=False)
    if len(cat) == 0:
        warn("detect_sources found no sources; lower nsigma or minarea, or check the background",
             NoDetectionsWarning)
    cut = (np.asarray(cat["flags"]) & FLAG_HALO_CUT) != 0
    if cut.any():
        kh = 0 if kernel is None else kernel.shape[0] // 2
        size = np.maximum(cat["xmax"] - cat["xmin"], cat["ymax"] - cat["ymin"])[cut]
        radius = int(np.ceil(np.max(size) / 2.0)) + kh + 2
        warn(
            f"detect_sources: {int(cut.sum())} sources are still cut by a tile halo after {max_regrow} "
            f"regrowths (flag {FLAG_HALO_CUT}; largest radius about {radius} px): their tiled measurements "
            f"differ from a whole-image run. Use overlap >= {radius}, fewer tiles, or a larger max_regrow.",
            OverlapWarning,
        )
    # a celestial WCS needs CTYPE cards: skip importing astropy.wcs (~0.4 s) for images without any
    ctype = any(str(c[0]).startswith("CTYPE") for c in ds.attrs.get("header", []) if c)
    if len(cat) and ctype and has_wcs(ds):
        ra, dec = pixel_to_radec(wcs(ds), cat["x"], cat["y"])
        cat["ra"] = np.asarray(ra, dtype=np.float64)
        cat["dec"] = np.asarray(dec, dtype=np.float64)
    cat.meta.clear()
    cat.meta.update(_meta())
    cat.meta.update({
        "nsigma": nsigma, "minarea": minarea, "filter_fwhm": filter_fwhm, "deblend_nthresh": deblend_nthresh,
        "deblend_cont": deblend_cont, "nx": grid.nx, "ny": grid.ny, "overlap": list(grid.overlap),
        "ownership": "peak pixel (xpeak, ypeak)", "flag_halo_cut": FLAG_HALO_CUT,
        "tile_status": {int(k): v for k, v in statuses.items() if v != "ok"},
        "regrown_tiles": {int(k): v for k, v in regrown.items()},
    })
    return cat


# ---------------------------------------------------------------------------
# per-tile rows driver (also used by photometry)
# ---------------------------------------------------------------------------
def rows_per_tile(
    func: Callable[..., dict[str, np.ndarray]],
    arrays: Sequence[Any],
    x: np.ndarray,
    y: np.ndarray,
    grid: TileGrid,
    columns: dict[str, Any],
    row_kwargs: dict[str, np.ndarray] | None = None,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
    """Evaluate ``func`` for catalog rows, each on the outer box of the tile owning it.

    ``func(*blocks, x=, y=, origin=(y0, x0), shape=, **kwargs)`` gets the
    outer-box blocks (numpy) and the *global* positions of the rows owned by
    the tile, and returns a dict of per-row arrays.  Rows outside the image
    get the fill values of ``columns`` (name -> (dtype, fill)).  Dask arrays
    are sliced per tile, so no task holds the whole image.  ``row_kwargs``
    are per-row arrays passed to ``func`` sliced to the tile's rows.
    """
    row_kwargs = row_kwargs or {}
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    out = {k: np.full(n, fill, dtype=dt) for k, (dt, fill) in columns.items()}
    if n == 0:
        return out
    owner = np.asarray(grid.owner(x, y))
    if grid.ntiles == 1 and not any(isinstance(a, da.Array) for a in arrays):
        sel = np.flatnonzero(owner == 0)
        if sel.size:
            res = func(*[np.asarray(a) for a in arrays], x=x[sel], y=y[sel], origin=(0, 0), shape=grid.shape,
                       **{k: np.asarray(v)[sel] for k, v in row_kwargs.items()}, **kwargs)
            for k, v in res.items():
                out[k][sel] = v
        return out
    darrays = [a if isinstance(a, da.Array) else da.from_array(np.asarray(a), chunks=grid.chunks) for a in arrays]
    jobs, sels = [], []
    f = dask.delayed(func, pure=True)
    for tile in grid.tiles:
        sel = np.flatnonzero(owner == tile.index)
        if sel.size == 0:
            continue
        blocks = [a[tile.outer] for a in darrays]
        jobs.append(f(*blocks, x=x[sel], y=y[sel], origin=tile.origin, shape=grid.shape,
                      **{k: np.asarray(v)[sel] for k, v in row_kwargs.items()}, **kwargs))
        sels.append(sel)
    for sel, res in zip(sels, dask.compute(*jobs)):
        for k, v in res.items():
            out[k][sel] = v
    return out


# ---------------------------------------------------------------------------
# peak tools
# ---------------------------------------------------------------------------
def _image_and_mask(image: Any, *, subtract_background: bool = True) -> tuple[Any, Any, bool]:
    """Return (image, mask or None, lazy) from a numpy array, DataArray or Dataset.

    For a Dataset the ``background`` variable is subtracted when present.
    """
    if isinstance(image, xr.Dataset):
        if "image" not in image:
            raise ValueError(f"the Dataset has no 'image' variable (it has {list(image.data_vars)})")
        img = image["image"].data
        if subtract_background and "background" in image:
            img = img - image["background"].data.astype(np.float32)
        m = image["mask"].data if "mask" in image else None
        return img, m, isinstance(img, da.Array)
    if isinstance(image, xr.DataArray):
        image = image.data
    if isinstance(image, da.Array):
        if image.ndim != 2:
            raise ValueError(f"image must be 2-D (y, x); got shape {image.shape}")
        return image, None, True
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"image must be 2-D (y, x); got shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise TypeError(f"image must be numeric; got dtype {a.dtype}")
    return _f32(a), None, False


def _peaks_block(img: np.ndarray, *rest: np.ndarray, tile: Tile | None = None, threshold: float | None = None,
                 footprint: int = 3, min_neighbors: int = 4, neighbor_frac: float = 0.5,
                 has_mask: bool = False, has_thr: bool = False) -> Table:
    from scipy import ndimage

    data = _f32(img).astype(np.float64)
    rest = list(rest)
    thr = np.asarray(rest.pop(0), dtype=np.float64) if has_thr else float(threshold)  # type: ignore[arg-type]
    bad = ~np.isfinite(data)
    if has_mask:
        bad |= np.asarray(rest.pop(0), dtype=bool)
    data[bad] = -np.inf
    mx = ndimage.maximum_filter(data, size=footprint, mode="constant", cval=-np.inf)
    is_peak = (data == mx) & np.isfinite(data) & (data > thr)
    if is_peak.any():
        # plateaus (equal neighbouring maxima, e.g. saturated cores): keep the first pixel of each
        lab, nl = ndimage.label(is_peak, structure=np.ones((3, 3), dtype=bool))
        if nl < int(is_peak.sum()):
            yy, xx = np.nonzero(is_peak)
            first = np.zeros(nl + 1, dtype=bool)
            keep = np.zeros(yy.size, dtype=bool)
            for i, l in enumerate(lab[yy, xx]):  # row-major order -> lowest (y, x) first
                if not first[l]:
                    first[l] = keep[i] = True
            is_peak[:] = False
            is_peak[yy[keep], xx[keep]] = True
    yy, xx = np.nonzero(is_peak)
    pv = data[yy, xx]
    pad = np.pad(data, 1, mode="constant", constant_values=-np.inf)
    nelev = np.zeros(yy.size, dtype=np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            nelev += pad[yy + 1 + dy, xx + 1 + dx] > neighbor_frac * pv
    keep = nelev >= min_neighbors
    t = Table()
    t["x"] = xx[keep].astype(np.float64)
    t["y"] = yy[keep].astype(np.float64)
    t["peak"] = pv[keep]
    t["n_elevated"] = nelev[keep]
    return t


def find_peaks(
    image: Any,
    threshold: float | np.ndarray,
    footprint: int = 3,
    min_neighbors: int = 4,
    neighbor_frac: float = 0.5,
    *,
    nx: int = 1,
    ny: int | None = None,
    overlap: int | None = None,
) -> Table:
    """Local maxima above ``threshold`` that are not hot pixels.

    A pixel is a peak when it is the maximum of its ``footprint x footprint``
    neighbourhood (:func:`scipy.ndimage.maximum_filter`), above ``threshold``
    and at least ``min_neighbors`` of its 8 neighbours exceed ``neighbor_frac``
    times its value.  A hot pixel or cosmic-ray hit has no elevated neighbours
    and is rejected; a star (FWHM >= 2.5 px) has all 8.  Equal neighbouring
    maxima (plateaus) give one peak, the first in ``(y, x)`` order.

    Parameters
    ----------
    image : 2-D array or Dataset
        **Sky-subtracted** pixel values (the neighbour test is relative to
        zero).  For a Dataset, its ``background`` variable is subtracted when
        present and ``mask`` pixels (True = bad) are never peaks.
    threshold : float or 2-D array
        Absolute threshold (image units), e.g. ``5 * rms``.
    footprint : int
        Odd size of the maximum filter (pixels).
    min_neighbors : int
        Minimum number of elevated 8-neighbours (0 disables the test).
    neighbor_frac : float
        A neighbour is elevated when above ``neighbor_frac * peak``.
    nx, ny, overlap : int
        Tiling (Datasets / dask images); default overlap ``footprint // 2 + 2``.

    Returns
    -------
    Table
        ``x, y`` (integer-valued float pixels), ``peak``, ``n_elevated``,
        sorted by ``(y, x)``, plus ``id`` and ``tile``.
    """
    footprint = check_int("footprint", footprint, lower=1)
    if footprint % 2 == 0:
        raise ValueError(f"footprint must be odd; got {footprint}")
    min_neighbors = check_int("min_neighbors", min_neighbors, lower=0)
    if min_neighbors > 8:
        raise ValueError(f"min_neighbors must be between 0 and 8; got {min_neighbors}")
    neighbor_frac = check_positive("neighbor_frac", neighbor_frac, allow_zero=True)
    img, mask, _ = _image_and_mask(image)
    arrays = [img]
    has_thr = not np.isscalar(threshold) and np.ndim(threshold) != 0  # a 0-d array is a scalar
    if has_thr:
        thr = threshold.data if isinstance(threshold, xr.DataArray) else threshold
        if tuple(np.shape(thr)) != tuple(img.shape):
            raise ValueError(f"threshold has shape {np.shape(thr)} but the image has shape {img.shape}; "
                             "pass a number or a map shaped like the image")
        arrays.append(thr)
        thr_value = None
    else:
        try:
            thr_value = float(threshold)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise TypeError(f"threshold must be a number or a 2-D array shaped like the image; got {threshold!r}") \
                from None
        if not np.isfinite(thr_value):
            raise ValueError(f"threshold must be finite; got {threshold!r}")
    if mask is not None:
        arrays.append(mask)
    ov = footprint // 2 + 2 if overlap is None else overlap
    kw = dict(threshold=thr_value, footprint=footprint, min_neighbors=min_neighbors,
              neighbor_frac=neighbor_frac, has_mask=mask is not None, has_thr=has_thr)
    grid = make_grid(img.shape, None, nx, ny, ov)
    grid.check_overlap(footprint // 2 + 2, "find_peaks")
    if grid.ntiles == 1 and not any(isinstance(a, da.Array) for a in arrays):
        t = _peaks_block(*[np.asarray(a) for a in arrays], tile=grid.tile(0), **kw)
        t["tile"] = np.zeros(len(t), dtype=np.int32)
        return merge_tables([t])
    from .tiling import map_tiles_table

    return map_tiles_table(_peaks_block, *arrays, grid=grid, **kw)


def _positions(obj: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(obj, Table):
        for xc, yc in (("x", "y"), ("x_centroid", "y_centroid"), ("xcentroid", "ycentroid")):
            if xc in obj.colnames and yc in obj.colnames:
                return np.asarray(obj[xc], dtype=np.float64), np.asarray(obj[yc], dtype=np.float64)
        raise ValueError(f"{name} must have 'x' and 'y' columns; it has {obj.colnames}")
    a = np.asarray(obj, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{name} must be a Table with x, y columns or an (N, 2) array of (x, y); got shape {a.shape}")
    return a[:, 0].copy(), a[:, 1].copy()


def _check_box(box: int) -> int:
    box = check_int("box", box, lower=3)
    if box % 2 == 0:
        raise ValueError(f"box must be odd (a box centred on a pixel); got {box}")
    return box


def _edge_check(px: np.ndarray, py: np.ndarray, half: int, shape: tuple[int, int], edge: str,
                what: str) -> np.ndarray:
    ok = (px - half >= 0) & (py - half >= 0) & (px + half <= shape[1] - 1) & (py + half <= shape[0] - 1)
    if edge == "raise" and not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise ValueError(
            f"{what}: the source at (x={px[i]}, y={py[i]}) is closer than box/2 = {half} px to the image edge "
            f"({int((~ok).sum())} such sources); pass edge='skip' to drop them or use a smaller box"
        )
    return ok


def _stamps(arr: np.ndarray, px: np.ndarray, py: np.ndarray, half: int, origin: tuple[int, int]) -> np.ndarray:
    off = np.arange(-half, half + 1)
    yy = (py - origin[0])[:, None, None] + off[None, :, None]
    xx = (px - origin[1])[:, None, None] + off[None, None, :]
    return arr[yy, xx]


def _sky_subtract(st: np.ndarray, sky: Any) -> np.ndarray:
    if sky == "perimeter":
        per = np.concatenate([st[:, 0, :], st[:, -1, :], st[:, 1:-1, 0], st[:, 1:-1, -1]], axis=1)
        # median of the non-NaN perimeter pixels; all-NaN perimeters get 0 without nanmedian's
        # "All-NaN slice" warning (runs in tile tasks: no warnings.catch_warnings, not thread-safe)
        level = np.full(per.shape[0], np.nan)
        some = ~np.isnan(per).all(axis=1)
        if some.any():
            with np.errstate(invalid="ignore", over="ignore"):
                level[some] = np.nanmedian(per[some], axis=1)
        return st - np.nan_to_num(level)[:, None, None]
    if sky is None:
        return st
    return st - float(sky)


def _centroid_block(img: np.ndarray, *rest: np.ndarray, x: np.ndarray, y: np.ndarray, origin: tuple[int, int],
                    shape: tuple[int, int], box: int, sky: Any, maxiter: int, has_mask: bool) -> dict[str, np.ndarray]:
    data = np.asarray(img, dtype=np.float64)
    if has_mask:
        data = np.where(np.asarray(rest[0], dtype=bool), np.nan, data)
    half = box // 2
    px = np.floor(x + 0.5).astype(np.int64)
    py = np.floor(y + 0.5).astype(np.int64)
    cx = np.full(x.size, np.nan)
    cy = np.full(x.size, np.nan)
    flux = np.full(x.size, np.nan)
    active = np.ones(x.size, dtype=bool)
    off = np.arange(-half, half + 1, dtype=np.float64)
    for it in range(maxiter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        st = _sky_subtract(_stamps(data, px[idx], py[idx], half, origin), sky)
        st = np.nan_to_num(st, nan=0.0)
        s = st.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            mx = (st.sum(axis=1) * off[None, :]).sum(axis=1) / s
            my = (st.sum(axis=2) * off[None, :]).sum(axis=1) / s
        good = s > 0
        cx[idx] = np.where(good, px[idx] + mx, np.nan)
        cy[idx] = np.where(good, py[idx] + my, np.nan)
        flux[idx] = s
        nx_ = np.floor(cx[idx] + 0.5)
        ny_ = np.floor(cy[idx] + 0.5)
        moved = good & ((nx_ != px[idx]) | (ny_ != py[idx]))
        if it == maxiter - 1:
            break
        # recentre only where the new box stays inside the image
        inside = moved & (nx_ - half >= 0) & (ny_ - half >= 0) & (nx_ + half <= shape[1] - 1) & (ny_ + half <= shape[0] - 1)
        px[idx[inside]] = nx_[inside].astype(np.int64)
        py[idx[inside]] = ny_[inside].astype(np.int64)
        active[:] = False
        active[idx[inside]] = True
    return {"x": cx, "y": cy, "box_flux": flux}


def centroids(
    image: Any,
    peaks: Any,
    box: int = 11,
    *,
    edge: str = "raise",
    sky: Any = "perimeter",
    maxiter: int = 3,
    nx: int = 1,
    ny: int | None = None,
) -> Table:
    """Light-weighted (first-moment) sub-pixel centroids in a box around each peak.

    ``x_c = sum(I * x) / sum(I)`` over the ``box x box`` pixels centred on
    the peak pixel, where ``I`` is the image minus a local sky level; the box
    is re-centred on the rounded centroid up to ``maxiter`` times.

    Parameters
    ----------
    image : 2-D array or Dataset
        Pixel values (``mask`` pixels of a Dataset get zero weight).
    peaks : Table (``x, y``) or (N, 2) array of ``(x, y)``
        Starting positions, global 0-based pixels.
    box : int
        Odd box size (pixels).
    edge : {"raise", "skip"}
        A peak closer than ``box // 2`` to the image edge raises ValueError, or
        is dropped with ``"skip"``.
    sky : "perimeter", float or None
        Local sky: median of the box's border pixels, a constant, or none (the
        image is already sky-subtracted).
    maxiter : int
        Number of centroid passes (1 = no re-centring).
    nx, ny : int
        Tiling for large/dask images (rows are computed on the tile owning them).

    Returns
    -------
    Table
        The input columns with ``x, y`` replaced by the centroids, ``x_peak,
        y_peak`` (the input positions) and ``box_flux`` (sky-subtracted box sum).
        NaN centroids where the box holds no positive flux.
    """
    box = _check_box(box)
    check_choice("edge", edge, ("raise", "skip"))
    maxiter = check_int("maxiter", maxiter, lower=1)
    img, mask, _ = _image_and_mask(image)
    x, y = _positions(peaks, "peaks")
    half = box // 2
    px = np.floor(x + 0.5).astype(np.int64)
    py = np.floor(y + 0.5).astype(np.int64)
    ok = _edge_check(px, py, half, img.shape, edge, "centroids")
    grid = make_grid(img.shape, None, nx, ny, half * (maxiter + 1) + 1)
    arrays = [img] + ([mask] if mask is not None else [])
    res = rows_per_tile(_centroid_block, arrays, x[ok], y[ok], grid,
                        {"x": (np.float64, np.nan), "y": (np.float64, np.nan), "box_flux": (np.float64, np.nan)},
                        box=box, sky=sky, maxiter=maxiter, has_mask=mask is not None)
    out = Table(peaks[ok]) if isinstance(peaks, Table) else Table()
    out["x_peak"] = x[ok]
    out["y_peak"] = y[ok]
    out["x"] = res["x"]
    out["y"] = res["y"]
    out["box_flux"] = res["box_flux"]
    if (~ok).any():
        log.info("centroids: skipped %d peaks closer than %d px to the edge", int((~ok).sum()), half)
    return out


def _moments_block(img: np.ndarray, *rest: np.ndarray, x: np.ndarray, y: np.ndarray, origin: tuple[int, int],
                   shape: tuple[int, int], box: int, sky: Any, has_mask: bool) -> dict[str, np.ndarray]:
    data = np.asarray(img, dtype=np.float64)
    if has_mask:
        data = np.where(np.asarray(rest[0], dtype=bool), np.nan, data)
    half = box // 2
    px = np.floor(x + 0.5).astype(np.int64)
    py = np.floor(y + 0.5).astype(np.int64)
    st = np.nan_to_num(_sky_subtract(_stamps(data, px, py, half, origin), sky), nan=0.0)
    off = np.arange(-half, half + 1, dtype=np.float64)
    dx = (px - x)[:, None, None] + off[None, None, :]
    dy = (py - y)[:, None, None] + off[None, :, None]
    s = st.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        vx = (st * dx * dx).sum(axis=(1, 2)) / s - 1.0 / 12.0
        vy = (st * dy * dy).sum(axis=(1, 2)) / s - 1.0 / 12.0
        cxy = (st * dx * dy).sum(axis=(1, 2)) / s
        sx = np.where((s > 0) & (vx > 0), np.sqrt(np.abs(vx)), np.nan)
        sy = np.where((s > 0) & (vy > 0), np.sqrt(np.abs(vy)), np.nan)
    return {"sigma_x": sx, "sigma_y": sy, "sigma_xy": np.where(s > 0, cxy, np.nan)}


def second_moments(
    image: Any,
    centroids: Any,
    box: int,
    *,
    edge: str = "raise",
    sky: Any = "perimeter",
    nx: int = 1,
    ny: int | None = None,
) -> Table:
    """Gaussian widths from light-weighted second moments around given centroids.

    ``sigma_x^2 = sum(I (x - x_c)^2) / sum(I) - 1/12`` (and the same in y),
    where ``I`` is the sky-subtracted image in a ``box x box`` box centred on
    the rounded centroid; the ``1/12`` is Sheppard's correction for pixel
    integration (a pixelated Gaussian of width sigma has second moment
    ``sigma^2 + 1/12``).  Use a box of at least ``8 sigma`` (truncation biases
    the width low: a box of +-4 sigma loses < 0.3 %).

    Parameters
    ----------
    image : 2-D array or Dataset
    centroids : Table (``x, y``) or (N, 2) array
        Centres (e.g. from :func:`centroids`).
    box : int
        Odd box size (pixels).
    edge, sky, nx, ny : see :func:`centroids`.

    Returns
    -------
    Table
        ``x, y, sigma_x, sigma_y, sigma_xy`` (pixels, pixels^2 for
        ``sigma_xy``), ``sigma = sqrt((sigma_x^2 + sigma_y^2) / 2)`` and
        ``fwhm = 2.3548 sigma``; NaN where undefined (no positive flux).
    """
    box = _check_box(box)
    check_choice("edge", edge, ("raise", "skip"))
    img, mask, _ = _image_and_mask(image)
    x, y = _positions(centroids, "centroids")
    half = box // 2
    finite = np.isfinite(x) & np.isfinite(y)
    px = np.floor(np.where(finite, x, half) + 0.5).astype(np.int64)
    py = np.floor(np.where(finite, y, half) + 0.5).astype(np.int64)
    ok = _edge_check(px, py, half, img.shape, edge, "second_moments") & finite
    grid = make_grid(img.shape, None, nx, ny, half + 1)
    arrays = [img] + ([mask] if mask is not None else [])
    cols = {"sigma_x": (np.float64, np.nan), "sigma_y": (np.float64, np.nan), "sigma_xy": (np.float64, np.nan)}
    res = rows_per_tile(_moments_block, arrays, x[ok], y[ok], grid, cols, box=box, sky=sky, has_mask=mask is not None)
    out = Table()
    out["x"] = x[ok]
    out["y"] = y[ok]
    for k in cols:
        out[k] = res[k]
    out["sigma"] = np.sqrt(0.5 * (out["sigma_x"] ** 2 + out["sigma_y"] ** 2))
    out["fwhm"] = _GAUSS_SIGMA * out["sigma"]
    return out


def remove_close(positions: Any, min_sep: float, *, keep: str = "none", flux_col: str = "peak") -> Any:
    """Drop groups of positions closer than ``min_sep`` (several peaks on one star, or blends).

    Positions are linked when closer than ``min_sep`` pixels; linked positions
    form groups (friends of friends).  ``keep="none"`` drops every member of a
    group (blended stars spoil aperture photometry), ``"brightest"`` keeps the
    member with the largest ``flux_col`` (several peaks on one star).

    Parameters
    ----------
    positions : Table (``x, y``) or (N, 2) array
    min_sep : float
        Separation in pixels.
    keep : {"none", "brightest"}
    flux_col : str
        Column ranking group members for ``keep="brightest"``.

    Returns
    -------
    Same type as ``positions``, with the dropped rows removed (order kept).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    min_sep = check_positive("min_sep", min_sep)
    check_choice("keep", keep, ("none", "brightest"))
    x, y = _positions(positions, "positions")
    n = x.size
    if n < 2:
        return positions[:] if isinstance(positions, Table) else np.asarray(positions, dtype=np.float64).copy()
    pairs = cKDTree(np.column_stack([x, y])).query_pairs(min_sep, output_type="ndarray")
    # query_pairs uses <= r: drop pairs exactly at min_sep (strictly closer than min_sep)
    if len(pairs):
        d = np.hypot(x[pairs[:, 0]] - x[pairs[:, 1]], y[pairs[:, 0]] - y[pairs[:, 1]])
        pairs = pairs[d < min_sep]
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])) if len(pairs) else ([], ([], [])), shape=(n, n))
    _, labels = connected_components(g, directed=False)
    sizes = np.bincount(labels)
    keep_mask = sizes[labels] == 1
    if keep == "brightest":
        if not isinstance(positions, Table) or flux_col not in positions.colnames:
            raise ValueError(f"keep='brightest' needs a Table with a {flux_col!r} column (flux_col=)")
        f = np.asarray(positions[flux_col], dtype=np.float64)
        order = np.lexsort((-f, labels))
        first = np.ones(n, dtype=bool)
        first[1:] = labels[order][1:] != labels[order][:-1]
        keep_mask[order[first]] = True
    if isinstance(positions, Table):
        return positions[keep_mask]
    return np.asarray(positions, dtype=np.float64)[keep_mask]


# ---------------------------------------------------------------------------
# quick-look plot
# ---------------------------------------------------------------------------
def plot_detections(ds: Any, cat: Table, path: str, *, max_pixels: int = 4096 * 4096, radius: float | None = None) -> str:
    """Write a PNG quick-look: zscale-stretched image with detections circled (matplotlib Agg).

    Images larger than ``max_pixels`` are shown block-averaged (binned) so the
    plot never loads more than that many pixels at full resolution.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from astropy.visualization import ZScaleInterval
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    from .image import as_dataset

    ds = as_dataset(ds)
    img = ds["image"].data
    h, w = img.shape
    binf = max(1, int(math.ceil(math.sqrt(h * w / max_pixels))))
    if binf > 1:
        hh, ww = (h // binf) * binf, (w // binf) * binf
        img = img[:hh, :ww].reshape(hh // binf, binf, ww // binf, binf).mean(axis=(1, 3))
    arr = np.asarray(img.compute() if hasattr(img, "compute") else img, dtype=np.float32)
    finite = arr[np.isfinite(arr)]
    vmin, vmax = ZScaleInterval().get_limits(finite) if finite.size else (0.0, 1.0)
    fig = Figure(figsize=(8, 8 * h / max(w, 1)), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(arr, origin="lower", cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest",
              extent=(-0.5, w - 0.5, -0.5, h - 0.5))
    rad = radius or max(3.0, 2.0 * float(np.nanmedian(cat["fwhm"])) if len(cat) and "fwhm" in cat.colnames else 5.0)
    for xx, yy in zip(np.asarray(cat["x"]), np.asarray(cat["y"])):
        ax.add_patch(Circle((xx, yy), rad, fill=False, color="lime", lw=0.6))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(-0.5, h - 0.5)
    ax.set_axis_off()
    fig.savefig(path)
    return path
