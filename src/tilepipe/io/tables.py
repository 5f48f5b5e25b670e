"""Catalog I/O: astropy Tables as ECSV, FITS or Parquet, local or on fsspec URLs.

The format follows the file name (``.ecsv``; ``.fits``/``.fit``/``.fits.gz``;
``.parquet``/``.pq``).  Writes are atomic (temporary file, then rename or a
single upload) and refuse to replace an existing file unless
``overwrite=True``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from astropy.table import Table

from . import _fs

log = logging.getLogger(__name__)

__all__ = ["read_table", "write_table", "table_format"]

_FORMATS = (
    (".ecsv", "ascii.ecsv"),
    (".fits.gz", "fits"),
    (".fits", "fits"),
    (".fit", "fits"),
    (".fts", "fits"),
    (".parquet", "parquet"),
    (".pq", "parquet"),
)


def table_format(path: str) -> tuple[str, str]:
    """``(astropy format, suffix)`` for a catalog file name."""
    low = path.lower()
    for suffix, fmt in _FORMATS:
        if low.endswith(suffix):
            return fmt, suffix
    raise ValueError(
        f"cannot tell the table format of {path!r} from its name; use one of "
        f"{', '.join(s for s, _ in _FORMATS)} (ECSV, FITS or Parquet)"
    )


def read_table(path: Any, storage_options: dict[str, Any] | None = None) -> Table:
    """Read a catalog (ECSV, FITS or Parquet by extension) from a path or URL.

    Parameters
    ----------
    path : str or path
        Local path or fsspec URL.
    storage_options : dict, optional
        fsspec options for URLs.

    Returns
    -------
    astropy.table.Table
    """
    url = _fs.as_str(path, "path")
    fmt, suffix = table_format(url)
    lp = _fs.local_path(url)
    if lp is not None:
        if not os.path.exists(lp):
            raise FileNotFoundError(f"table file not found: {lp!r}; check the path")
        return Table.read(lp, format=fmt)
    fs, rpath = _fs.get_fs(url, storage_options)
    if not fs.exists(rpath):
        raise FileNotFoundError(f"table file not found: {url!r}; {_fs.describe_remote(fs, url)}")
    fd, tmp = tempfile.mkstemp(prefix="tilepipe-", suffix=suffix)
    os.close(fd)
    try:
        fs.get_file(rpath, tmp)
        tab = Table.read(tmp, format=fmt)
        if fmt == "fits":  # detach from the temporary file
            tab = Table(tab, copy=True)
        return tab
    finally:
        _fs.remove_local(tmp)


def write_table(table: Table, path: Any, overwrite: bool = False, storage_options: dict[str, Any] | None = None) -> str:
    """Write a catalog atomically (ECSV, FITS or Parquet by extension).

    ``TILEPIPE`` (version) and ``DATE`` (UTC, when absent) are added to a
    copy of ``table.meta`` as provenance.

    Parameters
    ----------
    table : astropy.table.Table
    path : str or path
        Local path or fsspec URL; its extension selects the format.
    overwrite : bool
        Replace an existing file (default: ``FileExistsError``).
    storage_options : dict, optional
        fsspec options for URLs.

    Returns
    -------
    str
        The path or URL written.
    """
    if not isinstance(table, Table):
        raise TypeError(f"table must be an astropy Table; got {type(table).__name__} (wrap it with Table(...))")
    url = _fs.as_str(path, "path")
    fmt, suffix = table_format(url)
    out = table.copy(copy_data=False)
    prov = _fs.provenance()
    out.meta["TILEPIPE"] = prov["version"]
    out.meta.setdefault("DATE", prov["date"])
    with _fs.atomic_file(url, overwrite=overwrite, storage_options=storage_options, suffix=suffix) as tmp:
        out.write(tmp, format=fmt, overwrite=True)
    log.info("wrote %s (%d rows)", url, len(out))
    return url
