"""Overwriting a Zarr store at a URL: the old store survives a failed write, and a store rewritten
from a lazy product of itself (open, image + 1, write back with ``overwrite=True``) has the right values."""

from __future__ import annotations

import dask.array as da
import fsspec
import numpy as np
import pytest

import tilepipe as tp
from tilepipe import io as tio


def _failing_dataset(shape=(64, 64)):
    def boom(block, block_info=None):
        if block_info[0]["chunk-location"] == (1, 1):
            raise RuntimeError("disk on fire")
        return block

    return tp.open_image(da.ones(shape, dtype=np.float32, chunks=32).map_blocks(boom, dtype=np.float32))


@pytest.fixture
def remote(remote_folder):
    """``(url, storage_options)`` of a fresh store name on ``memory://`` or on the moto S3 server."""
    return f"{remote_folder[0]}/img.zarr", remote_folder[1]


def test_failed_remote_overwrite_keeps_the_old_store(remote, remote_keys):
    url, opts = remote
    tio.write_zarr(tp.open_image(np.full((64, 64), 7, np.float32)), url, storage_options=opts)
    before = remote_keys(url, opts)
    with pytest.raises(RuntimeError, match="disk on fire"):
        tio.write_zarr(_failing_dataset(), url, overwrite=True, storage_options=opts)
    back = tio.read_zarr(url, storage_options=opts)
    assert float(back["image"].values.mean()) == 7.0
    assert remote_keys(url, opts) == before  # the old store is intact and no temporary is left beside it


def test_remote_inplace_lazy_update(remote, remote_keys):
    url, opts = remote
    tio.write_zarr(tp.open_image(np.full((64, 64), 7, np.float32), chunks=32), url, storage_options=opts)
    ds = tp.open_image(url, storage_options=opts)
    ds["image"] = ds["image"] + 1  # a lazy product of the stored image, written back over it
    tio.write_zarr(ds, url, overwrite=True, storage_options=opts)
    back = tio.read_zarr(url, storage_options=opts)
    np.testing.assert_array_equal(back["image"].values, np.full((64, 64), 8, np.float32))
    assert back["mask"].dtype == bool and not back["mask"].values.any()
    fs, path = fsspec.core.url_to_fs(url, **opts)
    assert [k for k in remote_keys(url, opts) if not k.startswith(path.rstrip("/") + "/")] == []  # no temporaries


def test_remote_overwrite_drops_old_variables_and_chunks(remote, remote_keys):
    url, opts = remote
    big = tp.open_image(np.full((96, 96), 3, np.float32), chunks=32)
    big["extra"] = big["image"] * 2
    tio.write_zarr(big, url, storage_options=opts)
    small = tp.open_image(np.full((20, 30), 5, np.float32))
    tio.write_zarr(small, url, overwrite=True, storage_options=opts)
    back = tio.read_zarr(url, storage_options=opts)
    assert "extra" not in back and back["image"].shape == (20, 30)
    assert float(back["image"].values.mean()) == 5.0
    assert not any("/extra/" in k for k in remote_keys(url, opts))
