"""The halo-tile engine: :class:`TileGrid`, :func:`map_tiles`, :func:`map_tiles_table`.

Conventions
-----------
* Arrays are indexed ``[y, x]`` (numpy order), pixel centres at integer
  coordinates, 0-based: pixel ``i`` covers ``[i - 0.5, i + 0.5)``.
* The **cores** of the ``ny x nx`` tiles partition the image exactly.  Each
  tile's **outer box** is its core grown by ``overlap`` pixels on every side,
  clipped at the image edge.  A task reads the outer box, computes, and the
  engine keeps the core.
* **Ownership**: a point ``(x, y)`` (float, global pixel coordinates) belongs
  to the tile whose half-open core ``[x0, x1) x [y0, y1)`` holds the pixel
  ``(floor(x + 0.5), floor(y + 0.5))``, so every source of a merged catalog
  appears exactly once.

The engine is built on :mod:`dask.array`: chunks are the cores,
``dask.array.overlap.overlap(..., boundary="none", allow_rechunk=False)``
adds the halos, :func:`dask.array.map_blocks` runs the per-tile function and
the engine trims to the core.  No silent rechunking happens: an ``overlap``
larger than the smallest core is refused with a clear error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import dask
import dask.array as da
import numpy as np
from astropy.table import Table, vstack

from ._validate import as_pair, check_int

__all__ = ["Region", "Tile", "TileGrid", "bind_regions", "evaluate_regions", "fill_regions", "map_tiles",
           "map_tiles_table", "map_windows", "region_of", "register_region", "resolve_regions", "split_edges"]

log = logging.getLogger(__name__)


def split_edges(n: int, k: int, align: int = 1) -> np.ndarray:
    """Split ``n`` pixels into ``k`` contiguous cores.

    Core boundaries fall on multiples of ``align`` (except the image edge);
    core sizes, counted in units of ``align``, differ by at most one (the
    larger ones first), and the last core takes the remainder when ``n`` is not
    a multiple of ``align``; that partial cell never forms a core alone when
    another core can spare a whole cell (the last core then has one more cell
    than the one before it).

    Returns
    -------
    edges : ndarray of int, shape (k + 1,)
        ``edges[i]:edges[i + 1]`` is core ``i``.
    """
    ncell = -(-n // align)
    if k > ncell:
        unit = "pixels" if align == 1 else f"cells of {align} pixels"
        raise ValueError(
            f"cannot cut an axis of {n} pixels ({ncell} {unit}) into {k} tiles; "
            f"use at most {ncell} tiles along this axis"
        )
    base, extra = divmod(ncell, k)
    cells = np.full(k, base, dtype=np.int64)
    cells[:extra] += 1
    if n % align and base == 1 and extra:
        # the last cell is partial: never leave it alone as a core (a few px, narrower than any halo) when
        # another core can give it a whole cell
        cells[extra - 1] -= 1
        cells[-1] += 1
    edges = np.concatenate([[0], np.cumsum(cells) * align])
    edges[-1] = n
    return np.minimum(edges, n)


def _box(sl: tuple[slice, slice]) -> tuple[int, int, int, int]:
    return (sl[0].start, sl[0].stop, sl[1].start, sl[1].stop)


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`.

    Attributes
    ----------
    index : int
        Flat index ``iy * nx + ix`` (row-major).
    iy, ix : int
        Row and column of the tile in the grid.
    core : (slice, slice)
        The core in global ``[y, x]`` pixel coordinates.
    outer : (slice, slice)
        The outer box (core + halo, clipped at the image edge).
    inner : (slice, slice)
        The core's slices inside the outer box.
    """

    index: int
    iy: int
    ix: int
    core: tuple[slice, slice]
    outer: tuple[slice, slice]
    inner: tuple[slice, slice]

    @property
    def origin(self) -> tuple[int, int]:
        """``(y0, x0)`` of the outer box in global pixels."""
        return self.outer[0].start, self.outer[1].start

    @property
    def outer_box(self) -> tuple[int, int, int, int]:
        """The outer box as a window ``(y0, y1, x0, x1)`` (global, half-open): what :func:`map_windows` takes."""
        return _box(self.outer)

    @property
    def core_box(self) -> tuple[int, int, int, int]:
        """The core as a window ``(y0, y1, x0, x1)`` (global, half-open)."""
        return _box(self.core)

    @property
    def core_shape(self) -> tuple[int, int]:
        return (self.core[0].stop - self.core[0].start, self.core[1].stop - self.core[1].start)

    @property
    def outer_shape(self) -> tuple[int, int]:
        return (self.outer[0].stop - self.outer[0].start, self.outer[1].stop - self.outer[1].start)

    def touches_edge(self, shape: tuple[int, int]) -> tuple[bool, bool, bool, bool]:
        """Whether the outer box touches the image edge: (bottom, top, left, right)."""
        return (
            self.outer[0].start == 0,
            self.outer[0].stop == shape[0],
            self.outer[1].start == 0,
            self.outer[1].stop == shape[1],
        )


class TileGrid:
    """An ``ny x nx`` grid of halo tiles over an image of shape ``(height, width)``.

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(ny_pix, nx_pix)``.
    nx, ny : int
        Number of tiles along x and y (``ny`` defaults to ``nx``).
    overlap : int or (int, int)
        Halo width in pixels (``(oy, ox)`` for different halos per axis).
    align : int or (int, int)
        Core boundaries fall on multiples of ``align`` pixels (e.g. a
        background mesh size), except at the image edge.

    Examples
    --------
    >>> g = TileGrid((12, 12), nx=5, ny=2, overlap=2)
    >>> g.ntiles, g.chunks
    (10, ((6, 6), (3, 3, 2, 2, 2)))
    """

    def __init__(
        self,
        shape: Sequence[int],
        nx: int = 1,
        ny: int | None = None,
        overlap: int | Sequence[int] = 0,
        align: int | Sequence[int] = 1,
    ) -> None:
        shape = tuple(int(s) for s in np.atleast_1d(shape))
        if len(shape) != 2:
            raise ValueError(f"shape must be 2-D (ny, nx); got {shape!r}. Pass a single image plane.")
        if min(shape) < 1:
            raise ValueError(f"shape must be positive; got {shape!r}")
        nx = check_int("nx", nx, lower=1)
        ny = nx if ny is None else check_int("ny", ny, lower=1)
        oy, ox = as_pair("overlap", overlap, lower=0)
        ay, ax = as_pair("align", align, lower=1)
        self.shape: tuple[int, int] = shape  # type: ignore[assignment]
        self.nx, self.ny = nx, ny
        self.overlap: tuple[int, int] = (oy, ox)
        self.align: tuple[int, int] = (ay, ax)
        try:
            self.y_edges = split_edges(shape[0], ny, ay)
        except ValueError as exc:
            raise ValueError(f"ny={ny}: {exc}") from None
        try:
            self.x_edges = split_edges(shape[1], nx, ax)
        except ValueError as exc:
            raise ValueError(f"nx={nx}: {exc}") from None

    # ------------------------------------------------------------------ basics
    def __repr__(self) -> str:
        return (
            f"TileGrid(shape={self.shape}, nx={self.nx}, ny={self.ny}, "
            f"overlap={self.overlap}, align={self.align})"
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TileGrid)
            and self.shape == other.shape
            and np.array_equal(self.y_edges, other.y_edges)
            and np.array_equal(self.x_edges, other.x_edges)
            and self.overlap == other.overlap
        )

    def __len__(self) -> int:
        return self.ntiles

    def __iter__(self):
        return iter(self.tiles)

    @property
    def ntiles(self) -> int:
        return self.nx * self.ny

    @property
    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Core sizes as dask chunks ``((cy...), (cx...))``."""
        return (tuple(int(v) for v in np.diff(self.y_edges)), tuple(int(v) for v in np.diff(self.x_edges)))

    @property
    def min_core(self) -> tuple[int, int]:
        cy, cx = self.chunks
        return min(cy), min(cx)

    def tile(self, index: int) -> Tile:
        """Return tile number ``index`` (row-major)."""
        if not 0 <= index < self.ntiles:
            raise IndexError(f"tile index {index} out of range for {self.ntiles} tiles")
        iy, ix = divmod(int(index), self.nx)
        y0, y1 = int(self.y_edges[iy]), int(self.y_edges[iy + 1])
        x0, x1 = int(self.x_edges[ix]), int(self.x_edges[ix + 1])
        oy, ox = self.overlap
        Y0, Y1 = max(0, y0 - oy), min(self.shape[0], y1 + oy)
        X0, X1 = max(0, x0 - ox), min(self.shape[1], x1 + ox)
        return Tile(
            index=int(index),
            iy=iy,
            ix=ix,
            core=(slice(y0, y1), slice(x0, x1)),
            outer=(slice(Y0, Y1), slice(X0, X1)),
            inner=(slice(y0 - Y0, y1 - Y0), slice(x0 - X0, x1 - X0)),
        )

    @property
    def tiles(self) -> list[Tile]:
        """All tiles, row-major."""
        return [self.tile(i) for i in range(self.ntiles)]

    def owner(self, x: Any, y: Any) -> np.ndarray | int:
        """Index of the tile owning the point(s) ``(x, y)`` by the half-open core rule.

        Points are global pixel coordinates (0-based, pixel centres at
        integers); a point is owned by the tile whose core holds the pixel
        ``floor(x + 0.5), floor(y + 0.5)``.  Points outside the image get -1.
        """
        xa = np.asarray(x, dtype=np.float64)
        ya = np.asarray(y, dtype=np.float64)
        px = np.floor(xa + 0.5)
        py = np.floor(ya + 0.5)
        inside = (px >= 0) & (px < self.shape[1]) & (py >= 0) & (py < self.shape[0])
        ix = np.searchsorted(self.x_edges, np.where(inside, px, 0), side="right") - 1
        iy = np.searchsorted(self.y_edges, np.where(inside, py, 0), side="right") - 1
        idx = np.where(inside, iy * self.nx + ix, -1)
        if idx.ndim == 0:
            return int(idx)
        return idx.astype(np.int64)

    def border_distance(self) -> np.ndarray:
        """Distance (pixels) of every pixel to the nearest interior core border.

        Useful for seam tests: pixels near a border between two tiles have a
        small distance; image edges do not count as borders.
        """
        h, w = self.shape
        yy = np.arange(h)
        xx = np.arange(w)
        inner_y = self.y_edges[1:-1]
        inner_x = self.x_edges[1:-1]
        big = np.iinfo(np.int64).max // 4
        dy = np.full(h, big) if inner_y.size == 0 else np.min(np.abs(yy[:, None] + 0.5 - inner_y[None, :]), axis=1)
        dx = np.full(w, big) if inner_x.size == 0 else np.min(np.abs(xx[:, None] + 0.5 - inner_x[None, :]), axis=1)
        return np.minimum(dy[:, None], dx[None, :])

    # ------------------------------------------------------------- validation
    def check_overlap(self, support: int | Sequence[int], what: str = "this operation",
                      warn: Callable[[str, type[Warning]], None] | None = None) -> bool:
        """Warn when ``overlap`` is smaller than an operation's support radius.

        Returns True when the overlap is sufficient for tile invariance.
        ``warn(message, category)`` replaces :func:`warnings.warn` (e.g. to
        log instead, or to point the warning at another caller).
        """
        sy, sx = as_pair("support", support, lower=0)
        oy, ox = self.overlap
        if (self.ny > 1 and oy < sy) or (self.nx > 1 and ox < sx):
            from .exceptions import OverlapWarning

            message = (f"overlap={self.overlap} is smaller than the support ({sy}, {sx}) px of {what}: "
                       f"the tiled result will differ from the whole-image result near tile borders. "
                       f"Use overlap >= {max(sy, sx)}.")
            if warn is None:
                import warnings

                warnings.warn(message, OverlapWarning, stacklevel=3)
            else:
                warn(message, OverlapWarning)
            return False
        return True

    def _check_engine(self) -> None:
        oy, ox = self.overlap
        my, mx = self.min_core
        if (self.ny > 1 and oy > my) or (self.nx > 1 and ox > mx):
            raise ValueError(
                f"overlap={self.overlap} is larger than the smallest tile core ({my}, {mx}) px; "
                f"use fewer tiles (smaller nx/ny) or a smaller overlap"
            )


# ---------------------------------------------------------------------------
# map_tiles
# ---------------------------------------------------------------------------


def _as_dask(arr: Any, grid: TileGrid, name: str) -> da.Array:
    if hasattr(arr, "data") and hasattr(arr, "dims") and not isinstance(arr, (np.ndarray, da.Array)):
        arr = arr.data  # xarray.DataArray
    if isinstance(arr, da.Array):
        if arr.shape != grid.shape:
            raise ValueError(f"{name} has shape {arr.shape}, expected {grid.shape} (all inputs must have the same shape)")
        if arr.chunks != grid.chunks:
            arr = arr.rechunk(grid.chunks)
        return arr
    a = np.asarray(arr)
    if a.shape != grid.shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {grid.shape} (all inputs must have the same shape)")
    return da.from_array(a, chunks=grid.chunks)


def make_grid(
    shape: Sequence[int],
    grid: TileGrid | None = None,
    nx: int = 1,
    ny: int | None = None,
    overlap: int | Sequence[int] = 0,
    align: int | Sequence[int] = 1,
) -> TileGrid:
    """Return ``grid`` (checked against ``shape``) or a new :class:`TileGrid`."""
    if grid is not None:
        if tuple(grid.shape) != tuple(shape):
            raise ValueError(f"grid shape {grid.shape} does not match the image shape {tuple(shape)}")
        return grid
    return TileGrid(shape, nx=nx, ny=ny, overlap=overlap, align=align)


def _computing_client() -> Any:
    """The ``distributed.Client`` dask computes on now, or None (no client, or e.g. ``scheduler="synchronous"``
    set inside a client context)."""
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        return None
    return client if dask.base.get_scheduler() == client.get else None


def uses_distributed() -> bool:
    """Whether dask computes on a distributed cluster (the current ``distributed.Client`` is the scheduler)."""
    return _computing_client() is not None


def several_workers() -> bool:
    """Whether dask computes on a distributed cluster of more than one worker.

    Tile tasks that assemble their outer box from neighbouring chunks use it
    to choose how: with several workers, the halo strips are cut by small
    tasks where the chunks live, so only strips travel between workers; in
    one process or one worker, where nothing travels, a tile task takes the
    neighbouring chunks themselves (each scheduled task costs a few ms).
    """
    client = _computing_client()
    if client is None:
        return False
    try:
        return len(client.scheduler_info().get("workers", {})) > 1
    except Exception:  # noqa: BLE001 - a client that cannot answer: assume the general case
        return True


# ---------------------------------------------------------------------------
# regions: arrays whose any rectangle can be computed straight from their sources
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Region:
    """How to compute any rectangle of a 2-D array directly from its sources.

    ``func(ys, xs, **kwargs)`` returns the pixels ``[ys, xs]`` (global slices,
    possibly with a step: a strided sample; :func:`pixels` gives their
    coordinates).
    A ``kwargs`` value that is itself a :class:`Region` is evaluated on the
    same rectangle first (once per evaluation, however often it is used); a
    small :class:`dask.array.Array` value (a global statistic) is computed
    once by :func:`resolve_regions` before any rectangle is.

    Tile tasks of a heavy 2-D stencil (detection) use regions to read each
    tile's outer box from the file instead of exchanging halos between
    neighbouring chunks: every task is then independent, holds only its own
    box, and a worker's memory does not grow with the image (the halo pixels
    are read twice, a few per cent of the tile).
    """

    func: Callable[..., np.ndarray]
    kwargs: dict[str, Any]


#: dask array name -> Region.  Filled by the readers and the lazy maps that know how to compute a
#: rectangle (FITS files, the default variance, the mesh background); any other operation on the
#: array gives it a new name, which is simply not found here.
_REGIONS: dict[str, Region] = {}
_REGIONS_MAX = 4096


def register_region(arr: Any, region: Region | None) -> Any:
    """Record that ``region`` computes any rectangle of the dask array ``arr``; returns ``arr``."""
    if region is not None and isinstance(arr, da.Array) and arr.ndim == 2:
        if len(_REGIONS) >= _REGIONS_MAX:
            for k in list(_REGIONS)[: _REGIONS_MAX // 4]:  # oldest first (dicts keep insertion order)
                del _REGIONS[k]
        _REGIONS[arr.name] = region
    return arr


def region_of(arr: Any) -> Region | None:
    """The :class:`Region` registered for ``arr`` (a dask array or DataArray), or None."""
    if hasattr(arr, "dims") and hasattr(arr, "data") and not isinstance(arr, (np.ndarray, da.Array)):
        arr = arr.data
    return _REGIONS.get(arr.name) if isinstance(arr, da.Array) else None


def _lazy_args(r: Region, out: dict[int, da.Array]) -> None:
    for v in r.kwargs.values():
        if isinstance(v, Region):
            _lazy_args(v, out)
        elif isinstance(v, da.Array):
            out[id(v)] = v


def _swap_args(r: Region, slots: dict[int, Any], done: dict[int, Region]) -> Region:
    if id(r) not in done:
        kw = {k: _swap_args(v, slots, done) if isinstance(v, Region)
              else slots.get(id(v), v) if isinstance(v, da.Array) else v
              for k, v in r.kwargs.items()}
        done[id(r)] = Region(r.func, kw)
    return done[id(r)]


def resolve_regions(regions: Sequence[Region]) -> list[Region]:
    """Copies of ``regions`` with every dask-array argument computed (in one :func:`dask.compute`)."""
    templates, arrays = bind_regions(regions)
    return fill_regions(templates, dask.compute(*arrays)) if arrays else list(regions)


@dataclass(frozen=True)
class _Slot:
    """Placeholder for the ``index``-th lazy argument of a bound region (see :func:`bind_regions`)."""

    index: int


def bind_regions(regions: Sequence[Region]) -> tuple[list[Region], list[da.Array]]:
    """Split ``regions`` into templates (dask arguments replaced by slots) and those single-chunk arrays.

    For graphs that compute the global statistics and use them in the same
    run: pass each array's key to :func:`fill_regions` inside a task.
    """
    lazy: dict[int, da.Array] = {}
    for r in regions:
        _lazy_args(r, lazy)
    slots = {k: _Slot(i) for i, k in enumerate(lazy)}
    done: dict[int, Region] = {}
    templates = [_swap_args(r, slots, done) for r in regions]
    arrays = [a if a.npartitions == 1 else a.rechunk(a.shape) for a in lazy.values()]
    return templates, arrays


def _fill(r: Region, values: Sequence[Any], done: dict[int, Region]) -> Region:
    if id(r) not in done:
        kw = {k: _fill(v, values, done) if isinstance(v, Region) else values[v.index] if isinstance(v, _Slot) else v
              for k, v in r.kwargs.items()}
        done[id(r)] = Region(r.func, kw)
    return done[id(r)]


def fill_regions(templates: Sequence[Region], values: Sequence[Any]) -> list[Region]:
    """The regions of :func:`bind_regions` with their slots filled by the computed ``values``."""
    done: dict[int, Region] = {}
    return [_fill(r, values, done) for r in templates]


def _evaluate(r: Region, ys: slice, xs: slice, memo: dict[int, np.ndarray]) -> np.ndarray:
    if id(r) not in memo:
        kw = {k: _evaluate(v, ys, xs, memo) if isinstance(v, Region) else v for k, v in r.kwargs.items()}
        memo[id(r)] = r.func(ys, xs, **kw)
    return memo[id(r)]


def evaluate_regions(regions: Sequence[Region], ys: slice, xs: slice) -> list[np.ndarray]:
    """The rectangle ``[ys, xs]`` of each (resolved) region; shared sub-regions are computed once.

    Plain recursion with an explicit memo (no recursive closure: a closure
    that refers to itself is a reference cycle, and its memo, holding every
    intermediate image of the window, would live until the next garbage
    collection).
    """
    memo: dict[int, np.ndarray] = {}
    return [_evaluate(r, ys, xs, memo) for r in regions]


def pixels(sl: slice) -> np.ndarray:
    """The global pixel coordinates a region's slice ``sl`` (start, stop, optional step) stands for."""
    return np.arange(sl.start, sl.stop, sl.step or 1)


def _region_chunk(regions: list[Region], ys: slice, xs: slice) -> np.ndarray:
    return evaluate_regions(regions, ys, xs)[0]


def region_array(region: Region, grid: TileGrid, dtype: Any, label: str) -> da.Array:
    """A lazy dask array chunked on ``grid``'s tile cores, each chunk computed from ``region`` (and registered
    with it): for outputs that expose an intermediate image without persisting it."""
    import uuid

    from dask.highlevelgraph import HighLevelGraph

    name = f"{label}-{uuid.uuid4().hex}"
    spec = name + "-region"
    dsk: dict[Any, Any] = {spec: (list, [region])}  # one copy of the recipe per worker, not one per chunk
    for t in grid.tiles:
        dsk[(name, t.iy, t.ix)] = (_region_chunk, spec, t.core[0], t.core[1])
    arr = da.Array(HighLevelGraph.from_collections(name, dsk, dependencies=[]), name, chunks=grid.chunks,
                   dtype=dtype, meta=np.empty((0, 0), dtype=dtype))
    return register_region(arr, region)


def _window_task(func: Callable[..., Any], regions: list[Region], window: tuple[int, int, int, int],
                 kwargs: dict[str, Any]) -> Any:
    pixels = evaluate_regions(regions, slice(window[0], window[1]), slice(window[2], window[3]))
    return func(*pixels, window=window, **kwargs)


def map_windows(func: Callable[..., Any], regions: Sequence[Region], windows: Sequence[tuple[int, int, int, int]],
                per_window: Sequence[dict[str, Any]] | None = None, **kwargs: Any) -> tuple[list[Any], list[Region]]:
    """Run ``func`` on each window, its inputs computed straight from their sources: one independent task each.

    ``func(*pixels, window=(y0, y1, x0, x1), **kwargs, **per_window[i])``
    receives the rectangle ``[y0:y1, x0:x1]`` of every region (in the order of
    ``regions``).  No task depends on another (no halo exchange between
    tiles): a worker holds only the windows it is working on, however large
    the image, and nothing travels but the region recipes (once per worker)
    and the results.  The regions' global statistics (dask-array arguments)
    are computed in the same graph, before the windows (one round trip).

    Returns
    -------
    results : list
        ``func``'s result per window.
    regions : list of Region
        The regions with their statistics filled in, to pass to a later call
        (no statistic is computed twice).
    """
    import uuid

    from dask.core import flatten
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    templates, lazies = bind_regions(regions)
    # the statistics' own graphs optimised (fused) as dask.compute would: chains of small element-wise
    # tasks per chunk (e.g. a mask made of a file read, isfinite, invert, or) become one task each
    lazies = list(dask.optimize(*lazies)) if lazies else []
    name = f"tilepipe-windows-{uuid.uuid4().hex}"
    spec = name + "-regions"
    dsk: dict[Any, Any] = {spec: (fill_regions, templates, [next(iter(flatten(a.__dask_keys__()))) for a in lazies])}
    per_window = per_window or [{}] * len(windows)
    for i, (w, extra) in enumerate(zip(windows, per_window)):
        dsk[(name, i)] = (_window_task, func, spec, tuple(w), {**kwargs, **extra})
    dsk[name] = (tuple, [[(name, i) for i in range(len(windows))], spec])
    (out,) = dask.compute(Delayed(name, HighLevelGraph.from_collections(name, dsk, dependencies=lazies)),
                          optimize_graph=False)
    return list(out[0]), list(out[1])


def _read_region(ys: slice, xs: slice, *, source: Any) -> np.ndarray:
    """A rectangle of an array-like that supports 2-D slicing (a file reader, a zarr array)."""
    return np.asarray(source[ys, xs])


def _constant_region(ys: slice, xs: slice, *, value: Any, dtype: Any) -> np.ndarray:
    return np.full((ys.stop - ys.start, xs.stop - xs.start), value, dtype=dtype)


def _overlapped(arrays: Sequence[Any], grid: TileGrid) -> list[da.Array]:
    grid._check_engine()
    out = []
    for i, a in enumerate(arrays):
        d = _as_dask(a, grid, f"array #{i}")
        oy, ox = grid.overlap
        if (oy > 0 and grid.ny > 1) or (ox > 0 and grid.nx > 1):
            depth = {0: oy if grid.ny > 1 else 0, 1: ox if grid.nx > 1 else 0}
            d = da.overlap.overlap(d, depth=depth, boundary="none", allow_rechunk=False)
        out.append(d)
    return out


def _run_tile(func, grid, n_out, dtypes, kwargs, *blocks, block_id=None):
    iy, ix = block_id[-2], block_id[-1]
    tile = grid.tile(iy * grid.nx + ix)
    blocks = [np.asarray(b) for b in blocks]
    res = func(*blocks, tile=tile, **kwargs)
    if n_out == 1:
        res = (res,)
    if len(res) != n_out:
        raise ValueError(f"tile function returned {len(res)} outputs, expected n_out={n_out}")
    cores = []
    cy, cx = tile.core_shape
    for r, dt in zip(res, dtypes):
        r = np.asarray(r)
        if r.shape == tile.outer_shape:
            r = r[tile.inner]
        elif r.shape != (cy, cx):
            raise ValueError(
                f"tile function returned shape {r.shape} for tile {tile.index}; expected the outer box "
                f"{tile.outer_shape} or the core {(cy, cx)}"
            )
        cores.append(r.astype(dt, copy=False))
    if n_out == 1:
        return cores[0]
    return np.stack([c.astype(np.result_type(*dtypes), copy=False) for c in cores])


def map_tiles(
    func: Callable[..., Any],
    *arrays: Any,
    grid: TileGrid | None = None,
    nx: int = 1,
    ny: int | None = None,
    overlap: int | Sequence[int] = 0,
    align: int | Sequence[int] = 1,
    dtype: Any = np.float32,
    n_out: int = 1,
    name: str | None = None,
    **kwargs: Any,
) -> da.Array | tuple[da.Array, ...]:
    """Run ``func`` on every tile's outer box and stitch the cores, lazily.

    Parameters
    ----------
    func : callable
        ``func(*blocks, tile=Tile, **kwargs)``: ``blocks`` are numpy arrays of
        the tile's outer box (one per input array); returns an array of the
        outer-box shape (the engine keeps the core) or of the core shape, or a
        tuple of ``n_out`` such arrays.  It must be pure and thread-safe.
    *arrays : array-like
        2-D numpy/dask arrays or DataArrays of identical shape.
    grid : TileGrid, optional
        The grid; otherwise one is made from ``nx``, ``ny``, ``overlap``, ``align``.
    dtype : dtype or sequence of dtypes
        Output dtype(s).
    n_out : int
        Number of outputs returned by ``func``.
    name : str, optional
        Name prefix of the dask tasks (shown on the dashboard).
    **kwargs
        Passed to ``func``.

    Returns
    -------
    dask.array.Array or tuple of them
        Lazy stitched result(s) with chunks equal to the tile cores.
    """
    if not arrays:
        raise TypeError("map_tiles needs at least one input array")
    shape = np.shape(arrays[0]) if not hasattr(arrays[0], "shape") else arrays[0].shape
    if len(shape) != 2:
        raise ValueError(f"map_tiles works on 2-D images; the first array has shape {tuple(shape)}")
    grid = make_grid(shape, grid, nx, ny, overlap, align)
    n_out = check_int("n_out", n_out, lower=1)
    dtypes = [np.dtype(d) for d in (dtype if isinstance(dtype, (list, tuple)) else [dtype] * n_out)]
    if len(dtypes) != n_out:
        raise ValueError(f"dtype lists {len(dtypes)} dtypes but n_out={n_out}")
    blocks = _overlapped(arrays, grid)
    common = np.result_type(*dtypes)
    token = name or getattr(func, "__name__", "tile")
    kw = dict(
        dtype=dtypes[0] if n_out == 1 else common,
        name=f"{token}-{dask.base.tokenize(func, grid.shape, grid.chunks, grid.overlap, kwargs, *blocks)}",
        meta=np.empty((0, 0) if n_out == 1 else (0, 0, 0), dtype=dtypes[0] if n_out == 1 else common),
    )
    if n_out == 1:
        out = da.map_blocks(_run_tile, func, grid, n_out, dtypes, kwargs, *blocks, chunks=grid.chunks, **kw)
        return out
    stacked = da.map_blocks(
        _run_tile, func, grid, n_out, dtypes, kwargs, *blocks, chunks=((n_out,),) + grid.chunks, new_axis=0, **kw
    )
    return tuple(stacked[i].astype(dt, copy=False) for i, dt in enumerate(dtypes))


# ---------------------------------------------------------------------------
# map_tiles_table
# ---------------------------------------------------------------------------


def _tile_table(func, grid, tile_index, kwargs, xcol, ycol, *blocks):
    tile = grid.tile(tile_index)
    blocks = [np.asarray(b) for b in blocks]
    t = func(*blocks, tile=tile, **kwargs)
    if t is None or len(t) == 0:
        return None if t is None else Table(t)
    t = Table(t, copy=False)
    y0, x0 = tile.origin
    t[xcol] = np.asarray(t[xcol], dtype=np.float64) + x0
    t[ycol] = np.asarray(t[ycol], dtype=np.float64) + y0
    keep = grid.owner(t[xcol], t[ycol]) == tile.index
    t = t[keep]
    t["tile"] = np.full(len(t), tile.index, dtype=np.int32)
    return t


def tile_tables(
    func: Callable[..., Any],
    *arrays: Any,
    grid: TileGrid,
    xcol: str = "x",
    ycol: str = "y",
    **kwargs: Any,
) -> list[Any]:
    """Delayed per-tile tables (global coordinates, owned rows only), not computed.

    Lower-level than :func:`map_tiles_table`: returns a list of
    :class:`dask.delayed.Delayed` objects, one per tile, for callers that want
    to compute several things at once.
    """
    blocks = _overlapped(arrays, grid)
    delayed_blocks = [b.to_delayed() for b in blocks]
    tasks = []
    f = dask.delayed(_tile_table, pure=True)
    for t in grid.tiles:
        bl = [d[t.iy, t.ix] for d in delayed_blocks]
        tasks.append(f(func, grid, t.index, kwargs, xcol, ycol, *bl, dask_key_name=f"table-{getattr(func, '__name__', 'f')}-{dask.base.tokenize(func, grid, kwargs, *blocks)}-{t.index}"))
    return tasks


def merge_tables(tables: Sequence[Any], xcol: str = "x", ycol: str = "y", id_col: str | None = "id") -> Table:
    """Concatenate per-tile tables, sort by (y, x) and assign ``id`` from 1."""
    tabs = [t for t in tables if t is not None and len(t) > 0]
    if not tabs:
        empties = [t for t in tables if t is not None]
        out = Table(empties[0][:0]) if empties else Table()
    else:
        out = vstack(tabs, metadata_conflicts="silent") if len(tabs) > 1 else Table(tabs[0])
    if len(out):
        order = np.lexsort((np.asarray(out[xcol]), np.asarray(out[ycol])))
        out = out[order]
    if id_col is not None:
        if id_col in out.colnames:
            out.remove_column(id_col)
        out.add_column(np.arange(1, len(out) + 1, dtype=np.int64), name=id_col, index=0)
    return out


def map_tiles_table(
    func: Callable[..., Any],
    *arrays: Any,
    grid: TileGrid | None = None,
    nx: int = 1,
    ny: int | None = None,
    overlap: int | Sequence[int] = 0,
    align: int | Sequence[int] = 1,
    xcol: str = "x",
    ycol: str = "y",
    id_col: str | None = "id",
    **kwargs: Any,
) -> Table:
    """Run a catalog-producing ``func`` on every tile and merge by ownership.

    ``func(*blocks, tile=Tile, **kwargs)`` returns an astropy Table (or
    ``None``) whose ``xcol``/``ycol`` are **local** pixel coordinates in the
    tile's outer box.  The engine shifts them to global coordinates, keeps the
    rows whose reference point lies in the tile's core (half-open rule, see
    :meth:`TileGrid.owner`), adds a ``tile`` column, concatenates, sorts by
    ``(y, x)`` and assigns ``id`` from 1.  Computes immediately (on the current
    Dask client if there is one).
    """
    if not arrays:
        raise TypeError("map_tiles_table needs at least one input array")
    shape = arrays[0].shape
    grid = make_grid(shape, grid, nx, ny, overlap, align)
    tasks = tile_tables(func, *arrays, grid=grid, xcol=xcol, ycol=ycol, **kwargs)
    tables = dask.compute(*tasks)
    return merge_tables(tables, xcol=xcol, ycol=ycol, id_col=id_col)
