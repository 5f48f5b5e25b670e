"""tilepipe I/O: lazy FITS, Zarr v3 and catalogs, local or on any fsspec URL.

* :func:`read_fits` / :func:`read_fits_dataset`: one 2-D image (primary,
  numbered or named extension, ``.fits.fz``, gzipped) as a lazy dask array
  whose chunk tasks re-open the file (picklable, ``storage_options`` travel).
* :func:`read_zarr` / :func:`write_zarr`: Zarr v3 stores, chunks = tile
  cores, header as ordered cards, consolidated metadata, atomic.
* :func:`write_fits`: multi-extension FITS (``MASK``, ``VARIANCE``, every
  product), provenance in ``HISTORY``, atomic, band-by-band.
* :func:`read_table` / :func:`write_table`: ECSV, FITS, Parquet.
* :func:`read_array`: a single image (FITS or Zarr), for mask/variance paths.
"""

from __future__ import annotations

from typing import Any

import dask.array as da

from .fits import fits_hdu_names, read_fits, read_fits_dataset, write_fits
from .tables import read_table, table_format, write_table
from .zarr import default_compressor, is_zarr, read_zarr, write_zarr

__all__ = [
    "read_fits",
    "read_fits_dataset",
    "write_fits",
    "fits_hdu_names",
    "is_zarr",
    "read_zarr",
    "write_zarr",
    "default_compressor",
    "read_array",
    "read_table",
    "write_table",
    "table_format",
]


def read_array(src: Any, storage_options: dict[str, Any] | None = None, chunks: Any = None) -> da.Array:
    """Read one 2-D image (FITS or Zarr, path or URL) as a lazy dask array.

    For a FITS file: the first HDU with 2-D data.  For a Zarr store: the
    array itself, else the group's ``image`` variable, else its only 2-D
    variable.  Used for ``mask=`` / ``variance=`` paths of :func:`open_image`.
    """
    if is_zarr(src, storage_options=storage_options):
        ds = read_zarr(src, storage_options=storage_options, chunks=chunks)
        two_d = [k for k in ds.data_vars if ds[k].ndim == 2]
        if "image" in two_d:
            return ds["image"].data
        if len(two_d) == 1:
            return ds[two_d[0]].data
        raise ValueError(
            f"the Zarr store {src!r} holds {len(two_d)} 2-D arrays {two_d} and no 'image'; "
            "pass the URL of one array (store/<name>)"
        )
    return read_fits(src, chunks=chunks, storage_options=storage_options)[0]
