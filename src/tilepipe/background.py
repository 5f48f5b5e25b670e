"""Sky background: SExtractor's mesh background and a polynomial sky, tile-parallel and exact.

Two estimators, both computed as **map -> reduce -> map** (DESIGN.md section 2)
so that the tiled result equals the whole-image result:

``method="mesh"`` (default)
    The SExtractor algorithm (Bertin & Arnouts 1996, A&AS 117, 393, section
    3.1; the same code as sep's ``sep.Background``):

    1. **map** -- the image is cut into meshes of ``mesh`` pixels.  Every tile
       (cores aligned to the mesh grid, no halo) computes the statistics of
       the meshes in its core: a mean/std over the good pixels, a 2-sigma cut
       around the mean, the values kept within +-5 sigma of the cut mean (the
       range of SExtractor's histogram), then iterative 3-sigma clipping
       around the median until the clipped set stops changing.  The mesh
       value is the mode estimate ``2.5 * median - 1.5 * mean`` when
       ``|mean - median| / sigma < 0.3`` and the median otherwise (crowded
       meshes); the mesh rms is the clipped standard deviation.
    2. **reduce** (on the client, a small grid) -- meshes with fewer than
       ``min_valid_frac`` (default 50 %) good pixels are *bad* and take the
       average of the nearest good meshes (Euclidean distance in mesh units,
       ties averaged, as SExtractor); a ``filter_size`` median filter runs
       over the mesh grid (SExtractor's window, shrunk symmetrically at the
       grid edges; ``filter_threshold`` is SExtractor's ``BACK_FILTERTHRESH``);
       then the natural cubic spline second derivatives are solved once along
       each axis.
    3. **map** -- every tile evaluates the global bicubic (tensor-product
       natural cubic) spline on its core pixels, for the background and the
       rms.  Beyond the outermost mesh centres the end cubic pieces are
       extrapolated, as in SExtractor.

``method="poly"``
    A 2-D polynomial of total degree ``order`` (Legendre basis in normalised
    coordinates) fitted by least squares to sigma-clipped sky pixels after
    masking the sources detected above ``detect_thresh`` times the mesh rms
    (at least ``minarea`` connected pixels, grown by ``grow`` pixels).  The
    fit is assembled from per-tile normal-equation sums ``A^T A`` and
    ``A^T b``, which add over tiles; one solve on the client; then per-tile
    evaluation.  The source mask needs a halo of ``grow + minarea`` pixels.

Conventions: arrays ``[y, x]``, 0-based pixel centres at integers, mask True =
bad.  Pixel ``p`` of an axis lies at ``u = (p + 0.5) / mesh - 0.5`` in mesh
units, so mesh ``j``'s node sits at the centre of its full ``mesh``-pixel box,
``(j + 0.5) * mesh - 0.5``.  A partial last mesh (image size not a multiple of
``mesh``) is computed on its fewer pixels and keeps its nominal node position,
exactly as sep/SExtractor do.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any, Callable, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.highlevelgraph import HighLevelGraph

from ._validate import as_pair, check_choice, check_int, check_positive
from .exceptions import FallbackWarning
from .tiling import Region, Tile, TileGrid, map_tiles, pixels, register_region

__all__ = ["estimate_background", "subtract_background", "mesh_statistics"]

log = logging.getLogger(__name__)

#: Bertin & Arnouts (1996), the reference of the mesh algorithm
REFERENCE = "Bertin & Arnouts 1996, A&AS 117, 393 (SExtractor), sec. 3.1"

_BLOCK = 16  # block length of the blocked prefix sums in the mesh statistics


# =============================================================================
# map: per-mesh statistics of one tile core (vectorised over all meshes)
# =============================================================================
def _range_index(S: np.ndarray, k: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sorted float32 row, the index range ``[i0, i1)`` of its first ``k`` values inside ``[lo, hi]``.

    ``i0`` counts the values ``< lo`` and ``i1`` those ``<= hi`` (for float32
    values, ``<= hi`` is ``< nextafter(hi)`` in float64): a vectorised
    bisection over all rows at once with a fixed number of steps.
    """
    nm, n = S.shape
    flat = S.ravel()
    base = (np.arange(nm, dtype=np.int64) * n)[:, None]
    v = np.stack([np.asarray(lo, dtype=np.float64), np.nextafter(np.asarray(hi, dtype=np.float64), np.inf)], axis=1)
    left = np.zeros((nm, 2), dtype=np.int64)
    high = np.repeat(k.astype(np.int64)[:, None], 2, axis=1)
    for _ in range(int(n).bit_length()):
        mid = (left + high) >> 1
        go = (flat[base + np.minimum(mid, n - 1)] < v) & (left < high)
        left = np.where(go, mid + 1, left)
        high = np.where(go, high, mid)
    return left[:, 0], left[:, 1]


class _Prefix:
    """Blocked prefix sums of ``d = S - ref`` and ``d**2`` over sorted rows.

    ``F(i)`` (the sums of the first ``i`` values of each row) is the float64
    prefix of the block sums plus one gathered partial block of ``_BLOCK``
    values per row, so every clipping iteration costs O(n_meshes * _BLOCK)
    whatever the mesh size.  ``d`` is float32 (exact to a rounding of
    ``|d|``, ``ref`` being a pixel value of the row); the block sums of
    ``_BLOCK`` values are float32, their prefix float64.
    """

    def __init__(self, S: np.ndarray, ref: np.ndarray, k: np.ndarray) -> None:
        nm, n = S.shape
        nb = n // _BLOCK + 1  # at least one all-zero block at the end (i == n)
        D = np.empty((nm, nb * _BLOCK), dtype=np.float32)
        D[:, n:] = 0.0
        np.subtract(S, ref.astype(np.float32)[:, None], out=D[:, :n])
        for r in np.nonzero(k < n)[0]:  # masked pixels (+inf, sorted last) weigh nothing
            D[r, k[r]:n] = 0.0
        flat = D.reshape(nm * nb, _BLOCK)
        s1 = (flat @ np.ones(_BLOCK, dtype=np.float32)).reshape(nm, nb)
        s2 = np.einsum("ij,ij->i", flat, flat).reshape(nm, nb)
        # prefix over blocks in float64, accumulated along the leading (contiguous) axis
        P = np.zeros((nb + 1, 2, nm))
        P[1:, 0] = s1.T
        P[1:, 1] = s2.T
        for j in range(1, nb + 1):  # row-wise adds: much faster than np.cumsum on this layout
            P[j] += P[j - 1]
        self.P = P
        self.D = D.reshape(nm, nb, _BLOCK)
        self.rows = np.arange(nm)
        self.lane = np.arange(_BLOCK)

    def __call__(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b, r = np.divmod(i, _BLOCK)
        g = np.where(self.lane[None, :] < r[:, None], self.D[self.rows, b], np.float32(0)).astype(np.float64)
        s1 = self.P[b, 0, self.rows] + g.sum(axis=1)
        s2 = self.P[b, 1, self.rows] + np.einsum("ij,ij->i", g, g)
        return s1, s2


def _range_stats(S, pre, ref, i0, i1):
    """count, mean, population std and median of the sorted values ``[i0, i1)`` of each row."""
    c = i1 - i0
    cc = np.maximum(c, 1)
    a1, a2 = pre(i0)
    b1, b2 = pre(i1)
    m1 = (b1 - a1) / cc
    var = (b2 - a2) / cc - m1 * m1
    sig = np.sqrt(np.maximum(var, 0.0))
    rows = np.arange(S.shape[0])
    n = S.shape[1]
    lo = S[rows, np.clip(i0 + (cc - 1) // 2, 0, n - 1)].astype(np.float64)
    hi = S[rows, np.clip(i0 + cc // 2, 0, n - 1)].astype(np.float64)
    med = 0.5 * (lo + hi)
    return c, ref + m1, sig, med


def _clipped_mode(values: np.ndarray, npix: np.ndarray, min_valid_frac: float, maxiters: int,
                  nsigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SExtractor's mesh statistics for each row of ``values`` (masked pixels = +inf; sorted in place).

    Returns ``(mode, sigma, valid)`` per row.
    """
    S = values
    S.sort(axis=1)  # in place: ``values`` is a scratch array
    nm, n = S.shape
    rows = np.arange(nm)
    inf = np.full(nm, np.inf)
    k = _range_index(S, np.full(nm, n), inf, inf)[0]  # good pixels per mesh (masked = +inf, sorted last)
    valid = (k > 0) & (k >= min_valid_frac * npix)
    ref = S[rows, np.clip(k // 2, 0, n - 1)]
    ref = np.where(np.isfinite(ref), ref, np.float32(0)).astype(np.float64)
    pre = _Prefix(S, ref, k)
    zero = np.zeros(nm, dtype=np.int64)
    # 1. mean and std of all good pixels; 2. again within mean +- 2 sigma (SExtractor's backstat)
    _, mean, sig, _ = _range_stats(S, pre, ref, zero, k)
    lo = (mean - 2.0 * sig).astype(np.float32)
    hi = (mean + 2.0 * sig).astype(np.float32)
    i0, i1 = _range_index(S, k, lo, hi)
    _, mean, sig, _ = _range_stats(S, pre, ref, i0, i1)
    # 3. the histogram range of SExtractor: +- 5 sigma around the cut mean
    rlo, rhi = mean - 5.0 * sig, mean + 5.0 * sig
    i0, i1 = _range_index(S, k, rlo, rhi)
    # 4. iterative nsigma clipping around the median until the set is stable
    c, mean, sig, med = _range_stats(S, pre, ref, i0, i1)
    for _ in range(maxiters):
        lo = np.maximum(med - nsigma * sig, rlo)
        hi = np.minimum(med + nsigma * sig, rhi)
        j0, j1 = _range_index(S, k, lo, hi)
        changed = (j0 != i0) | (j1 != i1)
        if not changed[valid].any():
            break
        i0, i1 = j0, j1
        c, mean, sig, med = _range_stats(S, pre, ref, i0, i1)
    valid &= c > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = np.abs(mean - med) / sig
    mode = np.where(sig > 0, np.where(skew < 0.3, 2.5 * med - 1.5 * mean, med), mean)
    mode = np.where(valid, mode, np.nan)
    sig = np.where(valid, sig, np.nan)
    return mode, sig, valid


def _mesh_stats_block(img: np.ndarray, bad: np.ndarray | None, my: int, mx: int, min_valid_frac: float,
                      maxiters: int, nsigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Statistics of the meshes of a mesh-aligned block: ``(mode, sigma, valid)``, each ``(nmy, nmx)``."""
    img = np.asarray(img)
    h, w = img.shape
    nmy, nmx = -(-h // my), -(-w // mx)
    H, W = nmy * my, nmx * mx
    good = np.isfinite(img)
    if bad is not None:
        good &= ~np.asarray(bad, dtype=bool)
    # mesh-major scratch array (nmy, nmx, my, mx); masked and padding pixels = +inf
    vals = np.empty((nmy, nmx, my, mx), dtype=np.float32)
    if (H, W) == (h, w):
        np.copyto(vals, img.reshape(nmy, my, nmx, mx).transpose(0, 2, 1, 3), casting="unsafe")
        if not good.all():
            np.copyto(vals, np.float32(np.inf), where=~good.reshape(nmy, my, nmx, mx).transpose(0, 2, 1, 3))
    else:
        pad = np.full((H, W), np.inf, dtype=np.float32)
        np.copyto(pad[:h, :w], img, where=good, casting="unsafe")
        np.copyto(vals, pad.reshape(nmy, my, nmx, mx).transpose(0, 2, 1, 3))
    blocks = vals.reshape(nmy * nmx, my * mx)
    npy = np.minimum(my, h - np.arange(nmy) * my)
    npx = np.minimum(mx, w - np.arange(nmx) * mx)
    npix = (npy[:, None] * npx[None, :]).ravel()
    mode, sig, valid = _clipped_mode(blocks, npix, min_valid_frac, maxiters, nsigma)
    return mode.reshape(nmy, nmx), sig.reshape(nmy, nmx), valid.reshape(nmy, nmx)


def _stacked_mesh_stats(img: np.ndarray, bad: np.ndarray, *, my: int, mx: int, min_valid_frac: float,
                        maxiters: int, nsigma: float) -> np.ndarray:
    """:func:`_mesh_stats_block` as one ``(3, nmy, nmx)`` float64 array: mode, sigma, valid (0/1)."""
    mode, sig, valid = _mesh_stats_block(img, bad, my, mx, min_valid_frac, maxiters, nsigma)
    return np.stack([mode, sig, valid.astype(np.float64)])


# =============================================================================
# reduce: fill, filter and spline on the (small) mesh grid
# =============================================================================
def _fill_bad(back: np.ndarray, sig: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replace bad meshes by the average of the nearest good ones (SExtractor's rule)."""
    back = back.copy()
    sig = sig.copy()
    if valid.all():
        return back, sig
    gy, gx = np.nonzero(valid)
    by, bx = np.nonzero(~valid)
    gb, gs = back[gy, gx], sig[gy, gx]
    for s in range(0, by.size, 256):
        yy, xx = by[s:s + 256], bx[s:s + 256]
        d2 = (yy[:, None] - gy[None, :]) ** 2 + (xx[:, None] - gx[None, :]) ** 2  # exact integers
        tie = d2 == d2.min(axis=1, keepdims=True)
        n = tie.sum(axis=1)
        back[yy, xx] = (tie @ gb) / n
        sig[yy, xx] = (tie @ gs) / n
    return back, sig


def _median_filter(back: np.ndarray, sig: np.ndarray, fy: int, fx: int,
                   threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """SExtractor's mesh median filter: a ``fy x fx`` window shrunk symmetrically at the edges.

    A mesh takes the median of its window only when it differs from it by at
    least ``threshold`` (SExtractor's ``BACK_FILTERTHRESH``; 0 = always).
    """
    ny, nx = back.shape
    ry, rx = fy // 2, fx // 2
    iy, ix = np.arange(ny), np.arange(nx)
    hy = np.minimum(np.minimum(iy, ny - 1 - iy), ry)
    hx = np.minimum(np.minimum(ix, nx - 1 - ix), rx)
    outb, outs = back.copy(), sig.copy()
    for a in np.unique(hy):
        ys = iy[hy == a]
        for b in np.unique(hx):
            xs = ix[hx == b]
            if a == 0 and b == 0:
                continue
            wb = np.lib.stride_tricks.sliding_window_view(back, (2 * a + 1, 2 * b + 1))
            ws = np.lib.stride_tricks.sliding_window_view(sig, (2 * a + 1, 2 * b + 1))
            sel = np.ix_(ys - a, xs - b)
            mb = np.median(wb[sel].reshape(ys.size, xs.size, -1), axis=-1)
            ms = np.median(ws[sel].reshape(ys.size, xs.size, -1), axis=-1)
            cur = back[np.ix_(ys, xs)]
            use = np.abs(mb - cur) >= threshold
            outb[np.ix_(ys, xs)] = np.where(use, mb, cur)
            outs[np.ix_(ys, xs)] = np.where(use, ms, sig[np.ix_(ys, xs)])
    return outb, outs


def _spline_matrix(n: int) -> np.ndarray:
    """``K`` with ``M = K @ y``: second derivatives of the natural cubic spline through ``n`` unit-spaced nodes."""
    K = np.zeros((n, n))
    if n <= 2:
        return K
    m = n - 2
    T = 4.0 * np.eye(m) + np.eye(m, k=1) + np.eye(m, k=-1)
    D2 = np.zeros((m, n))
    idx = np.arange(m)
    D2[idx, idx] = 6.0
    D2[idx, idx + 1] = -12.0
    D2[idx, idx + 2] = 6.0
    K[1:-1] = np.linalg.solve(T, D2)
    return K


def _spline_local(pix: np.ndarray, mesh: int, n: int) -> tuple[slice, np.ndarray, np.ndarray]:
    """The natural spline's weights on ``pix`` in local form: ``W = P + Q @ K`` restricted to the nodes used.

    A pixel between nodes ``j`` and ``j + 1`` is ``c y_j + t y_(j+1) +
    (c^3 - c)/6 M_j + (t^3 - t)/6 M_(j+1)`` (``M = K @ y`` the second
    derivatives): ``P`` and ``Q`` have two non-zeros per row.  Returns the
    node range ``nodes`` spanned by ``pix`` and ``P``, ``Q`` on that range
    (``len(pix) x range``), so that ``f(pix) = P @ y[nodes] + Q @ M[nodes]``
    """
    u = (np.asarray(pix, dtype=np.float64) + 0.5) / mesh - 0.5
    if n == 1:
        return slice(0, 1), np.ones((u.size, 1)), np.zeros((u.size, 1))
    j = np.clip(np.floor(u).astype(np.int64), 0, n - 2)
    t = u - j
    c = 1.0 - t
    j0 = int(j.min())
    k = int(j.max()) + 2 - j0
    r = np.arange(u.size)
    P = np.zeros((u.size, k))
    Q = np.zeros((u.size, k))
    P[r, j - j0] = c
    P[r, j + 1 - j0] = t
    Q[r, j - j0] = (c ** 3 - c) / 6.0
    Q[r, j + 1 - j0] = (t ** 3 - t) / 6.0
    return slice(j0, j0 + k), P, Q


def _eval_mesh_tile(block: np.ndarray, *, tile: Tile, nodes: np.ndarray, mesh: tuple[int, int],
                    Ky: np.ndarray, Kx: np.ndarray) -> np.ndarray:
    """Evaluate the global bicubic spline through the mesh ``nodes`` on a tile core (float32).

    ``f = Wy @ nodes @ Wx.T`` with each axis' weights in local form
    ``W = P + Q @ K`` (:func:`_spline_local`): the second derivatives of the
    node grid are global (``Ky @ nodes``, ``nodes @ Kx.T``: small), and a
    tile needs only the ~``tile / mesh + 2`` nodes it spans along each axis,
    so the cost does not grow with the number of meshes across the image.
    The small products are float64; the final ``(h x 2 kx) @ (2 kx x w)``
    float32 (relative rounding ~1e-7, far below the statistical error of the
    mesh values).
    """
    return _eval_mesh_region(*tile.core, nodes=nodes, mesh=mesh, Ky=Ky, Kx=Kx)


def _eval_mesh_region(ys: slice, xs: slice, *, nodes: np.ndarray, mesh: tuple[int, int],
                      Ky: np.ndarray, Kx: np.ndarray) -> np.ndarray:
    """:func:`_eval_mesh_tile` on any rectangle ``[ys, xs]`` (a :class:`~tilepipe.tiling.Region`; the
    slices may have a step: the strided samples of the map)."""
    ry, Py, Qy = _spline_local(pixels(ys), mesh[0], nodes.shape[0])
    rx, Px, Qx = _spline_local(pixels(xs), mesh[1], nodes.shape[1])
    G = nodes
    GY = Ky[ry] @ nodes  # second derivatives along y at the rows used
    Z = np.block([[G[ry, rx], (G[ry] @ Kx[rx].T)], [GY[:, rx], GY @ Kx[rx].T]])
    left = (np.hstack([Py, Qy]) @ Z).astype(np.float32)
    return left @ np.ascontiguousarray(np.hstack([Px, Qx]).T, dtype=np.float32)


# =============================================================================
# polynomial sky
# =============================================================================
def _poly_terms(order: int) -> list[tuple[int, int]]:
    """(y degree, x degree) of the Legendre terms of total degree <= order."""
    return [(j, i) for j in range(order + 1) for i in range(order + 1 - j)]


def _legendre(pix: np.ndarray, size: int, order: int) -> np.ndarray:
    """Legendre polynomials ``P_0..P_order`` at the normalised coordinates ``2 p / (size - 1) - 1``."""
    p = np.asarray(pix, dtype=np.float64)
    t = 2.0 * p / (size - 1) - 1.0 if size > 1 else np.zeros_like(p)
    return np.polynomial.legendre.legvander(t, order)


def _poly_eval(coef: np.ndarray, ys: slice, xs: slice, shape: tuple[int, int]) -> np.ndarray:
    order = coef.shape[0] - 1
    Ly = _legendre(pixels(ys), shape[0], order)
    Lx = _legendre(pixels(xs), shape[1], order)
    return (Ly @ coef) @ Lx.T


def _source_mask(img: np.ndarray, bad: np.ndarray, ref: np.ndarray, rms: np.ndarray, detect_thresh: float,
                 minarea: int, grow: int) -> np.ndarray:
    """Pixels of sources (>= minarea connected pixels above detect_thresh * rms) grown by ``grow`` px."""
    from scipy import ndimage

    with np.errstate(invalid="ignore"):
        det = (img - ref > detect_thresh * rms) & ~bad
    if not det.any():
        return det
    lab, nlab = ndimage.label(det, structure=np.ones((3, 3), dtype=bool))
    size = np.bincount(lab.ravel(), minlength=nlab + 1)
    big = size >= minarea
    big[0] = False
    src = big[lab]
    if grow > 0 and src.any():
        r = np.arange(-grow, grow + 1)
        disk = (r[:, None] ** 2 + r[None, :] ** 2) <= grow * grow
        src = ndimage.binary_dilation(src, structure=disk)
    return src


def _source_mask_tile(img, bad, ref, rms, *, tile: Tile, detect_thresh, minarea, grow) -> np.ndarray:
    """The grown source mask of a tile's outer box (the engine keeps the core)."""
    img = np.asarray(img, dtype=np.float32)
    bad = np.asarray(bad, dtype=bool) | ~np.isfinite(img)
    return _source_mask(img, bad, np.asarray(ref, dtype=np.float32), np.asarray(rms, dtype=np.float32),
                        detect_thresh, minarea, grow)


def _poly_tile_sums(img, bad, src, ref, rms, *, tile: Tile, shape, order, coef, nsigma):
    """Per-tile normal-equation sums of the clipped sky fit over the core: ``(A^T A, A^T b, n, sum r^2)``."""
    img = np.asarray(img, dtype=np.float64)
    bad = np.asarray(bad, dtype=bool) | ~np.isfinite(img)
    src = np.asarray(src, dtype=bool)
    rms = np.asarray(rms, dtype=np.float64)
    model = np.asarray(ref, dtype=np.float64) if coef is None else _poly_eval(coef, *tile.core, shape)
    res = np.where(bad, 0.0, img - model)
    keep = ~bad & ~src & ((np.abs(res) < nsigma * rms) | (rms <= 0))
    w = keep.astype(np.float64)
    ys, xs = tile.core
    Ly = _legendre(np.arange(ys.start, ys.stop), shape[0], order)
    Lx = _legendre(np.arange(xs.start, xs.stop), shape[1], order)
    o1 = order + 1
    LxLx = (Lx[:, :, None] * Lx[:, None, :]).reshape(Lx.shape[0], o1 * o1)
    G = (w @ LxLx).reshape(-1, o1, o1)  # [y, i, k] = sum_x w Lx_i Lx_k
    ata = np.einsum("yj,yl,yik->jilk", Ly, Ly, G)  # [(j,i),(l,k)]
    H = (w * np.where(keep, img, 0.0)) @ Lx  # [y, i]
    atb = np.einsum("yj,yi->ji", Ly, H)
    terms = _poly_terms(order)
    jj = np.array([t[0] for t in terms])
    ii = np.array([t[1] for t in terms])
    A = ata[jj[:, None], ii[:, None], jj[None, :], ii[None, :]]
    b = atb[jj, ii]
    return A, b, int(keep.sum()), float(np.sum(np.where(keep, res, 0.0) ** 2))


def _solve_poly(A: np.ndarray, b: np.ndarray, n: int, order: int) -> np.ndarray:
    terms = _poly_terms(order)
    if n < len(terms):
        raise ValueError(
            f"only {n} sky pixels survived masking and clipping, fewer than the {len(terms)} terms of an "
            f"order={order} polynomial; lower `order`, `grow` or raise `sigma`, or check the mask"
        )
    # Jacobi scaling for conditioning, then a solve (lstsq fallback if singular)
    d = np.sqrt(np.maximum(np.diag(A), 1e-300))
    As = A / d[:, None] / d[None, :]
    cond = np.linalg.cond(As)
    if np.isfinite(cond) and cond < 1e12:
        x = np.linalg.solve(As, b / d) / d
    else:
        warnings.warn(
            f"the order={order} polynomial sky is ill-conditioned (condition number {cond:.2g}): "
            "used the minimum-norm least-squares solution; consider a lower `order`",
            FallbackWarning, stacklevel=4,
        )
        x = np.linalg.lstsq(As, b / d, rcond=None)[0] / d
    coef = np.zeros((order + 1, order + 1))
    for (j, i), v in zip(terms, x):
        coef[j, i] = v
    return coef


def _eval_poly_tile(block, *, tile: Tile, coef: np.ndarray, shape) -> np.ndarray:
    return _eval_poly_region(*tile.core, coef=coef, shape=shape)


def _eval_poly_region(ys: slice, xs: slice, *, coef: np.ndarray, shape) -> np.ndarray:
    return _poly_eval(coef, ys, xs, shape).astype(np.float32)


# =============================================================================
# public API
# =============================================================================
def _prepare(ds: Any, mask: Any, chunks: Any = None) -> xr.Dataset:
    """A light image Dataset (``image``, ``mask``) for the background, without hashing numpy pixels.

    numpy arrays (and Datasets holding ``image`` and ``mask``) are wrapped
    directly (dask's default token would hash every pixel, which costs as much
    as the statistics); everything else goes through :func:`tilepipe.open_image`.
    Non-finite pixels are masked by the mesh statistics themselves.
    """
    from .image import open_image

    def wrap(a: Any, name: str) -> da.Array:
        if isinstance(a, xr.DataArray):
            a = a.data
        if isinstance(a, da.Array):
            return a
        a = np.asarray(a)
        if a.ndim != 2:
            raise ValueError(f"{name} must be 2-D (y, x); got shape {a.shape}. Select one plane, e.g. data[0]")
        return _view_dask(a, chunks if chunks is not None else "auto")

    placeholder = False
    if isinstance(ds, np.ndarray) and ds.dtype.kind in "fiu":
        img = wrap(ds, "image")
        placeholder = True
        out = xr.Dataset({"image": (("y", "x"), img),
                          "mask": (("y", "x"), _constant(img.shape, img.chunks, False))},
                         attrs={"header": [], "bunit": "adu"})
    elif isinstance(ds, xr.Dataset) and "image" in ds and "mask" in ds:
        img = wrap(ds["image"], "image")
        out = xr.Dataset({"image": (("y", "x"), img), "mask": (("y", "x"), wrap(ds["mask"], "mask"))},
                         attrs=dict(ds.attrs))
    else:
        full = open_image(ds)
        out = xr.Dataset({"image": full["image"], "mask": full["mask"]}, attrs=dict(full.attrs))
    shape = tuple(out["image"].shape)
    if out["mask"].shape != shape:
        raise ValueError(f"ds['mask'] has shape {out['mask'].shape} but the image has shape {shape}; they must match")
    if mask is not None:
        m = mask.data if isinstance(mask, xr.DataArray) else mask
        if tuple(np.shape(m)) != shape:
            raise ValueError(f"mask has shape {tuple(np.shape(m))} but the image has shape {shape}; they must match")
        m = wrap(m, "mask").astype(bool).rechunk(out["mask"].data.chunks)
        out["mask"] = (("y", "x"), m if placeholder else out["mask"].data | m)
    return out


def _view_dask(a: np.ndarray, chunks: Any) -> da.Array:
    """A dask array over views of ``a`` (``da.from_array`` would copy and hash the whole array).

    Safe here: the statistics are computed before :func:`estimate_background`
    returns, and the returned maps never read the input again.
    """
    import uuid

    chunks = da.core.normalize_chunks(chunks, a.shape, dtype=a.dtype)
    name = f"tilepipe-input-{uuid.uuid4().hex}"
    ye = np.concatenate([[0], np.cumsum(chunks[0])])
    xe = np.concatenate([[0], np.cumsum(chunks[1])])
    dsk = {(name, i, j): a[ye[i]:ye[i + 1], xe[j]:xe[j + 1]]
           for i in range(len(chunks[0])) for j in range(len(chunks[1]))}
    return da.Array(dsk, name, chunks, dtype=a.dtype, meta=np.empty((0, 0), dtype=a.dtype))


def _constant(shape: tuple[int, int], chunks: Any, value: Any) -> da.Array:
    """A constant dask array whose chunks are made inside their tasks (zero-stride views, no memory).

    Not views of one client-side array: a view pickles as a full copy, so every
    chunk would travel in the graph to a distributed scheduler (16 MiB per graph
    for a 4k image).
    """
    value = np.asarray(value)
    return da.full(shape, value, chunks=chunks, dtype=value.dtype)


def _token(func: Any) -> Any:
    """Give a module-level tile function a cheap, stable dask token (instead of pickling it)."""
    from . import __version__

    func.__dask_tokenize__ = lambda: ("tilepipe.background", func.__name__, __version__)
    return func


def _mesh_grid(shape, mesh, nx, ny, grid) -> TileGrid:
    my, mx = mesh
    if grid is None:
        try:
            return TileGrid(shape, nx=nx, ny=ny, overlap=0, align=(my, mx))
        except ValueError as exc:
            raise ValueError(f"{exc} (tile cores are aligned to mesh={mesh}, so there are at most "
                             f"{-(-shape[1] // mx)} x {-(-shape[0] // my)} tiles)") from None
    if tuple(grid.shape) != tuple(shape):
        raise ValueError(f"grid shape {grid.shape} does not match the image shape {tuple(shape)}")
    if np.any(grid.y_edges[1:-1] % my) or np.any(grid.x_edges[1:-1] % mx):
        raise ValueError(
            f"the grid's tile cores are not aligned to mesh={mesh}; build it with TileGrid(..., align={mesh})"
        )
    return TileGrid(shape, nx=grid.nx, ny=grid.ny, overlap=0, align=(my, mx)) if grid.overlap != (0, 0) else grid


def mesh_statistics(
    ds: Any,
    mesh: int | Sequence[int] = 64,
    *,
    nx: int = 1,
    ny: int | None = None,
    mask: Any = None,
    sigma: float = 3.0,
    maxiters: int = 100,
    min_valid_frac: float = 0.5,
    grid: TileGrid | None = None,
) -> dict[str, np.ndarray]:
    """Per-mesh SExtractor statistics, computed tile by tile (the *map* step of the mesh background).

    Parameters
    ----------
    ds : image Dataset, array or path
        Anything :func:`tilepipe.open_image` accepts.
    mesh : int or (int, int)
        Mesh size ``(my, mx)`` in pixels.
    nx, ny : int
        Tiles along x and y; the cores are aligned to the mesh grid.
    mask : array-like of bool, optional
        Extra bad-pixel mask (True = bad), OR-ed with ``ds["mask"]``.
    sigma : float
        Clipping half-width in standard deviations (SExtractor: 3).
    maxiters : int
        Maximum number of clipping iterations (each mesh stops when its
        clipped set no longer changes).
    min_valid_frac : float
        A mesh with fewer good pixels than this fraction of its pixels is bad.

    Returns
    -------
    dict
        ``mode``, ``sigma`` (float64, NaN for bad meshes) and ``valid``
        (bool), each of shape ``(ceil(ny_pix / my), ceil(nx_pix / mx))``
        (rows = y), before bad-mesh filling and filtering; ``empty_tiles``:
        indices of the tiles without any good mesh.
    """
    ds = _prepare(ds, mask)
    shape = tuple(ds["image"].shape)
    (my, mx), sigma, maxiters, min_valid_frac = _check_mesh_args(shape, mesh, sigma, maxiters, min_valid_frac)
    g = _mesh_grid(shape, (my, mx), nx, ny, grid)
    mode, sig, valid = _mesh_stats_lazy(ds, g, (my, mx), sigma=sigma, maxiters=maxiters,
                                        min_valid_frac=min_valid_frac).compute()
    valid = valid > 0
    return {"mode": mode, "sigma": sig, "valid": valid, "empty_tiles": _empty_tiles(valid, g, (my, mx))}


def _check_mesh_args(shape: tuple[int, int], mesh: Any, sigma: float, maxiters: int,
                     min_valid_frac: float) -> tuple[tuple[int, int], float, int, float]:
    my, mx = as_pair("mesh", mesh, lower=1)
    if shape[0] < my or shape[1] < mx:
        raise ValueError(
            f"the image ({shape[0]} x {shape[1]} px) is smaller than one mesh (mesh={(my, mx)}); "
            f"use mesh <= {min(shape)} or a larger image"
        )
    sigma = check_positive("sigma", sigma)
    maxiters = check_int("maxiters", maxiters, lower=1)
    min_valid_frac = check_positive("min_valid_frac", min_valid_frac)
    if min_valid_frac > 1:
        raise ValueError(f"min_valid_frac must be in (0, 1]; got {min_valid_frac}")
    return (my, mx), sigma, maxiters, min_valid_frac


def _mesh_stats_lazy(ds: xr.Dataset, g: TileGrid, mesh: tuple[int, int], *, sigma: float, maxiters: int,
                     min_valid_frac: float) -> da.Array:
    """The per-mesh statistics as a lazy ``(3, nmy, nmx)`` array (mode, sigma, valid), one task per tile."""
    my, mx = mesh
    img = ds["image"].data.rechunk(g.chunks)
    bad = ds["mask"].data.rechunk(g.chunks)
    # one blockwise layer: reading a tile, its mask and its statistics fuse into one task per tile
    mesh_chunks = tuple(tuple(-(-c // m) for c in cs) for cs, m in zip(g.chunks, (my, mx)))
    return da.map_blocks(_stacked_mesh_stats, img, bad, my=my, mx=mx, min_valid_frac=min_valid_frac,
                         maxiters=maxiters, nsigma=sigma, new_axis=0, chunks=((3,),) + mesh_chunks,
                         dtype=np.float64, meta=np.empty((0, 0, 0)), token="tilepipe-mesh-stats")


def _empty_tiles(valid: np.ndarray, g: TileGrid, mesh: tuple[int, int]) -> np.ndarray:
    """Indices of the tiles of ``g`` without any good mesh."""
    my, mx = mesh
    return np.array([t.index for t in g.tiles
                     if not valid[t.core[0].start // my:-(-t.core[0].stop // my),
                                  t.core[1].start // mx:-(-t.core[1].stop // mx)].any()], dtype=np.int64)


def _no_good_mesh(mesh: tuple[int, int], min_valid_frac: float) -> ValueError:
    return ValueError(
        f"no mesh has enough good pixels (every mesh of mesh={tuple(mesh)} has more than "
        f"{100 * (1 - min_valid_frac):g}% masked or non-finite pixels): the image is all NaN or the mask "
        "covers everything; check the mask, or lower min_valid_frac"
    )


def bad_mesh_message(valid: np.ndarray, g: TileGrid, mesh: tuple[int, int], min_valid_frac: float) -> str | None:
    """The text of the :class:`FallbackWarning` for bad (filled) meshes, or None when every mesh is good."""
    nbad = int((~valid).sum())
    if not nbad:
        return None
    empty = _empty_tiles(valid, g, mesh)
    detail = f"; tiles {empty.tolist()} have no good mesh at all" if empty.size else ""
    return (f"{nbad} of {valid.size} meshes have fewer than {100 * min_valid_frac:g}% good pixels "
            f"(masked or non-finite) and were filled from their nearest good meshes{detail}")


def _solve_mesh(stats: np.ndarray, *, filter_size: tuple[int, int], filter_threshold: float,
                mesh: tuple[int, int], min_valid_frac: float) -> np.ndarray:
    """The *reduce* step on the mesh grid: ``(3, nmy, nmx)`` = filled and filtered background, rms, and
    the validity of the meshes before filling (1/0).  Raises ValueError when no mesh is good."""
    mode, sig, valid = stats
    valid = valid > 0
    if not valid.any():
        raise _no_good_mesh(mesh, min_valid_frac)
    back, sig = _fill_bad(mode, sig, valid)
    back, sig = _median_filter(back, sig, filter_size[0], filter_size[1], filter_threshold)
    return np.stack([back, sig, valid.astype(np.float64)])


@functools.lru_cache(maxsize=16)
def _spline_matrices(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_spline_matrix` of both axes of a mesh grid (cached: every tile task of a grid needs them)."""
    return _spline_matrix(ny), _spline_matrix(nx)


def _eval_solved_region(ys: slice, xs: slice, *, solved: np.ndarray, plane: int, mesh: tuple[int, int]) -> np.ndarray:
    """:func:`_eval_mesh_region` on plane ``plane`` (0 background, 1 rms) of :func:`_solve_mesh`'s output."""
    Ky, Kx = _spline_matrices(solved.shape[1], solved.shape[2])
    return _eval_mesh_region(ys, xs, nodes=solved[plane], mesh=mesh, Ky=Ky, Kx=Kx)


def _solved_map(solved: np.ndarray, ys: slice, xs: slice, plane: int, mesh: tuple[int, int]) -> np.ndarray:
    return _eval_solved_region(ys, xs, solved=solved, plane=plane, mesh=mesh)


def _solve_blocks(blocks: list[list[np.ndarray]], kwargs: dict[str, Any]) -> np.ndarray:
    return _solve_mesh(np.block(blocks), **kwargs)


def fit_mesh_to_image(shape: tuple[int, int], mesh: int, nx: int, ny: int) -> tuple[tuple[int, int], int, int, str | None]:
    """A default background mesh and tiling that fit an image of ``shape``: ``((my, mx), nx, ny, message)``.

    For callers that run the mesh background with their own tiling (the
    background maps do not depend on it): an image smaller than one
    ``mesh``-px mesh gets a mesh cut to its size (``message`` says so, for a
    :class:`~tilepipe.exceptions.FallbackWarning`; otherwise None), and
    ``nx, ny`` are capped so that every tile core holds at least two meshes.
    """
    h, w = int(shape[0]), int(shape[1])
    my, mx = min(int(mesh), h), min(int(mesh), w)
    message = None
    if (my, mx) != (mesh, mesh):
        message = f"the image ({h} x {w} px) is smaller than one {mesh}-px background mesh; using a {my} x {mx} px mesh"
    return (my, mx), max(1, min(int(nx), w // (2 * mx))), max(1, min(int(ny), h // (2 * my))), message


def mesh_background_lazy(
    ds: Any,
    mesh: int | Sequence[int] = 64,
    filter_size: int | Sequence[int] = 3,
    *,
    nx: int = 1,
    ny: int | None = None,
    sigma: float = 3.0,
    maxiters: int = 100,
    min_valid_frac: float = 0.5,
    filter_threshold: float = 0.0,
) -> tuple[da.Array, da.Array, da.Array, Callable[[np.ndarray], str | None]]:
    """The mesh background of :func:`estimate_background` with nothing computed: for pipelines that
    compute the statistics, the mesh-grid solve and their own tile work in **one** graph.

    :func:`estimate_background` reads the image for its mesh statistics when
    it is called (one round trip to the cluster, and its attrs carry the mesh
    grids).  Here the per-tile statistics, the solve on the mesh grid (one
    small task) and the maps all stay lazy, so a caller that computes its own
    tile tasks from the maps (detection, subtraction) needs one round trip
    instead of two.  Same algorithm and the same values as
    :func:`estimate_background` with ``method="mesh"``.

    Returns
    -------
    background, rms : dask.array.Array
        float32 maps of the image's shape (chunks: the mesh-aligned tiles);
        both also have a :class:`~tilepipe.tiling.Region` (any rectangle is
        computed from the solved mesh grid alone).
    solved : dask.array.Array
        ``(3, nmy, nmx)`` float64, one chunk: the filtered mesh background,
        the mesh rms, and 1/0 for the meshes that were good before filling
        (see ``check``).  Computing it raises ValueError when no mesh has
        enough good pixels.
    check : callable
        ``check(solved_values)`` on the computed ``solved`` grid: the text of
        :func:`estimate_background`'s bad-mesh :class:`FallbackWarning`, or
        None when every mesh is good.
    """
    ds = _prepare(ds, None)
    shape = tuple(ds["image"].shape)
    (my, mx), sigma, maxiters, min_valid_frac = _check_mesh_args(shape, mesh, sigma, maxiters, min_valid_frac)
    fy, fx = as_pair("filter_size", filter_size, lower=1)
    filter_threshold = check_positive("filter_threshold", filter_threshold, allow_zero=True)
    g = _mesh_grid(shape, (my, mx), nx, ny, None)
    stats = _mesh_stats_lazy(ds, g, (my, mx), sigma=sigma, maxiters=maxiters, min_valid_frac=min_valid_frac)
    # explicit graphs (task -> key references), no dask array hidden in blockwise arguments: the
    # optimiser of dask.persist lost such a reference ("lost dependencies" on a cluster, dask 2026.8)
    kw = {"filter_size": (fy, fx), "filter_threshold": filter_threshold, "mesh": (my, mx),
          "min_valid_frac": min_valid_frac}
    name = "tilepipe-mesh-solve-" + dask.base.tokenize(stats.name, kw)
    blocks = [[(stats.name, 0, i, j) for j in range(stats.numblocks[2])] for i in range(stats.numblocks[1])]
    solved = da.Array(HighLevelGraph.from_collections(name, {(name, 0, 0, 0): (_solve_blocks, blocks, kw)},
                                                      dependencies=[stats]),
                      name, chunks=tuple((n,) for n in stats.shape), dtype=np.float64, meta=np.empty((0, 0, 0)))
    maps = []
    for plane, label in ((0, "background-mesh"), (1, "background-rms")):
        mname = f"{label}-{dask.base.tokenize(name, plane)}"
        dsk = {(mname, t.iy, t.ix): (_solved_map, (name, 0, 0, 0), t.core[0], t.core[1], plane, (my, mx))
               for t in g.tiles}
        m = da.Array(HighLevelGraph.from_collections(mname, dsk, dependencies=[solved]), mname, chunks=g.chunks,
                     dtype=np.float32, meta=np.empty((0, 0), dtype=np.float32))
        maps.append(register_region(m, Region(_eval_solved_region, {"solved": solved, "plane": plane,
                                                                     "mesh": (my, mx)})))
    check = functools.partial(_solved_message, g=g, mesh=(my, mx), min_valid_frac=min_valid_frac)
    return maps[0], maps[1], solved, check


def _solved_message(solved: np.ndarray, *, g: TileGrid, mesh: tuple[int, int], min_valid_frac: float) -> str | None:
    return bad_mesh_message(np.asarray(solved[2]) > 0, g, mesh, min_valid_frac)


def estimate_background(
    ds: Any,
    mesh: int | Sequence[int] = 64,
    filter_size: int | Sequence[int] = 3,
    *,
    nx: int = 1,
    ny: int | None = None,
    overlap: int | Sequence[int] | None = None,
    mask: Any = None,
    method: str = "mesh",
    order: int = 3,
    grow: int = 4,
    sigma: float = 3.0,
    maxiters: int = 100,
    min_valid_frac: float = 0.5,
    filter_threshold: float = 0.0,
    detect_thresh: float = 2.0,
    minarea: int = 5,
    iters: int = 1,
    grid: TileGrid | None = None,
) -> xr.Dataset:
    """Estimate the sky background and its rms, tile by tile, equal to the whole-image result.

    Parameters
    ----------
    ds : image Dataset, array or path
        Anything :func:`tilepipe.open_image` accepts (FITS/Zarr path or URL,
        numpy/dask array of any byte order, Dataset).  Pixels that are masked
        (``ds["mask"]`` or ``mask``) or not finite are ignored.
    mesh : int or (int, int)
        Mesh size ``(my, mx)`` in pixels (SExtractor ``BACK_SIZE``).  The image
        must be at least one mesh in each axis.
    filter_size : int or (int, int)
        Median-filter window over the mesh grid, in meshes
        (SExtractor ``BACK_FILTERSIZE``; 1 = no filtering).
    nx, ny : int
        Tiles along x and y.  Tile cores are aligned to the mesh grid, so at
        most one tile per mesh along each axis.
    overlap : int or (int, int), optional
        Halo in pixels.  The mesh method needs none (the model is global and
        exact) and ignores it; the poly method needs ``grow + minarea`` for an
        exact source mask (the default) and warns when given less.
    mask : array-like of bool, optional
        Extra bad-pixel mask (True = bad), e.g. known sources.
    method : {"mesh", "poly"}
        SExtractor mesh background or a polynomial sky (see the module docs).
    order : int
        Total degree of the polynomial sky (``method="poly"``).
    grow : int
        Pixels by which detected sources are grown before the poly fit.
    sigma : float
        Clipping half-width in standard deviations (mesh statistics and the
        poly fit).
    maxiters : int
        Maximum clipping iterations (mesh: per mesh, until its clipped set is
        stable; poly: refits until the number of kept pixels is stable).
    min_valid_frac : float
        A mesh with fewer good pixels than this fraction (default 0.5, as
        SExtractor) is bad and filled from its nearest good neighbours.
    filter_threshold : float
        SExtractor's ``BACK_FILTERTHRESH``: a mesh is replaced by its filtered
        value only when they differ by at least this much (image units; 0 =
        always).
    detect_thresh : float
        Poly: source detection threshold in units of the mesh rms.
    minarea : int
        Poly: minimum connected pixels of a masked source.
    iters : int
        Poly: detection + fit rounds (round 1 detects against the mesh
        background, later rounds against the previous polynomial).
    grid : TileGrid, optional
        A ready grid (its cores must be aligned to ``mesh``).

    Returns
    -------
    xarray.Dataset
        ``background`` and ``rms`` (float32, dask-backed, the image's shape,
        dims ``("y", "x")``), lazily evaluated per tile.  ``attrs``: the
        parameters, ``mesh_background`` / ``mesh_rms`` (the filtered mesh grids
        as nested lists, rows = y), ``mesh_valid``, ``n_bad_meshes``,
        ``global_background`` / ``global_rms`` (medians of the mesh grids, as
        sep's ``globalback`` / ``globalrms``), the FITS ``header`` cards of the
        input, and for ``method="poly"`` the Legendre ``poly_coefficients``
        (``[y_degree][x_degree]`` of ``P_j(2y/(ny-1)-1) P_i(2x/(nx-1)-1)``).
        For ``method="poly"``, ``rms`` is the mesh rms map (the local sky noise).

    Notes
    -----
    The per-mesh statistics are computed (read from the image) when this
    function is called; the returned maps stay lazy.  The mesh algorithm
    follows Bertin & Arnouts (1996) and sep: see :mod:`tilepipe.background`.
    Differences from sep: statistics on the exact pixel values (no histogram
    quantisation) and mesh nodes at ``(j + 0.5) * mesh - 0.5`` on both axes
    (SExtractor places the y nodes half a pixel higher).

    Raises
    ------
    ValueError
        Image smaller than one mesh; no mesh with enough good pixels (all NaN
        or fully masked); bad parameters.

    Warns
    -----
    FallbackWarning
        When bad meshes (e.g. an all-NaN tile) were filled from their nearest
        good neighbours.

    Examples
    --------
    >>> bkg = estimate_background(ds, mesh=64, filter_size=3, nx=4, ny=4)  # doctest: +SKIP
    >>> sky = bkg["background"].compute()  # doctest: +SKIP
    """
    method = check_choice("method", method, ("mesh", "poly"))
    my, mx = as_pair("mesh", mesh, lower=1)
    chunks = None
    if isinstance(ds, np.ndarray) and ds.ndim == 2 and ds.shape[0] >= my and ds.shape[1] >= mx:
        chunks = _mesh_grid(ds.shape, (my, mx), nx, ny, grid).chunks
    ds = _prepare(ds, mask, chunks)
    shape = tuple(ds["image"].shape)
    fy, fx = as_pair("filter_size", filter_size, lower=1)
    filter_threshold = check_positive("filter_threshold", filter_threshold, allow_zero=True)
    order = check_int("order", order, lower=0)
    grow = check_int("grow", grow, lower=0)
    minarea = check_int("minarea", minarea, lower=1)
    iters = check_int("iters", iters, lower=1)
    detect_thresh = check_positive("detect_thresh", detect_thresh)
    stats = mesh_statistics(ds, (my, mx), nx=nx, ny=ny, sigma=sigma, maxiters=maxiters,
                            min_valid_frac=min_valid_frac, grid=grid)
    g0 = _mesh_grid(shape, (my, mx), nx, ny, grid)
    valid = stats["valid"]
    back, sig, _ = _solve_mesh(np.stack([stats["mode"], stats["sigma"], valid]), filter_size=(fy, fx),
                               filter_threshold=filter_threshold, mesh=(my, mx), min_valid_frac=min_valid_frac)
    nbad = int((~valid).sum())
    message = bad_mesh_message(valid, g0, (my, mx), min_valid_frac)
    if message:
        warnings.warn(message, FallbackWarning, stacklevel=2)
    Ky, Kx = _spline_matrix(back.shape[0]), _spline_matrix(back.shape[1])
    dummy = _constant(shape, g0.chunks, np.uint8(0))
    bmap = map_tiles(_eval_mesh_tile, dummy, grid=g0, dtype=np.float32, name="background-mesh",
                     nodes=back, mesh=(my, mx), Ky=Ky, Kx=Kx)
    rmap = map_tiles(_eval_mesh_tile, dummy, grid=g0, dtype=np.float32, name="background-rms",
                     nodes=sig, mesh=(my, mx), Ky=Ky, Kx=Kx)
    # the maps on any rectangle, for tile tasks that read their own halo (tilepipe.tiling.Region)
    register_region(bmap, Region(_eval_mesh_region, {"nodes": back, "mesh": (my, mx), "Ky": Ky, "Kx": Kx}))
    register_region(rmap, Region(_eval_mesh_region, {"nodes": sig, "mesh": (my, mx), "Ky": Ky, "Kx": Kx}))
    attrs: dict[str, Any] = {
        "method": method,
        "mesh": [my, mx],
        "filter_size": [fy, fx],
        "filter_threshold": filter_threshold,
        "sigma": float(sigma),
        "maxiters": int(maxiters),
        "min_valid_frac": float(min_valid_frac),
        "tiles": [g0.ny, g0.nx],
        "mesh_background": back.tolist(),
        "mesh_rms": sig.tolist(),
        "mesh_valid": valid.astype(int).tolist(),
        "n_bad_meshes": nbad,
        "global_background": float(np.median(back)),
        "global_rms": float(np.median(sig)),
        "reference": REFERENCE,
        "parameters": {"step": "background", "method": method, "mesh": [my, mx], "filter_size": [fy, fx],
                       "sigma": float(sigma), "tiles": [g0.ny, g0.nx]},
        "header": ds.attrs.get("header", []),
        "bunit": ds.attrs.get("bunit", "adu"),
    }
    if method == "poly":
        bmap, coef, info = _fit_poly(ds, bmap, rmap, g0, order=order, grow=grow, minarea=minarea,
                                     detect_thresh=detect_thresh, nsigma=sigma, maxiters=maxiters,
                                     iters=iters, overlap=overlap)
        attrs["parameters"].update(order=order, grow=grow, iters=iters)
        attrs.update(order=order, grow=grow, minarea=minarea, detect_thresh=detect_thresh, iters=iters,
                     poly_basis="legendre", poly_coefficients=coef.tolist(), **info)
    out = xr.Dataset({"background": (("y", "x"), bmap), "rms": (("y", "x"), rmap)}, attrs=attrs)
    return out


def _fit_poly(ds, bmesh, rmesh, g0: TileGrid, *, order, grow, minarea, detect_thresh, nsigma, maxiters, iters,
              overlap):
    shape = g0.shape
    support = grow + minarea
    if overlap is None:
        overlap = support
    oy, ox = as_pair("overlap", overlap, lower=0)
    g = TileGrid(shape, nx=g0.nx, ny=g0.ny, overlap=(oy if g0.ny > 1 else 0, ox if g0.nx > 1 else 0),
                 align=g0.align)
    g.check_overlap(support, "the poly sky's source mask (grow + minarea)")
    img = ds["image"].data.rechunk(g.chunks)
    bad = ds["mask"].data.rechunk(g.chunks)
    rms = rmesh
    ref = bmesh
    coef = None
    n_kept = -1
    f = dask.delayed(_poly_tile_sums, pure=True)
    total_fits = 0
    for round_ in range(iters):
        # the grown source mask of this round, computed once (with the halo) and kept
        src = map_tiles(_source_mask_tile, img, bad, ref, rms, grid=g, dtype=bool, name="background-sources",
                        detect_thresh=detect_thresh, minarea=minarea, grow=grow)
        (src,) = dask.persist(src)
        blocks = [b.rechunk(g.chunks).to_delayed() for b in (img, bad, src, ref, rms)]
        n_prev = -1
        for it in range(maxiters):
            tasks = [f(*[b[t.iy, t.ix] for b in blocks], tile=t, shape=shape, order=order, coef=coef,
                       nsigma=nsigma) for t in g.tiles]
            sums = dask.compute(*tasks)
            A = np.sum([s[0] for s in sums], axis=0)
            b = np.sum([s[1] for s in sums], axis=0)
            n_kept = int(sum(s[2] for s in sums))
            chi = float(sum(s[3] for s in sums))
            coef = _solve_poly(A, b, n_kept, order)
            total_fits += 1
            log.debug("poly sky round %d iteration %d: %d pixels kept", round_ + 1, it + 1, n_kept)
            if n_kept == n_prev:
                break
            n_prev = n_kept
        if round_ + 1 < iters:
            ref = map_tiles(_eval_poly_tile, _constant(shape, g0.chunks, np.uint8(0)), grid=g0,
                            dtype=np.float32, name="background-poly", coef=coef, shape=shape)
    bmap = map_tiles(_eval_poly_tile, _constant(shape, g0.chunks, np.uint8(0)), grid=g0,
                     dtype=np.float32, name="background-poly", coef=coef, shape=shape)
    register_region(bmap, Region(_eval_poly_region, {"coef": coef, "shape": shape}))
    info = {"poly_pixels": n_kept, "poly_fits": total_fits,
            "poly_residual_std": float(np.sqrt(chi / max(n_kept, 1)))}
    return bmap, coef, info


def subtract_background(ds: Any, bkg: xr.Dataset | None = None, **kwargs: Any) -> xr.Dataset:
    """Return a copy of ``ds`` with the background subtracted from ``image``.

    Parameters
    ----------
    ds : image Dataset, array or path
        Anything :func:`tilepipe.open_image` accepts.
    bkg : xarray.Dataset, optional
        A result of :func:`estimate_background` for this image; computed with
        ``**kwargs`` when not given.
    **kwargs
        Passed to :func:`estimate_background`.

    Returns
    -------
    xarray.Dataset
        ``image - background`` (float32, lazy) as ``image``, plus the
        ``background`` and ``rms`` variables; ``mask`` and ``variance`` are
        kept as they are (a constant offset does not change the noise).
        ``attrs["background"]`` records the method and parameters.
    """
    from .image import open_image

    ds = open_image(ds)
    if bkg is None:
        bkg = estimate_background(ds, **kwargs)
    elif kwargs:
        raise TypeError("give either bkg or estimate_background keyword arguments, not both")
    for name in ("background", "rms"):
        if name not in bkg:
            raise ValueError(f"bkg has no {name!r} variable; pass the result of tilepipe.estimate_background")
        if tuple(bkg[name].shape) != tuple(ds["image"].shape):
            raise ValueError(
                f"bkg[{name!r}] has shape {tuple(bkg[name].shape)} but the image has shape "
                f"{tuple(ds['image'].shape)}; estimate the background of this image"
            )
    chunks = ds["image"].data.chunks
    b = bkg["background"].data.rechunk(chunks)
    r = bkg["rms"].data.rechunk(chunks)
    out = ds.copy()
    out["image"] = (("y", "x"), (ds["image"].data - b).astype(np.float32))
    out["background"] = (("y", "x"), b)
    out["rms"] = (("y", "x"), r)
    out.attrs["background"] = {k: v for k, v in bkg.attrs.items()
                               if k not in ("header", "mesh_background", "mesh_rms", "mesh_valid", "parameters")}
    if "parameters" in bkg.attrs:
        out.attrs["parameters"] = bkg.attrs["parameters"]
    return out


for _f in (_mesh_stats_block, _eval_mesh_tile, _eval_poly_tile, _poly_tile_sums, _source_mask_tile):
    _token(_f)
