"""Analytic PSFs (elliptical Gaussian and Moffat) with the :class:`~tilepipe.psf.base.BasePSF` interface.

Profiles (``x', y'`` along the major/minor axes, position angle ``theta``
counter-clockwise from +x, ellipticity ``e = 1 - b/a``; ``fwhm`` is the
geometric mean of the axes' FWHMs of the continuous profile):

* Gaussian: ``exp(-q / 2)``, ``q = (x'/s_a)^2 + (y'/s_b)^2``, ``s = fwhm / 2.3548``;
* Moffat (Moffat 1969, A&A 3, 455): ``(1 + q)^-beta`` with
  ``alpha = fwhm / (2 sqrt(2^(1/beta) - 1))``.

Stamps are integrated over pixels by sub-sampling and normalised to sum 1.
The profiles are constant across the field (quick use: matched filters,
first-guess photometry); :meth:`fit` fits them to the stars of an image.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._validate import check_int, check_positive
from ._stamps import FWHM_PER_SIGMA
from .base import BasePSF

__all__ = ["GaussianPSF", "MoffatPSF"]


class _Analytic(BasePSF):
    kind = "analytic"
    _nsub = 5

    def __init__(self, fwhm: float, *, ellipticity: float = 0.0, theta: float = 0.0, size: int = 25,
                 oversampling: int = 1, shape: tuple[int, int] | None = None) -> None:
        self.fwhm_value = check_positive("fwhm", fwhm)
        self.ellipticity = float(ellipticity)
        if not 0 <= self.ellipticity < 1:
            raise ValueError(f"ellipticity must be in [0, 1) (1 - b/a); got {ellipticity!r}")
        self.theta = float(theta)
        size = check_int("size", size, lower=3)
        self.size = size + 1 if size % 2 == 0 else size
        self.oversampling = check_int("oversampling", oversampling, lower=1)
        self.shape = None if shape is None else (int(shape[0]), int(shape[1]))

    def _scale(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _profile(self, q: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _stamp(self, x: float, y: float, oversampled: bool) -> np.ndarray:
        os = self.oversampling if oversampled else 1
        n = self.size * os + (1 if os % 2 == 0 else 0)
        step = 1.0 / os
        ns = self._nsub
        k = (np.arange(n) - (n - 1) / 2.0) * step
        s = ((np.arange(ns) + 0.5) / ns - 0.5) * step
        off = (k[:, None] + s[None, :]).ravel()
        X = off[None, :]
        Y = off[:, None]
        r = math.sqrt(1.0 - self.ellipticity)
        sa, sb = self._scale() / r, self._scale() * r
        c, sn = math.cos(self.theta), math.sin(self.theta)
        xp = c * X + sn * Y
        yp = -sn * X + c * Y
        q = (xp / sa) ** 2 + (yp / sb) ** 2
        prof = self._profile(q).reshape(n, ns, n, ns).mean(axis=(1, 3))
        return prof

    def fwhm(self, x: float = 0.0, y: float = 0.0) -> float:
        """FWHM (px) of the continuous profile (constant across the field)."""
        return float(self.fwhm_value)

    def _params(self) -> dict[str, Any]:
        return {"fwhm": self.fwhm_value, "ellipticity": self.ellipticity, "theta": self.theta, "size": self.size,
                "oversampling": self.oversampling, "shape": None if self.shape is None else list(self.shape)}

    @classmethod
    def fit(cls, ds: Any, stars: Any = None, size: int = 25, *, nx: int = 1, ny: int | None = None,
            select: dict[str, Any] | None = None, **kwargs: Any):
        """Fit the profile (FWHM, ellipticity, angle; ``beta`` for Moffat) to the stars of ``ds``.

        ``stars`` as in :func:`tilepipe.build_psf` (``None`` = detect and
        select).  The stars are re-centred on their windowed centroids by a
        Fourier shift, normalised, and the profile parameters minimise the
        inverse-variance weighted residuals of all stamps together
        (``scipy.optimize.least_squares``).
        """
        from scipy.optimize import least_squares

        from ..image import as_dataset
        from ._stamps import extract_stamps, fourier_shift, local_background, windowed_centroid
        from .model import _resolve_stars

        ds = as_dataset(ds)
        size = check_int("size", size, lower=5)
        size += 1 - size % 2
        chosen, sel = _resolve_stars(ds, stars, size, nx, ny, None, dict(select or {}))
        if len(chosen) == 0:
            raise ValueError("no usable star to fit the PSF profile; pass stars= or relax select={...}")
        half = size // 2
        st = extract_stamps(ds, np.asarray(chosen["x"], float), np.asarray(chosen["y"], float), half, nx=nx, ny=ny)
        ok = st["complete"]
        if not ok.any():
            raise ValueError("every star stamp is cut by the image edge")
        img = st["image"][ok].astype(np.float64)
        msk = st["mask"][ok]
        var = st["variance"][ok].astype(np.float64)
        img -= local_background(img, msk)[:, None, None]
        f0 = float(ds.attrs.get("fwhm") or 3.0)
        xc, yc = windowed_centroid(img, msk, f0 / FWHM_PER_SIGMA)
        sh = fourier_shift(np.where(msk, 0.0, img), half - xc, half - yc)
        flux = np.where(msk, 0.0, sh).sum(axis=(1, 2))
        good = flux > 0
        sh, msk, var, flux = sh[good], msk[good], var[good], flux[good]
        if len(sh) == 0:
            raise ValueError("no star with positive flux to fit the PSF profile")
        S = sh / flux[:, None, None]
        W = np.where(msk | ~np.isfinite(var), 0.0, flux[:, None, None] ** 2 / np.where(np.isfinite(var), var, 1.0))
        W = W / W.sum()
        sw = np.sqrt(W)
        extra = cls._fit_extra()

        def make(p):
            e = float(np.hypot(p[1], p[2]))
            th = 0.5 * float(np.arctan2(p[2], p[1]))
            kw = {k: p[3 + i] for i, k in enumerate(extra)}
            return cls(abs(p[0]), ellipticity=min(e, 0.95), theta=th, size=size, shape=tuple(ds["image"].shape), **kw)

        def resid(p):
            m = make(p).at(0, 0)
            return (sw * (S - m[None])).ravel()

        p0 = [f0, 0.0, 0.0] + [cls._extra_start[k] for k in extra]
        lo = [0.3, -0.9, -0.9] + [cls._extra_bounds[k][0] for k in extra]
        hi = [50.0, 0.9, 0.9] + [cls._extra_bounds[k][1] for k in extra]
        res = least_squares(resid, p0, bounds=(lo, hi), x_scale="jac")
        out = make(res.x)
        out.n_stars = int(len(S))
        return out

    _extra_start: dict[str, float] = {}
    _extra_bounds: dict[str, tuple[float, float]] = {}

    @classmethod
    def _fit_extra(cls) -> list[str]:
        return []


class GaussianPSF(_Analytic):
    """Elliptical Gaussian PSF (constant across the field).

    Parameters
    ----------
    fwhm : float
        FWHM of the continuous profile (px; geometric mean of the axes).
    ellipticity : float
        ``1 - b/a``.
    theta : float
        Position angle of the major axis (radians, counter-clockwise from +x).
    size : int
        Stamp side (px, odd).
    oversampling : int
        Samples per pixel of ``at(..., oversampled=True)``.
    shape : (ny, nx), optional
        Image shape (for :meth:`fwhm_map` / :meth:`grid` defaults).
    """

    kind = "gaussian"

    def _scale(self) -> float:
        return self.fwhm_value / FWHM_PER_SIGMA

    def _profile(self, q):
        return np.exp(-0.5 * q)

    def __repr__(self) -> str:
        return f"GaussianPSF(fwhm={self.fwhm_value:.3f}, ellipticity={self.ellipticity:.3f}, theta={self.theta:.3f})"

    def to_attrs(self) -> dict[str, Any]:
        """JSON-able dict; :meth:`from_attrs` rebuilds the PSF."""
        return {"type": "gaussian", **self._params()}

    @classmethod
    def _from_attrs(cls, a: dict[str, Any]) -> "GaussianPSF":
        return cls(a["fwhm"], ellipticity=a["ellipticity"], theta=a["theta"], size=a["size"],
                   oversampling=a["oversampling"], shape=a.get("shape"))


class MoffatPSF(_Analytic):
    """Elliptical Moffat PSF ``(1 + q)^-beta`` (constant across the field).

    Parameters as :class:`GaussianPSF`, plus ``beta`` (> 1).
    """

    kind = "moffat"
    _extra_start = {"beta": 3.0}
    _extra_bounds = {"beta": (1.05, 20.0)}

    def __init__(self, fwhm: float, beta: float = 3.0, **kwargs: Any) -> None:
        super().__init__(fwhm, **kwargs)
        self.beta = check_positive("beta", beta)
        if self.beta <= 1:
            raise ValueError(f"beta must be > 1 (finite flux); got {beta}")

    @classmethod
    def _fit_extra(cls) -> list[str]:
        return ["beta"]

    def _scale(self) -> float:
        return self.fwhm_value / (2.0 * math.sqrt(2.0 ** (1.0 / self.beta) - 1.0))

    def _profile(self, q):
        return (1.0 + q) ** (-self.beta)

    def __repr__(self) -> str:
        return (f"MoffatPSF(fwhm={self.fwhm_value:.3f}, beta={self.beta:.3f}, ellipticity={self.ellipticity:.3f}, "
                f"theta={self.theta:.3f})")

    def to_attrs(self) -> dict[str, Any]:
        """JSON-able dict; :meth:`from_attrs` rebuilds the PSF."""
        return {"type": "moffat", "beta": self.beta, **self._params()}

    @classmethod
    def _from_attrs(cls, a: dict[str, Any]) -> "MoffatPSF":
        return cls(a["fwhm"], a["beta"], ellipticity=a["ellipticity"], theta=a["theta"], size=a["size"],
                   oversampling=a["oversampling"], shape=a.get("shape"))
