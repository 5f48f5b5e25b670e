"""Zarr v3 stores of image Datasets (zarr-python 3), local or on any fsspec URL.

Layout of a store written by :func:`write_zarr`::

    out.zarr/zarr.json            group: attrs (header cards, gain, ..., provenance)
                                  + consolidated metadata of every array
    out.zarr/image/zarr.json      array: dimension_names ["y", "x"], Blosc zstd+shuffle
    out.zarr/image/c/0/0 ...      one chunk object per tile core
    out.zarr/mask/...             bool (True = bad)
    out.zarr/variance/...

Atomicity: local stores are written under a hidden sibling name and renamed
into place.  On URLs (object stores have no rename) the arrays are written
first and the root ``zarr.json`` last: it is the completion marker, and
:func:`read_zarr` refuses a store without it ("incomplete store").  A failed
write removes what it wrote.  Overwriting a store at a URL writes the new
store under a hidden sibling prefix first (the old one stays readable, so a
lazy product of the old store can be written back over it), then swaps the
keys: old marker, old keys, new keys, new marker.  A failed write leaves the
old store as it was.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from . import _fs

log = logging.getLogger(__name__)

__all__ = ["is_zarr", "read_zarr", "write_zarr", "default_compressor"]

_CONSOLIDATED_MSG = "Consolidated metadata is currently not part in the Zarr format 3 specification"


def default_compressor() -> Any:
    """Blosc zstd (level 5) with byte shuffle: the default Zarr compressor."""
    import zarr

    return zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")


def _store(url: str, storage_options: dict[str, Any] | None, read_only: bool) -> Any:
    from zarr.storage import FsspecStore, LocalStore

    lp = _fs.local_path(url)
    if lp is not None:
        return LocalStore(lp, read_only=read_only)
    return FsspecStore.from_url(url, storage_options=dict(storage_options or {}), read_only=read_only)


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def is_zarr(src: Any, storage_options: dict[str, Any] | None = None) -> bool:
    """True when ``src`` looks like a Zarr store (a ``.zarr`` name, or a folder/prefix with Zarr metadata).

    Only metadata keys are checked (one small request per key on a URL).
    """
    if not isinstance(src, (str, os.PathLike)):
        return False
    url = _fs.as_str(src, "src")
    if url.rstrip("/").lower().endswith(".zarr"):
        return True
    fs, path = _fs.get_fs(url, storage_options)
    try:
        if not fs.isdir(path):
            return False
        return any(fs.exists(f"{path.rstrip('/')}/{key}") for key in ("zarr.json", ".zgroup", ".zarray"))
    except (OSError, ValueError):
        return False


def _open_root(url: str, storage_options: dict[str, Any] | None) -> Any:
    import zarr

    store = _store(url, storage_options, read_only=True)
    try:
        return zarr.open(store=store, mode="r")
    except FileNotFoundError:
        pass
    except Exception as exc:  # zarr raises its own NodeNotFound errors
        if "not found" not in str(exc).lower() and "NotFound" not in type(exc).__name__:
            raise
    fs, path = _fs.get_fs(url, storage_options)
    try:
        leftovers = fs.exists(path) and bool(fs.find(path, maxdepth=3))
    except (OSError, ValueError):
        leftovers = False
    if leftovers:
        raise ValueError(
            f"{url!r} is an incomplete Zarr store (no root zarr.json: the write was interrupted, or it is not a "
            "Zarr store); write it again with overwrite=True, or delete it"
        )
    hint = "check the path" if _fs.local_path(url) else _fs.describe_remote(fs, url)
    raise FileNotFoundError(f"no Zarr store at {url!r}; {hint}")


def _dask_from(arr: Any, chunks: Any) -> da.Array:
    if chunks is None:
        chunks = arr.chunks
    return da.from_zarr(arr, chunks=chunks)


def _dims(arr: Any) -> tuple[str, ...]:
    names = None
    try:
        names = arr.metadata.dimension_names
    except AttributeError:
        names = None
    if not names or any(n is None for n in names):
        names = arr.attrs.get("_ARRAY_DIMENSIONS")
    if not names:
        names = ("y", "x") if arr.ndim == 2 else tuple(f"dim_{i}" for i in range(arr.ndim))
    return tuple(names)


_CF_KEYS = ("scale_factor", "add_offset", "_FillValue", "missing_value", "_Unsigned")


def _cf_fill(value: Any, dtype: np.dtype) -> Any:
    """A ``_FillValue`` attribute as written by xarray in Zarr v3 (floats as base64 of a little-endian double)."""
    if dtype.kind == "f" and isinstance(value, str):
        import base64
        import struct

        try:
            return struct.unpack("<d", base64.standard_b64decode(value))[0]
        except (ValueError, struct.error) as exc:
            raise ValueError(f"cannot decode the _FillValue attribute {value!r} of a {dtype} Zarr array") from exc
    return value


def _variable(arr: Any, chunks: Any, decode_cf: bool) -> xr.Variable:
    """One Zarr array as a lazy variable, CF-decoded (mask and scale) when ``decode_cf`` and it is CF-encoded.

    Zarr v2 stores written by xarray (arrays with ``_ARRAY_DIMENSIONS``) keep ``_FillValue`` in the
    array's ``fill_value``; v3 ones keep it in the attributes.  Arrays without any CF attribute
    (``scale_factor``, ``add_offset``, ``_FillValue``, ``missing_value``, ``_Unsigned``) are returned
    unchanged.
    """
    attrs = {k: v for k, v in arr.attrs.items() if k != "_ARRAY_DIMENSIONS"}
    var = xr.Variable(_dims(arr), _dask_from(arr, chunks), attrs=attrs)
    if not decode_cf:
        return var
    attrs = dict(attrs)
    dtype = np.dtype(arr.dtype)
    if "_FillValue" in attrs:
        attrs["_FillValue"] = _cf_fill(attrs["_FillValue"], dtype)
    elif arr.metadata.zarr_format == 2 and "_ARRAY_DIMENSIONS" in arr.attrs and arr.fill_value is not None:
        attrs["_FillValue"] = arr.fill_value  # xarray's convention for Zarr v2
    if not any(k in attrs for k in _CF_KEYS):
        return var
    from xarray.conventions import decode_cf_variable

    # mask and scale only (lazy on dask: an elementwise map over the chunks); times stay as stored
    return decode_cf_variable(arr.basename or "image", xr.Variable(var.dims, var.data, attrs=attrs),
                              decode_times=False, decode_timedelta=False)


def _written_by_tilepipe(attrs: Any) -> bool:
    prov = attrs.get("provenance")
    return isinstance(prov, dict) and prov.get("software") == "tilepipe"


def _in_tilepipe_store(arr: Any, url: str, storage_options: dict[str, Any] | None) -> bool:
    """True when the array at ``url`` is one variable of a store written by tilepipe (its parent group's
    provenance says so).  Only looked up (one request) for an array with CF attributes."""
    import zarr

    if not any(k in arr.attrs for k in _CF_KEYS):
        return False
    parent = url.rstrip("/").rpartition("/")[0]
    if not parent or parent.endswith(":/"):
        return False
    try:
        group = zarr.open_group(store=_store(parent, storage_options, read_only=True), mode="r")
    except Exception:  # noqa: BLE001 - no readable parent group: a standalone array store
        return False
    return _written_by_tilepipe(group.attrs)


def read_zarr(url: Any, storage_options: dict[str, Any] | None = None, chunks: Any = None) -> xr.Dataset:
    """Open a Zarr store (v3, or v2) lazily as an :class:`xarray.Dataset`.

    Every array of the root group becomes a dask-backed variable (dims from
    the Zarr ``dimension_names``; bool masks stay bool), group attributes
    become ``ds.attrs`` (``header`` cards, ``gain``, ``provenance``...).
    A plain array store (no group), or the URL of one array of a group
    (``store.zarr/mask``), becomes the single variable ``image`` (a 2-D array
    without dimension names on dims ``("y", "x")``), so
    :func:`tilepipe.open_image` opens it as an image.

    Stores written by other software (xarray, v2 or v3) are CF-decoded,
    lazily, as :func:`xarray.open_zarr` does: an array with ``scale_factor``
    / ``add_offset`` becomes float (``raw * scale_factor + add_offset``), and
    pixels equal to its ``_FillValue`` (``missing_value``) become NaN, which
    :func:`tilepipe.open_image` masks.  The ``fill_value`` of a Zarr v2 array
    counts as its ``_FillValue`` only in a store written the xarray way (with
    ``_ARRAY_DIMENSIONS``).  Stores written by tilepipe (``provenance`` in
    the group attrs) are read as stored, never decoded.

    Parameters
    ----------
    url : str or path
        Local path or fsspec URL of the store.
    storage_options : dict, optional
        fsspec options; they travel with the dask graph to the workers.
    chunks : int or tuple, optional
        Dask chunks (default: the store's chunks, i.e. the tile cores).

    Raises
    ------
    FileNotFoundError
        Nothing at ``url``.
    ValueError
        An incomplete store (interrupted write: no root ``zarr.json``).
    """
    import zarr

    url = _fs.as_str(url, "url")
    root = _open_root(url, storage_options)
    attrs = dict(root.attrs)
    data_vars: dict[str, Any] = {}
    if isinstance(root, zarr.Array):
        # a plain array store (or the URL of one array of a group) is one image
        data_vars["image"] = _variable(root, chunks, decode_cf=not _in_tilepipe_store(root, url, storage_options))
        attrs = {}
    else:
        # tilepipe's own stores are never CF-decoded: their variable attrs are the product's, verbatim
        decode_cf = not _written_by_tilepipe(attrs)
        for name, arr in sorted(root.arrays(), key=lambda kv: kv[0]):
            data_vars[name] = _variable(arr, chunks, decode_cf)
    order = [k for k in ("image", "mask", "variance") if k in data_vars] + [k for k in data_vars if k not in ("image", "mask", "variance")]
    return xr.Dataset({k: data_vars[k] for k in order}, attrs=attrs)


def _regular_chunks(arr: da.Array, chunks: Any) -> tuple[int, ...]:
    """Zarr chunk shape for ``arr``; rechunk ``arr`` when its chunks are not Zarr-regular."""
    if chunks is not None:
        if isinstance(chunks, (int, np.integer)):
            return tuple(min(int(chunks), s) for s in arr.shape)
        cs = tuple(int(c) for c in chunks)
        if len(cs) != arr.ndim:
            raise ValueError(f"chunks must be an int or {arr.ndim} ints; got {chunks!r}")
        return tuple(min(c, s) if c > 0 else s for c, s in zip(cs, arr.shape))
    return tuple(max(c) if c else 1 for c in arr.chunks)


def _is_regular(dchunks: tuple[tuple[int, ...], ...], zchunks: tuple[int, ...]) -> bool:
    for dc, zc in zip(dchunks, zchunks):
        if any(c != zc for c in dc[:-1]) or (dc and dc[-1] > zc):
            return False
    return True


def write_zarr(
    ds: Any,
    url: Any,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    chunks: Any = None,
    compressor: Any = None,
    consolidated: bool = True,
) -> str:
    """Write a Dataset to a Zarr v3 store, chunk by chunk from the workers.

    Every data variable becomes a Zarr array with ``dimension_names`` equal to
    its dims; 2-D arrays are chunked like their dask chunks (the tile cores:
    one Zarr chunk per core, written by the task that computed it, so memory
    stays bounded and nothing is gathered on the client).  Cores of unequal
    size (``TileGrid`` remainders) are rechunked to the largest core, since
    a Zarr grid is regular.  Bool masks stay bool.  ``ds.attrs`` are stored
    JSON-safe (the FITS ``header`` as ordered ``[keyword, value, comment]``
    cards) plus ``provenance`` (tilepipe version, UTC date, package versions,
    ``attrs["parameters"]``).

    Parameters
    ----------
    ds : xarray.Dataset or array
        The product (arrays are wrapped with :func:`tilepipe.open_image`).
    url : str or path
        Local path or fsspec URL (``memory://``, ``s3://bucket/key.zarr``...).
    overwrite : bool
        Replace an existing store (default: ``FileExistsError``).  The new
        store is written completely beside the old one first, so a failed
        write keeps the old store, and ``ds`` may be a lazy product of the
        store it replaces (open, modify, write back to the same path or URL).
    storage_options : dict, optional
        fsspec options (credentials, endpoint); pickled to the workers.
    chunks : int or tuple, optional
        Chunk shape to use instead of the dask chunks.
    compressor : zarr codec, optional
        Default: :func:`default_compressor` (Blosc zstd + shuffle).
    consolidated : bool
        Write consolidated metadata into the root ``zarr.json`` (one request
        opens the whole store).

    Returns
    -------
    str
        The path or URL written.

    Raises
    ------
    FileExistsError
        ``url`` exists and ``overwrite`` is false.
    FileNotFoundError
        The parent folder or the bucket does not exist (nothing is written).
    """
    url = _fs.as_str(url, "url")
    if not isinstance(ds, xr.Dataset):
        from ..image import open_image

        ds = open_image(ds)
    if not ds.data_vars:
        raise ValueError("the Dataset has no variables to write")
    comp = default_compressor() if compressor is None else compressor
    target = _begin_store(url, storage_options, overwrite)
    try:
        _write_store(ds, target, storage_options, chunks, comp, consolidated)
    except BaseException:
        _discard_store(target, storage_options)
        raise
    _commit_store(target, url, storage_options, overwrite)
    return url


def _begin_store(url: str, storage_options: dict[str, Any] | None, overwrite: bool, temporary: bool = True) -> str:
    """Where to write a new store for ``url``: a hidden temporary sibling, or ``url`` itself.

    Refuses an existing ``url`` without ``overwrite`` (``FileExistsError``) and a missing parent
    folder or bucket (``FileNotFoundError``) before anything is written.  A local store is written
    under a hidden sibling name (renamed into place by :func:`_commit_store`).  At a URL a new store
    is written in place (the root ``zarr.json`` last is its completion marker); an existing one
    being overwritten stays untouched (and readable) while the new one is written under a hidden
    sibling prefix, swapped in by :func:`_commit_store`.  ``temporary=False`` always returns
    ``url`` (the caller writes straight into it).
    """
    lp = _fs.local_path(url)
    if lp is not None:
        _fs.check_local_parent(lp)
        if os.path.lexists(lp) and not overwrite:
            raise _fs.exists_error(url)
        return _fs.tmp_sibling(lp) if temporary else url
    fs, path = _fs.get_fs(url, storage_options)
    _fs.check_bucket(fs, path, url)
    fs.invalidate_cache()
    if not fs.exists(path):
        return url
    if not overwrite:
        raise _fs.exists_error(url)
    return _hidden_sibling(url, f"tmp-{uuid.uuid4().hex[:10]}") if temporary else url


def _commit_store(target: str, url: str, storage_options: dict[str, Any] | None, overwrite: bool) -> None:
    """Publish the complete store written at ``target`` (from :func:`_begin_store`) as ``url``.

    Nothing to do when ``target`` is ``url``.  A local store is renamed into place (the temporary
    is removed if that fails); at a URL the keys are swapped by :func:`_replace_remote` (root
    ``zarr.json`` last): if that fails, its error says where the complete new store was left.
    """
    if target == url:
        return
    lp = _fs.local_path(url)
    if lp is not None:
        try:
            _fs.commit_local(target, lp, overwrite)
        except BaseException:
            _discard_store(target, storage_options)
            raise
        return
    fs, path = _fs.get_fs(url, storage_options)
    _replace_remote(fs, _fs.get_fs(target, storage_options)[1], path, url)


def _discard_store(target: str, storage_options: dict[str, Any] | None) -> None:
    """Remove the store of a failed write at ``target`` (best effort; never the store being overwritten,
    unless the write went straight into it).

    Tasks still running on other threads or workers may write a few more chunks after a failure:
    keep removing until it stayed gone for 0.25 s (at most ~5 s), locally and at a URL alike.
    """
    try:
        lp = _fs.local_path(target)
        if lp is not None:
            def exists() -> bool:
                return os.path.lexists(lp)

            def remove() -> None:
                _fs.remove_local(lp)
        else:
            fs, path = _fs.get_fs(target, storage_options)

            def exists() -> bool:
                fs.invalidate_cache()
                return fs.exists(path)

            def remove() -> None:
                try:
                    fs.rm(path, recursive=True)
                except FileNotFoundError:
                    pass
        gone = 0
        for _ in range(100):
            if exists():
                remove()
                gone = 0
            else:
                gone += 1
                if gone >= 5:
                    return
            time.sleep(0.05)
    except Exception as exc:  # noqa: BLE001 - best effort
        log.warning("could not clean up the incomplete store %s: %s", target, exc)


def _hidden_sibling(url: str, tag: str) -> str:
    """A hidden name next to ``url`` (same parent prefix): ``parent/.name.tag``."""
    parent, _, name = url.rstrip("/").rpartition("/")
    return f"{parent}/.{name}.{tag}"


def _replace_remote(fs: Any, src: str, dst: str, url: str) -> None:
    """Replace the store at ``dst`` by the complete store at ``src`` (object stores have no rename).

    The old root ``zarr.json`` (the completion marker) goes first, so that readers see an
    incomplete store rather than a mix while the keys change; then the old keys, then the new
    ones are copied with the new root ``zarr.json`` last.  If this fails, the complete new store
    is left at ``src`` and the error says so.
    """
    fs.invalidate_cache()
    src_keys = sorted(k for k in fs.find(src) if not k.endswith("/"))
    root = f"{src.rstrip('/')}/zarr.json"
    if root not in src_keys:  # pragma: no cover - _write_store always writes it
        raise RuntimeError(f"the new store at {src!r} has no root zarr.json; {url!r} was left unchanged")
    src_keys.remove(root)
    src_keys.append(root)  # the completion marker last
    dst_keys = [f"{dst.rstrip('/')}/{k[len(src.rstrip('/')) + 1:]}" for k in src_keys]
    try:
        old_root = f"{dst.rstrip('/')}/zarr.json"
        if fs.exists(old_root):
            fs.rm_file(old_root)
        fs.rm(dst, recursive=True)
        fs.invalidate_cache()
        if src_keys[:-1]:
            fs.copy(src_keys[:-1], dst_keys[:-1], on_error="raise")
        fs.copy(src_keys[-1:], dst_keys[-1:], on_error="raise")
    except Exception as exc:
        raise OSError(
            f"could not move the new Zarr store into place at {url!r} ({type(exc).__name__}: {exc}); "
            f"the complete new store is at {fs.unstrip_protocol(src)!r}: copy it to {url!r} by hand"
        ) from exc
    try:  # the copy is complete: nothing writes to src any more, one removal is enough
        fs.rm(src, recursive=True)
    except Exception as exc:  # noqa: BLE001 - best effort: url is already complete
        log.warning("could not remove the temporary store %s: %s", fs.unstrip_protocol(src), exc)
    fs.invalidate_cache()


def _write_store(ds: xr.Dataset, url: str, storage_options: dict[str, Any] | None, chunks: Any, comp: Any,
                 consolidated: bool) -> None:
    import zarr

    from ..image import DEFAULT_CHUNK

    sources, targets = [], []
    for name, var in ds.data_vars.items():
        data = var.data
        if not isinstance(data, da.Array):
            data = da.from_array(np.asarray(data), chunks=DEFAULT_CHUNK if var.ndim else ())
        if data.dtype.kind not in "biuf":
            raise TypeError(f"variable {name!r} has dtype {data.dtype}; write_zarr stores bool, integer and float arrays")
        if data.ndim == 0:
            raise ValueError(f"variable {name!r} is a scalar; store it in ds.attrs instead")
        zchunks = _regular_chunks(data, chunks)
        if not _is_regular(data.chunks, zchunks):
            log.info("write_zarr: rechunking %r from %s to the regular grid %s", name, data.chunks, zchunks)
            data = data.rechunk(zchunks)
        if not data.dtype.isnative:
            data = data.astype(data.dtype.newbyteorder("="))
        # each array gets its own store rooted at url/name: no parent group is written yet
        arr = zarr.create_array(
            _store(_join(url, name), storage_options, read_only=False),
            shape=data.shape,
            dtype=data.dtype,
            chunks=zchunks,
            compressors=[comp] if comp else None,
            dimension_names=tuple(str(d) for d in var.dims),
            attributes=_fs.json_safe(dict(var.attrs)),
            zarr_format=3,
        )
        sources.append(data)
        targets.append(arr)
    # chunks are aligned with the Zarr grid: tasks write disjoint chunks, no lock needed
    da.store(sources, targets, lock=False, compute=True)
    attrs = _fs.json_safe(dict(ds.attrs))
    attrs["provenance"] = _fs.provenance(ds.attrs.get("parameters"))
    root_store = _store(url, storage_options, read_only=False)
    zarr.create_group(root_store, attributes=attrs, zarr_format=3)  # the completion marker
    if consolidated:
        # main thread only: client-side write_zarr, after da.store finished; zarr 3 always warns here
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CONSOLIDATED_MSG)
            zarr.consolidate_metadata(root_store)
