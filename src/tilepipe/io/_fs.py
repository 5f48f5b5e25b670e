"""fsspec helpers shared by the FITS, Zarr and table readers/writers.

Everything that touches a path goes through here so that local paths,
``file://``, ``memory://`` and object-store URLs (``s3://``...) behave the
same: errors name the path and say what to check, writes are atomic, and an
existing product is never replaced unless the caller says ``overwrite=True``.

Credentials and endpoints always travel in ``storage_options`` (never through
the environment), so Dask workers that re-open a file get them too.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import shutil
import tempfile
import uuid
from typing import Any, Iterator

import fsspec

log = logging.getLogger(__name__)

#: protocols whose single-object PUT is atomic and which have buckets
_BUCKET_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}
#: provenance packages recorded in every product
_PROV_PACKAGES = ("numpy", "scipy", "dask", "distributed", "xarray", "astropy", "zarr", "fsspec", "photutils", "sep")


def as_str(src: Any, name: str = "path") -> str:
    """Path or URL as a ``str`` (``~`` expanded for local paths)."""
    if isinstance(src, os.PathLike):
        src = os.fspath(src)
    if not isinstance(src, str):
        raise TypeError(f"{name} must be a path or URL string; got {type(src).__name__}")
    if not src:
        raise ValueError(f"{name} must not be empty")
    if "://" not in src:
        src = os.path.expanduser(src)
    return src


def protocol(url: str) -> str:
    """The fsspec protocol of ``url`` (``"file"`` for plain paths)."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].split("::")[-1].lower()


def local_path(url: str) -> str | None:
    """The local filesystem path of ``url`` (plain path or ``file://``), else ``None``."""
    if "://" not in url:
        return os.path.abspath(url)
    if protocol(url) in ("file", "local") and "::" not in url:
        return os.path.abspath(url.split("://", 1)[1])
    return None


def get_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """``(filesystem, path)`` for ``url`` with ``storage_options``."""
    lp = local_path(url)
    if lp is not None:
        return fsspec.filesystem("file"), lp
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise ValueError(
            f"cannot handle URL {url!r}: {exc}. Install the fsspec backend for {protocol(url)!r} "
            "(e.g. `pip install tilepipe[s3]` for s3://) or check the URL"
        ) from exc


def describe_remote(fs: Any, url: str) -> str:
    """A hint saying what to check when a remote path is missing."""
    endpoint = None
    opts = getattr(fs, "storage_options", {}) or {}
    ck = opts.get("client_kwargs") or {}
    if isinstance(ck, dict):
        endpoint = ck.get("endpoint_url")
    endpoint = endpoint or opts.get("endpoint_url")
    where = f" at endpoint {endpoint}" if endpoint else ""
    return (
        f"check the URL {url!r}{where}, and the credentials and endpoint in storage_options "
        "(e.g. {'key': ..., 'secret': ..., 'client_kwargs': {'endpoint_url': ...}})"
    )


def check_bucket(fs: Any, path: str, url: str) -> None:
    """Raise ``FileNotFoundError`` when the bucket of an object-store ``url`` does not exist.

    Called before any write so that a wrong bucket writes nothing.
    """
    if protocol(url) not in _BUCKET_PROTOCOLS:
        return
    bucket = path.strip("/").split("/", 1)[0]
    try:
        ok = fs.exists(bucket)
    except Exception as exc:  # permission errors etc.: report them, never write
        raise FileNotFoundError(
            f"cannot access bucket {bucket!r} of {url!r} ({type(exc).__name__}: {exc}); {describe_remote(fs, url)}"
        ) from exc
    if not ok:
        raise FileNotFoundError(
            f"bucket {bucket!r} does not exist (or is not visible with these credentials), so nothing was "
            f"written to {url!r}; create the bucket first, or {describe_remote(fs, url)}"
        )


def check_local_parent(path: str) -> None:
    """Raise ``FileNotFoundError`` when the folder that should hold ``path`` is missing."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"folder {parent!r} does not exist; create it first (mkdir -p {parent}) to write {path!r}")


def exists_error(url: str) -> FileExistsError:
    return FileExistsError(
        f"{url!r} already exists; pass overwrite=True (CLI: --overwrite) to replace it, or choose another name"
    )


def tmp_sibling(path: str, tag: str = "tmp", suffix: str = "") -> str:
    """A hidden temporary name next to ``path`` (same folder, so a rename is atomic).

    ``suffix`` ends the name (e.g. ``".fits.gz"``) for writers that choose the
    format or the compression from the file name.
    """
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{tag}-{uuid.uuid4().hex[:10]}{suffix}")


def remove_local(path: str) -> None:
    """Remove a local file or folder if it exists (best effort)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    except OSError as exc:  # pragma: no cover - best effort cleanup
        log.warning("could not remove temporary %s: %s", path, exc)


def commit_local(tmp: str, final: str, overwrite: bool) -> None:
    """Atomically move the finished ``tmp`` (file or folder) to ``final``.

    Without ``overwrite`` an existing ``final`` is never touched.  With it, the
    old product is first renamed aside and removed only after the new one is
    in place.
    """
    old = None
    if os.path.lexists(final):
        if not overwrite:
            raise exists_error(final)
        old = tmp_sibling(final, "old")
        os.rename(final, old)
    try:
        if os.path.isdir(tmp):
            os.rename(tmp, final)  # fails if something appeared meanwhile
        else:
            try:
                os.link(tmp, final)  # no-clobber for files
                os.remove(tmp)
            except OSError as exc:
                if os.path.lexists(final):
                    raise exists_error(final) from exc
                os.rename(tmp, final)
    except BaseException:
        if old is not None and not os.path.lexists(final):
            os.rename(old, final)
        raise
    if old is not None:
        remove_local(old)


@contextlib.contextmanager
def atomic_file(url: str, *, overwrite: bool, storage_options: dict[str, Any] | None = None,
                suffix: str = "") -> Iterator[str]:
    """Yield a local temporary file name; on success publish it as ``url`` atomically.

    Local targets: a hidden sibling renamed into place.  Remote targets: a
    local temporary file uploaded in one PUT (atomic on object stores), or to
    a temporary key then moved for other filesystems.  On any error the
    temporary is removed and nothing appears under ``url``.  The temporary
    name ends with ``suffix`` in both cases (writers such as astropy choose
    the format and gzip compression from it).
    """
    fs, path = get_fs(url, storage_options)
    lp = local_path(url)
    if lp is not None:
        check_local_parent(lp)
        if os.path.lexists(lp) and not overwrite:
            raise exists_error(url)
        tmp = tmp_sibling(lp, suffix=suffix)
        try:
            yield tmp
            commit_local(tmp, lp, overwrite)
        finally:
            remove_local(tmp)
        return
    check_bucket(fs, path, url)
    if fs.exists(path) and not overwrite:
        raise exists_error(url)
    fd, tmp = tempfile.mkstemp(prefix="tilepipe-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        if protocol(url) in _BUCKET_PROTOCOLS or protocol(url) == "memory":
            fs.put_file(tmp, path)
        else:
            tkey = f"{path}.tmp-{uuid.uuid4().hex[:10]}"
            fs.put_file(tmp, tkey)
            fs.mv(tkey, path)
    finally:
        remove_local(tmp)


def provenance(parameters: Any = None) -> dict[str, Any]:
    """Provenance record: tilepipe version, UTC date, package versions (and parameters).

    The same idea as photutils' ``_get_meta``: every product says what wrote it.
    """
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    pkgs: dict[str, str] = {}
    for name in _PROV_PACKAGES:
        try:
            pkgs[name] = version(name)
        except PackageNotFoundError:
            continue
    out: dict[str, Any] = {
        "software": "tilepipe",
        "version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "packages": pkgs,
    }
    if parameters is not None:
        out["parameters"] = json_safe(parameters)
    return out


def json_safe(value: Any) -> Any:
    """Recursively convert ``value`` to JSON-serialisable builtins (numpy scalars, arrays, tuples...)."""
    import math

    import numpy as np

    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else str(v)
    if isinstance(value, (int, str)) or value is None:
        return value
    return str(value)
