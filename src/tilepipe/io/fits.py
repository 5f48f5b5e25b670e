"""Lazy FITS reading and atomic, bounded-memory FITS writing.

Reading
-------
:func:`read_fits` parses only the headers when called.  Pixels are read per
dask chunk by a small picklable reader object that re-opens the file inside
the task (so distributed workers need nothing but the URL and the
``storage_options``):

* uncompressed images: the chunk's bytes are read directly at their byte
  offset -- ``numpy.memmap`` for local files, one ranged request
  (``fs.cat_file(path, start, end)``) covering the chunk's rows for URLs;
* tile-compressed images (``.fits.fz``, ``CompImageHDU``): ``hdu.section[...]``
  (astropy decompresses only the tiles a chunk needs);
* whole-file gzip/bzip2 (``.fits.gz``): no random access exists, so each chunk
  decompresses forward from the start of the file to its last pixel; convert
  such files to Zarr once (``tilepipe convert``) when they are read often.

Integer data are scaled with ``BSCALE``/``BZERO`` (``BZERO = 2**(n-1)`` gives
unsigned ints, e.g. uint16), ``BLANK`` pixels become NaN, and big-endian
FITS data are returned native-endian.

Writing
-------
:func:`write_fits` streams the Dataset band by band (one row of dask chunks
at a time) into a temporary file at precomputed offsets, then renames it into
place (local) or uploads it in one PUT (object stores).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import shutil
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr
from astropy.io import fits

from . import _fs
from ..tiling import Region, _read_region, region_of, register_region

log = logging.getLogger(__name__)

__all__ = ["read_fits", "read_fits_dataset", "write_fits", "fits_hdu_names"]

#: Largest buffer of a blocked read of partial rows (FitsChunkReader._pread_rows), bytes
_SPAN_BYTES = 4 << 20

#: astropy's whole-file compression names -> fsspec's
_COMPRESSED_FILE = {"gzip": "gzip", "bzip2": "bz2", "lzma": "xz", "zip": "zip"}
#: keyword written into the primary header of every tilepipe FITS product
PRODUCT_KEY = "TILEPIPE"
_STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT", "BZERO", "BSCALE", "BLANK",
               "END", "CHECKSUM", "DATASUM"}
_WCS_KEY = re.compile(
    r"^(WCSAXES|WCSNAME|CTYPE\d|CUNIT\d|CRPIX\d|CRVAL\d|CDELT\d|CROTA\d|CD\d_\d|PC\d_\d|PV\d_\d+|PS\d_\d+|"
    r"LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX|EPOCH|MJDREF|A_ORDER|B_ORDER|AP_ORDER|BP_ORDER|"
    r"A_\d+_\d+|B_\d+_\d+|AP_\d+_\d+|BP_\d+_\d+|A_DMAX|B_DMAX)$"
)


# ----------------------------------------------------------------- dtypes
def _raw_dtype(bitpix: int) -> np.dtype:
    table = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
    if bitpix not in table:
        raise ValueError(f"unsupported FITS BITPIX {bitpix}; expected one of {sorted(table)}")
    return np.dtype(table[bitpix])


def _scaling(header: fits.Header) -> tuple[float, float, Any]:
    bscale = float(header.get("BSCALE", 1.0))
    bzero = float(header.get("BZERO", 0.0))
    blank = header.get("BLANK")
    return bscale, bzero, blank


def _out_dtype(bitpix: int, bscale: float, bzero: float, blank: Any) -> np.dtype:
    """Native dtype of the scaled pixel values (astropy's conventions)."""
    raw = _raw_dtype(bitpix).newbyteorder("=")
    if raw.kind == "f":
        return np.dtype(np.float64) if (bitpix == -64) else np.dtype(np.float32)
    if bscale == 1.0:
        nbit = raw.itemsize * 8
        if bitpix == 8 and bzero == -128:
            out = np.dtype(np.int8)
        elif bitpix != 8 and bzero == float(2 ** (nbit - 1)):
            out = np.dtype(f"u{raw.itemsize}")
        elif bzero == 0.0:
            out = raw
        else:
            out = None
        if out is not None:
            if blank is not None:  # BLANK pixels become NaN
                return np.dtype(np.float32) if raw.itemsize <= 2 else np.dtype(np.float64)
            return out
    return np.dtype(np.float32) if raw.itemsize <= 2 else np.dtype(np.float64)


def _convert(raw: np.ndarray, out: np.dtype, bscale: float, bzero: float, blank: Any) -> np.ndarray:
    """Raw (file) pixel values -> scaled native values of dtype ``out``."""
    raw = np.asarray(raw)
    native = raw.astype(raw.dtype.newbyteorder("="), copy=False)
    if native.dtype.kind == "f":
        res = native.astype(out, copy=False)
        if bscale != 1.0 or bzero != 0.0:
            res = (res * out.type(bscale) + out.type(bzero)).astype(out, copy=False)
        return np.ascontiguousarray(res)
    bad = (native == blank) if blank is not None else None
    if out.kind == "u" and bscale == 1.0 and native.dtype.kind == "i":
        # BZERO = 2**(n-1): flip the sign bit, exact and cheap
        res = native.view(out) ^ out.type(1 << (out.itemsize * 8 - 1))
    elif out.kind == "i" and out.itemsize == 1 and native.dtype.kind == "u":
        res = (native.view(np.int8) ^ np.int8(-128)).astype(np.int8)
    elif out.kind in "iu":
        res = native.astype(out, copy=False)
    else:
        res = native.astype(out)
        if bscale != 1.0:
            res *= out.type(bscale)
        if bzero != 0.0:
            res += out.type(bzero)
    if bad is not None and bad.any():
        res = res.astype(out, copy=False)
        res[bad] = np.nan
    return np.ascontiguousarray(res)


# ----------------------------------------------------------------- opening
_INVALID_CARD_MSG = "The following header keyword is invalid"


@contextlib.contextmanager
def _opened(url: str, storage_options: dict[str, Any] | None) -> Iterator[Any]:
    """Open a FITS file (headers only), closing it afterwards.

    astropy's per-card "invalid keyword" warnings are silenced here: such
    cards are kept as ``COMMENT`` cards by :func:`_clean_header`.
    """
    # main thread only: read_fits/fits_hdu_names open files on the client while building the graph, before any compute
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_INVALID_CARD_MSG)
        hdul, fobj = _open_hdul(url, storage_options)
        try:
            yield hdul
        finally:
            hdul.close()
            if fobj is not None:
                fobj.close()


_CARD = 80


def _invalid_card(card: bytes) -> bool:
    """True for an 80-byte header card astropy parses as "invalid or non-standard keyword" (and warns).

    The rule of ``astropy.io.fits.Card._parse_keyword``: commentary keywords,
    ``HIERARCH`` cards with an ``=`` and cards with ``"= "`` in columns 1-9
    are fine; anything else is invalid.
    """
    text = card.decode("ascii", "replace")
    key = text[:8].strip().upper()
    if key in ("", "COMMENT", "HISTORY", "END", "CONTINUE"):
        return False
    if key == "HIERARCH" and text[8:9] == " " and "=" in text:
        return False
    return not 0 <= text.find("= ") <= 8


class _CleanHeadersFile:
    """Read-only file wrapper that blanks the invalid cards of the given header byte spans.

    astropy warns once per invalid card each time it parses a header; a chunk
    task must not silence that (``warnings.catch_warnings`` is not
    thread-safe), so the cards are replaced by blank cards as astropy reads
    them.  Only headers are touched; the data bytes pass unchanged.
    """

    mode = "rb"

    def __init__(self, f: Any, spans: Sequence[tuple[int, int]], name: str) -> None:
        self._f = f
        self._spans = [(int(a), int(b)) for a, b in spans]
        self.name = name

    @property
    def closed(self) -> bool:
        return bool(getattr(self._f, "closed", False))

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()

    def read(self, size: int | None = -1) -> bytes:
        pos = self._f.tell()
        data = self._f.read(-1 if size is None else size)
        end = pos + len(data)
        out = None
        for a, b in self._spans:
            lo, hi = max(a, pos), min(b, end)
            if lo >= hi:
                continue
            first = a + (lo - a) // _CARD * _CARD
            for c in range(first, hi, _CARD):
                if c >= pos and c + _CARD <= end:
                    card = data[c - pos:c - pos + _CARD]
                else:  # a card cut by the read: look at all of it, then come back
                    self._f.seek(c)
                    card = self._f.read(_CARD)
                    self._f.seek(end)
                if len(card) == _CARD and _invalid_card(card):
                    if out is None:
                        out = bytearray(data)
                    s0, s1 = max(c, pos) - pos, min(c + _CARD, end) - pos
                    out[s0:s1] = b" " * (s1 - s0)
        return data if out is None else bytes(out)


def _open_hdul(url: str, storage_options: dict[str, Any] | None, *, scale: bool = True,
               header_spans: Sequence[tuple[int, int]] | None = None):
    """Open a FITS file lazily; returns ``(hdulist, fileobj_or_None)``.

    ``header_spans``: byte ranges ``(start, end)`` of headers holding cards
    astropy cannot parse; they are read through :class:`_CleanHeadersFile`
    (no memory map), so that opening warns nothing.
    """
    lp = _fs.local_path(url)
    kw = {"lazy_load_hdus": True, "do_not_scale_image_data": not scale}
    try:
        if lp is not None and not header_spans:
            return fits.open(lp, memmap=True, **kw), None
        fs, path = _fs.get_fs(url, storage_options)
        magic = fs.cat_file(path, start=0, end=3)
        comp = "gzip" if magic[:2] == b"\x1f\x8b" else "bz2" if magic == b"BZh" else None
        f = fs.open(path, "rb", block_size=2**16, cache_type="readahead", compression=comp)
        if header_spans:
            f = _CleanHeadersFile(f, header_spans, str(path))
        try:
            hdul = fits.open(f, memmap=False, **kw)
            hdul._tp_compression = comp  # astropy sees the decompressed stream
            return hdul, f
        except BaseException:
            f.close()
            raise
    except FileNotFoundError as exc:
        if lp is not None:
            raise FileNotFoundError(f"FITS file not found: {lp!r}; check the path") from exc
        fs, _ = _fs.get_fs(url, storage_options)
        raise FileNotFoundError(f"FITS file not found: {url!r}; {_fs.describe_remote(fs, url)}") from exc
    except OSError as exc:
        raise OSError(
            f"cannot read {url!r} as FITS ({exc}); is it a FITS file (or a Zarr store without zarr.json)?"
        ) from exc


def _is_image_hdu(h: Any) -> bool:
    return isinstance(h, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU))


def _image_shape(h: Any) -> tuple[int, ...]:
    hdr = h.header
    n = int(hdr.get("NAXIS", 0))
    return tuple(int(hdr[f"NAXIS{i}"]) for i in range(n, 0, -1))


def _is_2d(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and all(s == 1 for s in shape[:-2]) and shape[-1] > 0 and shape[-2] > 0


def _describe_hdus(hdul: Any) -> str:
    parts = []
    for i, h in enumerate(hdul):
        name = h.name or ""
        kind = type(h).__name__
        shape = _image_shape(h) if _is_image_hdu(h) else ()
        parts.append(f"{i}:{name or '-'}({kind}{', ' + 'x'.join(map(str, shape)) if shape else ''})")
    return ", ".join(parts)


def _select(hdul: Any, hdu: int | str | None, url: str) -> int:
    if hdu is None:
        for i, h in enumerate(hdul):
            if _is_image_hdu(h) and _is_2d(_image_shape(h)):
                return i
        raise ValueError(f"{url!r} has no HDU with 2-D image data (HDUs: {_describe_hdus(hdul)}); pass hdu= to choose one")
    if isinstance(hdu, (bool, np.bool_)) or not isinstance(hdu, (int, np.integer, str)):
        raise TypeError(f"hdu must be an extension number or EXTNAME string; got {hdu!r}")
    try:
        h = hdul[hdu]
    except (IndexError, KeyError) as exc:
        raise ValueError(f"hdu={hdu!r} is not in {url!r} (HDUs: {_describe_hdus(hdul)}); pass a number or an EXTNAME listed") from exc
    idx = hdul.index(h)
    if not _is_image_hdu(h) or not _is_2d(_image_shape(h)):
        raise ValueError(
            f"hdu={hdu!r} of {url!r} holds no 2-D image ({type(h).__name__}, shape {_image_shape(h) if _is_image_hdu(h) else 'n/a'}); "
            f"choose an image HDU (HDUs: {_describe_hdus(hdul)})"
        )
    return idx


class FitsChunkReader:
    """Picklable array-like reading chunks of one FITS image HDU on demand.

    ``reader[y0:y1, x0:x1]`` returns native-endian scaled pixels.  The file is
    (re)opened inside the calling process; nothing but the URL, the
    ``storage_options`` and a few header numbers travel with the object.
    """

    def __init__(self, url: str, index: int, shape: tuple[int, int], nlead: int, bitpix: int, header: fits.Header,
                 mode: str, data_offset: int, storage_options: dict[str, Any] | None,
                 compression: str | None = None, header_spans: Sequence[tuple[int, int]] | None = None) -> None:
        self.url = url
        self.index = index
        self.shape = shape
        self.nlead = nlead
        self.bitpix = bitpix
        self.bscale, self.bzero, self.blank = _scaling(header)
        if self.blank is not None:
            self.blank = int(self.blank)
        self.dtype = _out_dtype(bitpix, self.bscale, self.bzero, self.blank)
        self.ndim = 2
        self.mode = mode  # "raw" (byte offsets) or "section" (astropy section)
        self.compression = compression  # whole-file compression (fsspec name) in "raw" mode
        self.data_offset = data_offset
        # "section" mode: byte spans of headers with cards astropy cannot parse (see _open_hdul)
        self.header_spans = [tuple(s) for s in header_spans] if header_spans else None
        self.storage_options = dict(storage_options or {})
        self._local = _fs.local_path(url)
        self._state: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_state"] = {}
        d.pop("_lock", None)
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FitsChunkReader({self.url!r}, hdu={self.index}, shape={self.shape}, mode={self.mode!r})"

    def _box(self, key: Any) -> tuple[slice, slice, tuple[Any, Any]]:
        if not isinstance(key, tuple):
            key = (key,)
        key = tuple(key) + (slice(None),) * (2 - len(key))
        if len(key) != 2:
            raise IndexError(f"2-D image indexed with {len(key)} indices")
        boxes, rest = [], []
        for k, n in zip(key, self.shape):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step == 1:
                    boxes.append(slice(start, max(start, stop)))
                    rest.append(slice(None))
                    continue
            idx = np.arange(n)[k]
            lo = int(np.min(idx)) if np.size(idx) else 0
            hi = int(np.max(idx)) + 1 if np.size(idx) else 0
            boxes.append(slice(lo, hi))
            rest.append(idx - lo if np.ndim(idx) else int(idx) - lo)
        return boxes[0], boxes[1], (rest[0], rest[1])

    def __getitem__(self, key: Any) -> np.ndarray:
        if self.mode == "raw" and self.compression is None and self._local is not None and _strided(key):
            # a strided sample (e.g. the default variance's sky statistics): read only the sampled rows
            ny, nx = self.shape
            rows = np.arange(ny)[key[0]]
            cols = np.arange(nx)[key[1]]
            if rows.size == 0 or cols.size == 0:
                return np.empty((rows.size, cols.size), dtype=self.dtype)
            x0 = int(cols.min())
            raw = self._pread_rows(rows, slice(x0, int(cols.max()) + 1))[:, cols - x0]
            return _convert(raw, self.dtype, self.bscale, self.bzero, self.blank)
        ys, xs, rest = self._box(key)
        h, w = ys.stop - ys.start, xs.stop - xs.start
        if h <= 0 or w <= 0:
            block = np.empty((max(h, 0), max(w, 0)), dtype=self.dtype)
        elif self.mode == "raw":
            block = self._read_raw(ys, xs)
        else:
            block = self._read_section(ys, xs)
        if rest != (slice(None), slice(None)):
            if isinstance(rest[0], np.ndarray) and isinstance(rest[1], np.ndarray):
                block = block[np.ix_(rest[0], rest[1])]
            else:
                block = block[rest]
        return block

    def _read_raw(self, ys: slice, xs: slice) -> np.ndarray:
        ny, nx = self.shape
        raw_dt = _raw_dtype(self.bitpix)
        isz = raw_dt.itemsize
        h, w = ys.stop - ys.start, xs.stop - xs.start
        if self.compression is not None:
            # whole-file gzip/bzip2: no random access; decompress forward to the chunk's first
            # pixel (a forward seek), then read its row span in one go
            import io

            from fsspec.compression import compr

            first = ys.start * nx + xs.start
            count = (h - 1) * nx + w
            if self._local is not None:
                src = open(self._local, "rb")
            else:  # one GET of the compressed file (a private copy: safe under threads)
                fs, path = _fs.get_fs(self.url, self.storage_options)
                src = io.BytesIO(fs.cat_file(path))
            with src, compr[self.compression](src, mode="rb") as f:
                f.seek(self.data_offset + first * isz)
                buf = f.read(count * isz)
            flat = np.frombuffer(buf, dtype=raw_dt, count=count)
            raw = np.lib.stride_tricks.as_strided(flat, shape=(h, w), strides=(nx * isz, isz)).copy()
        elif self._local is not None:
            raw = self._pread_rows(np.arange(ys.start, ys.stop), xs)
        else:
            fs = self._state.get("fs")
            if fs is None:
                fs, path = _fs.get_fs(self.url, self.storage_options)
                self._state["fs"], self._state["path"] = fs, path
            path = self._state["path"]
            first = ys.start * nx + xs.start
            count = (h - 1) * nx + w  # one contiguous span from the first to the last pixel
            start = self.data_offset + first * isz
            buf = fs.cat_file(path, start=start, end=start + count * isz)
            flat = np.frombuffer(buf, dtype=raw_dt, count=count)
            raw = np.lib.stride_tricks.as_strided(flat, shape=(h, w), strides=(nx * isz, isz)).copy()
        return _convert(raw, self.dtype, self.bscale, self.bzero, self.blank)

    def _pread_rows(self, rows: np.ndarray, xs: slice) -> np.ndarray:
        """Raw pixels ``[rows, xs]`` of a local uncompressed file, read with ``pread``.

        Whole consecutive rows are one read.  A box of consecutive rows at least a quarter of the image
        wide is read in blocks of rows, each one contiguous span (from its first to its last pixel)
        through a buffer of at most ``_SPAN_BYTES``, then cut: at most 4x the bytes, far fewer calls (a
        system call per row costs more than copying a few rows from the page cache).  Anything else is
        one call per row.

        Not a memory map: mapped file pages count in the process's resident memory while mapped (and
        a read fault maps its neighbours too), which made a worker's measured memory depend on the page
        cache; ``pread`` copies only the rows asked for.
        """
        ny, nx = self.shape
        raw_dt = _raw_dtype(self.bitpix)
        isz = raw_dt.itemsize
        w = xs.stop - xs.start
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), w), dtype=raw_dt)
        consecutive = len(rows) > 1 and bool(np.all(np.diff(rows) == 1))
        fd = os.open(self._local, os.O_RDONLY)
        try:
            if w == nx and consecutive:  # whole consecutive rows: one read
                self._pread(fd, memoryview(out).cast("B"), self.data_offset + int(rows[0]) * nx * isz)
            elif consecutive and 4 * w >= nx:
                per = max(1, min(len(rows), _SPAN_BYTES // (nx * isz)))
                buf = np.empty(per * nx, dtype=raw_dt)
                for i in range(0, len(rows), per):
                    n = min(per, len(rows) - i)
                    count = (n - 1) * nx + w
                    self._pread(fd, memoryview(buf[:count]).cast("B"),
                                self.data_offset + (int(rows[i]) * nx + xs.start) * isz)
                    out[i:i + n] = np.lib.stride_tricks.as_strided(buf, shape=(n, w), strides=(nx * isz, isz))
            else:
                mv = memoryview(out).cast("B")
                wb = w * isz
                offsets = (self.data_offset + xs.start * isz + rows * (nx * isz)).tolist()
                for i, off in enumerate(offsets):
                    self._pread(fd, mv[i * wb:(i + 1) * wb], off)
        finally:
            os.close(fd)
        return out

    def _pread(self, fd: int, buf: memoryview, offset: int) -> None:
        n = os.preadv(fd, [buf], offset)
        while n < buf.nbytes:  # a short read (rare): go on from where it stopped
            k = os.preadv(fd, [buf[n:]], offset + n)
            if k <= 0:
                raise OSError(f"{self._local}: the file ends before the image data does (truncated?)")
            n += k

    def _read_section(self, ys: slice, xs: slice) -> np.ndarray:
        with self._lock:  # one open file per reader; astropy file access is not thread-safe
            hdul = self._state.get("hdul")
            if hdul is None:
                # no warnings.catch_warnings here (not thread-safe): headers with invalid cards
                # are read through _CleanHeadersFile, so parsing them warns nothing
                hdul, fobj = _open_hdul(self.url, self.storage_options, scale=False, header_spans=self.header_spans)
                self._state["hdul"], self._state["fobj"] = hdul, fobj
                if "finalizer" not in self._state:  # closed with the reader, not left to the GC; the
                    # finalizer takes no lock (it may run inside a garbage collection triggered while a
                    # lock is held): the reader's stale entry in _OPEN_FILES just ages out
                    self._state["finalizer"] = weakref.finalize(self, _close_open_file, self._state)
            evict = _note_open_file(self._lock, self._state)
            sec = hdul[self.index].section
            key = (0,) * self.nlead + (ys, xs)
            raw = np.asarray(sec[key])
        for lock, state in evict:  # after releasing our lock: no lock-order cycle between readers
            with lock:
                _close_open_file(state)
        return _convert(raw, self.dtype, self.bscale, self.bzero, self.blank)


# Section readers keep their file open between chunk reads (astropy parses the headers on open), but a
# reader can live long (a lazily opened image's region recipe stays registered), so the number of files
# kept open at once is bounded: the least recently read is closed, and reopened if it is read again.
_MAX_OPEN_FILES = 32
_OPEN_FILES: "OrderedDict[int, tuple[threading.Lock, dict[str, Any]]]" = OrderedDict()
_OPEN_FILES_LOCK = threading.Lock()


def _note_open_file(lock: threading.Lock, state: dict[str, Any]) -> list[tuple[threading.Lock, dict[str, Any]]]:
    """Mark ``state``'s file as just used; return the (lock, state) pairs whose files must now be closed."""
    with _OPEN_FILES_LOCK:
        _OPEN_FILES[id(state)] = (lock, state)
        _OPEN_FILES.move_to_end(id(state))
        evict = []
        while len(_OPEN_FILES) > _MAX_OPEN_FILES:
            evict.append(_OPEN_FILES.popitem(last=False)[1])
        return evict


def _close_open_file(state: dict[str, Any]) -> None:
    """Close the FITS file a :class:`FitsChunkReader` kept open for section reads."""
    hdul, fobj = state.pop("hdul", None), state.pop("fobj", None)
    with contextlib.suppress(Exception):
        if hdul is not None:
            hdul.close()
        if fobj is not None:
            fobj.close()


def _default_chunks(chunks: Any, shape: tuple[int, int]) -> Any:
    from ..image import DEFAULT_CHUNK

    if chunks is None:
        return (min(DEFAULT_CHUNK, shape[0]), min(DEFAULT_CHUNK, shape[1]))
    return chunks


def _lazy_hdu(hdul: Any, idx: int, url: str, chunks: Any, storage_options: dict[str, Any] | None) -> tuple[da.Array, fits.Header]:
    h = hdul[idx]
    header = _clean_header(h.header, url)
    full = _image_shape(h)
    shape = (full[-2], full[-1])
    nlead = len(full) - 2
    file_comp = getattr(hdul, "_tp_compression", None) or _COMPRESSED_FILE.get(
        getattr(hdul.fileinfo(idx)["file"], "compression", None))
    spans = None
    if isinstance(h, fits.CompImageHDU):
        mode, offset = "section", -1
        # a chunk task re-opens the file and parses the headers of HDUs 0..idx again: tell it
        # where the invalid cards are, so that it can read them blanked instead of warning
        if any(getattr(c, "_invalid", False) for j in range(idx + 1) for c in hdul[j].header.cards):
            spans = [(int(hdul.fileinfo(j)["hdrLoc"]), int(hdul.fileinfo(j)["datLoc"])) for j in range(idx + 1)]
    else:
        mode, offset = "raw", int(hdul.fileinfo(idx)["datLoc"])
    bitpix = int(header["BITPIX"])
    reader = FitsChunkReader(url, idx, shape, nlead, bitpix, header, mode, offset, storage_options, file_comp, spans)
    # the chunks are part of the name: a chunk key must mean the same pixels in every graph, or a cluster still
    # holding the keys of an earlier open of the same file with other chunks would hand out the wrong blocks
    dchunks = da.core.normalize_chunks(_default_chunks(chunks, shape), shape, dtype=reader.dtype)
    name = "fits-" + dask.base.tokenize(url, idx, shape, offset, reader.dtype.str, _fs.json_safe(storage_options or {}),
                                        _mtime(url), dchunks)
    arr = da.from_array(
        reader, chunks=dchunks, name=name, lock=False, asarray=False, fancy=False,
        meta=np.empty((0, 0), dtype=reader.dtype),
        # the small reader is embedded in every chunk task: no shared "original-" key whose run_spec
        # differs between optimised and unoptimised graphs (dask/dask#9888 warnings on a cluster)
        inline_array=True,
    )
    # any rectangle can be read straight from the file (tile tasks that read their own halo use this)
    register_region(arr, Region(_read_region, {"source": reader}))
    return arr, header


def _strided(key: Any) -> bool:
    """Whether ``key`` is a pair of slices, one of them with a step > 1."""
    return (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)
            and any(k.step not in (None, 1) for k in key))


def _nonzero_region(ys: slice, xs: slice, *, a: np.ndarray) -> np.ndarray:
    return a != 0


def _clean_header(header: fits.Header, url: str) -> fits.Header:
    """Copy of ``header`` with unparsable cards kept verbatim as ``COMMENT`` cards.

    Real files carry non-standard cards (``ESO-LOG 00:00:00> DATE = ...``) on
    which astropy warns at every access; keeping their text as a comment loses
    nothing and keeps every later header operation quiet.
    """
    out = fits.Header()
    bad = 0
    for card in header.cards:
        # main thread only: called by _lazy_hdu inside _opened, on the client before any compute
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                key, value, comment = card.keyword, card.value, card.comment
                str(card)
            except Exception:  # astropy raises on some broken cards
                caught.append(None)
        if caught or getattr(card, "_invalid", False):
            bad += 1
            text = card.image.rstrip()
            for i in range(0, len(text), 72):  # 72 characters fit one COMMENT card: stable round trips
                out.append(("COMMENT", text[i:i + 72]), bottom=True)
        else:
            out.append(card, bottom=True)
    if bad:
        log.info("%s: %d non-standard header card(s) kept as COMMENT cards", url, bad)
    return out


def _mtime(url: str) -> float:
    import os

    lp = _fs.local_path(url)
    try:
        return os.path.getmtime(lp) if lp is not None else 0.0
    except OSError:
        return 0.0


def read_fits(
    src: Any,
    hdu: int | str | None = None,
    chunks: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[da.Array, fits.Header]:
    """Open one 2-D image of a FITS file lazily.

    Parameters
    ----------
    src : str or path
        Local path or fsspec URL (``file://``, ``memory://``, ``s3://``...);
        plain, gzipped (``.fits.gz``) or tile-compressed (``.fits.fz``).
    hdu : int or str, optional
        HDU number (0 = primary) or EXTNAME.  Default: the first HDU holding
        2-D image data (so the ``COMPRESSED_IMAGE`` of a ``.fits.fz``).
        Leading length-1 axes (``NAXIS3 = 1``) are dropped.
    chunks : int or tuple, optional
        Dask chunks (default ``tilepipe.image.DEFAULT_CHUNK`` square).
    storage_options : dict, optional
        fsspec options (credentials, ``client_kwargs={"endpoint_url": ...}``),
        passed to every chunk task.

    Returns
    -------
    data : dask.array.Array
        ``[y, x]`` pixels, native-endian, scaled (``BSCALE``/``BZERO``;
        uint16 for ``BZERO = 32768``), ``BLANK`` -> NaN.  Nothing is read yet.
    header : astropy.io.fits.Header
        The HDU's header (for a tile-compressed HDU, the image header).

    Raises
    ------
    FileNotFoundError
        The file does not exist (the message says what to check).
    ValueError
        ``hdu`` names no 2-D image.
    """
    url = _fs.as_str(src, "src")
    with _opened(url, storage_options) as hdul:
        idx = _select(hdul, hdu, url)
        return _lazy_hdu(hdul, idx, url, chunks, storage_options)


def fits_hdu_names(src: Any, storage_options: dict[str, Any] | None = None) -> list[str]:
    """EXTNAMEs of the HDUs of a FITS file (``""`` when unnamed), headers only."""
    url = _fs.as_str(src, "src")
    with _opened(url, storage_options) as hdul:
        return [h.name for h in hdul]


def read_fits_dataset(
    src: Any,
    hdu: int | str | None = None,
    chunks: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[da.Array, fits.Header, dict[str, da.Array]]:
    """Like :func:`read_fits`, plus the product planes of a tilepipe FITS file.

    When the selected HDU is the primary of a file written by
    :func:`write_fits` (primary header keyword ``TILEPIPE``), every other 2-D
    image extension is returned as a plane named ``EXTNAME.lower()``
    (``mask`` as bool, True = bad; ``variance``...), chunked like the image.
    A product written without an ``image`` variable (e.g. a subtraction:
    empty primary, then ``MASK``, ``DIFF``, ``SCORR``...) gives, with
    ``hdu=None``, its first extension that is not ``MASK`` or ``VARIANCE`` as
    the image and every other extension as a plane.  For any other file
    ``planes`` is empty.

    Returns
    -------
    data, header, planes : dask array, Header, dict of dask arrays
    """
    url = _fs.as_str(src, "src")
    with _opened(url, storage_options) as hdul:
        idx = _select(hdul, hdu, url)
        product = PRODUCT_KEY in hdul[0].header
        empty_primary = product and idx != 0 and hdu is None  # a product with no `image` variable
        if empty_primary:
            for j, h in enumerate(hdul):
                if j and _is_image_hdu(h) and _is_2d(_image_shape(h)) and h.name not in ("MASK", "VARIANCE"):
                    idx = j
                    break
        data, header = _lazy_hdu(hdul, idx, url, chunks, storage_options)
        planes: dict[str, da.Array] = {}
        if product and (idx == 0 or empty_primary):
            for j, h in enumerate(hdul):
                if j in (0, idx) or not _is_image_hdu(h) or not h.name:
                    continue
                shp = _image_shape(h)
                if not _is_2d(shp) or shp[-2:] != data.shape:
                    continue
                arr, hh = _lazy_hdu(hdul, j, url, data.chunks, storage_options)
                if hh.get("TPDTYPE") == "bool" or h.name == "MASK":
                    src = region_of(arr)
                    arr = register_region(arr != 0, Region(_nonzero_region, {"a": src}))
                planes[h.name.lower()] = arr
        return data, header, planes


# ----------------------------------------------------------------- writing
def _fits_dtype(dt: np.dtype, name: str) -> tuple[np.dtype, bool]:
    """FITS storage dtype for a variable; second value: was bool."""
    dt = np.dtype(dt)
    if dt == np.bool_:
        return np.dtype(np.uint8), True
    mapping = {
        "u1": np.uint8, "i1": np.int16, "i2": np.int16, "u2": np.int32, "i4": np.int32, "u4": np.int64,
        "i8": np.int64, "u8": np.float64, "f2": np.float32, "f4": np.float32, "f8": np.float64,
    }
    key = f"{dt.kind}{dt.itemsize}"
    if key not in mapping:
        raise TypeError(f"variable {name!r} has dtype {dt} which FITS cannot store; cast it to float32 first")
    return np.dtype(mapping[key]), False


def _header_for(kind: str, fdt: np.dtype, shape: tuple[int, int], cards: fits.Header, extname: str | None) -> bytes:
    template = np.zeros((1, 1), dtype=fdt.newbyteorder(">"))
    hdu = fits.PrimaryHDU(data=template) if kind == "primary" else fits.ImageHDU(data=template, name=extname)
    hdr = hdu.header
    hdr["NAXIS1"] = shape[1]
    hdr["NAXIS2"] = shape[0]
    if kind == "primary":
        hdr["EXTEND"] = True
    for card in cards.cards:
        if card.keyword in _STRUCTURAL or card.keyword.startswith("NAXIS") or (extname and card.keyword == "EXTNAME"):
            continue
        # appended in order (duplicated keywords of real headers included)
        hdr.append(card, useblanks=False, bottom=True)
    return hdr.tostring().encode("ascii")


def _primary_cards(ds: xr.Dataset, params: Any) -> fits.Header:
    from .. import __version__
    from ..image import cards_to_header

    # fit=True: no card astropy warns about when building or writing the header (explicit HIERARCH,
    # comments cut as astropy cuts them), so nothing needs silencing
    hdr = cards_to_header(ds.attrs.get("header", []), fit=True)
    for key, attr, comment in (
        ("GAIN", "gain", "[e-/ADU] gain"),
        ("SATURATE", "saturation", "saturation level (image units)"),
        ("FWHM", "fwhm", "[pix] PSF FWHM"),
    ):
        val = ds.attrs.get(attr)
        if val is not None and key not in hdr:
            hdr.append((key, float(val), comment), bottom=True)
    bunit = ds.attrs.get("bunit")
    if bunit and "BUNIT" not in hdr and str(bunit).lower() != "adu":
        hdr.append(("BUNIT", str(bunit)), bottom=True)
    prov = _fs.provenance(params)
    if PRODUCT_KEY in hdr:
        hdr[PRODUCT_KEY] = (__version__, "written by tilepipe (version)")
    else:  # appended after every input card, so the input's card order is a prefix
        hdr.append((PRODUCT_KEY, __version__, "written by tilepipe (version)"), bottom=True)
    def history(text: str) -> None:
        hdr.append(("HISTORY", text), bottom=True)  # at the very end, after the input's own cards

    history(f"tilepipe {prov['version']} wrote this file on {prov['date']}")
    pk = ", ".join(f"{k} {v}" for k, v in prov["packages"].items())
    history(f"tilepipe packages: {pk}")
    if params is not None:
        import json

        items = params.items() if isinstance(params, dict) else [("parameters", params)]
        for k, v in items:
            history(f"tilepipe parameter {k} = {json.dumps(_fs.json_safe(v))}")
    return hdr


def _wcs_cards(hdr: fits.Header) -> fits.Header:
    out = fits.Header()
    for card in hdr.cards:
        if _WCS_KEY.match(card.keyword):
            out.append(card)
    return out


def _bands(chunks_y: Sequence[int], row_bytes: int, max_bytes: int = 512 * 2**20) -> list[tuple[int, int]]:
    edges = np.concatenate([[0], np.cumsum(chunks_y)]).astype(int)
    bands = []
    for a, b in zip(edges[:-1], edges[1:]):
        step = max(1, min(b - a, max_bytes // max(row_bytes, 1)))
        for y in range(a, b, step):
            bands.append((y, min(b, y + step)))
    return bands


def write_fits(
    ds: Any,
    path: Any,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    variables: Sequence[str] | None = None,
) -> str:
    """Write an image Dataset (and its products) to one multi-extension FITS file.

    Layout: ``image`` is the primary HDU, with the Dataset's header (WCS
    included), ``GAIN``/``SATURATE``/``FWHM`` from the attrs when missing,
    ``TILEPIPE = <version>`` and provenance ``HISTORY`` cards (tilepipe
    version, UTC date, package versions, and ``attrs["parameters"]`` when
    present).  Every other 2-D ``(y, x)`` variable is an IMAGE extension with
    ``EXTNAME`` = the variable name upper-cased and the WCS cards copied:
    ``MASK`` as uint8 (1 = bad), ``VARIANCE`` float32, other bool variables as
    uint8 with ``TPDTYPE = 'bool'``.  :func:`tilepipe.open_image` restores
    ``mask``, ``variance`` and the other planes from such a file.

    The data are computed one band of dask chunk rows at a time (on the
    current scheduler) and written at precomputed offsets, so memory stays at
    one band; nothing is published before the file is complete.

    Parameters
    ----------
    ds : xarray.Dataset or array
        The product (arrays are wrapped with :func:`tilepipe.open_image`).
    path : str or path
        ``.fits`` / ``.fit`` / ``.fts`` (or ``.fits.gz``, gzipped) local
        path or fsspec URL.
    overwrite : bool
        Replace an existing file (default: ``FileExistsError``).
    storage_options : dict, optional
        fsspec options for URLs.
    variables : sequence of str, optional
        Variables to write (default: every 2-D variable on the dims and
        shape of ``image``, or of the first ``(y, x)`` variable when there is
        no ``image``; variables on other dims, such as PSF stamps, are left
        out).  Named variables must be 2-D and of one shape.

    Returns
    -------
    str
        The path or URL written.
    """
    url = _fs.as_str(path, "path")
    low = url.lower()
    if low.endswith(".fz"):
        raise ValueError(
            f"write_fits writes plain (.fits) or gzipped (.fits.gz) FITS, not tile-compressed {url!r}; "
            "use a .fits name, or tilepipe.write_zarr for compressed chunked storage"
        )
    if not isinstance(ds, xr.Dataset):
        from ..image import open_image

        ds = open_image(ds)
    names = _choose_variables(ds, variables)
    params = ds.attrs.get("parameters")
    primary_hdr = _primary_cards(ds, params)
    wcs_hdr = _wcs_cards(primary_hdr)

    plan: list[tuple[str | None, da.Array | None, np.dtype, bool, bytes]] = []
    if "image" in names:
        arr = _as_dask(ds["image"].data)
        fdt, _ = _fits_dtype(arr.dtype, "image")
        plan.append(("image", arr, fdt, False, _header_for("primary", fdt, arr.shape, primary_hdr, None)))
    else:
        plan.append((None, None, np.dtype(np.uint8), False, fits.PrimaryHDU(header=primary_hdr).header.tostring().encode("ascii")))
    for name in names:
        if name == "image":
            continue
        arr = _as_dask(ds[name].data)
        fdt, was_bool = _fits_dtype(arr.dtype, name)
        cards = wcs_hdr.copy()
        if was_bool and name != "mask":
            cards["TPDTYPE"] = ("bool", "tilepipe: stored as uint8, read back as bool")
        if name == "mask":
            cards["COMMENT"] = "tilepipe mask: 1 = bad pixel, 0 = good"
        plan.append((name, arr, fdt, was_bool, _header_for("ext", fdt, arr.shape, cards, name.upper())))

    # byte layout
    offsets, pos = [], 0
    for name, arr, fdt, _, hbytes in plan:
        data_at = pos + len(hbytes)
        nbytes = 0 if arr is None else int(np.prod(arr.shape)) * fdt.itemsize
        offsets.append(data_at)
        pos = data_at + -(-nbytes // 2880) * 2880
    total = pos

    arrays = [(i, p) for i, p in enumerate(plan) if p[1] is not None]
    with _fs.atomic_file(url, overwrite=overwrite, storage_options=storage_options, suffix=".fits") as tmp:
        raw_tmp = tmp + ".raw" if low.endswith(".gz") else tmp
        try:
            with open(raw_tmp, "wb") as f:
                f.truncate(total)
                for (name, arr, fdt, _, hbytes), data_at in zip(plan, offsets):
                    f.seek(data_at - len(hbytes))
                    f.write(hbytes)
                if arrays:
                    ref = arrays[0][1][1]
                    row_bytes = sum(p[1].shape[1] * p[2].itemsize for _, p in arrays)
                    for y0, y1 in _bands(ref.chunks[0], row_bytes):
                        blocks = dask.compute(*[p[1][y0:y1] for _, p in arrays])
                        for (i, p), block in zip(arrays, blocks):
                            _, arr, fdt, _, _ = p
                            out = np.ascontiguousarray(np.asarray(block).astype(fdt.newbyteorder(">"), copy=False))
                            f.seek(offsets[i] + y0 * arr.shape[1] * fdt.itemsize)
                            f.write(out.tobytes())
            if raw_tmp != tmp:
                with open(raw_tmp, "rb") as fi, gzip.open(tmp, "wb", compresslevel=6) as fo:
                    shutil.copyfileobj(fi, fo, 2**22)
        finally:
            if raw_tmp != tmp:
                _fs.remove_local(raw_tmp)
    log.info("wrote %s (%s)", url, ", ".join(p[0] or "empty primary" for p in plan))
    return url


def _as_dask(a: Any) -> da.Array:
    from ..image import DEFAULT_CHUNK

    if isinstance(a, da.Array):
        return a
    return da.from_array(np.asarray(a), chunks=DEFAULT_CHUNK)


def _choose_variables(ds: xr.Dataset, variables: Sequence[str] | None) -> list[str]:
    two_d = [k for k in ds.data_vars if ds[k].ndim == 2]
    if variables is None:
        # the image plane's (y, x): 'image' when present, else (y, x), else the first 2-D variable;
        # PSF stamps, kernels and other 2-D variables on other dims are left out
        ref = ds["image"] if "image" in two_d else next(
            (ds[k] for k in two_d if ds[k].dims == ("y", "x")), ds[two_d[0]] if two_d else None)
        names = [k for k in two_d if ds[k].dims == ref.dims and ds[k].shape == ref.shape]  # (ref is None only if two_d is empty)
        skipped = [k for k in ds.data_vars if k not in names]
        if skipped:
            log.info("write_fits: skipping variables %s (not on the image's %s grid; pass variables= to write them "
                     "to a file of their own)", skipped, None if ref is None else dict(zip(ref.dims, ref.shape)))
    else:
        if isinstance(variables, str):
            variables = [variables]
        names = []
        for k in variables:
            if k not in ds.data_vars:
                raise ValueError(f"variables: {k!r} is not in the Dataset (it has {list(ds.data_vars)})")
            if ds[k].ndim != 2:
                raise ValueError(f"variables: {k!r} is {ds[k].ndim}-D; FITS image extensions here must be 2-D (y, x)")
            names.append(k)
    if not names:
        raise ValueError(f"the Dataset has no 2-D variable to write (it has {list(ds.data_vars)})")
    shapes = {ds[k].shape for k in names}
    if len(shapes) > 1:
        raise ValueError(f"2-D variables have different shapes {sorted(shapes)}; write them separately with variables=")
    order = [k for k in ("image", "mask", "variance") if k in names] + [k for k in names if k not in ("image", "mask", "variance")]
    upper = [k.upper() for k in order]
    if len(set(upper)) != len(upper):
        raise ValueError(f"variable names {order} collide once upper-cased as EXTNAMEs; rename them")
    return order
