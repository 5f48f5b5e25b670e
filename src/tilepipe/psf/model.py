"""Empirical, spatially varying PSF: :class:`PSFModel` and :func:`build_psf`.

Model
-----
The PSF at image position ``(x, y)`` is a linear combination of basis images
whose weights are polynomials of the normalised position
``u = (x - cx) / hx``, ``v = (y - cy) / hy`` (``u, v`` in [-1, 1])::

    PSF(x, y) = sum_b c_b(u, v) * basis_b,     c_b(u, v) = sum_j C[b, j] m_j(u, v)

with ``m_j`` the monomials ``u^p v^q`` (``p + q <= degree``).

* ``model="pixel"`` (PSFEx-like; Bertin 2011, ASP Conf. Ser. 442, 435,
  "Automated Morphometry with SExtractor and PSFEx", section 3): every pixel
  of the (possibly oversampled) PSF varies as a polynomial of ``(u, v)``; the
  basis images are the polynomial coefficients of each pixel (``C`` is the
  identity), fitted by weighted linear least squares to the re-centred,
  flux-normalised star stamps.
* ``model="kl"`` (Lauer 2002, Proc. SPIE 4847, 167, "Deconvolution with a
  spatially-variant PSF"): the basis is the mean stamp plus the first
  Karhunen-Loeve eigen-images (SVD of the stamps); the number of components
  is the smallest one leaving out at most ``inf_loss`` of the stamp variance,
  and each component's coefficient varies as a polynomial of ``(u, v)``.

Building follows DESIGN.md's map -> reduce -> map: stamps are cut per tile in
parallel (each tile reads its outer box and cuts the stars it owns), gathered
on the client, one global fit is solved there (no seams), and the model is
evaluated anywhere with :meth:`PSFModel.at` (or per tile with
:meth:`PSFModel.grid`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
from astropy.table import Table

from .._validate import check_choice, check_int, check_positive
from ..exceptions import FallbackWarning
from ._fit import decimate, fine_centre, fit_single, render
from ._stamps import (
    FWHM_PER_SIGMA,
    extract_stamps,
    fourier_shift,
    local_background,
    monomials,
    n_terms,
    windowed_centroid,
)
from .base import BasePSF

__all__ = ["PSFModel", "build_psf", "min_stars"]

log = logging.getLogger(__name__)

_PAD = 3  # extra pixels cut around each stamp for re-centring


def min_stars(degree: int) -> int:
    """Fewest stars :func:`build_psf` accepts for a polynomial ``degree`` (2 per coefficient)."""
    return 1 if degree == 0 else 2 * n_terms(degree)


class PSFModel(BasePSF):
    """A spatially varying PSF: basis images with polynomial coefficient fields.

    Parameters
    ----------
    basis : ndarray ``(n_basis, hf, hf)``
        Basis images on the model grid (``hf = size * oversampling``, +1 when
        ``oversampling`` is even); the centre of the central sample is the
        star centre.  Values are pixel-integrated (an effective PSF).
    coeffs : ndarray ``(n_basis, n_terms(degree))``
        Polynomial coefficients of each basis weight.
    degree : int
        Polynomial degree in ``(u, v)``.
    shape : (ny, nx)
        Shape of the image the model was built on (defines ``u, v``).
    size : int
        Stamp side in image pixels (odd).
    oversampling : int
        Model samples per image pixel.
    kind : {"pixel", "kl"}
        How the basis was built.
    meta : dict, optional
        Provenance (number of stars, FWHM, iterations...).
    stars : Table, optional
        The stars used (``x, y, flux, used``).
    """

    def __init__(self, basis: np.ndarray, coeffs: np.ndarray, degree: int, shape: tuple[int, int], size: int,
                 oversampling: int = 1, kind: str = "pixel", meta: dict[str, Any] | None = None,
                 stars: Table | None = None) -> None:
        basis = np.asarray(basis, dtype=np.float64)
        coeffs = np.asarray(coeffs, dtype=np.float64)
        if basis.ndim != 3:
            raise ValueError(f"basis must be (n_basis, h, w); got shape {basis.shape}")
        hf, _ = fine_centre(int(size), int(oversampling))
        if basis.shape[1:] != (hf, hf):
            raise ValueError(f"basis images must be {hf}x{hf} for size={size}, oversampling={oversampling}; "
                             f"got {basis.shape[1:]}")
        if coeffs.shape != (basis.shape[0], n_terms(int(degree))):
            raise ValueError(f"coeffs must have shape ({basis.shape[0]}, {n_terms(int(degree))}); got {coeffs.shape}")
        self.kind = check_choice("kind", kind, ("pixel", "kl"))
        self._basis = basis
        self._flat = basis.reshape(basis.shape[0], -1)
        self.coeffs = coeffs
        self.degree = int(degree)
        self.shape = (int(shape[0]), int(shape[1]))
        self.size = int(size)
        self.oversampling = int(oversampling)
        self.meta = dict(meta or {})
        self.stars = stars
        ny, nx = self.shape
        self._cx, self._cy = (nx - 1) / 2.0, (ny - 1) / 2.0
        self._hx, self._hy = max(self._cx, 0.5), max(self._cy, 0.5)

    def __repr__(self) -> str:
        return (f"PSFModel(kind={self.kind!r}, size={self.size}, oversampling={self.oversampling}, "
                f"degree={self.degree}, n_basis={self._basis.shape[0]}, shape={self.shape}, "
                f"n_stars={self.meta.get('n_stars')})")

    # ------------------------------------------------------------ evaluation
    @property
    def basis(self) -> np.ndarray:
        """The basis images ``(n_basis, hf, hf)`` (a copy)."""
        return self._basis.copy()

    def _uv(self, x, y):
        u = np.clip((np.asarray(x, np.float64) - self._cx) / self._hx, -1.0, 1.0)
        v = np.clip((np.asarray(y, np.float64) - self._cy) / self._hy, -1.0, 1.0)
        return u, v

    def weights(self, x, y) -> np.ndarray:
        """Basis weights ``(n_basis,)`` (or ``(N, n_basis)``) at position(s) ``(x, y)``."""
        u, v = self._uv(x, y)
        m = monomials(u, v, self.degree)  # (N, nt)
        w = m @ self.coeffs.T
        return w[0] if np.ndim(x) == 0 else w

    def fine(self, x, y) -> np.ndarray:
        """Un-normalised model on its own grid at position(s): ``(hf, hf)`` or ``(N, hf, hf)``."""
        w = np.atleast_2d(self.weights(x, y))
        out = (w @ self._flat).reshape(-1, *self._basis.shape[1:])
        return out[0] if np.ndim(x) == 0 else out

    def _stamp(self, x: float, y: float, oversampled: bool) -> np.ndarray:
        f = self.fine(x, y)
        if oversampled or self.oversampling == 1:
            return f
        return decimate(f, self.oversampling, self.size)

    def efine(self, x, y) -> np.ndarray:
        """Fine models ``(N, hf, hf)`` normalised so their pixel samples sum to 1 (for fitting)."""
        f = np.atleast_3d(self.fine(np.atleast_1d(x), np.atleast_1d(y)))
        s = decimate(f, self.oversampling, self.size).sum(axis=(-2, -1))
        s = np.where(np.abs(s) > 0, s, 1.0)
        return f / s[:, None, None]

    # --------------------------------------------------------------- storage
    def to_attrs(self) -> dict[str, Any]:
        """A JSON-able dict (Zarr attrs); :meth:`from_attrs` restores the model exactly."""
        return {
            "type": self.kind,
            "version": 1,
            "size": self.size,
            "oversampling": self.oversampling,
            "degree": self.degree,
            "shape": list(self.shape),
            "basis": self._basis.tolist(),
            "coeffs": self.coeffs.tolist(),
            "meta": _jsonable(self.meta),
        }

    @classmethod
    def _from_attrs(cls, attrs: dict[str, Any]) -> "PSFModel":
        return cls(np.asarray(attrs["basis"]), np.asarray(attrs["coeffs"]), int(attrs["degree"]),
                   tuple(attrs["shape"]), int(attrs["size"]), int(attrs["oversampling"]), attrs["type"],
                   meta=attrs.get("meta"))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


# =========================================================================
# building
# =========================================================================
def _solve_pixel_basis(F: np.ndarray, W: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Per-pixel weighted least squares: ``F[i, p] ~ sum_j B[j, p] M[i, j]``.

    ``F, W`` are ``(N, P)``; ``M`` is ``(N, nt)``.  Returns ``B`` ``(nt, P)``;
    pixels with no weight get 0.
    """
    nt = M.shape[1]
    A = np.einsum("ip,ij,ik->pjk", W, M, M, optimize=True)
    b = np.einsum("ip,ij->pj", W * F, M, optimize=True)
    tr = np.einsum("pjj->p", A)
    good = tr > 0
    A = A + (1e-10 * np.where(good, tr, 1.0))[:, None, None] * np.eye(nt)
    B = np.linalg.solve(A, b[..., None])[..., 0]
    B[~good] = 0.0
    # variance of each pixel's constant term (the PSF at the field centre)
    var0 = np.full(A.shape[0], np.inf)
    e0 = np.zeros((nt, 1))
    e0[0] = 1.0
    var0[good] = np.linalg.solve(A[good], np.broadcast_to(e0, (int(good.sum()), nt, 1)))[:, 0, 0]
    return B.T, var0


def _support_window(centre_img: np.ndarray, var0: np.ndarray, os: int, nsig: float = 3.0) -> tuple[np.ndarray, float]:
    """Radial window cutting the model where its azimuthal mean is lost in the noise.

    Annuli of 1 px (image pixels) around the centre: the support ends at the
    first annulus (beyond 2 px) whose mean is below ``nsig`` times its noise
    (from the least-squares variances); the window is 1 within that radius + 1 px,
    then 0.  This removes the pure-noise outskirts of the stamp, which would
    otherwise dominate the model's total absolute error.
    """
    hf = centre_img.shape[-1]
    cf = (hf - 1) / 2.0
    yy, xx = np.mgrid[0:hf, 0:hf]
    r = np.hypot(xx - cf, yy - cf) / os
    ring = np.floor(r + 0.5).astype(int)
    rmax = int(ring.max())
    v = var0.reshape(hf, hf)
    support = float(rmax)
    for k in range(2, rmax + 1):
        sel = (ring == k) & np.isfinite(v)
        if not sel.any():
            continue
        mean = centre_img[sel].mean()
        noise = np.sqrt(v[sel].mean() / sel.sum())
        if mean < nsig * noise:
            support = float(k)
            break
    win = (r <= support + 1.0).astype(float)
    return win, support


def _recentre(data_ext, mask_ext, offx, offy, n, os, fill=None):
    """Cut ``n x n`` stamps centred on the stars (fractional offsets ``offx, offy`` from the
    ext-stamp centre) and Fourier-shift them so the centre falls on the nearest fine-grid node.

    Returns stamps ``(N, n, n)``, bad-pixel masks (dilated by 1 px), the fine
    phases ``(phx, phy)`` (ints) and ok flags (star within the cut margin).
    """
    N, E, _ = data_ext.shape
    H = E // 2
    c = n // 2
    kx = np.floor(offx + 0.5).astype(int)
    ky = np.floor(offy + 0.5).astype(int)
    fx = offx - kx
    fy = offy - ky
    lim = H - c - 1
    ok = (np.abs(kx) <= lim) & (np.abs(ky) <= lim)
    kx = np.clip(kx, -lim, lim)
    ky = np.clip(ky, -lim, lim)
    m = n + 2
    crops = np.empty((N, m, m))
    cm = np.empty((N, m, m), bool)
    src = data_ext if fill is None else np.where(mask_ext, fill, data_ext)
    for i in range(N):
        ya, xa = H + ky[i] - c - 1, H + kx[i] - c - 1
        crops[i] = src[i, ya:ya + m, xa:xa + m]
        cm[i] = mask_ext[i, ya:ya + m, xa:xa + m]
    if fill is None:
        crops[cm] = 0.0
    if os > 1:
        hmax = os // 2 if os % 2 == 0 else (os - 1) // 2
        hmin = -(os // 2) + 1 if os % 2 == 0 else -(os - 1) // 2
        phx = np.clip(np.round(fx * os).astype(int), hmin, hmax)
        phy = np.clip(np.round(fy * os).astype(int), hmin, hmax)
    else:
        phx = np.zeros(N, int)
        phy = np.zeros(N, int)
    sh = fourier_shift(crops, -(fx - phx / os), -(fy - phy / os))
    from scipy import ndimage

    cmd = ndimage.binary_dilation(cm, structure=np.ones((1, 3, 3), bool))
    return sh[:, 1:-1, 1:-1], cmd[:, 1:-1, 1:-1], phx, phy, ok, kx, ky


def _deposit(stamps, weights, phx, phy, n, os):
    """Place pixel stamps on the fine grid at their phases: ``(N, hf, hf)`` values and weights."""
    if os == 1:
        return stamps, weights
    N = len(stamps)
    hf, cf = fine_centre(n, os)
    c = n // 2
    F = np.zeros((N, hf, hf))
    W = np.zeros((N, hf, hf))
    p = np.arange(n)
    for i in range(N):
        qy = cf + os * (p - c) - phy[i]
        qx = cf + os * (p - c) - phx[i]
        F[i][np.ix_(qy, qx)] = stamps[i]
        W[i][np.ix_(qy, qx)] = weights[i]
    return F, W


def _smooth_unsampled(basis: np.ndarray, wsum: np.ndarray) -> np.ndarray:
    """Fill fine samples that no star sampled by the mean of their sampled neighbours."""
    from scipy import ndimage

    empty = wsum <= 0
    if not empty.any():
        return basis
    out = basis.copy()
    k = np.ones((3, 3))
    for b in range(len(out)):
        num = ndimage.convolve(np.where(empty, 0.0, out[b]), k, mode="constant")
        den = ndimage.convolve((~empty).astype(float), k, mode="constant")
        out[b][empty] = np.where(den[empty] > 0, num[empty] / np.maximum(den[empty], 1), 0.0)
    return out


def _resolve_stars(ds, stars, size, nx, ny, overlap, select_kwargs):
    """Return the star list (Table with x, y and maybe flux) used to build the PSF."""
    from .select import select_stars

    if stars is None:
        cat = detect_for_psf(ds, nx=nx, ny=ny)
        sel = select_stars(ds, cat, size, nx=nx, ny=ny, overlap=overlap, **select_kwargs)
        return sel[sel["keep"]], sel
    if isinstance(stars, Table):
        if "keep" in stars.colnames:
            return stars[np.asarray(stars["keep"], bool)], stars
        if not {"x", "y"} <= set(stars.colnames):
            raise ValueError(f"stars must have 'x' and 'y' columns (pixels); it has {stars.colnames}")
        sel = select_stars(ds, stars, size, nx=nx, ny=ny, overlap=overlap, **select_kwargs)
        return sel[sel["keep"]], sel
    try:
        arr = np.asarray(stars, dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise TypeError("stars must be None, an astropy Table with x, y columns, or an (N, 2) array of (x, y); "
                        f"got {type(stars).__name__}")
    sel = select_stars(ds, None, size, stars=arr, nx=nx, ny=ny, overlap=overlap, **select_kwargs)
    return sel[sel["keep"]], sel


def detect_for_psf(ds, *, nx: int = 1, ny: int | None = None, nsigma: float = 5.0) -> Table:
    """Detect sources for PSF building: :func:`tilepipe.detect_sources` (its warnings logged at INFO,
    not issued), or, if that fails, a local sep extraction per tile (background-subtracted,
    ownership-merged)."""
    from .. import detect

    # detect_sources with its own warnings logged instead of issued (detect._QUIET), not silenced
    # with warnings.catch_warnings: that is not thread-safe, and here it would span a dask computation
    token = detect._QUIET.set(True)
    try:
        return detect.detect_sources(ds, nsigma=nsigma, nx=nx, ny=ny)
    except Exception as exc:  # noqa: BLE001 - fall back to sep below, but say why
        log.warning("tilepipe.detect_sources failed (%s); using the local sep fallback", exc)
    finally:
        detect._QUIET.reset(token)
    return _sep_detect(ds, nx=nx, ny=ny, nsigma=nsigma)


def _sep_tile(img, msk, *, tile, nsigma):
    import sep

    data = np.ascontiguousarray(img, dtype=np.float32)
    m = np.ascontiguousarray(msk, dtype=bool) | ~np.isfinite(data)
    data = np.where(m, 0.0, data).astype(np.float32)
    empty = Table({k: np.zeros(0) for k in ("x", "y", "flux", "a", "b", "peak")})
    empty["flags"] = np.zeros(0, np.int32)
    try:
        sep.set_extract_pixstack(1_000_000)
        sep.set_sub_object_limit(4096)
        bw = max(16, min(64, min(data.shape) // 4))
        bkg = sep.Background(data, mask=m, bw=bw, bh=bw, fw=3, fh=3)
        sub = data - bkg.back()
        objs = sep.extract(sub, nsigma, err=bkg.rms(), mask=m, minarea=5)
    except Exception as exc:  # noqa: BLE001 - never let sep errors escape a tile
        log.warning("sep failed on tile %d: %s", tile.index, exc)
        return empty
    if len(objs) == 0:
        return empty
    return Table({"x": objs["x"].astype(np.float64), "y": objs["y"].astype(np.float64),
                  "flux": objs["flux"].astype(np.float64), "a": objs["a"].astype(np.float64),
                  "b": objs["b"].astype(np.float64), "peak": objs["peak"].astype(np.float64),
                  "flags": objs["flag"].astype(np.int32)})


def _sep_detect(ds, *, nx=1, ny=None, nsigma=5.0, overlap=32) -> Table:
    from ..tiling import TileGrid, map_tiles_table

    grid = TileGrid(tuple(ds["image"].shape), nx=nx, ny=ny, overlap=overlap)
    return map_tiles_table(_sep_tile, ds["image"].data, ds["mask"].data, grid=grid, nsigma=nsigma)


def build_psf(
    ds: Any,
    stars: Any = None,
    size: int = 25,
    oversampling: int = 1,
    degree: int = 2,
    model: str = "pixel",
    *,
    inf_loss: float = 0.05,
    nx: int = 1,
    ny: int | None = None,
    overlap: int | None = None,
    niter: int = 4,
    clip: float = 5.0,
    max_stars: int = 3000,
    truncate: bool = True,
    select: dict[str, Any] | None = None,
) -> PSFModel:
    """Build a spatially varying empirical PSF from the stars of an image.

    Parameters
    ----------
    ds : Dataset, array or path
        The image (anything :func:`tilepipe.open_image` accepts).  A
        ``background`` variable is subtracted when present; each stamp's
        residual local sky is measured on its border and fitted.
    stars : Table, (N, 2) array or None
        * ``None``: detect (``tilepipe.detect_sources``, or sep per tile) and
          select with :func:`select_stars` (defaults, or ``select=``);
        * a Table with a ``keep`` column (output of :func:`select_stars`): the
          kept rows are used;
        * a Table with ``x, y`` (a detection catalog): selected first;
        * an ``(N, 2)`` array of ``(x, y)``: user stars (only edge, saturation
          and bad-pixel checks apply).
    size : int
        PSF stamp side in pixels (odd; even values are rounded up).
    oversampling : int
        Model samples per pixel (an effective PSF on a finer grid, built from
        the stars' sub-pixel phases; needs many stars).
    degree : int
        Degree of the polynomials of ``(x, y)``.  With fewer than
        ``min_stars(degree)`` stars the degree is lowered (``FallbackWarning``).
    model : {"pixel", "kl"}
        Pixel basis (PSFEx-like, Bertin 2011) or Karhunen-Loeve basis (Lauer
        2002; ``oversampling=1`` only).
    inf_loss : float
        ``model="kl"``: largest fraction of the stamp variance left out by the
        truncated KL basis.
    nx, ny, overlap : int
        Tiles used to cut stamps (and to detect); ``overlap`` defaults to the
        stamp half-size + 4 (stamps then do not depend on the tiling).
    niter : int
        Refinement iterations (re-centring, flux and centre fits, outlier
        rejection).
    clip : float
        Rejection threshold (sigma) for outlying pixels and stars.
    max_stars : int
        Use at most this many stars (the brightest).
    truncate : bool
        Set the model to 0 beyond the radius where its azimuthal profile
        drops below 3 sigma of its noise (the noisy outskirts otherwise
        dominate the model's error); ``meta["support_radius"]`` records it.
    select : dict, optional
        Keyword arguments for :func:`select_stars`.

    Returns
    -------
    PSFModel
        ``psf.at(x, y)`` gives the normalised stamp anywhere; ``psf.stars`` the
        stars with fitted ``x_fit, y_fit, flux_fit`` and ``used``.

    Raises
    ------
    ValueError
        No usable star (none detected, all saturated/rejected), or bad options.

    Notes
    -----
    Algorithm: (1) stamps of side ``size + 6`` are cut per tile around every
    star; (2) each stamp's sky is the sigma-clipped median of its border and
    its centre the Gaussian-windowed centroid; (3) the stamps are re-centred
    by a Fourier shift (to the nearest node of the oversampled grid),
    normalised by their fluxes and the per-pixel polynomials are fitted by
    weighted least squares (inverse variance, from a model-based variance
    when the gain is known); (4) every star's flux, sky and centre are refitted
    with the model (Gauss-Newton), pixels deviating by more than ``clip``
    sigma and stars with outlying chi^2 are rejected, and the model is
    re-centred on its windowed centroid; (3)-(4) repeat ``niter`` times.
    """
    from ..image import as_dataset

    ds = as_dataset(ds)
    size = check_int("size", size, lower=5)
    if size % 2 == 0:
        size += 1
    os = check_int("oversampling", oversampling, lower=1)
    degree = check_int("degree", degree, lower=0)
    model = check_choice("model", model, ("pixel", "kl"))
    if model == "kl" and os != 1:
        raise ValueError("model='kl' supports oversampling=1 only; use model='pixel' for an oversampled PSF")
    inf_loss = check_positive("inf_loss", inf_loss)
    if inf_loss >= 1:
        raise ValueError(f"inf_loss must be < 1 (a fraction of the variance); got {inf_loss}")
    niter = check_int("niter", niter, lower=1)
    clip = check_positive("clip", clip)
    max_stars = check_int("max_stars", max_stars, lower=1)
    half_ext = size // 2 + _PAD
    if overlap is None:
        overlap = half_ext + 1
    shape = tuple(ds["image"].shape)

    chosen, selection = _resolve_stars(ds, stars, size, nx, ny, overlap, dict(select or {}))
    if len(chosen) == 0:
        reasons = _reason_summary(selection)
        raise ValueError(f"no usable PSF star in the image ({reasons}); pass stars= positions, relax the "
                         "selection (select={...}) or check the saturation level")
    if len(chosen) > max_stars:
        order = np.argsort(-np.asarray(chosen["flux"], float)) if "flux" in chosen.colnames else np.arange(len(chosen))
        chosen = chosen[np.sort(order[:max_stars])]
    x = np.asarray(chosen["x"], np.float64)
    y = np.asarray(chosen["y"], np.float64)
    N = len(x)

    st = extract_stamps(ds, x, y, half_ext, nx=nx, ny=ny, overlap=overlap)
    good = st["complete"].copy()
    if not good.any():
        raise ValueError("every PSF star stamp is cut by the image edge; use a smaller size or stars farther "
                         "from the border")
    data_ext = st["image"].astype(np.float64)
    mask_ext = st["mask"]
    var_ext = st["variance"].astype(np.float64)
    E = 2 * half_ext + 1
    c = size // 2
    bkg = local_background(data_ext, mask_ext)
    data_ext -= bkg[:, None, None]
    var_bg = np.array([np.median(v[np.isfinite(v)]) if np.isfinite(v).any() else np.inf for v in var_ext])

    fwhm0 = _initial_fwhm(ds, chosen)
    sig = max(fwhm0 / FWHM_PER_SIGMA, 0.6)
    xc, yc = windowed_centroid(data_ext, mask_ext, sig, niter=15)
    x = st["ix"] + (xc - half_ext)
    y = st["iy"] + (yc - half_ext)
    yy, xx = np.mgrid[0:E, 0:E]
    rr = np.hypot(xx[None] - xc[:, None, None], yy[None] - yc[:, None, None])
    flux = np.where(mask_ext | (rr > c), 0.0, data_ext).sum(axis=(1, 2))
    good &= np.isfinite(flux) & (flux > 0)

    if good.sum() < 1:
        raise ValueError("no usable PSF star: every candidate has non-positive flux or is cut by the edge")
    degree_requested = degree
    nt_needed = degree
    while nt_needed > 0 and good.sum() < min_stars(nt_needed):
        nt_needed -= 1
    if nt_needed != degree:
        warnings.warn(
            f"only {int(good.sum())} usable PSF stars: too few for degree={degree} (needs {min_stars(degree)}); "
            f"using degree={nt_needed}", FallbackWarning, stacklevel=2)
        degree = nt_needed
    if good.sum() < 1:
        raise ValueError("no usable PSF star: every candidate has non-positive flux or is cut by the edge")

    gain = ds.attrs.get("gain")
    hf, cf = fine_centre(size, os)
    u = np.clip((x - (shape[1] - 1) / 2.0) / max((shape[1] - 1) / 2.0, 0.5), -1, 1)
    v = np.clip((y - (shape[0] - 1) / 2.0) / max((shape[0] - 1) / 2.0, 0.5), -1, 1)
    clipped = np.zeros((N, size, size), bool)
    psf = None
    fill = None
    chi2 = np.full(N, np.nan)
    for it in range(niter + 1):
        offx = x - st["ix"]
        offy = y - st["iy"]
        S, Smask, phx, phy, inside, kx, ky = _recentre(data_ext, mask_ext, offx, offy, size, os, fill)
        good &= inside
        # variance of the cut (not shifted) pixels
        V = np.empty((N, size, size))
        for i in range(N):
            ya, xa = half_ext + ky[i] - c, half_ext + kx[i] - c
            V[i] = var_ext[i, ya:ya + size, xa:xa + size]
        if psf is not None and gain:
            model_pix = np.clip(flux[:, None, None] * decimate(psf.efine(x, y), os, size), 0, None)
            V = np.where(np.isfinite(V), var_bg[:, None, None] + model_pix / gain, np.inf)
        bad = Smask | clipped | ~np.isfinite(V) | ~good[:, None, None]
        Wn = np.where(bad, 0.0, flux[:, None, None] ** 2 / np.where(bad, 1.0, V))
        Fn = S / flux[:, None, None]
        Ff, Wf = _deposit(Fn, Wn, phx, phy, size, os)
        M = monomials(u, v, degree)
        B, var0 = _solve_pixel_basis(Ff.reshape(N, -1), Wf.reshape(N, -1), M)
        wsum = Wf.sum(axis=0)
        basis = _smooth_unsampled(B.reshape(-1, hf, hf), wsum) if os > 1 else B.reshape(-1, hf, hf)
        if truncate:
            win, support = _support_window(basis[0], var0, os)
            basis = basis * win[None]
        psf = PSFModel(basis, np.eye(len(basis)), degree, shape, size, os, "pixel")
        if it == niter:
            break
        # refit every star with the current model: flux, sky, centre
        fine = psf.efine(x, y)
        D = np.empty((N, size, size))
        Wd = np.empty((N, size, size))
        for i in range(N):
            ya, xa = half_ext + ky[i] - c, half_ext + kx[i] - c
            D[i] = data_ext[i, ya:ya + size, xa:xa + size]
            mm = mask_ext[i, ya:ya + size, xa:xa + size] | clipped[i]
            Wd[i] = np.where(mm, 0.0, 1.0)
        fr = fit_single(D, Wd, fine, os, size, fit_position=True, dx0=offx - kx, dy0=offy - ky)
        resid = D - fr["model"]
        Vm = np.where(np.isfinite(V), V, np.inf) + (0.05 * np.clip(fr["model"] - fr["sky"][:, None, None], 0, None)) ** 2
        z = np.abs(resid) / np.sqrt(Vm)
        dof = np.maximum(Wd.sum(axis=(1, 2)) - 4, 1)
        chi2 = np.where(Wd > 0, z * z, 0.0).sum(axis=(1, 2)) / dof
        new_clip = (z > clip) & (Wd > 0)
        too_many = new_clip.sum(axis=(1, 2)) > 0.05 * size * size
        clipped |= new_clip
        good &= fr["ok"] & ~too_many
        if good.sum() > 5:
            med = np.median(chi2[good])
            mad = 1.4826 * np.median(np.abs(chi2[good] - med))
            good &= chi2 <= med + clip * max(mad, 0.1 * med)
        x = st["ix"] + kx + fr["dx"]
        y = st["iy"] + ky + fr["dy"]
        flux = np.where(fr["ok"], fr["flux"], flux)
        data_ext -= np.where(fr["ok"], fr["sky"], 0.0)[:, None, None]
        bkg += np.where(fr["ok"], fr["sky"], 0.0)
        # anchor: the model's windowed centroid defines the star centre
        pix = decimate(psf.efine(x, y), os, size)
        mcx, mcy = windowed_centroid(pix, np.zeros_like(pix, bool), sig, niter=15)
        x = x + (mcx - c)
        y = y + (mcy - c)
        u = np.clip((x - (shape[1] - 1) / 2.0) / max((shape[1] - 1) / 2.0, 0.5), -1, 1)
        v = np.clip((y - (shape[0] - 1) / 2.0) / max((shape[0] - 1) / 2.0, 0.5), -1, 1)
        # fill bad pixels with the model for the next shift (no ringing from holes)
        fill = np.zeros_like(data_ext)
        fr_full = flux[:, None, None] * render(psf.efine(x, y), (x - st["ix"]) - 0, (y - st["iy"]), os, size,
                                                derivatives=False)
        fill[:, half_ext - c:half_ext + c + 1, half_ext - c:half_ext + c + 1] = fr_full
        if good.sum() < min_stars(degree):
            while degree > 0 and good.sum() < min_stars(degree):
                degree -= 1
            warnings.warn(f"outlier rejection left {int(good.sum())} PSF stars; lowering the degree to {degree}",
                          FallbackWarning, stacklevel=2)
            if good.sum() < 1:
                raise ValueError("every PSF star was rejected as an outlier; check the star list")

    n_used = int(good.sum())
    if model == "kl":
        psf = _kl_model(Fn, Wn, good, M, psf, x, y, flux, os, size, shape, degree, inf_loss,
                        win if truncate else None)
    stars_out = Table({"x": np.asarray(chosen["x"], float), "y": np.asarray(chosen["y"], float),
                       "x_fit": x, "y_fit": y, "flux_fit": flux, "sky": bkg, "chi2": chi2, "used": good})
    fw = psf.fwhm((shape[1] - 1) / 2, (shape[0] - 1) / 2)
    psf.meta.update({"n_stars": n_used, "n_candidates": int(N), "degree_requested": int(degree_requested),
                     "niter": niter, "fwhm_centre": float(fw), "model": model,
                     "support_radius": float(support) if truncate else float(size // 2)})
    psf.stars = stars_out
    log.info("built %s PSF from %d/%d stars (degree %d, fwhm at centre %.2f px)", model, n_used, N, degree, fw)
    return psf


def _reason_summary(selection) -> str:
    if selection is None or len(selection) == 0:
        return "no source detected"
    if "reason" not in selection.colnames:
        return f"{len(selection)} candidates"
    vals, counts = np.unique(np.asarray(selection["reason"]).astype(str), return_counts=True)
    return f"{len(selection)} candidates rejected: " + ", ".join(f"{v or 'kept'}={c}" for v, c in zip(vals, counts))


def _initial_fwhm(ds, chosen) -> float:
    if "fwhm" in chosen.colnames:
        f = np.asarray(chosen["fwhm"], float)
        f = f[np.isfinite(f) & (f > 0)]
        if f.size:
            return float(np.median(f))
    if ds.attrs.get("fwhm"):
        return float(ds.attrs["fwhm"])
    return 3.0


def _kl_model(Fn, Wn, good, M, pix_psf, x, y, flux, os, size, shape, degree, inf_loss, win=None):
    """Karhunen-Loeve basis (Lauer 2002) from the re-centred, normalised stamps."""
    N = len(Fn)
    g = np.nonzero(good)[0]
    pred = decimate(pix_psf.efine(x[g], y[g]), os, size).reshape(len(g), -1)
    F = Fn[g].reshape(len(g), -1)
    W = Wn[g].reshape(len(g), -1)
    F = np.where(W > 0, F, pred)  # fill rejected pixels with the pixel model
    if win is not None:
        F = F * win.ravel()[None]
    # per-star weight: inverse of the mean relative variance (capped so a few stars do not dominate)
    wstar = np.array([np.mean(w[w > 0]) if np.any(w > 0) else 0.0 for w in W])
    wstar = np.minimum(wstar, np.percentile(wstar, 90))
    wstar = wstar / wstar.sum()
    mean = (wstar[:, None] * F).sum(axis=0)
    R = np.sqrt(wstar)[:, None] * (F - mean)
    _, s, vt = np.linalg.svd(R, full_matrices=False)
    lam = s**2
    tot = lam.sum()
    left = 1.0 - np.cumsum(lam) / tot if tot > 0 else np.zeros_like(lam)
    ncomp = int(np.argmax(left <= inf_loss)) + 1 if np.any(left <= inf_loss) else len(lam)
    ncomp = max(1, min(ncomp, len(g) - 1, 30))
    comps = vt[:ncomp]
    a = (F - mean) @ comps.T  # (Ng, ncomp)
    Mg = M[g]
    A = Mg.T @ (wstar[:, None] * Mg) + 1e-12 * np.eye(Mg.shape[1])
    C = np.linalg.solve(A, Mg.T @ (wstar[:, None] * a)).T  # (ncomp, nt)
    nt = M.shape[1]
    c0 = np.zeros((1, nt))
    c0[0, 0] = 1.0
    basis = np.concatenate([mean[None], comps]).reshape(-1, size, size)
    coeffs = np.concatenate([c0, C])
    kl = PSFModel(basis, coeffs, degree, shape, size, 1, "kl")
    kl.meta["n_components"] = ncomp
    kl.meta["variance_left_out"] = float(left[ncomp - 1]) if len(left) else 0.0
    return kl
