"""Cutouts for galaxy modelling: image, mask, sigma image, multi-extension FITS.

The image-preparation recipe of galaxy-fitting codes (GALFIT, GalfitS,
imfit...): cut a stamp around a target, optionally subtract the sky, build a
sigma (noise) image, mask the neighbours and write everything into one
multi-extension FITS file.  :func:`cutouts` does it for thousands of targets
in parallel, each Dask task reading only the region of the image it needs.

Conventions
-----------
* Pixel coordinates are 0-based (centre of pixel ``[0, 0]`` is ``(0, 0)``),
  arrays are indexed ``[y, x]``, masks are True (or 1 in FITS) = bad.
* A cutout of ``(ny, nx)`` pixels around the position ``(x, y)`` puts the
  pixel ``(floor(x + 0.5), floor(y + 0.5))`` at index ``[ny // 2, nx // 2]``
  (the centre for odd sizes).  Its origin in the parent image is
  ``x0 = floor(x + 0.5) - nx // 2`` (same for y).  The exact target position
  in cutout pixels is ``attrs["x_target"], attrs["y_target"]``.
* The cutout's WCS is the parent's with ``CRPIX`` shifted by the origin (valid
  for TAN, TPV, SIP, ZPN... every distortion expressed relative to CRPIX);
  IRAF ``LTV1/LTV2`` are shifted too, so physical coordinates survive.
"""

from __future__ import annotations

import io as _io
import logging
import math
import os
import re
import uuid
import warnings
from typing import Any, Sequence

import dask
import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.table import Table

from ._validate import check_choice, check_int, check_positive
from .exceptions import FallbackWarning
from .image import cards_to_header, header_to_cards, open_image, pixel_to_radec, radec_to_pixel, wcs as _wcs

log = logging.getLogger(__name__)

__all__ = ["cutout", "cutouts", "sigma_image", "source_mask", "write_cutout", "parse_size"]

_SIZE_UNITS = {
    "arcsec": ("arcsec", 1.0),
    '"': ("arcsec", 1.0),
    "as": ("arcsec", 1.0),
    "arcmin": ("arcsec", 60.0),
    "'": ("arcsec", 60.0),
    "deg": ("arcsec", 3600.0),
    "pix": ("pix", 1.0),
    "px": ("pix", 1.0),
    "pixel": ("pix", 1.0),
    "pixels": ("pix", 1.0),
}

# WCS keywords copied into the MASK/SIGMA extensions (and shifted for cutouts)
_WCS_KEY = re.compile(
    r"^(WCSAXES|CTYPE\d|CUNIT\d|CRPIX\d|CRVAL\d|CDELT\d|CROTA\d|CD\d_\d|PC\d_\d|PV\d_\d+|PS\d_\d+|"
    r"LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX|EPOCH|MJDREF|MJD-OBS|DATE-OBS|"
    r"A_ORDER|B_ORDER|AP_ORDER|BP_ORDER|A_\d+_\d+|B_\d+_\d+|AP_\d+_\d+|BP_\d+_\d+|A_DMAX|B_DMAX|"
    r"LTV\d|LTM\d_\d)[A-Z]?$"
)
_CRPIX = re.compile(r"^CRPIX([12])([A-Z]?)$")
_LTV = re.compile(r"^LTV([12])$")


# --------------------------------------------------------------------- sizes
def parse_size(size: Any, unit: str = "arcsec") -> tuple[tuple[float, float], str]:
    """Parse a cutout size into ``((size_y, size_x), unit)`` with unit ``"arcsec"`` or ``"pix"``.

    Parameters
    ----------
    size : float, (float, float), str or astropy Quantity
        Full width of the cutout: a number (in ``unit``), a ``(ny, nx)`` pair,
        a string such as ``"10arcsec"``, ``"1.5arcmin"``, ``"64pix"``, ``"0.01deg"``,
        or a Quantity (angle or ``u.pix``).
    unit : {"arcsec", "pix"}
        Unit of plain numbers.
    """
    unit = check_choice("unit", unit, ("arcsec", "pix"))
    if isinstance(size, str):
        m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z\"']*)\s*", size)
        if not m:
            raise ValueError(f"size {size!r} is not understood; use e.g. '10arcsec', '1.5arcmin' or '64pix'")
        value = float(m.group(1))
        u = m.group(2).lower() or unit
        if u not in _SIZE_UNITS:
            raise ValueError(f"size unit {m.group(2)!r} is not understood; use arcsec, arcmin, deg or pix")
        unit, factor = _SIZE_UNITS[u]
        values = (value * factor, value * factor)
    elif hasattr(size, "unit") and hasattr(size, "value"):  # Quantity
        import astropy.units as u

        q = size
        if q.unit.is_equivalent(u.arcsec):
            vals = np.atleast_1d(q.to_value(u.arcsec)).astype(float)
            unit = "arcsec"
        elif q.unit == u.pix:
            vals = np.atleast_1d(q.value).astype(float)
            unit = "pix"
        else:
            raise ValueError(f"size has unit {q.unit}; use an angle (arcsec) or pixels (u.pix)")
        if vals.size not in (1, 2):
            raise ValueError(f"size must be a scalar or a (ny, nx) pair; got {size!r}")
        values = (float(vals[0]), float(vals[-1]))
    else:
        arr = np.atleast_1d(np.asarray(size, dtype=float))
        if arr.ndim != 1 or arr.size not in (1, 2):
            raise ValueError(f"size must be a number or a (ny, nx) pair; got {size!r}")
        values = (float(arr[0]), float(arr[-1]))
    for v in values:
        if not np.isfinite(v) or v <= 0:
            raise ValueError(f"size must be positive (the full width of the cutout); got {size!r}")
    return values, unit


def _size_pixels(size: Any, unit: str, w: Any | None) -> tuple[int, int]:
    (sy, sx), u = parse_size(size, unit)
    if u == "arcsec":
        if w is None:
            raise ValueError("size is given in arcsec but the image has no celestial WCS; give the size in pixels (unit='pix' or '64pix')")
        from astropy.wcs.utils import proj_plane_pixel_scales

        scales = proj_plane_pixel_scales(w) * 3600.0  # arcsec/px along (x, y)
        sx, sy = sx / float(scales[0]), sy / float(scales[1])
    nx, ny = int(round(sx)), int(round(sy))
    if nx < 1 or ny < 1:
        raise ValueError(f"size {size!r} is smaller than one pixel; give a larger size")
    return ny, nx


# ---------------------------------------------------------------- statistics
def _clipped_stats(values: np.ndarray, nsigma: float = 3.0, iters: int = 10) -> tuple[float, float]:
    """Sigma-clipped median and MAD-based standard deviation of finite values."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    for _ in range(iters):
        med = np.median(v)
        sig = 1.4826 * np.median(np.abs(v - med))
        if not sig > 0:
            break
        keep = np.abs(v - med) <= nsigma * sig
        if keep.all():
            break
        v = v[keep]
    med = float(np.median(v))
    sig = float(1.4826 * np.median(np.abs(v - med)))
    if not sig > 0:
        sig = float(np.std(v))
    return med, sig


# ---------------------------------------------------------------- sigma image
def _sigma_array(
    img: np.ndarray,
    bad: np.ndarray,
    gain: float | None,
    exptime: float | None,
    rdnoise: float | None,
    sky: Any,
    sky_rms: Any,
    ncombine: float,
) -> tuple[np.ndarray, Any, Any]:
    img = np.asarray(img, dtype=np.float64)
    if sky is None or sky_rms is None:
        ok = ~bad & np.isfinite(img)
        med, sig = _clipped_stats(img[ok])
        sky = med if sky is None else sky
        sky_rms = sig if sky_rms is None else sky_rms
    var = np.broadcast_to(np.asarray(sky_rms, dtype=np.float64) ** 2, img.shape).copy()
    t = 1.0 if exptime is None else float(exptime)
    if gain is not None:
        geff = float(gain) * float(ncombine) * t
        src = np.clip(np.nan_to_num(img - sky, nan=0.0, posinf=0.0, neginf=0.0), 0.0, None)
        var += src / geff
        if rdnoise is not None:
            var += float(ncombine) * (float(rdnoise) / (float(gain) * float(ncombine) * t)) ** 2
    elif rdnoise is not None:
        raise ValueError("rdnoise (electrons) needs gain (e-/ADU) to convert it to image units; pass gain=")
    return np.sqrt(var).astype(np.float32), sky, sky_rms


def sigma_image(
    ds: Any,
    exptime: float | None = None,
    gain: float | None = None,
    rdnoise: float | None = None,
    *,
    sky: float | None = None,
    sky_rms: float | None = None,
    ncombine: int = 1,
) -> xr.DataArray:
    """Per-pixel noise (sigma) image, GALFIT convention.

    .. math::

        \\sigma^2 = \\frac{\\max(I - S, 0)}{g\\,N\\,t} + \\sigma_{\\rm sky}^2
                   + N \\left(\\frac{r}{g\\,N\\,t}\\right)^2

    in image units squared, where ``I`` is the image, ``S`` the sky level,
    ``g`` the gain (e-/ADU), ``N`` = ``ncombine`` (number of averaged
    exposures, GALFIT's NCOMBINE), ``t`` = ``exptime`` (s; only when the image
    is a count *rate* in ADU/s, otherwise ``t = 1``), ``σ_sky`` the sky rms and
    ``r`` the read noise (e-).  The first term is the Poisson noise of the
    source electrons, the second the noise of the sky (photons, read noise,
    dark current: everything measured on the sky), the third an explicit
    read-noise term.

    Parameters
    ----------
    ds : Dataset, path or array
        Anything :func:`tilepipe.open_image` accepts.  When the Dataset holds
        ``background`` and/or ``rms`` variables (from
        :func:`tilepipe.estimate_background`), they are used per pixel for
        ``S`` and ``σ_sky``.
    exptime : float, optional
        Exposure time in seconds, for images in ADU/s.  Default: the image is
        in ADU (``t = 1``).
    gain : float, optional
        e-/ADU.  Default: ``ds.attrs["gain"]``.  Without a gain the Poisson term
        is left out (a :class:`~tilepipe.exceptions.FallbackWarning` says so).
    rdnoise : float, optional
        Read noise in electrons.  **Leave it None when σ_sky is measured on the
        image** (the default): a measured sky rms already contains the read
        noise.  Give it together with a modelled ``sky_rms`` (sky photons only).
    sky, sky_rms : float, optional
        Sky level and rms in image units.  Default: the ``background``/``rms``
        variables, else a 3-sigma-clipped median and MAD-based std of the
        unmasked pixels (one global pair of numbers).
    ncombine : int
        Number of exposures averaged into the image (GALFIT NCOMBINE).

    Returns
    -------
    xarray.DataArray
        ``sigma`` (float32, image units) on dims ``("y", "x")``, dask-backed
        when the input is.
    """
    import dask.array as da

    if not isinstance(ds, xr.Dataset) or "mask" not in ds:
        ds = open_image(ds)
    ncombine = check_int("ncombine", ncombine, lower=1)
    if exptime is not None:
        exptime = check_positive("exptime", exptime)
    if gain is None:
        gain = ds.attrs.get("gain")
    if gain is not None:
        gain = check_positive("gain", gain)
    if rdnoise is not None:
        rdnoise = check_positive("rdnoise", rdnoise, allow_zero=True)
        if gain is None:
            raise ValueError("rdnoise (electrons) needs a gain (e-/ADU) to convert it to image units; pass gain=")
    if gain is None:
        warnings.warn(
            "sigma_image: no gain known (pass gain= or set GAIN in the header): the source Poisson term is "
            "left out and sigma is the sky rms only",
            FallbackWarning,
            stacklevel=2,
        )
    img = ds["image"].data
    bad = ds["mask"].data
    sky_arr = ds["background"].data if (sky is None and "background" in ds) else sky
    rms_arr = ds["rms"].data if (sky_rms is None and "rms" in ds) else sky_rms
    if sky_arr is None or rms_arr is None:
        h, w = img.shape
        stride = max(1, int(math.ceil(math.sqrt(h * w / 1_000_000))))
        sub = img[::stride, ::stride]
        subbad = bad[::stride, ::stride]
        if isinstance(sub, da.Array):
            sub, subbad = dask.compute(sub, subbad)
        med, sig = _clipped_stats(np.asarray(sub)[~np.asarray(subbad)])
        sky_arr = med if sky_arr is None else sky_arr
        rms_arr = sig if rms_arr is None else rms_arr

    def block(i, b, s, r):
        return _sigma_array(i, b, gain, exptime, rdnoise, s, r, ncombine)[0]

    if isinstance(img, da.Array):
        s_da = sky_arr if isinstance(sky_arr, da.Array) else da.full(img.shape, float(sky_arr), chunks=img.chunks)
        r_da = rms_arr if isinstance(rms_arr, da.Array) else da.full(img.shape, float(rms_arr), chunks=img.chunks)
        out = da.map_blocks(block, img, bad, s_da.rechunk(img.chunks), r_da.rechunk(img.chunks),
                            dtype=np.float32, meta=np.empty((0, 0), np.float32))
    else:
        out = block(np.asarray(img), np.asarray(bad), np.asarray(sky_arr), np.asarray(rms_arr))
    return xr.DataArray(
        out,
        dims=("y", "x"),
        name="sigma",
        attrs={
            "formula": "sigma^2 = max(I - sky, 0)/(gain*ncombine*exptime) + sky_rms^2 [+ ncombine*(rdnoise/(gain*ncombine*exptime))^2]",
            "gain": gain,
            "exptime": exptime,
            "rdnoise": rdnoise,
            "ncombine": ncombine,
        },
    )


# ---------------------------------------------------------------- source mask
def _gauss_kernel(fwhm: float) -> np.ndarray:
    sigma = fwhm / 2.3548200450309493
    r = max(1, int(math.ceil(2.0 * fwhm)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    k = np.exp(-0.5 * (xx**2 + yy**2) / sigma**2)
    return k / k.sum()


def _disk(radius: float) -> np.ndarray:
    r = int(math.floor(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx**2 + yy**2) <= radius**2 + 1e-9


def _segment_ellipse_mask(seg: np.ndarray, weights: np.ndarray, label: int, scale: float, shape: tuple[int, int]) -> np.ndarray | None:
    ys, xs = np.nonzero(seg == label)
    if ys.size == 0:
        return None
    w = np.clip(weights[ys, xs], 0, None).astype(np.float64)
    if not w.sum() > 0:
        w = np.ones_like(w)
    wt = w.sum()
    xc, yc = (w * xs).sum() / wt, (w * ys).sum() / wt
    cxx = (w * (xs - xc) ** 2).sum() / wt + 1.0 / 12
    cyy = (w * (ys - yc) ** 2).sum() / wt + 1.0 / 12
    cxy = (w * (xs - xc) * (ys - yc)).sum() / wt
    evals, evecs = np.linalg.eigh(np.array([[cxx, cxy], [cxy, cyy]]))
    sb, sa = np.sqrt(np.clip(evals, 0.25, None))  # ascending: minor, major
    a, b = scale * sa, scale * sb
    vx, vy = evecs[0, 1], evecs[1, 1]  # major-axis direction
    r = int(math.ceil(a)) + 1
    y0, y1 = max(0, int(yc) - r), min(shape[0], int(yc) + r + 2)
    x0, x1 = max(0, int(xc) - r), min(shape[1], int(xc) + r + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dx, dy = xx - xc, yy - yc
    u = dx * vx + dy * vy
    v = -dx * vy + dy * vx
    out = np.zeros(shape, bool)
    out[y0:y1, x0:x1] = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    return out


def _source_mask_array(
    img: np.ndarray,
    bad: np.ndarray,
    fwhm: float,
    nsigma: float,
    npixels: int,
    deblend: bool,
    nlevels: int,
    contrast: float,
    grow: float,
    grow_mode: str,
    keep_center: bool,
    center: tuple[float, float] | None,
    warn: bool = True,
) -> tuple[np.ndarray, int, int]:
    from photutils.segmentation import SegmentationImage, deblend_sources
    from scipy import ndimage

    img = np.asarray(img, dtype=np.float64)
    bad = np.asarray(bad, bool) | ~np.isfinite(img)
    shape = img.shape
    med, sig = _clipped_stats(img[~bad])
    if not np.isfinite(med) or not sig > 0:
        return np.zeros(shape, bool), 0, 0
    data = np.where(bad, 0.0, img - med)
    kern = _gauss_kernel(fwhm)
    conv = ndimage.convolve(data, kern, mode="constant", cval=0.0)
    # threshold in units of the noise of the *smoothed* image
    thresh = nsigma * sig * float(np.sqrt((kern**2).sum()))
    # The segmentation of photutils' detect_sources (8-connected pixels above the threshold, at
    # least npixels of them, labelled 1..n in scan order), made here because detect_sources
    # warns (NoDetectionsWarning) when nothing is found: silencing that needs
    # warnings.catch_warnings, which is not thread-safe, and cutouts run on dask threads.
    labels0, n0 = ndimage.label((conv > thresh) & ~bad, structure=np.ones((3, 3), dtype=int))
    segm = None
    if n0:
        keep = np.bincount(labels0.ravel(), minlength=n0 + 1) >= npixels
        keep[0] = False
        if keep.any():
            relabel = np.zeros(n0 + 1, dtype=labels0.dtype)
            relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels0.dtype)
            segm = SegmentationImage(relabel[labels0])
    deblend_error = None
    if segm is not None and deblend:
        # every segment pixel is > thresh > 0, so photutils' exponential mode never falls back
        # to linear (its AstropyUserWarning) for a non-positive minimum
        try:
            segm = deblend_sources(
                conv, segm, n_pixels=npixels, n_levels=nlevels, contrast=contrast, progress_bar=False
            )
        except ImportError as exc:
            raise ImportError(f"source_mask(deblend=True) needs scikit-image ({exc}); pip install scikit-image") from exc
        except ValueError as exc:
            deblend_error = str(exc)
    if deblend_error is not None and warn:
        warnings.warn(f"source_mask: deblending failed ({deblend_error}); the undeblended segmentation is used",
                      FallbackWarning, stacklevel=3)
    if segm is None:
        return np.zeros(shape, bool), 0, 0
    seg = np.asarray(segm.data)
    labels = [int(v) for v in np.unique(seg) if v != 0]
    target = 0
    if keep_center:
        cx, cy = center if center is not None else ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
        ix, iy = int(math.floor(cx + 0.5)), int(math.floor(cy + 0.5))
        if 0 <= iy < shape[0] and 0 <= ix < shape[1] and seg[iy, ix] != 0:
            target = int(seg[iy, ix])
        else:  # nearest segment within one FWHM of the centre
            ys, xs = np.nonzero(seg)
            if ys.size:
                d2 = (xs - cx) ** 2 + (ys - cy) ** 2
                k = int(np.argmin(d2))
                if d2[k] <= fwhm**2:
                    target = int(seg[ys[k], xs[k]])
    others = seg != 0
    if target:
        others &= seg != target
    if grow_mode == "ellipse":
        grown = others.copy()
        for lab in labels:
            if lab == target:
                continue
            e = _segment_ellipse_mask(seg, conv, lab, grow, shape)
            if e is not None:
                grown |= e
        out = grown
    elif grow > 0:
        out = ndimage.binary_dilation(others, structure=_disk(grow))
    else:
        out = others
    if target:
        out &= seg != target
    return out, len(labels), target


def source_mask(
    ds: Any,
    fwhm: float | None = None,
    nsigma: float = 3.0,
    npixels: int = 5,
    deblend: bool = False,
    nlevels: int = 32,
    contrast: float = 0.001,
    grow: float = 2.0,
    keep_center: bool = True,
    *,
    grow_mode: str = "pixels",
    center: tuple[float, float] | None = None,
) -> xr.DataArray:
    """Mask the sources around a target (True = masked), leaving the target itself unmasked.

    Detection (photutils 3 ``detect_sources``, optionally ``deblend_sources``)
    runs on the sky-subtracted image smoothed with a Gaussian of ``fwhm``; the
    threshold is ``nsigma`` times the noise of the *smoothed* image
    (``σ_sky · sqrt(Σ k²)``), with ``σ_sky`` a sigma-clipped, MAD-based rms of
    the unmasked pixels.  The segment at the centre (``center``, default the
    cutout target ``attrs["x_target"/"y_target"]`` or the array centre; or the
    nearest segment within one FWHM) is the target and stays unmasked, also
    where a neighbour's grown mask would cover it.  Meant for cutouts: it works
    in memory.

    Parameters
    ----------
    ds : Dataset or array
        A cutout (from :func:`cutout`) or any image.  Pixels of ``mask`` (bad)
        are ignored for detection; they are *not* included in the result.
    fwhm : float, optional
        PSF FWHM in pixels (default ``ds.attrs["fwhm"]``).
    nsigma : float
        Detection threshold (smoothed-image sigmas).
    npixels : int
        Minimum number of connected pixels of a source.
    deblend, nlevels, contrast
        photutils deblending (``n_levels``, ``contrast``), so that neighbours
        blended with the target are masked separately.
    grow : float
        With ``grow_mode="pixels"``: each source segment is dilated by a disk
        of this radius (pixels).  With ``grow_mode="ellipse"``: each source is
        masked out to ``grow`` times its second-moment ellipse (semi-axes
        ``grow·σ_major``, ``grow·σ_minor``), plus its segment.
    keep_center : bool
        Leave the central target unmasked.

    Returns
    -------
    xarray.DataArray
        Boolean ``source_mask`` on ``("y", "x")``; attrs ``n_sources`` and
        ``target_label`` (0 when no segment was found at the centre).
    """
    if isinstance(ds, xr.Dataset):
        img = np.asarray(ds["image"].values)
        bad = np.asarray(ds["mask"].values) if "mask" in ds else np.zeros(img.shape, bool)
        attrs = ds.attrs
    else:
        img = np.asarray(ds.values if isinstance(ds, xr.DataArray) else ds)
        bad = np.zeros(img.shape, bool)
        attrs = {}
    if img.ndim != 2:
        raise ValueError(f"source_mask needs a 2-D image; got shape {img.shape}")
    if fwhm is None:
        fwhm = attrs.get("fwhm")
        if fwhm is None:
            raise ValueError("source_mask needs the PSF FWHM in pixels: pass fwhm= (no 'fwhm' attribute on the image)")
    fwhm = check_positive("fwhm", fwhm)
    nsigma = check_positive("nsigma", nsigma)
    npixels = check_int("npixels", npixels, lower=1)
    nlevels = check_int("nlevels", nlevels, lower=1)
    contrast = check_positive("contrast", contrast, allow_zero=True)
    grow = check_positive("grow", grow, allow_zero=True)
    grow_mode = check_choice("grow_mode", grow_mode, ("pixels", "ellipse"))
    if grow_mode == "ellipse" and grow <= 0:
        raise ValueError("grow must be > 0 with grow_mode='ellipse' (a multiple of the source ellipse, e.g. 3)")
    if center is None and "x_target" in attrs:
        center = (float(attrs["x_target"]), float(attrs["y_target"]))
    out, n, target = _source_mask_array(
        img, bad, fwhm, nsigma, npixels, deblend, nlevels, contrast, grow, grow_mode, keep_center, center
    )
    return xr.DataArray(out, dims=("y", "x"), name="source_mask", attrs={"n_sources": n, "target_label": target})


# ---------------------------------------------------------------------- cutout
def _shift_cards(cards: Sequence[Sequence[Any]], x0: int, y0: int) -> list[list[Any]]:
    out = []
    for card in cards:
        key, value, comment = (list(card) + [None, None, ""])[:3]
        m = _CRPIX.match(str(key))
        shifted = False
        if m and isinstance(value, (int, float)):
            value, shifted = float(value) - (x0 if m.group(1) == "1" else y0), True
        m = _LTV.match(str(key))
        if m and isinstance(value, (int, float)):
            value, shifted = float(value) - (x0 if m.group(1) == "1" else y0), True
        if shifted:  # a long float repr must not push the comment over 80 characters
            comment = str(comment or "")[:45]
        out.append([key, value, comment])
    return out


def _set_card(cards: list[list[Any]], key: str, value: Any, comment: str) -> None:
    for c in cards:
        if c[0] == key:
            c[1], c[2] = value, comment
            return
    cards.append([key, value, comment])


class _Region:
    """A rectangular piece of an image read into memory, addressable in parent coordinates."""

    def __init__(self, origin: tuple[int, int], shape: tuple[int, int], **arrays: np.ndarray) -> None:
        self.y0, self.x0 = origin
        self.parent_shape = shape
        self.arrays = arrays

    def get(self, name: str, box: tuple[int, int, int, int], fill: Any, dtype: Any) -> np.ndarray:
        y0, y1, x0, x1 = box
        h, w = self.parent_shape
        out = np.full((y1 - y0, x1 - x0), fill, dtype=dtype)
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if cy1 > cy0 and cx1 > cx0:
            a = self.arrays[name]
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = a[
                cy0 - self.y0 : cy1 - self.y0, cx0 - self.x0 : cx1 - self.x0
            ]
        return out


def _box(x: float, y: float, ny: int, nx: int) -> tuple[int, int, int, int]:
    cx, cy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
    x0, y0 = cx - nx // 2, cy - ny // 2
    return y0, y0 + ny, x0, x0 + nx


def _geometry(x: float, y: float, ny: int, nx: int, shape: tuple[int, int], partial: str) -> tuple[tuple[int, int, int, int], str]:
    """Cutout box and status ('ok', 'partial'); raises ValueError when the centre is outside."""
    h, w = shape
    cx, cy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
    if not (np.isfinite(x) and np.isfinite(y)) or not (0 <= cx < w and 0 <= cy < h):
        raise ValueError(
            f"position (x={x:.2f}, y={y:.2f}) lies outside the image (shape {h} x {w} px, 0-based pixel centres); "
            "check the coordinates (ra/dec in degrees) and that they fall on this image"
        )
    y0, y1, x0, x1 = _box(x, y, ny, nx)
    inside = y0 >= 0 and x0 >= 0 and y1 <= h and x1 <= w
    if inside:
        return (y0, y1, x0, x1), "ok"
    if partial == "error":
        raise ValueError(
            f"the cutout box x=[{x0}, {x1}) y=[{y0}, {y1}) crosses the image edge (shape {h} x {w}); "
            "use partial='pad' (padded and masked) or partial='trim', or a smaller size"
        )
    if partial == "trim":
        return (max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)), "partial"
    return (y0, y1, x0, x1), "partial"


def _build_cutout(
    region: _Region,
    x: float,
    y: float,
    ny: int,
    nx: int,
    partial: str,
    cards: list[list[Any]],
    attrs: dict[str, Any],
    *,
    sky: Any,
    sigma: str,
    gain: float | None,
    exptime: float | None,
    rdnoise: float | None,
    fill_value: float,
    mask_sources: Any,
    warn: bool = True,
) -> xr.Dataset:
    box, status = _geometry(x, y, ny, nx, region.parent_shape, partial)
    y0, y1, x0, x1 = box
    img = region.get("image", box, np.nan, np.float32)
    pad = np.ones(img.shape, bool)
    h, w = region.parent_shape
    pad[max(0, -y0) : min(y1, h) - y0, max(0, -x0) : min(x1, w) - x0] = False
    bad = region.get("mask", box, True, bool) | pad | ~np.isfinite(img)
    xt, yt = x - x0, y - y0
    fwhm = attrs.get("fwhm")
    smask = None
    if mask_sources:
        opts = dict(mask_sources) if isinstance(mask_sources, dict) else {}
        f = opts.pop("fwhm", fwhm)
        if f is None:
            raise ValueError("mask_sources needs the PSF FWHM: pass mask_sources={'fwhm': ...} or an image with a 'fwhm' attribute")
        grow_mode = opts.pop("grow_mode", "pixels")
        smask = _source_mask_array(
            img, bad, float(f), check_positive("mask_sources['nsigma']", float(opts.pop("nsigma", 3.0))),
            int(opts.pop("npixels", 5)), bool(opts.pop("deblend", False)),
            int(opts.pop("nlevels", 32)), float(opts.pop("contrast", 0.001)), float(opts.pop("grow", 2.0)), grow_mode,
            bool(opts.pop("keep_center", True)), (xt, yt), warn=warn,
        )[0]
        if opts:
            raise TypeError(f"mask_sources got unknown options {sorted(opts)}; see tilepipe.source_mask")
    skyval = 0.0
    stat_bad = bad if smask is None else (bad | smask)
    if sky is not None:
        if isinstance(sky, str):
            check_choice("sky", sky, ("auto",))
            skyval, _ = _clipped_stats(img[~stat_bad])
            if not np.isfinite(skyval):
                raise ValueError("sky='auto': the cutout has no valid pixels to measure the sky on")
        else:
            skyval = float(sky)
        img = img - np.float32(skyval)
    if sigma == "variance":
        if "variance" not in region.arrays:
            raise ValueError("sigma='variance' needs a 'variance' variable in the image Dataset")
        sig = np.sqrt(np.clip(region.get("variance", box, np.nan, np.float32), 0, None)).astype(np.float32)
    else:
        if gain is None and warn:
            warnings.warn(
                "cutout: no gain known (pass gain= or set GAIN in the header): the sigma image holds the sky rms only",
                FallbackWarning,
                stacklevel=3,
            )
        ok = ~stat_bad & np.isfinite(img)
        m, s = _clipped_stats(img[ok])
        sig = _sigma_array(img, stat_bad, gain, exptime, rdnoise, 0.0 if sky is not None else m, s, 1)[0]
    valid = ~bad & np.isfinite(sig)
    fill_sigma = float(np.median(sig[valid])) if valid.any() else 1.0
    sig = np.where(bad | ~np.isfinite(sig), np.float32(fill_sigma), sig).astype(np.float32)
    img = np.where(bad & ~np.isfinite(img), np.float32(fill_value), img).astype(np.float32)
    img[pad] = np.float32(fill_value)
    if smask is not None:
        bad = bad | smask
    new_cards = _shift_cards(cards, x0, y0)
    _set_card(new_cards, "CUTX0", int(x0), "parent x of cutout pixel 0 (0-based)")
    _set_card(new_cards, "CUTY0", int(y0), "parent y of cutout pixel 0 (0-based)")
    _set_card(new_cards, "CUTXT", float(xt), "target x in the cutout (0-based)")
    _set_card(new_cards, "CUTYT", float(yt), "target y in the cutout (0-based)")
    if sky is not None:
        _set_card(new_cards, "SKYSUB", float(skyval), "sky level subtracted")
    out_attrs = {k: v for k, v in attrs.items() if k in ("gain", "saturation", "fwhm", "bunit")}
    out_attrs.update(
        header=new_cards,
        origin=[int(y0), int(x0)],
        x_target=float(xt),
        y_target=float(yt),
        x_parent=float(x),
        y_parent=float(y),
        status=status,
        sky=float(skyval),
    )
    data_vars = {
        "image": (("y", "x"), img),
        "mask": (("y", "x"), bad),
        "sigma": (("y", "x"), sig),
    }
    return xr.Dataset(data_vars, attrs=out_attrs)


def _position(ds: xr.Dataset, ra: Any, dec: Any, unit_is_pix: bool, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray, Any]:
    w = None
    try:
        w = _wcs(ds)
    except ValueError:
        w = None
    if x is not None or y is not None:
        if x is None or y is None:
            raise TypeError("give both x= and y= (pixel centre, 0-based)")
        return np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float)), w
    if ra is None or dec is None:
        raise TypeError("give the target position: ra, dec (degrees), or x=, y= (pixels)")
    if unit_is_pix:
        return np.atleast_1d(np.asarray(ra, float)), np.atleast_1d(np.asarray(dec, float)), w
    if w is None:
        _wcs(ds)  # raises the clear "no celestial WCS" error
    if hasattr(ra, "unit"):
        ra = ra.to_value("deg")
    if hasattr(dec, "unit"):
        dec = dec.to_value("deg")
    px, py = radec_to_pixel(w, np.atleast_1d(np.asarray(ra, float)), np.atleast_1d(np.asarray(dec, float)))
    return np.atleast_1d(np.asarray(px, float)), np.atleast_1d(np.asarray(py, float)), w


def cutout(
    ds: Any,
    ra: float | None = None,
    dec: float | None = None,
    size: Any = 64,
    unit: str = "arcsec",
    partial: str = "pad",
    *,
    x: float | None = None,
    y: float | None = None,
    sky: float | str | None = None,
    sigma: str = "model",
    gain: float | None = None,
    exptime: float | None = None,
    rdnoise: float | None = None,
    mask_sources: bool | dict[str, Any] = False,
    fill_value: float = 0.0,
    storage_options: dict[str, Any] | None = None,
) -> xr.Dataset:
    """Cut a stamp around one target: ``image``, ``mask`` and ``sigma`` with the cutout's own WCS.

    Parameters
    ----------
    ds : Dataset, path, URL or array
        The parent image (anything :func:`tilepipe.open_image` accepts: FITS
        or Zarr, local or ``s3://``).  Only the cutout's region is read.
    ra, dec : float or Quantity
        Target position in degrees (ICRS/the WCS's frame).  With
        ``unit="pix"`` they are read as pixel coordinates ``x, y`` instead
        (0-based); or pass ``x=``/``y=`` explicitly.
    size : float, (float, float), str or Quantity
        Full width of the cutout, in ``unit`` (``(ny, nx)`` for a rectangle),
        or a string with its unit (``"10arcsec"``, ``"64pix"``).  Arcseconds
        are converted with the WCS pixel scale; the pixel count is rounded.
    unit : {"arcsec", "pix"}
        Unit of ``size`` (and ``ra, dec`` are pixels when ``"pix"``).
    partial : {"pad", "trim", "error"}
        A box crossing the image edge is padded to full size (padded pixels
        masked, image = ``fill_value``), trimmed, or refused.  A target whose
        centre pixel is outside the image is always an error.
    sky : None, float or "auto"
        Subtract nothing (default: GALFIT fits the sky itself), a constant, or
        the 3-sigma-clipped median of the unmasked (and, with
        ``mask_sources``, source-free) cutout pixels.  Recorded as ``SKYSUB``.
    sigma : {"model", "variance"}
        ``"model"``: the GALFIT-style noise model of :func:`sigma_image`
        measured on this cutout (sky rms from its own pixels); ``"variance"``:
        ``sqrt`` of the parent's ``variance`` variable.
    gain, exptime, rdnoise : float, optional
        For the sigma model (e-/ADU, s, e-); ``gain`` defaults to the image's.
    mask_sources : bool or dict
        OR :func:`source_mask` into ``mask`` (a dict passes its options, e.g.
        ``{"fwhm": 4, "deblend": True, "grow": 3}``).
    fill_value : float
        Image value of padded / non-finite pixels (they are masked).

    Returns
    -------
    xarray.Dataset
        In-memory ``image`` (float32), ``mask`` (bool, True = bad: parent mask,
        padding, sources), ``sigma`` (float32; padded pixels get the median
        sigma so weight maps stay finite — use the mask).  attrs: ``header``
        (parent cards with the shifted WCS, ``CUTX0/CUTY0/CUTXT/CUTYT``),
        ``origin`` ``(y0, x0)``, ``x_target``, ``y_target``, ``x_parent``,
        ``y_parent``, ``status`` (``"ok"`` or ``"partial"``), ``sky``.

    Raises
    ------
    ValueError
        Target outside the image, zero or negative size, arcsec sizes or
        ra/dec without a WCS, ``partial="error"`` at an edge.
    """
    check_choice("unit", unit, ("arcsec", "pix"))
    check_choice("partial", partial, ("pad", "trim", "error"))
    check_choice("sigma", sigma, ("model", "variance"))
    if not isinstance(ds, xr.Dataset):
        ds = open_image(ds, storage_options=storage_options)
    elif "mask" not in ds:
        ds = open_image(ds)
    px, py, w = _position(ds, ra, dec, unit == "pix", x, y)
    if px.size != 1:
        raise ValueError("cutout() makes one cutout; use tilepipe.cutouts(src, catalog, size, output=...) for many")
    ny, nx = _size_pixels(size, unit, w)
    shape = tuple(ds["image"].shape)
    box, _ = _geometry(float(px[0]), float(py[0]), ny, nx, shape, partial)
    y0, y1, x0, x1 = box
    cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, shape[0]), max(x0, 0), min(x1, shape[1])
    names = ["image", "mask"] + (["variance"] if sigma == "variance" else [])
    pieces = dask.compute(*[ds[n].data[cy0:cy1, cx0:cx1] for n in names])
    region = _Region((cy0, cx0), shape, **{n: np.asarray(p) for n, p in zip(names, pieces)})
    if gain is None:
        gain = ds.attrs.get("gain")
    return _build_cutout(
        region, float(px[0]), float(py[0]), ny, nx, partial, header_to_cards(ds.attrs.get("header", [])), dict(ds.attrs),
        sky=sky, sigma=sigma, gain=gain, exptime=exptime, rdnoise=rdnoise, fill_value=fill_value,
        mask_sources=mask_sources,
    )


# ----------------------------------------------------------------- FITS output
def _fs_for(path: str, storage_options: dict[str, Any] | None) -> tuple[Any, str, bool]:
    import fsspec

    path = os.fspath(path)
    if "://" not in path or path.startswith("file://"):
        lp = os.path.abspath(path.split("://", 1)[1] if path.startswith("file://") else path)
        return fsspec.filesystem("file"), lp, True
    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs, p, False


def _atomic_put(data: bytes, path: str, storage_options: dict[str, Any] | None, overwrite: bool) -> str:
    fs, p, local = _fs_for(path, storage_options)
    if not overwrite and fs.exists(p):
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if local:
        d = os.path.dirname(p) or "."
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{os.path.basename(p)}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:  # a single PUT is atomic on object stores
        fs.pipe_file(p, data)
    return path


def _psf_stamp(psf: Any, x: float, y: float) -> np.ndarray:
    if hasattr(psf, "at"):
        stamp = psf.at(x, y)
    elif callable(psf):
        stamp = psf(x, y)
    else:
        stamp = psf
    stamp = np.asarray(stamp, dtype=np.float32)
    if stamp.ndim != 2:
        raise ValueError(f"psf must give a 2-D stamp; got shape {stamp.shape}")
    s = float(stamp.sum())
    if not np.isfinite(s) or s == 0:
        raise ValueError("psf stamp sums to zero or is not finite")
    return stamp / np.float32(s)


def _cutout_hdul(cut: xr.Dataset, psf: Any = None) -> fits.HDUList:
    cards = [c for c in cut.attrs.get("header", []) if c[0] not in ("EXTNAME", "EXTVER", "EXTLEVEL", "INHERIT")]
    # fit=True: no card astropy would warn about (HIERARCH made explicit, over-long comments cut
    # as astropy cuts them on writing), so nothing needs silencing on the worker threads
    return _cutout_hdul_inner(cut, cards_to_header(cards, fit=True), psf)


def _cutout_hdul_inner(cut: xr.Dataset, hdr: fits.Header, psf: Any) -> fits.HDUList:
    from . import __version__

    wcs_cards = fits.Header([fits.Card(k, hdr[k], hdr.comments[k]) for k in hdr.keys() if _WCS_KEY.match(k) and k not in ("COMMENT", "HISTORY")])
    prim = fits.PrimaryHDU(header=hdr.copy())
    prim.header["ORIGIN"] = ("tilepipe", "software that wrote this file")
    prim.header.add_history(f"tilepipe {__version__} cutout: extensions IMAGE, MASK (1 = bad), SIGMA" + (", PSF" if psf is not None else ""))
    img_hdr = hdr.copy()
    if "bunit" in cut.attrs and "BUNIT" not in img_hdr:
        img_hdr["BUNIT"] = str(cut.attrs["bunit"])
    hdus = [prim, fits.ImageHDU(np.asarray(cut["image"].values, dtype=np.float32), header=img_hdr, name="IMAGE")]
    mh = wcs_cards.copy()
    mh["COMMENT"] = "1 = bad pixel (parent mask, padding, masked sources), 0 = good"
    hdus.append(fits.ImageHDU(np.asarray(cut["mask"].values).astype(np.uint8), header=mh, name="MASK"))
    sh = wcs_cards.copy()
    if "BUNIT" in img_hdr:
        sh["BUNIT"] = img_hdr["BUNIT"]
    sh["COMMENT"] = "1-sigma noise per pixel, same units as IMAGE"
    hdus.append(fits.ImageHDU(np.asarray(cut["sigma"].values, dtype=np.float32), header=sh, name="SIGMA"))
    if psf is not None:
        xp = float(cut.attrs.get("x_parent", 0.0))
        yp = float(cut.attrs.get("y_parent", 0.0))
        stamp = _psf_stamp(psf, xp, yp)
        ph = fits.Header()
        ph["COMMENT"] = "PSF at the target position, normalised to sum 1, centred on the central pixel"
        ph["PSFX"], ph["PSFY"] = (xp, "parent-image x where the PSF was evaluated"), (yp, "parent-image y")
        hdus.append(fits.ImageHDU(stamp, header=ph, name="PSF"))
    return fits.HDUList(hdus)


def write_cutout(
    cut: xr.Dataset,
    path: str | os.PathLike,
    psf: Any = None,
    overwrite: bool = False,
    *,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write a cutout as one multi-extension FITS file (atomically).

    Extensions: an empty primary HDU carrying the parent header (with the
    shifted WCS and provenance), ``IMAGE`` (float32, full header incl. WCS),
    ``MASK`` (uint8, 1 = bad, WCS), ``SIGMA`` (float32, WCS) and, when ``psf``
    is given, ``PSF`` (float32, sum 1).

    Parameters
    ----------
    cut : Dataset
        From :func:`cutout`.
    path : str or path
        Local path or fsspec URL (``s3://bucket/key.fits``).  Written to a
        temporary name and renamed (local) or in one PUT (object stores), so
        no half-written file ever carries the final name.
    psf : array, callable or object with ``.at(x, y)``, optional
        PSF stamp, or a model evaluated at the target's parent-image position.
    overwrite : bool
        Replace an existing file.
    """
    for v in ("image", "mask", "sigma"):
        if v not in cut:
            raise ValueError(f"write_cutout needs a cutout Dataset with image, mask and sigma; '{v}' is missing")
    hdul = _cutout_hdul(cut, psf)
    buf = _io.BytesIO()
    hdul.writeto(buf, output_verify="silentfix")  # silentfix reports nothing; the cards fit (see _cutout_hdul)
    return _atomic_put(buf.getvalue(), os.fspath(path), storage_options, overwrite)


# ------------------------------------------------------------------ batch mode
def _group_task(
    pieces: Sequence[np.ndarray],
    names: Sequence[str],
    region_origin: tuple[int, int],
    shape: tuple[int, int],
    rows: list[dict[str, Any]],
    ny: int,
    nx: int,
    partial: str,
    cards: list[list[Any]],
    attrs: dict[str, Any],
    opts: dict[str, Any],
    output: str,
    fmt: str,
    storage_options: dict[str, Any] | None,
    overwrite: bool,
    psf: Any,
    target: str,
) -> list[dict[str, Any]]:
    region = _Region(region_origin, shape, **{n: np.asarray(p) for n, p in zip(names, pieces)})
    results = []
    zarrays = None
    if fmt == "zarr":
        import zarr

        root = zarr.open_group(_zarr_store(target, storage_options), mode="r+")
        zarrays = {k: root[k] for k in ("image", "mask", "sigma")}
    for row in rows:
        res = dict(row)
        try:
            # opts holds warn=False: batch rows report through the table, not with warnings
            cut = _build_cutout(region, row["x"], row["y"], ny, nx, partial, cards, attrs, **opts)
        except ValueError as exc:
            res.update(status="error", message=str(exc), path="")
            results.append(res)
            continue
        res.update(status=cut.attrs["status"], message="", x0=cut.attrs["origin"][1], y0=cut.attrs["origin"][0],
                   n_masked=int(cut["mask"].values.sum()))
        if fmt == "fits":
            p = _join(output, f"{row['name']}.fits")
            write_cutout(cut, p, psf=psf, overwrite=overwrite, storage_options=storage_options)
            res["path"] = p
        else:
            i = int(row["index"])
            zarrays["image"][i] = cut["image"].values
            zarrays["mask"][i] = cut["mask"].values
            zarrays["sigma"][i] = cut["sigma"].values
            res["path"] = f"{output}#{i}"
        results.append(res)
    return results


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _zarr_store(path: str, storage_options: dict[str, Any] | None) -> Any:
    import zarr

    if "://" not in path or path.startswith("file://"):
        lp = path.split("://", 1)[1] if path.startswith("file://") else path
        return zarr.storage.LocalStore(lp)
    return zarr.storage.FsspecStore.from_url(path, storage_options=storage_options or {})


def _read_catalog(catalog: Any) -> Table:
    if isinstance(catalog, Table):
        return catalog
    if isinstance(catalog, (str, os.PathLike)):
        p = os.fspath(catalog)
        fmt = "ascii.ecsv" if p.endswith(".ecsv") else None
        return Table.read(p, format=fmt) if fmt else Table.read(p)
    try:
        return Table(catalog)
    except Exception as exc:  # noqa: BLE001
        raise TypeError(f"catalog must be an astropy Table, a table file path or a dict of columns; got {type(catalog).__name__}") from exc


def cutouts(
    src: Any,
    catalog: Any,
    size: Any,
    *,
    output: str | os.PathLike,
    unit: str = "arcsec",
    partial: str = "pad",
    storage_options: dict[str, Any] | None = None,
    output_storage_options: dict[str, Any] | None = None,
    chunks: int | tuple[int, int] = 256,
    group_size: int = 1024,
    name_col: str | None = None,
    ra_col: str = "ra",
    dec_col: str = "dec",
    x_col: str = "x",
    y_col: str = "y",
    hdu: int | str | None = None,
    sky: float | str | None = None,
    sigma: str = "model",
    gain: float | None = None,
    exptime: float | None = None,
    rdnoise: float | None = None,
    mask_sources: bool | dict[str, Any] = False,
    psf: Any = None,
    fill_value: float = 0.0,
    overwrite: bool = False,
    compute: bool = True,
) -> Table | list[Any]:
    """Make many cutouts in parallel, each Dask task reading only its region.

    The targets are grouped by the ``group_size``-pixel tile of the image
    that owns their centre; one task per non-empty group reads the bounding
    box of its cutouts (a lazy slice of the image: with ``chunks`` small, only
    the chunks under that box are read, never the whole image), builds the
    cutouts exactly as :func:`cutout` does and writes them.

    Parameters
    ----------
    src : path, URL or Dataset
        FITS or Zarr image, local or on an object store.
    catalog : Table or path
        Targets: ``ra_col``/``dec_col`` in degrees, or ``x_col``/``y_col``
        (0-based pixels) with ``unit="pix"``.
    size : see :func:`cutout`
        One size for all cutouts.
    output : str
        A folder (local or URL) receiving ``<name>.fits`` files, or a path
        ending in ``.zarr`` receiving one Zarr group with arrays ``image``,
        ``mask`` (uint8), ``sigma`` of shape ``(n, ny, nx)`` (one chunk per
        cutout) and ``x0``, ``y0``, ``ra``, ``dec``, ``x``, ``y`` per cutout;
        the parent header is in the group's attrs (a cutout's WCS is it with
        ``CRPIX`` shifted by ``-x0, -y0``).
    storage_options, output_storage_options : dict, optional
        fsspec options of ``src`` and of ``output`` (default: the same).
    chunks : int or (int, int)
        Dask chunks used to open ``src`` (small chunks = small reads).
    group_size : int
        Side (pixels) of the tiles that group nearby targets into one task.
    name_col : str, optional
        Column giving the file names (default ``id`` when present, else the
        row number as ``cutout_000042``).
    sky, sigma, gain, exptime, rdnoise, mask_sources, psf, fill_value, partial
        As in :func:`cutout` and :func:`write_cutout`.
    overwrite : bool
        Replace existing outputs (default: ``FileExistsError``).  A Zarr
        store, local or at a URL, is written completely under a hidden
        sibling name first and only then replaces the old one, so a failed
        batch leaves the previous store as it was.
    compute : bool
        Run now (on the current Dask client, if any) and return the Table;
        ``False`` returns the list of delayed group tasks.

    Returns
    -------
    astropy.table.Table
        One row per catalog row (input order): ``name``, ``x``, ``y``,
        ``ra``, ``dec`` (when known), ``x0``, ``y0``, ``path``, ``status``
        (``ok``, ``partial``, ``outside`` or ``error``), ``n_masked``,
        ``message``.
    """
    check_choice("unit", unit, ("arcsec", "pix"))
    check_choice("partial", partial, ("pad", "trim", "error"))
    check_choice("sigma", sigma, ("model", "variance"))
    group_size = check_int("group_size", group_size, lower=16)
    output = os.fspath(output)
    out_opts = storage_options if output_storage_options is None else output_storage_options
    fmt = "zarr" if output.rstrip("/").endswith(".zarr") else "fits"
    if fmt == "zarr" and partial == "trim":
        raise ValueError(
            f"partial='trim' cannot be written to the Zarr output {output!r}: its cutouts share one fixed-size "
            "array (one slot of size x size per target), and a trimmed cutout is smaller. Use partial='pad' "
            "(edge cutouts padded to full size, padded pixels masked, x0/y0 the padded origin), "
            "partial='error', or write trimmed cutouts to a folder of FITS files (output without '.zarr')"
        )
    cat = _read_catalog(catalog)
    if isinstance(src, xr.Dataset):
        ds = src if "mask" in src else open_image(src)
    else:
        ds = open_image(src, hdu=hdu, chunks=chunks, storage_options=storage_options)
    shape = tuple(int(v) for v in ds["image"].shape)
    if unit == "pix":
        for c in (x_col, y_col):
            if c not in cat.colnames:
                raise ValueError(f"catalog has no column {c!r} (unit='pix' needs pixel columns x_col/y_col); columns: {cat.colnames}")
        xs, ys, w = _position(ds, None, None, True, np.asarray(cat[x_col], float), np.asarray(cat[y_col], float))
    else:
        for c in (ra_col, dec_col):
            if c not in cat.colnames:
                raise ValueError(f"catalog has no column {c!r} (ra/dec in degrees); columns: {cat.colnames}. Use ra_col=/dec_col= or unit='pix'")
        xs, ys, w = _position(ds, np.asarray(cat[ra_col], float), np.asarray(cat[dec_col], float), False, None, None)
    ny, nx = _size_pixels(size, unit, w)
    if name_col is None:
        name_col = "id" if "id" in cat.colnames else None
    if name_col is not None and name_col not in cat.colnames:
        raise ValueError(f"catalog has no column {name_col!r} for file names; columns: {cat.colnames}")
    names = [str(v) for v in cat[name_col]] if name_col else [f"cutout_{i:06d}" for i in range(len(cat))]
    if len(set(names)) != len(names):
        raise ValueError(f"column {name_col!r} has duplicate values; file names must be unique (use name_col=)")
    if w is not None:
        ra, dec = pixel_to_radec(w, xs, ys)
    else:
        ra = dec = np.full(len(xs), np.nan)
    if gain is None:
        gain = ds.attrs.get("gain")
    opts = dict(sky=sky, sigma=sigma, gain=gain, exptime=exptime, rdnoise=rdnoise, fill_value=fill_value,
                mask_sources=mask_sources, warn=False)
    cards = header_to_cards(ds.attrs.get("header", []))
    attrs = {k: v for k, v in ds.attrs.items() if k in ("gain", "saturation", "fwhm", "bunit")}
    # ---- group by tile of the image owning the centre
    from .tiling import TileGrid

    gx = max(1, -(-shape[1] // group_size))
    gy = max(1, -(-shape[0] // group_size))
    grid = TileGrid(shape, nx=gx, ny=gy)
    owner = np.asarray(grid.owner(xs, ys))
    base_rows = []
    for i in range(len(xs)):
        base_rows.append(dict(index=i, name=names[i], x=float(xs[i]), y=float(ys[i]), ra=float(ra[i]), dec=float(dec[i])))
    target = output  # where the Zarr store is written (a hidden temporary sibling for local outputs)
    if fmt == "zarr":
        import zarr

        from .io.zarr import _begin_store, _commit_store, _discard_store

        # compute=False: the caller runs the tasks, so they write straight into output (never marked complete)
        target = _begin_store(output, out_opts, overwrite, temporary=compute)
        try:
            root = zarr.open_group(_zarr_store(target, out_opts), mode="w" if (overwrite or target != output) else "w-",
                                   zarr_format=3)  # v3: the root zarr.json is the marker _commit_store moves last
            n = len(xs)
            for k, dt in (("image", "float32"), ("mask", "uint8"), ("sigma", "float32")):
                root.create_array(k, shape=(n, ny, nx), chunks=(1, ny, nx), dtype=dt, fill_value=0)
            for k, v in (("x", xs), ("y", ys), ("ra", ra), ("dec", dec)):
                root.create_array(k, shape=(n,), dtype="float64")[:] = np.asarray(v, float)
            # the planned (padded) origins; with compute=True they are overwritten from the results (a cutout
            # that could not be cut gets -1, as in the table), with compute=False they are what the tasks cut
            boxes = [_box(a, b, ny, nx) for a, b in zip(xs, ys)]
            root.create_array("x0", shape=(n,), dtype="int64", fill_value=-1)[:] = np.array(
                [b[2] for b in boxes], dtype=np.int64)
            root.create_array("y0", shape=(n,), dtype="int64", fill_value=-1)[:] = np.array(
                [b[0] for b in boxes], dtype=np.int64)
            root.attrs.update({"header": cards, "names": names, "size": [ny, nx], "mask_convention": "1 = bad",
                               "wcs_note": "cutout i's WCS = header with CRPIX1 -= x0[i], CRPIX2 -= y0[i]"})
        except BaseException:
            _discard_store(target, out_opts)
            raise
    else:
        fs, p, local = _fs_for(output, out_opts)
        if local:
            os.makedirs(p, exist_ok=True)
    data_names = ["image", "mask"] + (["variance"] if sigma == "variance" else [])
    tasks = []
    outside_rows = []
    for g in range(grid.ntiles):
        sel = np.nonzero(owner == g)[0]
        if sel.size == 0:
            continue
        boxes = np.array([_box(xs[i], ys[i], ny, nx) for i in sel])
        y0 = max(0, int(boxes[:, 0].min()))
        y1 = min(shape[0], int(boxes[:, 1].max()))
        x0 = max(0, int(boxes[:, 2].min()))
        x1 = min(shape[1], int(boxes[:, 3].max()))
        pieces = [ds[nm].data[y0:y1, x0:x1] for nm in data_names]
        rows = [base_rows[i] for i in sel]
        tasks.append(
            dask.delayed(_group_task, pure=False)(
                pieces, data_names, (y0, x0), shape, rows, ny, nx, partial, cards, attrs, opts, output, fmt,
                out_opts, overwrite, psf, target, dask_key_name=f"cutouts-{g}-{uuid.uuid4().hex[:8]}",
            )
        )
    for i in np.nonzero(owner < 0)[0]:
        r = dict(base_rows[i])
        r.update(status="outside", message=f"position (x={xs[i]:.1f}, y={ys[i]:.1f}) lies outside the image {shape}", path="")
        outside_rows.append(r)
    if not compute:
        return tasks
    try:
        results = dask.compute(*tasks)
    except BaseException:
        if fmt == "zarr":
            _discard_store(target, out_opts)
        raise
    rows = [r for group in results for r in group] + outside_rows
    rows.sort(key=lambda r: r["index"])
    table = Table(
        rows=[(r["name"], r["x"], r["y"], r["ra"], r["dec"], int(r.get("x0", -1)), int(r.get("y0", -1)), r.get("path", ""),
               r["status"], int(r.get("n_masked", 0)), r.get("message", "")) for r in rows],
        names=("name", "x", "y", "ra", "dec", "x0", "y0", "path", "status", "n_masked", "message"),
        dtype=(str, float, float, float, float, int, int, str, str, int, str),
    ) if rows else Table(names=("name", "x", "y", "ra", "dec", "x0", "y0", "path", "status", "n_masked", "message"),
                         dtype=(str, float, float, float, float, int, int, str, str, int, str))
    table.meta.update(size=[ny, nx], output=output, format=fmt)
    if fmt == "zarr":
        import zarr

        try:
            root = zarr.open_group(_zarr_store(target, out_opts), mode="r+")
            if len(table):
                root["x0"][:] = np.asarray(table["x0"], np.int64)
                root["y0"][:] = np.asarray(table["y0"], np.int64)
            root.attrs["status"] = [str(s) for s in table["status"]]
            root.attrs["complete"] = True
        except BaseException:
            _discard_store(target, out_opts)
            raise
        _commit_store(target, output, out_opts, overwrite)
    n_bad = int(np.sum(np.isin(table["status"], ["outside", "error"])))
    if n_bad:
        log.warning("cutouts: %d of %d targets could not be cut (see the 'status' and 'message' columns)", n_bad, len(table))
    return table
