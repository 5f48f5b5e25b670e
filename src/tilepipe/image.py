"""The image Dataset: the one object that flows through tilepipe.

An image is an :class:`xarray.Dataset` on dims ``("y", "x")`` with

============  =======  ======================================================
variable      dtype    meaning
============  =======  ======================================================
``image``     float32  pixel values (ADU or e-, ``attrs["bunit"]``)
``mask``      bool     True = bad pixel (NaN/inf input, saturated, user mask)
``variance``  float32  per-pixel variance in image units squared
============  =======  ======================================================

and ``attrs``: ``header`` (ordered ``[keyword, value, comment]`` cards),
``gain`` (e-/ADU), ``saturation`` (image units), ``fwhm`` (pixels) when known,
``bunit``.  Variables are dask arrays: nothing is read until computed.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Any, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr
from astropy.io import fits

log = logging.getLogger(__name__)

__all__ = [
    "open_image",
    "as_dataset",
    "make_dataset",
    "wcs",
    "header_to_cards",
    "cards_to_header",
    "default_variance",
    "DEFAULT_CHUNK",
]

#: chunk edge (pixels) used when a caller gives no ``chunks``
DEFAULT_CHUNK = 2048

_GAIN_KEYS = ("GAIN", "EGAIN", "CCDGAIN", "GAINEFF")
_SAT_KEYS = ("SATURATE", "SATURATION", "SATLEVEL", "MAXLIN")
_FWHM_KEYS = ("FWHM", "SEEING_PIX", "PSF_FWHM")


# --------------------------------------------------------------------- header
def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (int, float, str)) or value is None:
        if isinstance(value, float) and not np.isfinite(value):
            return str(value)
        return value
    if isinstance(value, fits.card.Undefined):
        return None
    return str(value)


def header_to_cards(header: fits.Header | Sequence | None) -> list[list[Any]]:
    """Turn a FITS header into an ordered list of ``[keyword, value, comment]`` cards.

    The list survives JSON (Zarr attrs) and keeps ``HISTORY``/``COMMENT`` cards
    and their order, unlike a plain dict.  Structural keywords (``SIMPLE``,
    ``BITPIX``, ``NAXIS*``, ``EXTEND``, ``BZERO``, ``BSCALE``, ``XTENSION``,
    ``PCOUNT``, ``GCOUNT``, ``Z*`` tile-compression keywords) are dropped: they
    describe the file, not the image.
    """
    if header is None:
        return []
    if isinstance(header, list):
        return [list(c) for c in header]
    skip = {"SIMPLE", "BITPIX", "EXTEND", "BZERO", "BSCALE", "XTENSION", "PCOUNT", "GCOUNT", "CHECKSUM", "DATASUM", "END", ""}
    cards = []
    for card in header.cards:
        key = card.keyword
        if key in skip or key.startswith("NAXIS") or key in ("ZIMAGE", "ZBITPIX", "ZCMPTYPE", "ZQUANTIZ", "ZDITHER0"):
            continue
        if key.startswith("ZNAXIS") or key.startswith("ZTILE") or key.startswith("ZNAME") or key.startswith("ZVAL"):
            continue
        value = card.value
        if key in ("HISTORY", "COMMENT"):
            value = str(value)
        cards.append([key, _jsonable(value), str(card.comment or "")])
    return cards


#: a standard FITS keyword (astropy creates a HIERARCH card, with a warning, for anything else)
_FITS_KEYWORD = re.compile(r"^[A-Z0-9_-]{0,8}$")


def _fitted_comment(key: str, value: Any, comment: str) -> str:
    """``comment`` cut to what fits on the card: what astropy writes, without its VerifyWarning.

    astropy truncates a too-long comment only when it formats the card (on
    writing) and says so with a ``VerifyWarning`` ("Card is too long, comment
    will be truncated"); cutting it here gives the same 80 bytes and no warning.
    """
    bare = fits.Card(key, value).image  # without a comment a card always fits (or uses CONTINUE)
    if len(bare) > 80:
        return comment  # long string value: astropy writes the comment on the CONTINUE cards
    if len(bare.rstrip()) + 5 > 80:
        return ""  # no room for " / " and one character
    # length of "KEY     = value" including the value's padding: measure with a 1-character comment
    kv = len(fits.Card(key, value, "x").image.rstrip()) - 4
    room = 80 - kv - 3
    return comment if len(comment) <= room else (comment[:room] if room > 0 else "")


def cards_to_header(cards: Sequence[Sequence[Any]] | fits.Header | None, *, fit: bool = False) -> fits.Header:
    """Rebuild an :class:`astropy.io.fits.Header` from ``[keyword, value, comment]`` cards.

    Builds no card astropy warns about: non-standard keywords (longer than 8
    characters, with a space, or with characters outside ``A-Z 0-9 _ -`` and
    no ``.``) become explicit ``HIERARCH`` cards.  With ``fit=True`` comments too long for their card
    are cut as astropy cuts them when writing, so that writing the header
    raises no ``VerifyWarning`` either (same bytes).  Used by the writers:
    warnings must not be silenced with ``warnings.catch_warnings``, which is
    not thread-safe.
    """
    if isinstance(cards, fits.Header):
        if not fit:
            return cards.copy()
        cards = [[c.keyword, c.value, c.comment] for c in cards.cards]
    hdr = fits.Header()
    for card in cards or []:
        key, value, comment = (list(card) + [None, None, ""])[:3]
        if key in ("HISTORY", "COMMENT"):
            # bottom=True keeps interleaved HISTORY/COMMENT cards in their original order
            hdr.append(fits.Card(key, "" if value is None else str(value)), bottom=True)
        else:
            ukey = str(key).upper()
            # dotted keys may be record-valued cards ("DP1.AXIS.1"), which astropy does not make HIERARCH
            nonstandard = len(ukey) > 8 or " " in ukey or (not _FITS_KEYWORD.match(ukey) and "." not in ukey)
            if nonstandard and not ukey.startswith("HIERARCH "):
                key = f"HIERARCH {key}"  # explicit, so astropy does not warn
            comment = comment or ""
            if fit and comment:
                comment = _fitted_comment(key, value, comment)
            hdr.append(fits.Card(key, value, comment), end=True)
    return hdr


def wcs(ds: xr.Dataset | fits.Header | Sequence) -> Any:
    """Return the celestial :class:`astropy.wcs.WCS` of an image Dataset.

    Raises
    ------
    ValueError
        If the header holds no celestial WCS (say so, and how to add one).
    """
    if isinstance(ds, xr.Dataset):
        cards = ds.attrs.get("header", [])
    else:
        cards = ds
    from astropy.wcs import WCS, FITSFixedWarning

    hdr = cards_to_header(cards)
    # main thread only: every caller builds WCSs on the client, before or after a computation
    # (a warnings filter is process-global and not thread-safe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        w = WCS(hdr, naxis=2, relax=True)
    if not w.has_celestial:
        raise ValueError(
            "the image has no celestial WCS (no CTYPE1/CTYPE2 sky axes in its header); "
            "solve the astrometry first (e.g. astrometry.net) or pass pixel coordinates"
        )
    return w.celestial


def pixel_to_radec(w: Any, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """ICRS right ascension and declination (degrees) of 0-based pixel positions.

    Through astropy's high-level API (:meth:`~astropy.wcs.WCS.pixel_to_world`),
    so the header's axis order (``CTYPE1 = DEC--TAN`` first is legal) and
    frame (FK5, galactic...) are honoured and the result is ICRS, not the
    raw world values of the header's axes.
    """
    sky = w.pixel_to_world(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)).icrs
    return np.asarray(sky.ra.deg, dtype=np.float64), np.asarray(sky.dec.deg, dtype=np.float64)


def radec_to_pixel(w: Any, ra: Any, dec: Any) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel positions of ICRS ``ra, dec`` (degrees); the inverse of :func:`pixel_to_radec`."""
    from astropy.coordinates import SkyCoord

    sky = SkyCoord(np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64), unit="deg", frame="icrs")
    px, py = w.world_to_pixel(sky)
    return np.asarray(px, dtype=np.float64), np.asarray(py, dtype=np.float64)


def has_wcs(ds: xr.Dataset) -> bool:
    """True when :func:`wcs` would succeed."""
    try:
        wcs(ds)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------- variance
def _median_sorted(s: np.ndarray) -> float:
    """``np.median`` of an ascending array, without a partition."""
    n = s.size
    return float(s[(n - 1) // 2]) if n % 2 else float((s[n // 2 - 1] + s[n // 2]) / 2)


def _kth_of_two(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """The ``k``-th smallest value (0-based) of the union of two ascending arrays, by bisection.

    O(log n) comparisons, no merge: the answer is the larger of ``a[i-1]``
    and ``b[k-i]`` for the smallest ``i`` with ``a[i] >= b[k-i]``.
    """
    na, nb = a.size, b.size
    lo, hi = max(0, k + 1 - nb), min(na, k + 1)
    while lo < hi:
        i = (lo + hi) // 2
        if a[i] < b[k - i]:  # k - i = (k + 1 - i) - 1 is a valid index of b for lo <= i < hi
            lo = i + 1
        else:
            hi = i
    j = k + 1 - lo
    return float(max(a[lo - 1] if lo > 0 else -np.inf, b[j - 1] if j > 0 else -np.inf))


def _median_of_two(a: np.ndarray, b: np.ndarray) -> float:
    """:func:`_median_sorted` of the merge of two ascending arrays (the same value, without merging)."""
    n = a.size + b.size
    if n % 2:
        return _kth_of_two(a, b, (n - 1) // 2)
    return float((_kth_of_two(a, b, n // 2 - 1) + _kth_of_two(a, b, n // 2)) / 2)


def _robust_sky(sample: np.ndarray) -> np.ndarray:
    """Sigma-clipped median and std (MAD based) of a pixel sample: ``[sky, sigma]``.

    Up to five rounds of clipping at 3 sigma around the median, then the
    median and ``1.4826 * MAD`` of the kept values.  The sample is sorted
    once: every kept set is then a contiguous slice, and the absolute
    deviations from the median are two ascending runs (below and above it)
    whose median is found by bisection (no partition or sort per round).
    """
    v = np.asarray(sample, dtype=np.float64).ravel()
    v = np.sort(v[np.isfinite(v)])

    def median_mad(s: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray, int]:
        med = _median_sorted(s)
        m = int(np.searchsorted(s, med, side="left"))
        below = np.abs(s[:m] - med)[::-1]  # ascending deviations of the values below the median
        above = np.abs(s[m:] - med)
        return med, 1.4826 * _median_of_two(below, above), below, above, m

    if v.size == 0:
        return np.array([0.0, 1.0])
    for _ in range(5):
        med, sig, below, above, m = median_mad(v)
        if sig <= 0:
            break
        # |v - med| < 3 sig keeps a contiguous slice around the median
        nlo = int(np.searchsorted(below, 3 * sig, side="left"))
        nhi = int(np.searchsorted(above, 3 * sig, side="left"))
        if nlo + nhi == v.size:
            break
        v = v[m - nlo:m + nhi]
        if v.size == 0:
            return np.array([0.0, 1.0])
    med, sig, _, _, _ = median_mad(v)
    if not np.isfinite(sig) or sig <= 0:
        sig = float(np.std(v)) or 1.0
    return np.array([med, sig])


def _sky_and_noise(sample: np.ndarray, stride: int) -> np.ndarray:
    """``[sky, sigma]`` of a 2-D strided sample: the sky a clipped median, the noise from differences.

    ``sigma`` is the clipped MAD-based std (:func:`_robust_sky`) of the
    differences between sample pixels at least 4 image pixels apart along x,
    divided by √2: a smooth sky gradient adds almost nothing to a difference (a
    global MAD of the values would count the gradient as noise: a ±10 % ramp
    on a 200 ADU sky more than doubles the variance), and 4 px apart the noise
    of resampled images is nearly independent.  Falls back to the MAD of the
    values when the sample is too narrow for differences.
    """
    a = np.asarray(sample, dtype=np.float64)
    out = _robust_sky(a)
    k = max(1, int(np.ceil(4 / max(int(stride), 1))))
    if a.ndim == 2 and a.shape[1] > k:
        d = (a[:, k:] - a[:, :-k]).ravel()
        if np.isfinite(d).sum() >= 100:
            out[1] = _robust_sky(d)[1] / np.sqrt(2.0)
    return out


def _variance_block(img: np.ndarray, stats: np.ndarray, gain: float | None) -> np.ndarray:
    sky, sig = float(stats[0]), float(stats[1])
    var = np.full(img.shape, sig * sig, dtype=np.float32)
    if gain:
        src = np.clip(np.nan_to_num(img.astype(np.float32) - sky, nan=0.0, posinf=0.0, neginf=0.0), 0, None)
        var += src / np.float32(gain)
    return var


def default_variance(image: da.Array, gain: float | None = None, max_sample: int = 250_000) -> da.Array:
    """Lazy per-pixel variance: robust sky variance plus source Poisson noise.

    ``variance = sigma_sky**2 + max(image - sky, 0) / gain`` (image units
    squared; the second term only when ``gain`` in e-/ADU is known).  ``sky`` and
    ``sigma_sky`` are one global sigma-clipped median, and a MAD-based std of
    the differences of sample pixels at least 4 px apart (÷ √2, so a sky
    gradient is not counted as noise), from a strided sample of at most
    ``max_sample`` pixels: the map does not depend on tiling (250,000 pixels
    fix ``sigma_sky`` to well under 1 %, far below what matters for a
    variance).  :func:`tilepipe.estimate_background` gives a spatially varying
    ``rms`` when the sky noise varies across the field.
    """
    return _default_variance(image, gain, max_sample)[0]


def _default_variance(image: da.Array, gain: float | None = None, max_sample: int = 250_000,
                      region: Any = None) -> tuple[da.Array, da.Array]:
    """:func:`default_variance` and its ``(sky, sigma_sky)`` statistics (a lazy 2-vector).

    With the image's ``region`` (:class:`tilepipe.tiling.Region`), one task
    reads the strided sample straight from the file (only the sampled rows)
    instead of reading every chunk whole and striding it: the same pixels.
    """
    h, w = image.shape
    stride = max(1, int(np.ceil(np.sqrt(h * w / max_sample))))
    if region is not None:
        sample = dask.delayed(_sample_region)(region, stride, (h, w))
    else:
        sample = image[::stride, ::stride]
    stats = da.from_delayed(dask.delayed(_sky_and_noise)(sample, stride), shape=(2,), dtype=np.float64)
    var = image.map_blocks(_variance_block, stats, gain, dtype=np.float32, meta=np.empty((0, 0), np.float32))
    return var, stats


def _sample_region(region: Any, stride: int, shape: tuple[int, int]) -> np.ndarray:
    from .tiling import evaluate_regions

    return evaluate_regions([region], slice(0, shape[0], stride), slice(0, shape[1], stride))[0]


# Regions (tilepipe.tiling.Region) of the Dataset's arrays: the same per-pixel arithmetic as the chunk
# graphs of make_dataset, on any rectangle, for tile tasks that read their own halo from the file.
def _float32_region(ys: slice, xs: slice, *, a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _bad_region(ys: slice, xs: slice, *, img: np.ndarray, saturation: float | None,
                mask: np.ndarray | None = None) -> np.ndarray:
    bad = ~np.isfinite(img)
    if saturation is not None:
        bad |= img >= np.float32(saturation)
    if mask is not None:
        bad |= mask.astype(bool)
    return bad


def _variance_region(ys: slice, xs: slice, *, img: np.ndarray, stats: np.ndarray, gain: float | None) -> np.ndarray:
    return _variance_block(img, stats, gain)


# -------------------------------------------------------------------- dataset
def _header_value(cards: Sequence[Sequence[Any]], keys: Sequence[str]) -> Any:
    for key in keys:
        for c in cards:
            if c[0] == key and isinstance(c[1], (int, float)) and not isinstance(c[1], bool):
                return float(c[1])
    return None


def _to_dask(arr: Any, chunks: Any, name: str, shape: tuple[int, ...] | None = None) -> da.Array:
    """``arr`` as a 2-D dask array with ``chunks``; its dimensions and ``shape`` (that of the image, when
    given) are checked first, so a wrong shape gets a clear message rather than a chunking error."""
    if isinstance(arr, xr.DataArray):
        arr = arr.data
    a = arr if isinstance(arr, da.Array) else np.asarray(arr)
    if a.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (y, x); got shape {a.shape}. "
            "Select one plane (e.g. data[0]) or one FITS extension with hdu=."
        )
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)} but image has shape {tuple(shape)}; they must match")
    if isinstance(a, da.Array):
        d = a
    else:
        d = da.from_array(a, chunks=chunks if chunks is not None else DEFAULT_CHUNK)
    if chunks is not None:
        d = d.rechunk(chunks)
    return d


def _split_masked(arr: Any) -> tuple[Any, Any]:
    """``(values, mask or None)`` of a :class:`numpy.ma.MaskedArray` (or a dask array of them).

    ``np.asarray`` would silently drop the mask; the caller ORs it into the
    Dataset's ``mask`` (True = bad).  Other inputs come back unchanged with
    ``None``.
    """
    if isinstance(arr, xr.DataArray):
        arr = arr.data
    if isinstance(arr, np.ma.MaskedArray):
        m = np.ma.getmaskarray(arr)
        return np.ma.getdata(arr), (m if m.any() else None)
    if isinstance(arr, da.Array) and isinstance(getattr(arr, "_meta", None), np.ma.MaskedArray):
        return da.ma.getdata(arr), da.ma.getmaskarray(arr)
    return arr, None


def _native_float32(block: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(block, dtype=np.float32)


def _register_regions(r_img: Any, mask: Any, variance: Any, img: da.Array, bad: da.Array, var: da.Array,
                      stats: da.Array | None, gain: float | None, saturation: float | None) -> None:
    """Register regions for ``img, bad, var`` when their inputs can be read by rectangle (FITS files)."""
    from .tiling import Region, region_of, register_region

    if r_img is None:
        return
    register_region(img, r_img)
    r_mask = region_of(mask) if mask is not None else None
    if mask is None or r_mask is not None:
        register_region(bad, Region(_bad_region, {"img": r_img, "saturation": saturation, "mask": r_mask}))
    if variance is None and stats is not None:
        register_region(var, Region(_variance_region, {"img": r_img, "stats": stats, "gain": gain}))
    elif variance is not None and region_of(variance) is not None:
        register_region(var, Region(_float32_region, {"a": region_of(variance)}))


def make_dataset(
    image: Any,
    *,
    mask: Any = None,
    variance: Any = None,
    header: Any = None,
    gain: float | None = None,
    saturation: float | None = None,
    fwhm: float | None = None,
    bunit: str | None = None,
    chunks: Any = None,
    extra: dict[str, Any] | None = None,
) -> xr.Dataset:
    """Build the image Dataset of DESIGN.md section 1 from arrays (lazily).

    Parameters
    ----------
    image : array-like (2-D)
        Pixel values; converted to native-endian float32.  A
        :class:`numpy.ma.MaskedArray` (or a dask array of them) keeps its
        mask: its masked pixels are bad (``mask`` True) and left out of the
        default variance's sky statistics; their stored values are kept in
        ``image``.
    mask : array-like of bool, optional
        True = bad.  OR-ed with non-finite pixels, pixels >= ``saturation``
        and the masks of masked-array ``image``/``variance`` (masked entries
        of a masked-array ``mask`` count as bad).
    variance : array-like, optional
        Per-pixel variance (image units squared).  Default: :func:`default_variance`.
        The masked pixels of a masked array are bad (``mask`` True).
    header : astropy Header or list of cards, optional
    gain, saturation, fwhm : float, optional
        e-/ADU, image units, pixels.  Taken from the header (``GAIN``,
        ``SATURATE``, ``FWHM``...) when not given.
    bunit : str, optional
        Pixel unit (``BUNIT`` from the header by default, else ``"adu"``).
    chunks : int or tuple, optional
        Dask chunks for arrays that are not dask-backed yet.
    extra : dict, optional
        Additional 2-D variables (e.g. ``background``) to carry.
    """
    cards = header_to_cards(header)
    image, image_mask = _split_masked(image)
    variance, var_mask = (None, None) if variance is None else _split_masked(variance)
    if mask is not None:
        mask, mask_mask = _split_masked(mask)
        if mask_mask is not None:
            mask = mask.astype(bool) | mask_mask
    img = _to_dask(image, chunks, "image")
    if img.dtype != np.float32 or not img.dtype.isnative:
        img = img.map_blocks(_native_float32, dtype=np.float32)
    if gain is None:
        gain = _header_value(cards, _GAIN_KEYS)
    if saturation is None:
        saturation = _header_value(cards, _SAT_KEYS)
    if fwhm is None:
        fwhm = _header_value(cards, _FWHM_KEYS)
    if gain is not None and (not np.isfinite(gain) or gain <= 0):
        raise ValueError(f"gain must be a positive number of e-/ADU; got {gain!r}")
    bad = ~da.isfinite(img)
    if saturation is not None:
        bad = bad | (img >= np.float32(saturation))
    if mask is not None:
        m = _to_dask(mask, img.chunks, "mask", img.shape)
        bad = bad | m.astype(bool)
    from .tiling import Region, region_of

    stats = None
    r_img = None if region_of(image) is None else Region(_float32_region, {"a": region_of(image)})

    def dask_mask(m: Any, name: str) -> da.Array:
        return _to_dask(m, img.chunks, f"the mask of {name}", img.shape).astype(bool)

    masks = [] if image_mask is None else [dask_mask(image_mask, "image")]
    if variance is None and masks:
        # the masked pixels of a masked array often hold fill values: keep them out of the sky statistics
        var, stats = _default_variance(da.where(masks[0], np.float32(np.nan), img), gain)
    elif variance is None:
        var, stats = _default_variance(img, gain, region=r_img)
    else:
        var = _to_dask(variance, img.chunks, "variance", img.shape)
        var = var.astype(np.float32)
    if var_mask is not None:
        masks.append(dask_mask(var_mask, "variance"))
    for m in masks:  # the masks of masked arrays: same shape as their values
        bad = bad | m
    if bunit is None:
        for c in cards:
            if c[0] == "BUNIT":
                bunit = str(c[1])
        bunit = bunit or "adu"
    bad, var = bad.rechunk(img.chunks), var.rechunk(img.chunks)
    # a masked-array mask has no file region: then ``bad`` must not be read from the file alone
    masks_in = mask if image_mask is None and var_mask is None else bad
    _register_regions(r_img, masks_in, variance, img, bad, var, stats, gain, saturation)
    data_vars = {
        "image": (("y", "x"), img),
        "mask": (("y", "x"), bad),
        "variance": (("y", "x"), var),
    }
    for k, v in (extra or {}).items():
        data_vars[k] = (("y", "x"), _to_dask(v, img.chunks, k, img.shape))
    attrs: dict[str, Any] = {"header": cards, "bunit": bunit}
    if gain is not None:
        attrs["gain"] = float(gain)
    if saturation is not None:
        attrs["saturation"] = float(saturation)
    if fwhm is not None:
        attrs["fwhm"] = float(fwhm)
    return xr.Dataset(data_vars, attrs=attrs)


def _is_path_like(src: Any) -> bool:
    return isinstance(src, (str, os.PathLike))


def as_dataset(src: Any, **kwargs: Any) -> xr.Dataset:
    """Return ``src`` as an image Dataset (see :func:`open_image`); Datasets pass through."""
    return open_image(src, **kwargs)


def open_image(
    src: Any,
    hdu: int | str | None = None,
    chunks: Any = None,
    mask: Any = None,
    variance: Any = None,
    gain: float | None = None,
    saturation: float | None = None,
    fwhm: float | None = None,
    storage_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> xr.Dataset:
    """Open an image lazily as a tilepipe Dataset (DESIGN.md section 1).

    Parameters
    ----------
    src : str, path, URL, numpy/dask array, DataArray or Dataset
        A FITS file (``.fits``, ``.fit``, ``.fts``, ``.fits.fz``, gzipped),
        a Zarr store written by :func:`tilepipe.write_zarr`, an fsspec URL
        (``file://``, ``memory://``, ``s3://``...), an array, or a Dataset
        (validated and returned with defaults filled in).
    hdu : int or str, optional
        FITS extension number or name; default: the first HDU with 2-D data.
    chunks : int or tuple, optional
        Dask chunk shape (default ``DEFAULT_CHUNK`` square).
    mask, variance : array-like or str, optional
        Extra bad-pixel mask (True = bad) and variance map (arrays or paths).
        The masks of :class:`numpy.ma.MaskedArray` inputs (``src``,
        ``variance``) are OR-ed into the Dataset's ``mask``.
    gain, saturation, fwhm : float, optional
        Override the header values (e-/ADU, image units, pixels).
    storage_options : dict, optional
        fsspec options for URLs (e.g. ``{"key": ..., "secret": ...,
        "client_kwargs": {"endpoint_url": ...}}`` for S3).

    Returns
    -------
    xarray.Dataset
        ``image``, ``mask``, ``variance`` on dims ``("y", "x")``, dask-backed.
    """
    if isinstance(src, xr.Dataset):
        if "image" not in src:
            raise ValueError(
                f"the Dataset has no 'image' variable (it has {list(src.data_vars)}); "
                "build one with tilepipe.open_image(array)"
            )
        attrs = dict(src.attrs)
        extra = {k: src[k].data for k in src.data_vars if k not in ("image", "mask", "variance") and src[k].dims == ("y", "x")}
        out = make_dataset(
            src["image"].data,
            mask=src["mask"].data if "mask" in src and mask is None else mask,
            variance=src["variance"].data if "variance" in src and variance is None else variance,
            header=attrs.get("header"),
            gain=gain if gain is not None else attrs.get("gain"),
            saturation=saturation if saturation is not None else attrs.get("saturation"),
            fwhm=fwhm if fwhm is not None else attrs.get("fwhm"),
            bunit=attrs.get("bunit"),
            chunks=chunks,
            extra=extra,
        )
        for k, v in attrs.items():
            out.attrs.setdefault(k, v)
        return out
    if _is_path_like(src):
        from . import io as tio

        opts = dict(storage_options or {})
        if isinstance(mask, (str, os.PathLike)):
            mask = tio.read_array(mask, storage_options=opts, chunks=chunks).astype(bool)
        if isinstance(variance, (str, os.PathLike)):
            variance = tio.read_array(variance, storage_options=opts, chunks=chunks)
        if tio.is_zarr(src, storage_options=opts):
            ds = tio.read_zarr(src, storage_options=opts, chunks=chunks)
            return open_image(ds, mask=mask, variance=variance, gain=gain, saturation=saturation, fwhm=fwhm, chunks=chunks)
        # planes: MASK/VARIANCE/... extensions of a file written by tilepipe.write_fits
        data, header, planes = tio.read_fits_dataset(src, hdu=hdu, chunks=chunks, storage_options=opts)
        file_mask, file_var = planes.pop("mask", None), planes.pop("variance", None)
        if file_mask is not None:
            mask = file_mask if mask is None else file_mask | da.asarray(mask).astype(bool)
        return make_dataset(
            data, mask=mask, variance=variance if variance is not None else file_var, header=header, gain=gain,
            saturation=saturation, fwhm=fwhm, chunks=None, extra=planes or None,
        )
    if isinstance(src, (np.ndarray, da.Array, xr.DataArray)) or hasattr(src, "__array__"):
        header = kwargs.pop("header", None)
        if isinstance(src, xr.DataArray) and header is None:
            header = src.attrs.get("header")
        return make_dataset(
            src, mask=mask, variance=variance, header=header, gain=gain, saturation=saturation, fwhm=fwhm, chunks=chunks
        )
    raise TypeError(
        f"cannot open an image from {type(src).__name__}; pass a FITS/Zarr path or URL, "
        "a 2-D numpy/dask array, or an xarray Dataset"
    )
