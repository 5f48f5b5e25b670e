"""SFFT image subtraction, tile-parallel: one exact global solve from per-tile sums.

Method: Hu, Wang, Chen & Yang (2022, ApJ 936, 157), "Image Subtraction in
Fourier Space" (SFFT).  The convolved image ``S`` (the one with the sharper
PSF) is matched to the target ``T`` by a spatially varying kernel on a
**delta-function basis** plus a polynomial **differential background**
(the paper's §2 model)::

    T(x) = sum_u k_x(u) S(x - u) + B(x) + noise,
    k_x(u) = sum_q a[u, q] m_q(x),        B(x) = sum_b g[b] m_b(x)

with ``u = (uy, ux)`` over the ``(2w+1)²`` kernel pixels and ``m_q`` the
monomials ``x̂^i ŷ^j`` (``i + j <= kernel_poly_order``) of the normalised
coordinates ``x̂ = (x - cx) / hx``, ``cx = (W - 1) / 2``, ``hx = max(cx, 0.5)``
(same for ``y``), which lie in ``[-1, 1]`` over the image.

Fourier-space normal equations (the paper's §3)
-----------------------------------------------
Because the monomials of ``x`` and of ``x - u`` span the same space for every
fixed ``u``, the model is rewritten on the **polynomial-modulated images**
``F_p = m_p · S``::

    sum_u k_x(u) S(x - u) = sum_u sum_p c[u, p] F_p(x - u),
    c[u, p] = sum_q a[u, q] Sx_qp(u)          (binomial expansion of m_q(s + u))

Every normal-matrix entry is then a plain cross-correlation of two images:

    sum_x F_p(x - u) F_p'(x - u') = C_pp'(u - u'),  C_pp'(d) = sum_s F_p(s) F_p'(s + d)
    sum_x F_p(x - u) m_b(x)       = corr(F_p, m_b)(u)
    sum_x F_p(x - u) T(x)         = corr(F_p, T)(u)

so the whole ``(L·P + B)²`` matrix (``L = (2w+1)²``) comes from
``O(n_terms²)`` FFTs of the tile, whatever the kernel size.

Constant flux ratio (``const_flux_ratio=True``)
-----------------------------------------------
The kernel sum is ``sum_u k_x(u) = sum_q (sum_u a[u, q]) m_q(x)``; it is
constant iff ``sum_u a[u, q] = 0`` for every non-constant monomial ``q``.  We
build that into the basis (the paper's trick): the constant-in-space part
keeps all ``L`` deltas, ``a[u, 0] = alpha_u`` (its sum is the flux ratio), and
every spatially varying term uses the zero-sum basis ``δ_u - δ_0`` for
``u != 0``: ``a[u, q] = beta[u, q]``, ``a[0, q] = -sum_{u != 0} beta[u, q]``.
Unknowns: ``L + (L - 1)(P_terms - 1) + B_terms``.  With
``const_flux_ratio=False`` every ``a[u, q]`` is free.

Excluded pixels, exactly
------------------------
Pixel weights break the shift invariance that makes the entries
correlations, so exclusion (masked, saturated, non-finite, sigma-clipped,
outside the ``objects`` windows, within ``w`` of a bad pixel of ``S``) is
done by **imputation**: the design matrix keeps every row
(it is computed once), and an excluded row's target is replaced by the current
model's prediction there (an EM iteration for missing data).  At the fixed
point the excluded rows contribute no gradient, i.e. the solution is exactly
the least-squares solution over the good pixels; the iterations are the
sigma-clipping iterations (``max_iter``) followed by at most ``em_iter``
more until the coefficients change by less than ``tol``.  Clipping uses
``|T - model| / sigma > sigma_clip`` with ``sigma`` the propagated noise of the
difference (not the raw residual).  Bad pixels of ``S`` are set to 0 (the sky,
after sky subtraction) so that they do not dominate the excluded rows.  Both
images are zero-padded (the sky) beyond the image edge and the rows near the
edge are fitted with that assumption: excluding them makes the EM converge
slowly, because the spatial terms are largest there.

Tiles into one solve
--------------------
The sums are additive: the ``S``-``S`` correlations over the reference-pixel
index ``s`` (each tile sums its core's ``s``, reading a ``2w`` halo), the
right-hand side and background terms over the target-pixel index ``x`` (each
tile sums its core, plus a ``w`` ring beyond the image edge for edge tiles).
Everything outside the image is zero and every tile grid is zero-padded by
``2w``, so nothing wraps.  The client adds the tiles' lag arrays, builds and
solves the small system once (Jacobi-scaled, ridge ``ridge`` on the unit
diagonal), and :func:`tilepipe.map_tiles` applies the solution to every core.
The tiled solution equals the whole-image one to rounding.

Conventions: arrays ``[y, x]``, 0-based pixels, mask True = bad, variances in
image units squared.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr
from scipy import fft as sfft_
from scipy import ndimage

from .._validate import check_choice, check_int, check_positive
from ..exceptions import FallbackWarning, OverlapWarning
from ..image import _robust_sky, open_image
from ..tiling import TileGrid, map_tiles

log = logging.getLogger(__name__)

__all__ = ["sfft_subtract", "kernel_at", "default_kernel_half_width", "measure_fwhm"]

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: a scaled normal matrix whose smallest/largest eigenvalue ratio is below this is called singular
_SINGULAR_RCOND = 1e-13


# =========================================================== polynomial terms
def poly_terms(order: int) -> list[tuple[int, int]]:
    """Monomial exponents ``(i, j)`` of ``x̂^i ŷ^j`` with ``i + j <= order``, by degree.

    The first ``(k+1)(k+2)/2`` terms are those of order ``k``, so lower orders
    are prefixes: ``[(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2), ...]``.
    """
    return [(i, d - i) for d in range(order + 1) for i in range(d, -1, -1)]


def _n_terms(order: int) -> int:
    return (order + 1) * (order + 2) // 2


def _shift_matrix(terms: list[tuple[int, int]], ux: float, uy: float) -> np.ndarray:
    """``Sx[q, p]``: ``m_q(s + u) = sum_p Sx[q, p] m_p(s)`` (binomial expansion)."""
    index = {t: k for k, t in enumerate(terms)}
    out = np.zeros((len(terms), len(terms)))
    for q, (a, b) in enumerate(terms):
        for i in range(a + 1):
            for j in range(b + 1):
                out[q, index[(i, j)]] += math.comb(a, i) * math.comb(b, j) * ux ** (a - i) * uy ** (b - j)
    return out


@dataclass
class _Config:
    """Everything a tile task needs (small, picklable)."""

    shape: tuple[int, int]
    w: int
    kpo: int  # kernel polynomial order (full; fallbacks only subset)
    bpo: int
    sigma_clip: float
    sky_t: float
    sky_s: float
    objects: np.ndarray | None  # (n, 2) x, y
    obj_radius: float
    swap: bool  # True: the new image is convolved (S = new, T = ref)
    fwhm_diff: float = 3.0  # FWHM (px) of the difference image's PSF, for the matched filter
    norm: tuple[float, float, float, float] = field(init=False)  # cx, cy, hx, hy

    def __post_init__(self) -> None:
        h, w_ = self.shape
        cx, cy = (w_ - 1) / 2.0, (h - 1) / 2.0
        self.norm = (cx, cy, max(cx, 0.5), max(cy, 0.5))

    @property
    def kterms(self) -> list[tuple[int, int]]:
        return poly_terms(self.kpo)

    @property
    def bterms(self) -> list[tuple[int, int]]:
        return poly_terms(self.bpo)


# ================================================================ tile grids
class _Grid:
    """A tile's outer box zero-padded by ``2w``, with global coordinates and region masks."""

    def __init__(self, tile: Any, cfg: _Config) -> None:
        H, W = cfg.shape
        w = cfg.w
        self.pad = pad = 2 * w
        oy, ox = tile.outer
        self.h, self.wd = oy.stop - oy.start + 2 * pad, ox.stop - ox.start + 2 * pad
        self.y0, self.x0 = oy.start - pad, ox.start - pad
        self.place = (slice(pad, pad + oy.stop - oy.start), slice(pad, pad + ox.stop - ox.start))
        self.fshape = (sfft_.next_fast_len(self.h, real=True), sfft_.next_fast_len(self.wd, real=True))
        self._dft: dict[tuple[int, bool], tuple[np.ndarray, np.ndarray]] = {}
        self._lag_dft: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        yg = self.y0 + np.arange(self.h)
        xg = self.x0 + np.arange(self.wd)
        self.yg, self.xg = yg, xg
        cx, cy, hx, hy = cfg.norm
        self.xh = (xg - cx) / hx
        self.yh = (yg - cy) / hy
        in_y = (yg >= 0) & (yg < H)
        in_x = (xg >= 0) & (xg < W)
        self.inimg = in_y[:, None] & in_x[None, :]
        cy_, cx_ = tile.core
        core_y = (yg >= cy_.start) & (yg < cy_.stop)
        core_x = (xg >= cx_.start) & (xg < cx_.stop)
        self.core = core_y[:, None] & core_x[None, :]
        # rows summed by this tile: the core, extended by w beyond the image edge
        ey = (yg >= (cy_.start - w if cy_.start == 0 else cy_.start)) & (yg < (cy_.stop + w if cy_.stop == H else cy_.stop))
        ex = (xg >= (cx_.start - w if cx_.start == 0 else cx_.start)) & (xg < (cx_.stop + w if cx_.stop == W else cx_.stop))
        self.ecore = ey[:, None] & ex[None, :]
        # rows whose kernel box leaves the image
        edge_y = (yg < w) | (yg >= H - w)
        edge_x = (xg < w) | (xg >= W - w)
        self.edge = edge_y[:, None] | edge_x[None, :]
        # where the core lies inside the grid (to cut core-shaped outputs)
        self.core_sl = (slice(cy_.start - self.y0, cy_.stop - self.y0), slice(cx_.start - self.x0, cx_.stop - self.x0))

    def embed(self, block: np.ndarray, fill: float = 0.0, dtype: Any = np.float64) -> np.ndarray:
        out = np.full((self.h, self.wd), fill, dtype=dtype)
        out[self.place] = block
        return out

    def mono(self, i: int, j: int) -> np.ndarray:
        """The monomial ``x̂^i ŷ^j`` on the grid."""
        return np.outer(self.yh**j, self.xh**i)

    def _powers(self, terms: Iterable[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """``Y[y, j] = ŷ^j`` and ``X[x, i] = x̂^i`` up to the highest powers in ``terms``."""
        terms = list(terms)
        ni = max((i for i, _ in terms), default=0) + 1
        nj = max((j for _, j in terms), default=0) + 1
        return self.yh[:, None] ** np.arange(nj)[None, :], self.xh[:, None] ** np.arange(ni)[None, :]

    def poly(self, coeffs: dict[tuple[int, int], float]) -> np.ndarray:
        """``sum c_ij x̂^i ŷ^j`` on the grid, as one separable product ``Y @ C @ X.T`` (no per-term images)."""
        Y, X = self._powers(coeffs)
        C = np.zeros((Y.shape[1], X.shape[1]))
        for (i, j), v in coeffs.items():
            C[j, i] += v
        return (Y @ C) @ X.T

    def moments(self, img: np.ndarray, terms: list[tuple[int, int]]) -> np.ndarray:
        """``sum_x img(x) x̂^i ŷ^j`` for each term, from one ``Y.T @ img @ X`` product."""
        Y, X = self._powers(terms)
        M = (Y.T @ img) @ X
        return np.array([M[j, i] for (i, j) in terms])

    def rfft(self, a: np.ndarray) -> np.ndarray:
        return sfft_.rfft2(a, s=self.fshape)

    def irfft(self, a: np.ndarray) -> np.ndarray:
        return sfft_.irfft2(a, s=self.fshape)[: self.h, : self.wd]

    def conv32(self, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """``sum_e img_e ⊛ kern_e`` on the grid, in single precision (float64 result).

        For the noise and detection maps only (the model variance and the
        matched filter's sums, each compared with noise): a float32 FFT is
        about twice as fast and its error (~1e-6 of the array's rms) is far
        below the noise.  The fit's normal equations stay in float64.
        """
        acc = None
        for img, kern in pairs:
            term = sfft_.rfft2(img.astype(np.float32), s=self.fshape)
            term *= self.kernel_fft(kern, single=True)
            acc = term if acc is None else acc + term
        if acc is None:
            return np.zeros((self.h, self.wd))
        return sfft_.irfft2(acc, s=self.fshape)[: self.h, : self.wd].astype(np.float64)

    def lags(self, spec: np.ndarray, r: int) -> np.ndarray:
        """Values at lags ``d in [-r, r]²`` of the circular correlation whose spectrum is ``spec``.

        ``spec`` is a half spectrum (``rfft2`` layout, several stacked along
        a leading axis allowed).  Only ``(2r+1)²`` values are needed, so
        instead of a full ``irfft2`` the inverse DFT is evaluated at those
        lags directly: ``Re(Ey @ spec @ Ex) / N`` with ``Ex`` weighting the
        half-spectrum columns by 2 (1 for the zero and Nyquist columns), which
        is exactly what ``irfft2`` computes at those points.
        """
        if r not in self._lag_dft:
            ny, nx = self.fshape
            d = np.arange(-r, r + 1)
            ey = np.exp(2j * np.pi * np.outer(d, np.arange(ny)) / ny)
            kx = np.arange(nx // 2 + 1)
            wx = np.full(kx.size, 2.0)
            wx[0] = 1.0
            if nx % 2 == 0:
                wx[-1] = 1.0
            ex = (wx[:, None] * np.exp(2j * np.pi * np.outer(kx, d) / nx)) / (ny * nx)
            self._lag_dft[r] = (ey, ex)
        ey, ex = self._lag_dft[r]
        return np.real(np.matmul(np.matmul(ey, spec), ex))

    def kernel_fft(self, kern: np.ndarray, single: bool = False) -> np.ndarray:
        """rfft2 (on ``fshape``) of a small centred kernel stamp, by a direct separable DFT.

        Equals ``rfft2`` of the stamp wrapped around the origin, at the cost of
        two small matrix products instead of a full-size FFT.  ``single``:
        complex64 (for :meth:`conv32`).
        """
        r = kern.shape[0] // 2
        key = (r, single)
        if key not in self._dft:
            u = np.arange(-r, r + 1)
            ey = np.exp(-2j * np.pi * np.outer(np.arange(self.fshape[0]), u) / self.fshape[0])
            ex = np.exp(-2j * np.pi * np.outer(u, np.arange(self.fshape[1] // 2 + 1)) / self.fshape[1])
            dt = np.complex64 if single else np.complex128
            self._dft[key] = (ey.astype(dt), ex.astype(dt))
        ey, ex = self._dft[key]
        return ey @ (kern.astype(ey.real.dtype) @ ex)


class _SpectraCache:
    """A per-process, thread-safe LRU (bounded in bytes) of the modulated spectra ``F̂_p`` of a tile.

    ``F̂_p = rfft2(m_p · S)`` depends only on the tile's ``S`` pixels and the
    configuration, not on the iteration, so the fit passes after the first
    reuse them when their task runs in the same process (always with the
    local schedulers; on a cluster, tasks of a tile usually follow its
    persisted chunks).  The key hashes the pixel data, so a hit is exact;
    a miss just recomputes.
    """

    def __init__(self, max_bytes: int) -> None:
        import threading
        from collections import OrderedDict

        self.max_bytes = int(max_bytes)
        self._d: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    def get(self, key: str, make: Any) -> list[np.ndarray]:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = make()
        size = sum(v.nbytes for v in value)
        if size <= self.max_bytes // 2:
            for v in value:
                v.flags.writeable = False
            with self._lock:
                if key not in self._d:
                    self._d[key] = value
                    self._nbytes += size
                while self._nbytes > self.max_bytes and self._d:
                    _, old = self._d.popitem(last=False)
                    self._nbytes -= sum(v.nbytes for v in old)
        return value


_FHAT_CACHE = _SpectraCache(768 * 2**20)


def _modulated_spectra(g: _Grid, cfg: _Config, s: np.ndarray, s_img: Any, s_bad: Any, tile: Any) -> list[np.ndarray]:
    """``[rfft2(m_p · S) for p]`` of a tile (fit pass preparation), through :data:`_FHAT_CACHE`."""
    key = dask.base.tokenize(np.asarray(s_img), np.asarray(s_bad), cfg.sky_s, cfg.kterms, tile.outer, g.pad,
                             g.fshape, cfg.shape)
    return _FHAT_CACHE.get(key, lambda: [g.rfft(g.mono(i, j) * s) for (i, j) in cfg.kterms])


def _prepare(g: _Grid, cfg: _Config, t_img, s_img, t_bad, s_bad, fit: bool):
    """Sky-subtracted float64 T and S on the grid, with bad pixels set to 0, and the bad maps."""
    t = g.embed(np.asarray(t_img, dtype=np.float64) - cfg.sky_t)
    s = g.embed(np.asarray(s_img, dtype=np.float64) - cfg.sky_s)
    tb = g.embed(np.asarray(t_bad, dtype=bool), False, bool) | ~np.isfinite(t)
    sb = g.embed(np.asarray(s_bad, dtype=bool), False, bool) | ~np.isfinite(s)
    t[~np.isfinite(t)] = 0.0
    s[~np.isfinite(s)] = 0.0
    if fit:
        t[tb] = 0.0
        s[sb] = 0.0
    return t, s, tb, sb


def _object_windows(g: _Grid, cfg: _Config, radius: float) -> np.ndarray:
    """Pixels of the grid within ``radius`` of any object (global rounded centres)."""
    margin = int(math.ceil(radius)) + 1
    xy = cfg.objects
    px = np.floor(xy[:, 0] + 0.5).astype(np.int64) - (g.x0 - margin)
    py = np.floor(xy[:, 1] + 0.5).astype(np.int64) - (g.y0 - margin)
    hh, ww = g.h + 2 * margin, g.wd + 2 * margin
    ok = (px >= 0) & (px < ww) & (py >= 0) & (py < hh)
    if not ok.any():
        return np.zeros((g.h, g.wd), dtype=bool)
    seeds = np.ones((hh, ww), dtype=bool)
    seeds[py[ok], px[ok]] = False
    dist = ndimage.distance_transform_edt(seeds)
    return dist[margin:margin + g.h, margin:margin + g.wd] <= radius


def _excluded_rows(g: _Grid, cfg: _Config, tb: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """Rows excluded before any clipping: bad T, within w of bad S, outside the object windows."""
    w = cfg.w
    near_sbad = ndimage.maximum_filter(sb.view(np.uint8), size=2 * w + 1, mode="constant", cval=0).astype(bool)
    excl = (tb | near_sbad) & g.inimg
    if cfg.objects is not None:
        excl |= ~_object_windows(g, cfg, cfg.obj_radius)
    return excl


# ================================================= model evaluation in a tile
def _model_parts(g: _Grid, cfg: _Config, s: np.ndarray, c: np.ndarray, gamma: np.ndarray, fhat=None):
    """``K ⊛ S`` and ``B`` on the grid for modulated-basis coefficients ``c[p, uy, ux]``."""
    acc = None
    for p, (i, j) in enumerate(cfg.kterms):
        if not np.any(c[p]):
            continue
        fp = fhat[p] if fhat is not None else g.rfft(g.mono(i, j) * s)
        term = fp * g.kernel_fft(c[p])
        acc = term if acc is None else acc + term
    conv = g.irfft(acc) if acc is not None else np.zeros((g.h, g.wd))
    bg = g.poly({t: float(gamma[b]) for b, t in enumerate(cfg.bterms)})
    bg *= g.inimg
    return conv, bg


def _model_variance(g: _Grid, cfg: _Config, var_s: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``sum_u k_x(u)² V(x - u)`` with ``k_x(u) = sum_p c[p, u] m_p(x - u)``.

    ``k² = sum_pp' c_p c_p' m_p m_p'(x - u)``: grouped by the product monomial
    ``m_e`` (orders up to ``2P``), it is ``sum_e ((m_e V) ⊛ Q_e)(x)`` with
    ``Q_e = sum_{p+p'=e} c_p c_p'`` — one FFT per distinct product monomial.
    """
    terms = cfg.kterms
    groups: dict[tuple[int, int], np.ndarray] = {}
    for p, (i, j) in enumerate(terms):
        for pp, (k, l) in enumerate(terms):
            e = (i + k, j + l)
            prod = c[p] * c[pp]
            groups[e] = groups[e] + prod if e in groups else prod.copy()
    pairs = ((g.mono(i, j) * var_s, q) for (i, j), q in groups.items() if np.any(q))  # one image at a time
    return np.clip(g.conv32(pairs), 0.0, None)


def _kernel_power(g: _Grid, cfg: _Config, a: np.ndarray) -> np.ndarray:
    """``sum_u k_x(u)²`` on the grid from the standard coefficients ``a[q, uy, ux]``."""
    terms = cfg.kterms
    flat = a.reshape(len(terms), -1)
    gram = flat @ flat.T
    coeffs: dict[tuple[int, int], float] = {}
    for q, (i, j) in enumerate(terms):
        for qq, (k, l) in enumerate(terms):
            e = (i + k, j + l)
            coeffs[e] = coeffs.get(e, 0.0) + float(gram[q, qq])
    return g.poly(coeffs)


# ======================================================== per-tile fit sums
def _tile_sums(t_img, s_img, t_bad, s_bad, t_var, s_var, *, tile, cfg: _Config, coef: dict | None,
               need_matrix: bool) -> dict[str, Any]:
    """Partial normal-equation sums of one tile (pure, thread-safe).

    Returns the ``S``-``S`` correlation lags (``need_matrix``), the kernel-
    background and background-background blocks, the right-hand side, and
    counts.  ``coef`` (``c``, ``gamma`` of the previous iteration) drives the
    sigma clipping and the imputation of excluded rows; ``None`` on the first
    pass (excluded rows then get target 0).
    """
    g = _Grid(tile, cfg)
    w = cfg.w
    kt, bt = cfg.kterms, cfg.bterms
    t, s, tb, sb = _prepare(g, cfg, t_img, s_img, t_bad, s_bad, fit=True)
    excl = _excluded_rows(g, cfg, tb, sb)
    fhat = _modulated_spectra(g, cfg, s, s_img, s_bad, tile)
    out: dict[str, Any] = {}
    n_clip = 0
    if coef is None:
        target = np.where(excl, 0.0, t)
        model = None
    else:
        model, bg = _model_parts(g, cfg, s, coef["c"], coef["gamma"], fhat)
        model += bg  # in place: a tile task holds few grid-sized arrays
        del bg
        sv = g.embed(np.asarray(s_var, dtype=np.float64), 0.0)
        sv[~np.isfinite(sv)] = 0.0
        # for the clip decision only: sum_u k_x(u)^2 var_S(x - u) ~ var_S(x) sum_u k_x(u)^2
        var = sv * _kernel_power(g, cfg, coef["a"])
        del sv
        var += g.embed(np.asarray(t_var, dtype=np.float64), np.inf)
        with np.errstate(invalid="ignore", divide="ignore"):
            z = t - model
            z /= np.sqrt(var, out=var)
        del var
        clip = ~excl & g.core & ~(np.abs(z) <= cfg.sigma_clip)
        n_clip = int(clip.sum())
        excl = excl | clip
        target = np.where(excl, model, t)
        del model
    good = ~excl & g.core
    out["n_good"] = int(good.sum())
    out["n_clip"] = n_clip
    if coef is not None:
        out["chi2"] = float(np.sum(z[good] ** 2))
        del z
    # right-hand side over this tile's rows
    rows = target * g.ecore
    del target
    rhat = g.rfft(rows)
    out["rK"] = np.stack([g.lags(np.conj(fp) * rhat, w) for fp in fhat])
    out["rB"] = g.moments(rows * g.core, bt)  # core ⊂ image
    if need_matrix:
        # S-S block, partitioned over the reference-pixel index s (core)
        if np.array_equal(g.core, g.inimg):  # one tile: S is zero outside the image, so S·core = S
            fcore = fhat
        else:
            fcore = [g.rfft(g.mono(i, j) * s * g.core) for (i, j) in kt]
        n = len(kt)
        out["C"] = np.stack([
            g.lags(np.conj(fcore[p]) * fhat[pp], 2 * w) for p in range(n) for pp in range(p, n)
        ])
        # kernel-background block, partitioned over the rows x (core)
        out["KB"] = _kb_block(g, cfg, s)
        core = g.core.astype(np.float64)
        prod = [(i + k, j + l) for (i, j) in bt for (k, l) in bt]
        out["BB"] = g.moments(core, prod).reshape(len(bt), len(bt))
    return out


def _kb_block(g: _Grid, cfg: _Config, s: np.ndarray) -> np.ndarray:
    """``KB[p, b, u] = sum_{x in core} m_b(x) F_p(x - u)`` from separable box sums.

    With ``m_b(s + u) = sum_e Sx_be(u) m_e(s)`` the sum is
    ``sum_e Sx_be(u) · sum_{s in core - u} m_{e+p}(s) S(s)``.  The monomials
    and the shifted core boxes are separable, so every box sum of every
    monomial-weighted image comes from two matrix products:
    ``B[j, uy, i, ux] = Uᵀ @ S @ V`` with ``V[x, (i, ux)] = x̂^i [x in core_x - ux]``
    and ``U[y, (j, uy)] = ŷ^j [y in core_y - uy]`` (no FFT, no per-term image).
    """
    w = cfg.w
    kt, bt = cfg.kterms, cfg.bterms
    side = 2 * w + 1
    u = np.arange(-w, w + 1)
    y0, y1 = g.core_sl[0].start, g.core_sl[0].stop
    x0, x1 = g.core_sl[1].start, g.core_sl[1].stop
    ne = cfg.kpo + cfg.bpo + 1
    pw = np.arange(ne)
    xs, ys = np.arange(g.wd), np.arange(g.h)
    inx = (xs[:, None] >= (x0 - u)[None, :]) & (xs[:, None] < (x1 - u)[None, :])  # (wd, side)
    iny = (ys[:, None] >= (y0 - u)[None, :]) & (ys[:, None] < (y1 - u)[None, :])  # (h, side)
    V = ((g.xh[:, None] ** pw[None, :])[:, :, None] * inx[:, None, :]).reshape(g.wd, ne * side)
    U = ((g.yh[:, None] ** pw[None, :])[:, :, None] * iny[:, None, :]).reshape(g.h, ne * side)
    B = (U.T @ (s @ V)).reshape(ne, side, ne, side)  # [j, uy, i, ux]
    _, _, hx, hy = cfg.norm
    out = np.zeros((len(kt), len(bt), side, side))
    for iy, uy in enumerate(u):
        for ix, ux in enumerate(u):
            sx = _shift_matrix(bt, ux / hx, uy / hy)  # [b, e]
            for p, (i, j) in enumerate(kt):
                vals = np.array([B[j + l, iy, i + k, ix] for (k, l) in bt])
                out[p, :, iy, ix] = sx @ vals
    return out


# ================================================================ the solve
class _System:
    """Builds the global normal equations from the summed lag arrays and solves them."""

    def __init__(self, cfg: _Config, sums: dict[str, Any]) -> None:
        self.cfg = cfg
        w = cfg.w
        kt, bt = cfg.kterms, cfg.bterms
        nP, nB = len(kt), len(bt)
        side = 2 * w + 1
        L = side * side
        self.L, self.nP, self.nB = L, nP, nB
        uy, ux = np.divmod(np.arange(L), side)
        uy = uy - w
        ux = ux - w
        self.uy, self.ux = uy, ux
        n = L * nP + nB
        M = np.zeros((n, n))
        dy = (uy[:, None] - uy[None, :]) + 2 * w
        dx = (ux[:, None] - ux[None, :]) + 2 * w
        k = 0
        Mk = M[: L * nP, : L * nP].reshape(L, nP, L, nP)
        for p in range(nP):
            for pp in range(p, nP):
                block = sums["C"][k][dy, dx]
                k += 1
                Mk[:, p, :, pp] = block
                if pp != p:
                    Mk[:, pp, :, p] = block.T
        M[: L * nP, : L * nP] = Mk.reshape(L * nP, L * nP)
        # symmetrise the S-S block (exact in the sum; per-tile parts are not symmetric)
        M[: L * nP, : L * nP] = 0.5 * (M[: L * nP, : L * nP] + M[: L * nP, : L * nP].T)
        KB = sums["KB"]  # (nP, nB, side, side)
        kb = KB[:, :, uy + w, ux + w]  # (nP, nB, L)
        M[: L * nP, L * nP:] = kb.transpose(2, 0, 1).reshape(L * nP, nB)
        M[L * nP:, : L * nP] = M[: L * nP, L * nP:].T
        M[L * nP:, L * nP:] = sums["BB"]
        self.M = M
        # shift matrices: c[l, p] = sum_q a[l, q] Sx_qp(u_l)
        _, _, hx, hy = cfg.norm
        self.Sx = np.stack([_shift_matrix(kt, ux[l] / hx, uy[l] / hy) for l in range(L)])  # (L, nq, np)
        self._cache: dict[Any, Any] = {}

    def rhs(self, sums: dict[str, Any]) -> np.ndarray:
        w = self.cfg.w
        rk = sums["rK"][:, self.uy + w, self.ux + w]  # (nP, L)
        return np.concatenate([rk.T.reshape(-1), sums["rB"]])

    def _param_matrix(self, kpo: int, bpo: int, const: bool) -> tuple[np.ndarray, int]:
        """``G``: unknowns theta -> full coefficient vector (c, gamma); and the count of unknowns."""
        L, nP, nB = self.L, self.nP, self.nB
        nq = _n_terms(kpo)
        nb = _n_terms(bpo)
        l0 = L // 2
        # H: theta_k -> a[l, q] (q < nq)
        cols = []
        if const:
            for l in range(L):
                v = np.zeros((L, nP))
                v[l, 0] = 1.0
                cols.append(v)
            for q in range(1, nq):
                for l in range(L):
                    if l == l0:
                        continue
                    v = np.zeros((L, nP))
                    v[l, q] = 1.0
                    v[l0, q] = -1.0
                    cols.append(v)
        else:
            for q in range(nq):
                for l in range(L):
                    v = np.zeros((L, nP))
                    v[l, q] = 1.0
                    cols.append(v)
        A = np.stack(cols, axis=-1)  # (L, nP[q], nk)
        C = np.einsum("lqp,lqk->lpk", self.Sx, A)  # c[l, p] per unknown
        nk = A.shape[-1]
        G = np.zeros((L * nP + nB, nk + nb))
        G[: L * nP, :nk] = C.reshape(L * nP, nk)
        G[L * nP + np.arange(nb), nk + np.arange(nb)] = 1.0
        self._A = A
        return G, nk + nb

    def solve(self, r: np.ndarray, kpo: int, bpo: int, const: bool, ridge: float):
        """Solve for (kpo, bpo); returns (theta, G, rcond) or raises LinAlgError when singular.

        The Jacobi-scaled matrix and its Cholesky factor are cached per
        (kpo, bpo): the normal matrix does not change between iterations.
        """
        from scipy.linalg import LinAlgError, cho_factor, cho_solve
        from scipy.linalg.lapack import dpocon

        key = (kpo, bpo, const, ridge)
        if key not in self._cache:
            G, n = self._param_matrix(kpo, bpo, const)
            Mt = G.T @ self.M @ G
            d = np.sqrt(np.clip(np.diag(Mt), 0, None))
            if np.any(d <= 0) or not np.all(np.isfinite(Mt)):
                raise np.linalg.LinAlgError("a basis function is zero on every fitted pixel")
            Ms = Mt / d[:, None] / d[None, :]
            try:
                cf = cho_factor(Ms, lower=False, check_finite=False)
            except LinAlgError:
                raise np.linalg.LinAlgError("the matrix is not positive definite") from None
            rcond, info = dpocon(cf[0], 1.0)  # ||Ms||_1 <= n for a unit-diagonal PSD matrix
            rcond = float(rcond) / n if info == 0 else 0.0
            if rcond < _SINGULAR_RCOND:
                raise np.linalg.LinAlgError(f"reciprocal condition number {rcond:.2e}")
            cfr = cho_factor(Ms + ridge * np.eye(n), lower=False, check_finite=False)
            self._cache[key] = (G, d, cfr, rcond, self._A)
        G, d, cfr, rcond, A = self._cache[key]
        self._A = A
        rt = G.T @ r
        th = cho_solve(cfr, rt / d, check_finite=False) / d
        return th, G, rcond


# ============================================================ FWHM and sizes
def _fwhm_block(img: np.ndarray, bad: np.ndarray, saturation: float | None) -> float:
    """Median FWHM (px) of bright isolated stars from Gaussian-weighted adaptive moments."""
    a = np.asarray(img, dtype=np.float64)
    badm = np.asarray(bad, dtype=bool) | ~np.isfinite(a)
    sky, sig = _robust_sky(a[~badm][:: max(1, a.size // 200_000)])
    a = np.where(badm, sky, a) - sky
    sm = ndimage.gaussian_filter(a, 1.0)
    peaks = (sm == ndimage.maximum_filter(sm, size=9)) & (sm > 20 * sig / 2.0)
    near_bad = ndimage.maximum_filter(badm.view(np.uint8), size=15).astype(bool)
    peaks &= ~near_bad
    if saturation is not None:
        peaks &= ndimage.maximum_filter(a + sky, size=7) < 0.8 * saturation
    py, px = np.nonzero(peaks)
    r = 10
    ok = (py >= r) & (py < a.shape[0] - r) & (px >= r) & (px < a.shape[1] - r)
    py, px = py[ok], px[ok]
    order = np.argsort(sm[py, px])[::-1]
    py, px = py[order][:200], px[order][:200]
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    vals = []
    for y, x in zip(py, px):
        st = a[y - r:y + r + 1, x - r:x + r + 1]
        s2 = 2.0
        cx = cy = 0.0
        for _ in range(20):
            wgt = np.exp(-0.5 * ((xx - cx) ** 2 + (yy - cy) ** 2) / s2)
            f = st * wgt
            tot = f.sum()
            if tot <= 0:
                break
            cx, cy = (f * xx).sum() / tot, (f * yy).sum() / tot
            m2 = (f * ((xx - cx) ** 2 + (yy - cy) ** 2)).sum() / tot / 2.0
            if not np.isfinite(m2) or m2 <= 0:
                break
            s2 = 2.0 * m2  # adaptive moments: the weight matches the object (sigma_w^2 -> 2 m2)
        else:
            vals.append(_FWHM_PER_SIGMA * math.sqrt(max(s2 - 1.0 / 12.0, 1e-3)))
    return float(np.median(vals)) if len(vals) >= 3 else float("nan")


def measure_fwhm(ds: Any, *, box: int = 1024) -> float:
    """FWHM (pixels) measured on the central ``box × box`` region of an image.

    Adaptive Gaussian-weighted second moments of up to 200 bright, isolated,
    unsaturated peaks; the median is returned (NaN when fewer than 3 stars).
    Only one bounded box is read, never the whole image.
    """
    ds = open_image(ds)
    h, w = ds["image"].shape
    by, bx = min(box, h), min(box, w)
    y0, x0 = (h - by) // 2, (w - bx) // 2
    sl = (slice(y0, y0 + by), slice(x0, x0 + bx))
    img, bad = dask.compute(ds["image"].data[sl], ds["mask"].data[sl])
    return _fwhm_block(img, bad, ds.attrs.get("saturation"))


def default_kernel_half_width(fwhm_new: float, fwhm_ref: float) -> int:
    """Default kernel half-width ``w`` (kernel ``(2w+1)²``) from the two FWHMs (pixels).

    A Gaussian matching kernel has ``sigma_K = sqrt(|f_new² - f_ref²|) / 2.355``;
    ``w = max(3, ceil(4 sigma_K + 1))`` holds it to 4 sigma plus one pixel for
    residual shifts and non-Gaussian wings (``w = 6``, a 13 x 13 kernel, for
    3.5 vs 2.5 px).
    """
    sk = math.sqrt(abs(fwhm_new**2 - fwhm_ref**2)) / _FWHM_PER_SIGMA
    return int(max(3, math.ceil(4.0 * sk + 1.0)))


def _objects_xy(objects: Any) -> np.ndarray:
    try:
        x = np.asarray(objects["x"], dtype=np.float64)
        y = np.asarray(objects["y"], dtype=np.float64)
    except (KeyError, ValueError, TypeError, IndexError):
        try:
            arr = np.asarray(objects, dtype=np.float64)
        except (TypeError, ValueError):
            arr = np.zeros(0)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise TypeError(
                "objects must be a table with 'x' and 'y' columns (global 0-based pixels) or an (n, 2) "
                f"array of (x, y); got {type(objects).__name__}"
            ) from None
        x, y = arr[:, 0], arr[:, 1]
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        raise ValueError("objects has no finite (x, y) position; pass at least one object or objects=None")
    return np.column_stack([x[ok], y[ok]])


# ================================================================ apply tile
def _apply_tile(t_img, s_img, t_bad, s_bad, t_var, s_var, *, tile, cfg: _Config, c: np.ndarray,
                gamma: np.ndarray, ksum_coef: np.ndarray, a: np.ndarray):
    """Difference, convolved image, noise, scaled, mask, kernel sum, background for one core.

    Full-grid arrays are released as soon as their core cut is taken, so a
    task holds a few grid-sized arrays at a time.
    """
    g = _Grid(tile, cfg)
    t, s, tb, sb = _prepare(g, cfg, t_img, s_img, t_bad, s_bad, fit=False)
    # without bad S pixels the unmasked S is the fitted S: reuse the fit passes' spectra (same cache key)
    fhat = None if sb.any() else _modulated_spectra(g, cfg, s, s_img, s_bad, tile)
    conv, bg = _model_parts(g, cfg, s, c, gamma, fhat)
    del s, fhat
    tv = g.embed(np.asarray(t_var, dtype=np.float64), 0.0)
    sv = g.embed(np.asarray(s_var, dtype=np.float64), 0.0)
    tv[~np.isfinite(tv)] = 0.0
    sv[~np.isfinite(sv)] = 0.0
    ksum = g.poly({t: float(ksum_coef[q]) for q, t in enumerate(cfg.kterms)})
    w = cfg.w
    near_sbad = ndimage.maximum_filter(sb.view(np.uint8), size=2 * w + 1, mode="constant", cval=0).astype(bool)
    bad = tb | near_sbad | g.edge | ~g.inimg
    del tb, sb, near_sbad
    sl = g.core_sl
    # PSF-matched-filter S/N of the difference (Gaussian of the larger FWHM), for detection
    scorr = _matched_filter(g, cfg, t, conv, bg, tv, sv, ksum, bad, a)[sl].copy()
    t, conv, bg, ksum, bad = (a[sl].copy() for a in (t, conv, bg, ksum, bad))  # cores; grids released
    var = tv[sl] + _model_variance(g, cfg, sv, c)[sl]
    del tv, sv
    if not cfg.swap:  # T = new, S = ref: diff = new - K (x) ref - B
        diff = t - conv - bg
        convolved = conv
        noise = np.sqrt(var)
    else:  # T = ref, S = new: diff = (K (x) new + B - ref) / ksum, in new's units
        with np.errstate(divide="ignore", invalid="ignore"):
            diff = (conv + bg - t) / ksum
            convolved = conv / ksum
            noise = np.sqrt(var) / np.abs(ksum)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(noise > 0, diff / noise, 0.0)
    bad |= ~np.isfinite(scaled) | ~(noise > 0)
    scaled = np.where(np.isfinite(scaled), scaled, 0.0)
    scorr = np.where(bad, 0.0, scorr)
    return diff, convolved, noise, scaled, bad, ksum, bg, scorr


def _matched_filter(g, cfg, t, conv, bg, tv, sv, ksum, bad, a) -> np.ndarray:
    """S/N of a PSF fit at every pixel of the difference, with its correlated noise.

    ``num = P ⊛ (D / σ²)``; its variance (noise locally constant over the
    footprint) is ``P² ⊛ (v_T / σ⁴) + Γ(x) · (P̄ ⊛ (v_S / σ⁴))`` with
    ``Γ(x) = sum_u (P ⊛ k_x)(u)²`` (the convolved image's noise is
    correlated by the kernel) and ``P̄ = P² / sum P²``.  ``P`` is a Gaussian
    of the difference PSF's FWHM; ``σ² = v_T + sum k² v_S``.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        if cfg.swap:
            k2 = np.where(ksum != 0, ksum, np.nan) ** 2
            d = (conv + bg - t) / np.sqrt(k2)
            vt, vs = tv / k2, sv / k2
            del k2
        else:
            d = t - conv - bg
            vt, vs = tv, sv
        sig2 = vs * _kernel_power(g, cfg, a)
        sig2 += vt
        ok = ~bad & np.isfinite(d) & np.isfinite(sig2) & (sig2 > 0) & np.isfinite(vt) & np.isfinite(vs)
        w = np.divide(1.0, sig2, out=np.zeros_like(sig2), where=ok)
        del sig2
    d[~ok] = 0.0
    d *= w  # D / sigma^2
    psf = _gauss(cfg.fwhm_diff)
    p2 = psf * psf
    num = g.conv32([(d, psf)])
    del d
    w *= w  # 1 / sigma^4
    white = g.conv32([(np.where(ok, vt, 0.0) * w, p2)])
    corr_local = g.conv32([(np.where(ok, vs, 0.0) * w, p2 / p2.sum())])
    del w
    terms = cfg.kterms
    pa = [_conv_full(psf, a[q]) for q in range(len(terms))]
    corr_local *= _kernel_power(g, cfg, np.stack(pa))  # Γ(x) = sum_u (P ⊛ k_x)(u)²: the kernel power of P ⊛ a
    white += corr_local  # the variance of num
    del corr_local
    pos = white > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        np.sqrt(np.clip(white, 1e-300, None, out=white), out=white)
        num /= white
    num[~pos] = 0.0
    return num


def _conv_full(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full 2-D linear convolution of two small stamps (zero-padded FFT; no ``scipy.signal`` import, ~1.7 s)."""
    shape = (a.shape[0] + b.shape[0] - 1, a.shape[1] + b.shape[1] - 1)
    return np.fft.irfft2(np.fft.rfft2(a, shape) * np.fft.rfft2(b, shape), shape)


def _gauss(fwhm: float) -> np.ndarray:
    """Normalised circular Gaussian stamp of the given FWHM (radius ceil(1.5 FWHM))."""
    sig = fwhm / _FWHM_PER_SIGMA
    r = max(1, int(math.ceil(1.5 * fwhm)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    p = np.exp(-0.5 * (xx**2 + yy**2) / sig**2)
    return p / p.sum()


# ============================================================== public API
def sfft_subtract(
    new: Any,
    ref: Any,
    *,
    kernel_half_width: int | None = None,
    kernel_poly_order: int = 2,
    bg_poly_order: int = 2,
    const_flux_ratio: bool = True,
    ridge: float = 1e-6,
    sigma_clip: float = 3.0,
    max_iter: int = 5,
    em_iter: int = 10,
    tol: float = 1e-4,
    objects: Any = None,
    object_radius: float | None = None,
    nx: int = 1,
    ny: int | None = None,
    overlap: int | None = None,
    convolve: str = "auto",
    new_var: Any = None,
    ref_var: Any = None,
    new_gain: float | None = None,
    ref_gain: float | None = None,
    new_fwhm: float | None = None,
    ref_fwhm: float | None = None,
    subtract_background: bool = True,
) -> xr.Dataset:
    """SFFT difference image (Hu et al. 2022), tile-parallel with one exact global solve.

    Fits ``T = K_x ⊛ S + B`` (see the module docstring for the equations):
    a ``(2w+1)²`` delta-function kernel whose coefficients are polynomials of
    order ``kernel_poly_order`` of the position, and a differential background
    polynomial of order ``bg_poly_order``.  ``S`` is the image with the
    sharper PSF (``convolve="auto"``), ``T`` the other one.  The normal
    equations are built from FFT cross-correlations of polynomial-modulated
    images, summed over tiles in parallel and solved once on the client; the
    solution is applied per tile.

    Parameters
    ----------
    new, ref : Dataset, path or array
        The science and reference images, aligned on the same pixel grid
        (anything :func:`tilepipe.open_image` accepts).
    kernel_half_width : int, optional
        ``w``; default :func:`default_kernel_half_width` of the two FWHMs.
    kernel_poly_order, bg_poly_order : int
        Polynomial orders of the kernel's spatial variation and of the
        differential background.
    const_flux_ratio : bool
        Constrain the kernel sum (the flux ratio) to be constant over the field.
    ridge : float
        Ridge added to the unit diagonal of the Jacobi-scaled normal matrix.
    sigma_clip : float
        Pixels with ``|T - model| / sigma > sigma_clip`` (``sigma`` the
        propagated noise of the difference) are excluded from the next fit.
    max_iter : int
        Sigma-clipping iterations after the first fit.
    em_iter, tol : int, float
        At most ``em_iter`` further iterations after ``max_iter``; the loop
        stops once the number of clipped pixels is stable (changed by at most
        one pixel or 0.1 %) and the coefficients change by less than ``tol``
        (the largest change relative to the largest coefficient).  Each
        iteration also moves the imputation of excluded pixels towards the
        exact masked fit.  The default 1e-4 is far below the coefficients'
        statistical errors: on the 1k test pair the flux ratio moves by 3e-6
        (relative) between ``tol=1e-4`` and ``tol=1e-6``.
    objects : Table or (n, 2) array, optional
        Restrict the fit to windows of radius ``object_radius`` around these
        ``(x, y)`` positions (global 0-based pixels).
    object_radius : float, optional
        Window radius (pixels); default ``max(w, ceil(2.5 * FWHM_max))``.
    nx, ny, overlap : int
        Tile grid.  ``overlap`` defaults to ``2w`` (the support of the
        normal-matrix correlations); a smaller one is refused.
    convolve : {"auto", "ref", "new"}
        Which image is convolved.  ``"auto"``: the one with the smaller FWHM
        (``ds.attrs["fwhm"]``, ``new_fwhm``/``ref_fwhm``, or measured by
        :func:`measure_fwhm`); ties convolve the reference.
    new_var, ref_var : array-like, optional
        Variance maps (image units²) replacing the Datasets' ``variance``.
    new_gain, ref_gain : float, optional
        Gains (e-/ADU) used when a variance map has to be built (inputs given
        as arrays or paths); a Dataset's own ``variance`` is used as is
        (``FallbackWarning`` when a gain is then given).
    new_fwhm, ref_fwhm : float, optional
        FWHMs (pixels) overriding ``attrs["fwhm"]``.
    subtract_background : bool
        Subtract each image's global sigma-clipped sky level before the fit
        (recommended: zero-filled bad pixels then sit at the sky).

    Returns
    -------
    xarray.Dataset
        Lazy (dask) variables on ``("y", "x")``:

        ``diff``
            New-image flux units.  ``convolve="ref"``: ``new - K ⊛ ref - B``;
            ``convolve="new"``: ``(K ⊛ new + B - ref) / ksum(x)``.
        ``convolved``
            ``K ⊛ ref`` or ``K ⊛ new / ksum`` (the convolved image, new units).
        ``noise``
            Per-pixel sigma of ``diff``: ``sqrt(var_new + sum_u k_x(u)² var_ref(x - u))``
            for ``convolve="ref"``; ``sqrt(var_ref + sum_u k_x(u)² var_new(x - u)) / |ksum|``
            for ``convolve="new"``.
        ``scaled``
            ``diff / noise`` (0 where the noise is 0).
        ``mask``
            True = bad: masked in ``T``, within ``w`` of a bad pixel of ``S``
            or of the image edge, or a non-finite result.
        ``kernel_sum``
            ``sum_u k_x(u)``: the flux ratio new/ref when the reference is
            convolved (ref/new otherwise).
        ``background``
            The fitted differential background ``B`` (units of ``T``).

        ``attrs``: ``method``, ``convolved_image``, ``kernel_half_width``,
        ``kernel_poly_order``, ``bg_poly_order`` (as used), ``poly_terms``,
        ``coord_norm`` (cx, cy, hx, hy), ``kernel_coeffs`` (``a[q][uy+w][ux+w]``:
        ``k_x(u) = sum_q a[q, u] m_q(x)``), ``bg_coeffs``, ``flux_ratio``
        (new/ref), ``sky_new``, ``sky_ref``, ``n_fit_pixels``, ``n_clipped``,
        ``n_iter``, ``rcond``, ``fwhm_new``, ``fwhm_ref``, ``overlap``, ``header``.

    Raises
    ------
    ValueError
        Shapes differ, the kernel does not fit the image or the overlap, or
        there are fewer good pixels than unknowns.

    Warns
    -----
    FallbackWarning
        The normal matrix is singular: the kernel polynomial order (then the
        background order) is lowered until it is not.
    """
    for what, src, var, gain in (("new", new, new_var, new_gain), ("ref", ref, ref_var, ref_gain)):
        if gain is not None and var is None and isinstance(src, xr.Dataset) and "variance" in src:
            warnings.warn(
                f"{what}_gain is not used: the {what} Dataset has its own 'variance' (used as is); pass the image as "
                f"an array or path to build its variance with the gain, or give {what}_var=",
                FallbackWarning, stacklevel=2,
            )
    new_ds = open_image(new, variance=new_var, gain=new_gain, fwhm=new_fwhm)
    ref_ds = open_image(ref, variance=ref_var, gain=ref_gain, fwhm=ref_fwhm)
    shape = tuple(new_ds["image"].shape)
    if tuple(ref_ds["image"].shape) != shape:
        raise ValueError(
            f"new has shape {shape} but ref has shape {tuple(ref_ds['image'].shape)}; "
            "register/resample the reference onto the new image's pixel grid first"
        )
    kpo = check_int("kernel_poly_order", kernel_poly_order, lower=0)
    bpo = check_int("bg_poly_order", bg_poly_order, lower=0)
    ridge = check_positive("ridge", ridge, allow_zero=True)
    sigma_clip = check_positive("sigma_clip", sigma_clip)
    max_iter = check_int("max_iter", max_iter, lower=0)
    em_iter = check_int("em_iter", em_iter, lower=0)
    tol = check_positive("tol", tol)
    check_choice("convolve", convolve, ("auto", "ref", "new"))
    nx = check_int("nx", nx, lower=1)
    ny = nx if ny is None else check_int("ny", ny, lower=1)

    f_new = new_ds.attrs.get("fwhm")
    f_ref = ref_ds.attrs.get("fwhm")
    need_fwhm = True  # for the default kernel size, convolve="auto", the windows and the matched filter
    if need_fwhm:
        if f_new is None or not np.isfinite(f_new):
            f_new = measure_fwhm(new_ds)
        if f_ref is None or not np.isfinite(f_ref):
            f_ref = measure_fwhm(ref_ds)
        if not (np.isfinite(f_new) and np.isfinite(f_ref)):
            raise ValueError(
                f"could not measure the FWHMs (new: {f_new}, ref: {f_ref}; too few bright isolated stars); "
                "pass new_fwhm= and ref_fwhm= (pixels), or kernel_half_width= and convolve='ref'/'new'"
            )
    if convolve == "auto":
        convolve = "new" if f_new < f_ref else "ref"
    swap = convolve == "new"
    if kernel_half_width is None:
        w = default_kernel_half_width(f_new, f_ref)
    else:
        w = check_int("kernel_half_width", kernel_half_width, lower=0)
    if 4 * w + 1 > min(shape):
        raise ValueError(
            f"kernel_half_width={w} (a {2 * w + 1}x{2 * w + 1} kernel) needs images larger than {4 * w + 1} px "
            f"on a side; the images are {shape}. Use a smaller kernel_half_width"
        )
    need = 2 * w
    fwhm_diff = float(max(f_new, f_ref))
    r_filter = max(1, int(math.ceil(1.5 * fwhm_diff)))
    if overlap is None:
        overlap = max(need, w + r_filter)
    overlap = check_int("overlap", overlap, lower=0)
    if (nx > 1 or ny > 1) and overlap < need:
        raise ValueError(
            f"overlap={overlap} is smaller than 2 * kernel_half_width = {need} px, the support of the SFFT "
            f"normal-matrix correlations; use overlap >= {need} or a smaller kernel_half_width"
        )
    if (nx > 1 or ny > 1) and overlap < w + r_filter:
        warnings.warn(
            f"overlap={overlap} is smaller than w + matched-filter radius = {w + r_filter} px: 'scorr' "
            "will differ from the whole-image result near tile borders (diff, noise and the fit are exact)",
            OverlapWarning, stacklevel=2,
        )
    grid = TileGrid(shape, nx=nx, ny=ny, overlap=overlap)
    grid._check_engine()
    if (nx > 1 or ny > 1) and min(grid.min_core) < need:
        raise ValueError(
            f"the smallest tile core {grid.min_core} is smaller than 2 * kernel_half_width = {need} px; "
            "use fewer tiles (smaller nx/ny)"
        )
    if objects is not None:
        obj = _objects_xy(objects)
        fmax = max(v for v in (f_new, f_ref) if v is not None and np.isfinite(v)) if need_fwhm else 0.0
        rad = float(object_radius) if object_radius is not None else float(max(w, math.ceil(2.5 * fmax)))
        rad = check_positive("object_radius", rad)
    else:
        obj, rad = None, 0.0

    T_ds, S_ds = (ref_ds, new_ds) if swap else (new_ds, ref_ds)
    if subtract_background:
        sky_t, sky_s = _global_sky(T_ds), _global_sky(S_ds)
    else:
        sky_t = sky_s = 0.0
    cfg = _Config(shape=shape, w=w, kpo=kpo, bpo=bpo, sigma_clip=sigma_clip, sky_t=sky_t, sky_s=sky_s,
                  objects=obj, obj_radius=rad, swap=swap, fwhm_diff=fwhm_diff)
    # chunks = tile cores, so that a tile task reads only the chunks under its outer box
    arrays = [a.rechunk(grid.chunks) for a in (T_ds["image"].data, S_ds["image"].data, T_ds["mask"].data,
                                                S_ds["mask"].data, T_ds["variance"].data, S_ds["variance"].data)]
    # read (and compute the default variance of) the inputs once: every fit pass and the apply step
    # work on these persisted tile chunks (on a cluster they stay in the workers' memory)
    arrays = list(dask.persist(*arrays))

    coef, info = _fit(arrays, grid, cfg, const_flux_ratio, ridge, max_iter, em_iter, tol)

    outs = map_tiles(_apply_tile, *arrays, grid=grid, n_out=8,
                     dtype=[np.float32, np.float32, np.float32, np.float32, bool, np.float32, np.float32, np.float32],
                     name="sfft-apply", cfg=cfg, c=coef["c"], gamma=coef["gamma"], ksum_coef=coef["ksum"], a=coef["a"])
    names = ["diff", "convolved", "noise", "scaled", "mask", "kernel_sum", "background", "scorr"]
    data_vars = {n: (("y", "x"), o) for n, o in zip(names, outs)}
    ksum0 = float(coef["ksum"][0])
    attrs = {
        "method": "sfft",
        "reference": "Hu et al. 2022, ApJ 936, 157",
        "convolved_image": "new" if swap else "ref",
        "kernel_half_width": int(w),
        "kernel_poly_order": int(info["kpo"]),
        "bg_poly_order": int(info["bpo"]),
        "const_flux_ratio": bool(const_flux_ratio),
        "poly_terms": [list(t) for t in poly_terms(kpo)[: _n_terms(info["kpo"])]],
        "bg_terms": [list(t) for t in poly_terms(bpo)[: _n_terms(info["bpo"])]],
        "coord_norm": [float(v) for v in cfg.norm],
        "kernel_coeffs": coef["a"][: _n_terms(info["kpo"])].tolist(),
        "bg_coeffs": coef["gamma"][: _n_terms(info["bpo"])].tolist(),
        "flux_ratio": (1.0 / ksum0 if swap else ksum0) if ksum0 != 0 else float("nan"),
        "sky_new": float(sky_s if swap else sky_t),
        "sky_ref": float(sky_t if swap else sky_s),
        "n_fit_pixels": int(info["n_good"]),
        "n_clipped": int(info["n_clip"]),
        "n_iter": int(info["n_iter"]),
        "rcond": float(info["rcond"]),
        "fwhm_new": float(f_new) if f_new is not None else None,
        "fwhm_ref": float(f_ref) if f_ref is not None else None,
        "overlap": int(overlap),
        "nx": int(nx),
        "ny": int(ny),
        "ridge": float(ridge),
        "header": new_ds.attrs.get("header", []),
        "bunit": new_ds.attrs.get("bunit", "adu"),
    }
    return xr.Dataset(data_vars, attrs=attrs)


def _global_sky(ds: xr.Dataset, max_sample: int = 1_000_000) -> float:
    """Global sigma-clipped sky level from a strided sample (tile-invariant)."""
    img = ds["image"].data
    h, w = img.shape
    # at least every 4th pixel along each axis: the sample is never the whole image
    stride = max(4, int(np.ceil(np.sqrt(h * w / max_sample))))
    sample, bad = dask.compute(img[::stride, ::stride], ds["mask"].data[::stride, ::stride])
    return float(_robust_sky(np.asarray(sample)[~np.asarray(bad)])[0])


def _tile_tasks(arrays: Sequence[da.Array], grid: TileGrid, cfg: _Config, coef: dict | None, need_matrix: bool):
    f = dask.delayed(_tile_sums, pure=True)
    tasks = []
    for t in grid.tiles:
        blocks = [a[t.outer] for a in arrays]
        tasks.append(f(*blocks, tile=t, cfg=cfg, coef=coef, need_matrix=need_matrix))
    return tasks


def _add(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = v if k not in out else out[k] + v
    return out


def _fit(arrays, grid, cfg, const, ridge, max_iter, em_iter, tol):
    """The map -> reduce -> solve loop; returns the coefficients and diagnostics."""
    sums = _add(dask.compute(*_tile_tasks(arrays, grid, cfg, None, True)))
    system = _System(cfg, sums)
    kpo, bpo = cfg.kpo, cfg.bpo
    L = system.L
    theta = None
    G = None
    rcond = float("nan")

    def n_unknowns(k, b):
        nq = _n_terms(k)
        nk = L * nq if not const else L + (L - 1) * (nq - 1)
        return nk + _n_terms(b)

    def check_pixels(n_good):
        n_unk = n_unknowns(kpo, bpo)
        if n_good < n_unk:
            raise ValueError(
                f"only {n_good} unmasked pixels are available for the fit but the model has {n_unk} unknowns "
                f"(kernel {2 * cfg.w + 1}x{2 * cfg.w + 1}, kernel_poly_order={kpo}, bg_poly_order={bpo}); "
                "unmask more pixels, pass more objects, or use a smaller kernel_half_width or lower orders"
            )

    def do_solve(s):
        nonlocal kpo, bpo, G, rcond
        r = system.rhs(s)
        while True:
            try:
                th, G, rcond = system.solve(r, kpo, bpo, const, ridge)
                return th
            except np.linalg.LinAlgError as exc:
                if kpo > 0:
                    new = (kpo - 1, bpo)
                elif bpo > 0:
                    new = (kpo, bpo - 1)
                else:
                    raise ValueError(
                        f"the SFFT normal equations are singular even with constant kernel and background ({exc}); "
                        "the convolved image carries no usable signal in the fitted pixels (is it empty or "
                        "fully masked?)"
                    ) from None
                warnings.warn(
                    f"singular SFFT normal matrix ({exc}) with kernel_poly_order={kpo}, bg_poly_order={bpo}; "
                    f"falling back to kernel_poly_order={new[0]}, bg_poly_order={new[1]}",
                    FallbackWarning,
                    stacklevel=4,
                )
                kpo, bpo = new

    check_pixels(sums["n_good"])
    theta = do_solve(sums)
    coef = _coefficients(system, G, theta, cfg)
    n_iter = 1
    last_clip = None
    n_good, n_clip = sums["n_good"], 0
    for it in range(max_iter + em_iter):
        s = _add(dask.compute(*_tile_tasks(arrays, grid, cfg, coef, False)))
        n_good, n_clip = s["n_good"], s["n_clip"]
        check_pixels(n_good)
        new_theta = do_solve(s)
        n_iter += 1
        if new_theta.shape != theta.shape:
            change = np.inf
        else:
            change = float(np.max(np.abs(new_theta - theta)) / max(np.max(np.abs(new_theta)), 1e-300))
        theta = new_theta
        coef = _coefficients(system, G, theta, cfg)
        log.debug("sfft iteration %d: %d fit pixels, %d clipped, change %.3g", n_iter, n_good, n_clip, change)
        clip_stable = last_clip is not None and abs(n_clip - last_clip) <= max(1, 1e-3 * last_clip)
        last_clip = n_clip
        if (clip_stable or it >= max_iter) and change < tol:
            break
    info = {"kpo": kpo, "bpo": bpo, "n_good": n_good, "n_clip": n_clip, "n_iter": n_iter, "rcond": rcond}
    return coef, info


def _coefficients(system: _System, G: np.ndarray, theta: np.ndarray, cfg: _Config) -> dict[str, np.ndarray]:
    """Full coefficient arrays from the unknowns: modulated c, standard a, gamma, kernel-sum polynomial."""
    w = cfg.w
    side = 2 * w + 1
    L, nP, nB = system.L, system.nP, system.nB
    full = G @ theta
    c = full[: L * nP].reshape(L, nP)  # c[l, p]
    gamma = full[L * nP:]
    nk = system._A.shape[-1]
    a = np.einsum("lqk,k->ql", system._A, theta[:nk])  # a[q, l]
    return {
        "c": np.ascontiguousarray(c.T.reshape(nP, side, side)),
        "a": a.reshape(nP, side, side),
        "gamma": gamma,
        "ksum": a.sum(axis=1),
        "theta": theta,
    }


def kernel_at(result: xr.Dataset, x: float, y: float) -> np.ndarray:
    """The fitted kernel stamp ``k[uy + w, ux + w]`` at the global pixel ``(x, y)``.

    ``convolved(x) = sum_u k_x(u) S(x - u)`` (a true convolution; for
    ``convolve="new"`` divide by the kernel sum to stay in new's units).
    """
    a = np.asarray(result.attrs["kernel_coeffs"], dtype=np.float64)
    cx, cy, hx, hy = result.attrs["coord_norm"]
    xh, yh = (float(x) - cx) / hx, (float(y) - cy) / hy
    terms = result.attrs["poly_terms"]
    return sum(a[q] * xh**i * yh**j for q, (i, j) in enumerate(terms))
