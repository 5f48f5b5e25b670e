"""CCD calibration: bias and dark subtraction, normalised flat-fielding.

Per pixel (all frames in ADU, the same camera and shape)::

    num  = R - b·B - s·D                   (bias and scaled dark removed)
    Fc   = F - b_f·B - s_f·D               (the flat, bias/dark corrected when it is raw)
    out  = num / (Fc / N)                  (N = median, or max, of Fc over its good pixels)

with ``s`` the dark scale (``t_raw / t_dark`` from the headers, or
``dark_scale``), ``b = 1 - s`` when the dark still contains the bias
(``dark_has_bias=True``, a raw or averaged dark) and ``b = 1`` when it does not;
``b_f, s_f`` the same for the flat (``s_f = t_flat / t_dark`` when both are
known, else 0).  Everything is elementwise except ``N``, one global scalar
computed lazily (an exact median by a two-pass histogram over the blocks, so
it never gathers the flat), so the whole calibration is a lazy, per-tile dask
graph: no overlap is needed.

Variance, first order (``V`` the input variances)::

    V_num  = V_R + b²·V_B + s²·V_D
    V_Fc   = V_F + b_f²·V_B + s_f²·V_D
    C      = b·b_f·V_B + s·s_f·V_D                       (shared master frames)
    V_out  = V_num / Fn² + out²·V_Fc / Fc² - 2·out·C / (Fn·Fc),   Fn = Fc / N

The error of the scalar ``N`` is neglected.  Calibration frames count as
noise-free master frames (``V_B = V_D = V_F = 0``) unless
``calib_variance=True``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import warnings
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from ._validate import check_choice, check_positive
from .exceptions import FallbackWarning
from .image import make_dataset, open_image

log = logging.getLogger(__name__)

__all__ = ["calibrate", "flat_normalization", "exposure_time"]

#: header keywords giving the time the dark current integrated, in order of preference
_TIME_KEYS = ("DARKTIME", "EXPTIME", "EXPOSURE", "ITIME")
_SAT_KEYS = ("SATURATE", "SATURATION", "SATLEVEL", "MAXLIN")
_NBINS = 65536


# ------------------------------------------------------------------ helpers
def exposure_time(ds: xr.Dataset) -> float | None:
    """Dark-current integration time (s) from the header: ``DARKTIME``, else ``EXPTIME``/``EXPOSURE``/``ITIME``."""
    cards = ds.attrs.get("header", []) if isinstance(ds, xr.Dataset) else ds
    for key in _TIME_KEYS:
        for c in cards:
            if c[0] == key and isinstance(c[1], (int, float)) and not isinstance(c[1], bool) and np.isfinite(c[1]):
                return float(c[1])
    return None


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.path.basename(os.fspath(src).rstrip("/")) or os.fspath(src)
    return f"<{type(src).__name__}>"


def _open(name: str, src: Any, chunks: Any, saturation: float | None, storage_options: Any,
          use_variance: bool) -> tuple[xr.Dataset, bool]:
    """Open a frame (errors name the argument); the flag says whether its variance is propagated."""
    try:
        ds = open_image(src, chunks=chunks, saturation=saturation, storage_options=storage_options)
    except (OSError, ValueError, TypeError) as exc:
        raise type(exc)(f"{name}: {exc}") from None
    return ds, use_variance


# -------------------------------------------- exact lazy median over blocks
def _p1(v: np.ndarray, g: np.ndarray) -> tuple[int, float, float]:
    sel = v[g]
    if sel.size == 0:
        return 0, np.inf, -np.inf
    return int(sel.size), float(sel.min()), float(sel.max())


def _r1(parts: list) -> tuple[int, float, float]:
    n = sum(p[0] for p in parts)
    if n == 0:
        raise ValueError(
            "the flat has no good pixels (all masked, non-finite or <= 0 after bias/dark correction); "
            "check the flat frame and the bias/dark given with it"
        )
    return n, min(p[1] for p in parts), max(p[2] for p in parts)


def _bin(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(v.shape, dtype=np.int64)
    idx = np.floor((v - lo) * (_NBINS / (hi - lo))).astype(np.int64)
    return np.clip(idx, 0, _NBINS - 1)


def _p2(v: np.ndarray, g: np.ndarray, r1: tuple) -> np.ndarray:
    return np.bincount(_bin(v[g], r1[1], r1[2]), minlength=_NBINS)


def _r2(hists: list, r1: tuple) -> tuple[int, int, int, int, int]:
    n = r1[0]
    cum = np.cumsum(np.sum(hists, axis=0))
    k1, k2 = (n - 1) // 2, n // 2  # the two middle order statistics (0-based)
    b1 = int(np.searchsorted(cum, k1, side="right"))
    b2 = int(np.searchsorted(cum, k2, side="right"))
    before = int(cum[b1 - 1]) if b1 > 0 else 0
    return b1, b2, before, k1, k2


def _p3(v: np.ndarray, g: np.ndarray, r1: tuple, r2: tuple) -> np.ndarray:
    sel = v[g]
    b = _bin(sel, r1[1], r1[2])
    return sel[(b >= r2[0]) & (b <= r2[1])]


def _r3(parts: list, r2: tuple) -> float:
    vals = np.sort(np.concatenate(parts))
    _, _, before, k1, k2 = r2
    return float(0.5 * (vals[k1 - before] + vals[k2 - before]))


def _lazy_median(values: da.Array, good: da.Array) -> da.Array:
    """Exact median of ``values[good]`` as a lazy 0-d dask array (= ``numpy.median``).

    Three passes over the blocks (count/min/max, a 65536-bin histogram, then
    the values in the bin(s) holding the middle order statistics), each a
    per-block task followed by a tiny reduction: no task holds the whole image.
    """
    good = good.rechunk(values.chunks)
    vb = values.to_delayed().ravel()
    gb = good.to_delayed().ravel()
    p1 = [dask.delayed(_p1)(v, g) for v, g in zip(vb, gb)]
    r1 = dask.delayed(_r1)(p1)
    r2 = dask.delayed(_r2)([dask.delayed(_p2)(v, g, r1) for v, g in zip(vb, gb)], r1)
    r3 = dask.delayed(_r3)([dask.delayed(_p3)(v, g, r1, r2) for v, g in zip(vb, gb)], r2)
    return da.from_delayed(r3, shape=(), dtype=np.float64)


def _check_max(m: float) -> float:
    if not np.isfinite(m) or m <= 0:
        raise ValueError(
            "the flat has no good pixels (all masked, non-finite or <= 0 after bias/dark correction); "
            "check the flat frame and the bias/dark given with it"
        )
    return float(m)


def flat_normalization(flat: da.Array, good: da.Array, method: str = "median") -> da.Array:
    """Lazy global normalisation of a flat: the exact median (or max) of ``flat[good]``.

    Parameters
    ----------
    flat : dask.array.Array
        The (bias/dark corrected) flat, ``[y, x]``.
    good : dask.array.Array of bool
        True where the flat pixel may be used (finite, > 0, not masked).
    method : {"median", "max"}

    Returns
    -------
    dask.array.Array
        A 0-d float64 dask array; computing it raises ``ValueError`` when no
        pixel is good.
    """
    check_choice("flat_norm", method, ("median", "max"))
    if method == "median":
        return _lazy_median(flat, good)
    m = da.where(good, flat, -np.inf).max()
    return da.from_delayed(dask.delayed(_check_max)(m), shape=(), dtype=np.float64)


# ------------------------------------------------------------------ public
def calibrate(
    raw: Any,
    bias: Any = None,
    dark: Any = None,
    flat: Any = None,
    *,
    dark_scale: float | None = None,
    flat_norm: str = "median",
    dark_has_bias: bool = True,
    flat_has_bias: bool = True,
    saturation: float | None = None,
    hot_pixel_sigma: float | None = None,
    calib_variance: bool = False,
    fill_value: float = np.nan,
    chunks: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> xr.Dataset:
    """Calibrate a raw frame: bias and dark subtraction, division by the normalised flat.

    Lazy and elementwise (per tile, no overlap needed); the flat's
    normalisation is one global scalar computed lazily from all blocks.
    Formulas for the image and the variance: module docstring and
    ``docs/calibration.md``.

    Parameters
    ----------
    raw : path, URL, array or Dataset
        The raw light frame (anything :func:`tilepipe.open_image` accepts).
    bias, dark, flat : path, URL, array or Dataset, optional
        Master calibration frames of the same shape as ``raw`` (ADU).
    dark_scale : float, optional
        Factor applied to the dark current.  Default: ``t_raw / t_dark`` with
        ``t = DARKTIME``, else ``EXPTIME`` (``EXPOSURE``, ``ITIME``) from the
        headers; 1 with a :class:`~tilepipe.exceptions.FallbackWarning` when
        either is unknown.
    flat_norm : {"median", "max"}
        Normalise the flat by the median (default) or the maximum of its good
        pixels (finite, > 0, unmasked in the flat and in the frames subtracted
        from it).
    dark_has_bias : bool
        The dark still contains the bias (a raw or averaged dark, as the
        frames of most small observatories): with a bias, the dark current is
        ``dark - bias``.  Set False for a bias-subtracted master dark.  A dark
        that contains the bias cannot be scaled without a bias frame
        (``ValueError``) unless the scale is 1.
    flat_has_bias : bool
        The flat still contains the bias and dark current (a raw or averaged
        flat): the bias and the dark scaled by ``t_flat / t_dark`` (when both
        times are known) are removed before normalising.  Without a bias frame
        the flat is used as given, with a ``FallbackWarning``.  Set False for a
        master flat that is already corrected.
    saturation : float, optional
        Raw-count level (ADU) at or above which a pixel of *any* frame is
        masked (e.g. 65535 for 16-bit cameras; saturated hot pixels of a dark
        cannot be scaled).  Default: the raw frame's ``saturation`` (header
        ``SATURATE``...).
    hot_pixel_sigma : float, optional
        Also mask pixels whose dark current (``dark - bias``, or the dark)
        exceeds its median by more than this many robust standard deviations
        (1.4826 × MAD; median and MAD exact, over the unmasked dark pixels,
        computed lazily).  Hot pixels are noisy even after subtraction, and
        in a *single* dark most such outliers are cosmic rays, which scaled
        subtraction would print as holes into the image.  Default: off.
    calib_variance : bool
        Propagate the ``variance`` of the bias, dark and flat (from their
        Datasets, or :func:`tilepipe.open_image`'s default estimate).  Default
        False: they are noise-free master frames (averages of many exposures,
        whose noise is small; a default variance estimated from a single flat
        would mistake its illumination structure for noise).
    fill_value : float
        Image and variance value where the calibration is undefined (flat
        <= 0 or non-finite); those pixels are masked in any case.
    chunks : int or tuple, optional
        Dask chunks for every frame (default: the raw frame's; calibration
        frames are rechunked to match it).
    storage_options : dict, optional
        fsspec options for URLs (S3 endpoint, credentials...), for every frame.

    Returns
    -------
    xarray.Dataset
        ``image`` (ADU, float32), ``mask`` (True = bad: masked in the raw or
        any calibration frame, unusable flat, non-finite result),
        ``variance`` (ADU², formula above); the raw header with ``HISTORY``
        and ``CAL*`` provenance cards; ``gain``, ``fwhm`` kept; the
        ``saturation`` level and ``SATURATE``-like cards are dropped (raw
        counts no longer map to one level; saturated pixels stay masked);
        ``attrs["parameters"]["calibrate"]`` records the options.

    Raises
    ------
    ValueError
        Shapes differ, an impossible combination of options, or (at compute
        time) a flat without any good pixel.
    """
    check_choice("flat_norm", flat_norm, ("median", "max"))
    if hot_pixel_sigma is not None:
        hot_pixel_sigma = check_positive("hot_pixel_sigma", hot_pixel_sigma)
    if dark_scale is not None:
        try:
            dark_scale = float(dark_scale)
        except (TypeError, ValueError):
            raise TypeError(f"dark_scale must be a number (or None for the header exposure times); got {dark_scale!r}") from None
        if not np.isfinite(dark_scale) or dark_scale < 0:
            raise ValueError(f"dark_scale must be a finite number >= 0; got {dark_scale!r}")
    if raw is None:
        raise TypeError("raw must be an image (path, URL, array or Dataset), not None")
    rds, _ = _open("raw", raw, chunks, saturation, storage_options, True)
    if saturation is None:
        saturation = rds.attrs.get("saturation")
    shape = rds["image"].shape
    rchunks = rds["image"].data.chunks

    frames: dict[str, tuple[xr.Dataset, bool] | None] = {}
    for name, src in (("bias", bias), ("dark", dark), ("flat", flat)):
        if src is None:
            frames[name] = None
            continue
        ds, has_var = _open(name, src, chunks, saturation, storage_options, bool(calib_variance))
        if ds["image"].shape != shape:
            raise ValueError(
                f"{name} has shape {ds['image'].shape} but raw has shape {shape}; calibration frames must come from "
                "the same detector readout (same binning and trimming/subframe) as the raw frame"
            )
        frames[name] = (ds, has_var)

    def arr(ds: xr.Dataset, var: str) -> da.Array:
        a = ds[var].data
        if a.chunks != rchunks:
            a = a.rechunk(rchunks)
        return a.astype(np.float64) if var != "mask" else a

    # ----------------------------------------------------------- coefficients
    t_raw = exposure_time(rds)
    s = 0.0
    s_note = ""
    fb = frames["bias"]
    fd = frames["dark"]
    ff = frames["flat"]
    t_dark = exposure_time(fd[0]) if fd else None
    if fd:
        if dark_scale is not None:
            s, s_note = dark_scale, "given"
        elif t_raw is not None and t_dark is not None and t_dark > 0:
            s, s_note = t_raw / t_dark, f"t_raw/t_dark = {t_raw:g}/{t_dark:g}"
        else:
            s, s_note = 1.0, "exposure times unknown"
            warnings.warn(
                "dark not scaled (scale 1): the exposure time of the raw or the dark frame is unknown "
                "(no DARKTIME/EXPTIME in the header); pass dark_scale= to scale it",
                FallbackWarning,
                stacklevel=2,
            )
        if dark_has_bias and fb is None and abs(s - 1.0) > 1e-12:
            raise ValueError(
                f"the dark contains the bias (dark_has_bias=True) and must be scaled by {s:g}, which needs a bias "
                "frame: pass bias=, or dark_has_bias=False for a bias-subtracted dark, or dark_scale=1"
            )
    b = 0.0
    if fb:
        b = (1.0 - s) if (fd and dark_has_bias) else 1.0
    elif fd and dark_has_bias:
        b = 0.0  # the (unscaled) dark carries the bias

    # flat coefficients
    bf = sf = 0.0
    if ff and flat_has_bias:
        if fb is None:
            warnings.warn(
                "flat used as given: flat_has_bias=True but no bias frame to remove from it; pass bias=, or "
                "flat_has_bias=False for a master flat that is already bias-corrected",
                FallbackWarning,
                stacklevel=2,
            )
        else:
            t_flat = exposure_time(ff[0])
            if fd and t_flat is not None and t_dark:
                sf = t_flat / t_dark
            elif fd:
                log.info("dark current not removed from the flat: flat or dark exposure time unknown")
            bf = (1.0 - sf) if (fd and dark_has_bias) else 1.0

    # ------------------------------------------------------------ the graph
    R = arr(rds, "image")
    VR = arr(rds, "variance")
    mask = rds["mask"].data
    num = R
    zero = 0.0
    VB = VD = zero
    DC = None  # dark current frame: dark - bias for a dark that contains the bias
    if fb:
        B = arr(fb[0], "image")
        mask = mask | arr(fb[0], "mask")
        VB = arr(fb[0], "variance") if fb[1] else zero
        num = num - B
    if fd:
        D = arr(fd[0], "image")
        mask = mask | arr(fd[0], "mask")
        VD = arr(fd[0], "variance") if fd[1] else zero
        DC = D - B if (fb and dark_has_bias) else D
        num = num - s * DC
        if hot_pixel_sigma is not None:
            dgood = ~arr(fd[0], "mask") & da.isfinite(DC)
            if fb and dark_has_bias:
                dgood = dgood & ~arr(fb[0], "mask")
            med = _lazy_median(DC, dgood)
            mad = _lazy_median(abs(DC - med), dgood)
            sig = 1.4826 * mad
            hot = (sig > 0) & ((DC - med) > hot_pixel_sigma * sig)
            mask = mask | hot
    Vnum = VR + (b * b) * VB + (s * s) * VD
    params: dict[str, Any] = {
        "bias": _describe(bias) if bias is not None else None,
        "dark": _describe(dark) if dark is not None else None,
        "flat": _describe(flat) if flat is not None else None,
        "dark_scale": s if fd else None,
        "dark_scale_source": s_note or None,
        "dark_has_bias": bool(dark_has_bias),
        "flat_has_bias": bool(flat_has_bias),
        "flat_norm": flat_norm if ff else None,
        "saturation": float(saturation) if saturation is not None else None,
        "hot_pixel_sigma": hot_pixel_sigma if fd else None,
        "calib_variance": bool(calib_variance),
    }
    if ff:
        F = arr(ff[0], "image")
        Fc = F
        if bf:
            Fc = Fc - B
        if sf:
            Fc = Fc - sf * DC
        VF = arr(ff[0], "variance") if ff[1] else zero
        VFc = VF + (bf * bf) * VB + (sf * sf) * VD
        C = (b * bf) * VB + (s * sf) * VD
        fbad = arr(ff[0], "mask") | ~da.isfinite(Fc) | (Fc <= 0)
        if bf and fb:
            fbad = fbad | arr(fb[0], "mask")
        if sf and fd:
            fbad = fbad | arr(fd[0], "mask")
        norm = flat_normalization(Fc, ~fbad, flat_norm)
        Fcs = da.where(fbad, np.nan, Fc)  # NaN where unusable: no 0-divisions, result masked
        Fn = Fcs / norm
        out = num / Fn
        Vout = Vnum / Fn**2
        if ff[1]:
            Vout = Vout + out**2 * VFc / Fcs**2 - 2.0 * out * C / (Fn * Fcs)
        mask = mask | fbad
        params["flat_coefficients"] = {"bias": bf, "dark": sf}
    else:
        out = num
        Vout = Vnum
    if not isinstance(Vout, da.Array):  # pragma: no cover - raw variance is always an array
        Vout = da.full(shape, Vout, chunks=rchunks)
    mask = mask | ~da.isfinite(out)
    fill = np.float32(fill_value)
    image = da.where(da.isfinite(out), out, fill).astype(np.float32)
    variance = da.where(da.isfinite(Vout), Vout, fill).astype(np.float32)
    params["coefficients"] = {"bias": b, "dark": s if fd else 0.0}

    # --------------------------------------------------------------- header
    cards = [list(c) for c in rds.attrs.get("header", []) if c[0] not in _SAT_KEYS]
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    from . import __version__

    cards.append(["HISTORY", f"tilepipe {__version__} calibrate {now}", ""])
    if fb:
        cards.append(["CALBIAS", params["bias"][:68], "bias frame subtracted"])
        cards.append(["HISTORY", f"bias {params['bias']} subtracted (coefficient {b:.6g})", ""])
    if fd:
        cards.append(["CALDARK", params["dark"][:68], "dark frame subtracted"])
        cards.append(["DARKSCAL", float(s), "dark scale (" + (s_note or "")[:40] + ")"])
        cards.append(["HISTORY", f"dark {params['dark']} x {s:.6g} subtracted ({s_note})", ""])
        if hot_pixel_sigma is not None:
            cards.append(["HISTORY", f"dark-current outliers > {hot_pixel_sigma:g} sigma (MAD) masked", ""])
    if ff:
        cards.append(["CALFLAT", params["flat"][:68], "flat frame divided"])
        cards.append(["FLATNORM", flat_norm, "flat normalised to this statistic of good px"])
        cards.append(["HISTORY", f"flat {params['flat']} (bias x{bf:.6g}, dark x{sf:.6g} removed) "
                                 f"normalised to its {flat_norm}, divided", ""])
    attrs = rds.attrs
    result = make_dataset(image, mask=mask, variance=variance, header=cards, gain=attrs.get("gain"),
                          saturation=None, fwhm=attrs.get("fwhm"), bunit=attrs.get("bunit"))
    result.attrs.pop("saturation", None)
    prev = attrs.get("parameters")
    merged = dict(prev) if isinstance(prev, dict) else {}
    merged["calibrate"] = params
    result.attrs["parameters"] = merged
    log.debug("calibrate: %s", params)
    return result
