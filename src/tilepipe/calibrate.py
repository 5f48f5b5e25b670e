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
from typing import Any, NamedTuple

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
def _p1(v: np.ndarray) -> tuple[int, float, float]:
    sel = v[np.isfinite(v)]
    if sel.size == 0:
        return 0, np.inf, -np.inf
    return int(sel.size), float(sel.min()), float(sel.max())


def _r1(parts: list, what: str) -> tuple[int, float, float]:
    n = sum(p[0] for p in parts)
    if n == 0:
        raise ValueError(
            f"the {what} has no good pixels (all masked, non-finite, or <= 0 after bias/dark correction); "
            f"check the {what} frame and the frames subtracted from it"
        )
    return n, min(p[1] for p in parts), max(p[2] for p in parts)


def _bin(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(v.shape, dtype=np.int64)
    idx = np.floor((v - lo) * (_NBINS / (hi - lo))).astype(np.int64)
    return np.clip(idx, 0, _NBINS - 1)


def _p2(v: np.ndarray, r1: tuple) -> np.ndarray:
    return np.bincount(_bin(v[np.isfinite(v)], r1[1], r1[2]), minlength=_NBINS)


def _r2(hists: list, r1: tuple) -> tuple[int, int, int, int, int]:
    n = r1[0]
    cum = np.cumsum(np.sum(hists, axis=0))
    k1, k2 = (n - 1) // 2, n // 2  # the two middle order statistics (0-based)
    b1 = int(np.searchsorted(cum, k1, side="right"))
    b2 = int(np.searchsorted(cum, k2, side="right"))
    before = int(cum[b1 - 1]) if b1 > 0 else 0
    return b1, b2, before, k1, k2


def _p3(v: np.ndarray, r1: tuple, r2: tuple) -> np.ndarray:
    sel = v[np.isfinite(v)]
    b = _bin(sel, r1[1], r1[2])
    return sel[(b >= r2[0]) & (b <= r2[1])]


def _r3(parts: list, r2: tuple) -> float:
    vals = np.sort(np.concatenate(parts))
    _, _, before, k1, k2 = r2
    return float(0.5 * (vals[k1 - before] + vals[k2 - before]))


def _lazy_median(values: da.Array, what: str = "flat") -> da.Array:
    """Exact median of the finite values of ``values`` as a lazy 0-d dask array (= ``numpy.median``).

    Three passes over the blocks (count/min/max, a 65536-bin histogram, then
    the values in the bin(s) holding the middle order statistics), each a
    per-block task followed by a tiny reduction: no task holds the whole image,
    and the result does not depend on the chunking.  Bad pixels are NaN.
    """
    vb = values.to_delayed().ravel()
    r1 = dask.delayed(_r1)([dask.delayed(_p1)(v) for v in vb], what)
    r2 = dask.delayed(_r2)([dask.delayed(_p2)(v, r1) for v in vb], r1)
    r3 = dask.delayed(_r3)([dask.delayed(_p3)(v, r1, r2) for v in vb], r2)
    return da.from_delayed(r3, shape=(), dtype=np.float64)


def _check_max(m: float) -> float:
    if not np.isfinite(m) or m <= 0:
        raise ValueError(
            "the flat has no good pixels (all masked, non-finite, or <= 0 after bias/dark correction); "
            "check the flat frame and the frames subtracted from it"
        )
    return float(m)


def flat_normalization(flat: da.Array, good: da.Array | None = None, method: str = "median") -> da.Array:
    """Lazy global normalisation of a flat: the exact median (or max) of its good pixels.

    Parameters
    ----------
    flat : dask.array.Array
        The (bias/dark corrected) flat, ``[y, x]``; NaN pixels are bad.
    good : dask.array.Array of bool, optional
        True where the flat pixel may be used (finite, > 0, not masked).
    method : {"median", "max"}

    Returns
    -------
    dask.array.Array
        A 0-d float64 dask array; computing it raises ``ValueError`` when no
        pixel is good.
    """
    check_choice("flat_norm", method, ("median", "max"))
    flat = da.asarray(flat).astype(np.float64)
    if good is not None:
        flat = da.where(da.asarray(good).rechunk(flat.chunks), flat, np.nan)
    if method == "median":
        return _lazy_median(flat, what="flat")
    m = da.nanmax(da.where(da.isfinite(flat), flat, -np.inf))
    return da.from_delayed(dask.delayed(_check_max)(m), shape=(), dtype=np.float64)


# ------------------------------------------------------------- tile kernels
class _Spec(NamedTuple):
    """Coefficients and switches of one calibration (module docstring)."""

    has_b: bool
    has_d: bool
    has_f: bool
    dc_minus_b: bool  # dark current = dark - bias
    s: float  # dark scale
    b: float  # coefficient of the bias in num (for the variance)
    flat_b: bool  # subtract the bias from the flat (even when its net coefficient bf is 0: t_flat == t_dark)
    sf: float  # dark scale for the flat
    bf: float  # coefficient of the bias in Fc (for the variance)
    var_b: bool
    var_d: bool
    var_f: bool
    hot_k: float | None
    fill: float


def _dark_current(D: np.ndarray, B: np.ndarray | None, spec: _Spec) -> np.ndarray:
    D = D.astype(np.float64)
    return D - B if spec.dc_minus_b else D


def _dc_block(D, MD, B, MB, *, spec: _Spec) -> np.ndarray:
    """Dark current, NaN where unusable (for its median/MAD)."""
    B = B.astype(np.float64) if B is not None else None
    dc = _dark_current(D, B, spec)
    bad = MD | ~np.isfinite(dc)
    if spec.dc_minus_b:
        bad |= MB
    return np.where(bad, np.nan, dc)


def _absdev(dc: np.ndarray, med: Any) -> np.ndarray:
    return np.abs(dc - float(med))


def _flat_fc(F, B, D, spec: _Spec) -> np.ndarray:
    Fc = F.astype(np.float64)
    if spec.flat_b:
        Fc = Fc - B
    if spec.sf:
        Fc = Fc - spec.sf * _dark_current(D, B, spec)
    return Fc


def _flat_bad(Fc, MF, MB, MD, spec: _Spec) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        bad = MF | ~np.isfinite(Fc) | ~(Fc > 0)
    if spec.flat_b:
        bad |= MB
    if spec.sf:
        bad |= MD
    return bad


def _flat_block(F, MF, B, MB, D, MD, *, spec: _Spec) -> np.ndarray:
    """Corrected flat, NaN where unusable (for its normalisation)."""
    B = B.astype(np.float64) if B is not None else None
    Fc = _flat_fc(F, B, D, spec)
    return np.where(_flat_bad(Fc, MF, MB, MD, spec), np.nan, Fc)


def _calib_block(*args: Any, present: tuple[bool, ...], spec: _Spec) -> np.ndarray:
    """One tile: ``[image, variance, mask]`` stacked as float32 (formulas in the module docstring)."""
    it = iter(args)
    R, VR, MR, B, VB, MB, D, VD, MD, F, VF, MF = (next(it) if p else None for p in present)
    norm, med, mad = (float(v) for v in it)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        Bf = B.astype(np.float64) if B is not None else None
        num = R.astype(np.float64)
        mask = MR.copy()
        if spec.has_b:
            num -= Bf
            mask |= MB
        if spec.has_d:
            dc = _dark_current(D, Bf, spec)
            num -= spec.s * dc
            mask |= MD
            if spec.hot_k is not None and mad > 0:
                mask |= (dc - med) > spec.hot_k * 1.4826 * mad
        vnum = VR.astype(np.float64)
        if spec.var_b:
            vnum = vnum + spec.b**2 * VB
        if spec.var_d:
            vnum = vnum + spec.s**2 * VD
        if spec.has_f:
            Fc = _flat_fc(F, Bf, D, spec)
            fbad = _flat_bad(Fc, MF, MB, MD, spec)
            Fc[fbad] = np.nan
            Fn = Fc / norm
            out = num / Fn
            vout = vnum / Fn**2
            if spec.var_b or spec.var_d or spec.var_f:
                vfc = np.zeros_like(Fc)
                if spec.var_f:
                    vfc = vfc + VF
                if spec.var_b:
                    vfc = vfc + spec.bf**2 * VB
                if spec.var_d:
                    vfc = vfc + spec.sf**2 * VD
                c = (spec.b * spec.bf * VB if spec.var_b else 0.0) + (spec.s * spec.sf * VD if spec.var_d else 0.0)
                vout = vout + out**2 * vfc / Fc**2 - 2.0 * out * c / (Fn * Fc)
            mask |= fbad
        else:
            out, vout = num, vnum
        mask |= ~np.isfinite(out)
        res = np.empty((3,) + out.shape, dtype=np.float32)
        res[0] = np.where(np.isfinite(out), out, spec.fill)
        res[1] = np.where(np.isfinite(vout), vout, spec.fill)
        res[2] = mask
    return res


# ------------------------------------------------------------------ public
def calibrate(
    raw: Any,
    bias: Any = None,
    dark: Any = None,
    flat: Any = None,
    *,
    dark_scale: float | None = None,
    flat_norm: str | float = "median",
    dark_has_bias: bool = True,
    flat_has_bias: bool = True,
    saturation: float | None = None,
    hot_pixel_sigma: float | None = None,
    calib_variance: bool = False,
    fill_value: float = np.nan,
    chunks: Any = None,
    storage_options: dict[str, Any] | None = None,
    return_norm: bool = False,
) -> xr.Dataset | tuple[xr.Dataset, da.Array | float | None]:
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
    flat_norm : {"median", "max"} or float
        Normalise the flat by the median (default) or the maximum of its good
        pixels (finite, > 0, unmasked in the flat and in the frames subtracted
        from it), or by this number (ADU of the corrected flat).  The
        statistic is a lazy global scalar; a writer that computes a big image
        band by band recomputes it per band, so for big images compute it once
        (``return_norm=True``) and pass the number.
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
    return_norm : bool
        Also return the flat normalisation (a lazy 0-d dask array, a float
        when given, None without a flat): ``ds, norm = calibrate(...)``.

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
    if isinstance(flat_norm, str):
        check_choice("flat_norm", flat_norm, ("median", "max"))
    else:
        flat_norm = check_positive("flat_norm", flat_norm)
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
        return a.rechunk(rchunks) if a.chunks != rchunks else a

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
    # One task per tile computes image, variance and mask together (_calib_block);
    # the global scalars (flat norm, dark median/MAD) enter as 0-d dask arrays.
    spec = _Spec(
        has_b=fb is not None, has_d=fd is not None, has_f=ff is not None, dc_minus_b=bool(fb and fd and dark_has_bias),
        s=s, b=b, flat_b=bool(ff and flat_has_bias and fb is not None), sf=sf, bf=bf, var_b=bool(fb and fb[1]),
        var_d=bool(fd and fd[1]), var_f=bool(ff and ff[1]), hot_k=hot_pixel_sigma if fd else None, fill=float(fill_value),
    )
    blocks: list[Any] = [arr(rds, "image"), arr(rds, "variance"), rds["mask"].data]
    for f in (fb, fd, ff):
        if f is None:
            blocks += [None, None, None]
        else:
            blocks += [arr(f[0], "image"), arr(f[0], "variance") if f[1] else None, arr(f[0], "mask")]
    raw_b, dark_b, flat_b = blocks[3:6], blocks[6:9], blocks[9:12]
    med = mad = None
    if spec.hot_k is not None:
        dc = da.map_blocks(_dc_block, dark_b[0], dark_b[2], raw_b[0], raw_b[2], spec=spec, dtype=np.float64,
                           meta=np.empty((0, 0), np.float64))
        med = _lazy_median(dc, what="dark")
        mad = _lazy_median(da.map_blocks(_absdev, dc, med, dtype=np.float64, meta=np.empty((0, 0), np.float64)),
                           what="dark")
    norm: Any = None
    if ff:
        if isinstance(flat_norm, str):
            fc = da.map_blocks(_flat_block, flat_b[0], flat_b[2], raw_b[0], raw_b[2], dark_b[0], dark_b[2],
                               spec=spec, dtype=np.float64, meta=np.empty((0, 0), np.float64))
            norm = flat_normalization(fc, method=flat_norm)
        else:
            norm = float(flat_norm)
    args = [b_ for b_ in blocks]
    stacked = da.map_blocks(
        _calib_block, *[a for a in args if a is not None], norm if norm is not None else 1.0,
        med if med is not None else 0.0, mad if mad is not None else 0.0,
        present=tuple(a is not None for a in args), spec=spec,
        new_axis=0, chunks=((3,),) + rchunks, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32),
    )
    image, variance, mask = stacked[0], stacked[1], stacked[2] != 0
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
        "coefficients": {"bias": b, "dark": s if fd else 0.0},
    }
    if ff:
        params["flat_coefficients"] = {"bias": bf, "dark": sf}

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
        if isinstance(flat_norm, str):
            cards.append(["FLATNORM", flat_norm, "flat normalised to this statistic of good px"])
        else:
            cards.append(["FLATNORM", float(flat_norm), "[ADU] flat normalised by this value"])
        cards.append(["HISTORY", f"flat {params['flat']} (bias x{bf:.6g}, dark x{sf:.6g} removed) "
                                 f"normalised to {flat_norm if isinstance(flat_norm, str) else repr(flat_norm)}, "
                                 "divided", ""])
    attrs = rds.attrs
    result = make_dataset(image, mask=mask, variance=variance, header=cards, gain=attrs.get("gain"),
                          saturation=None, fwhm=attrs.get("fwhm"), bunit=attrs.get("bunit"))
    result.attrs.pop("saturation", None)
    prev = attrs.get("parameters")
    merged = dict(prev) if isinstance(prev, dict) else {}
    merged["calibrate"] = params
    result.attrs["parameters"] = merged
    log.debug("calibrate: %s", params)
    if return_norm:
        return result, (norm if ff else None)
    return result
