"""I/O: lazy FITS (local, memory://, s3://), Zarr v3, multi-extension FITS, tables, atomic writes."""

from __future__ import annotations

import io
import json
import os
import uuid

import dask
import dask.array as da
import fsspec
import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from astropy.table import Table
from fsspec.implementations.memory import MemoryFileSystem

import tilepipe as tp
from tilepipe import io as tio
from tilepipe.image import cards_to_header, header_to_cards


# ----------------------------------------------------------------- helpers
def _raise_on_compute(*args, **kwargs):
    raise RuntimeError("something was computed (pixels read) while only building the graph")


def _wcs_header(shape=(200, 300)) -> fits.Header:
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRPIX1"], h["CRPIX2"] = shape[1] / 2, shape[0] / 2
    h["CRVAL1"], h["CRVAL2"] = 150.1, 2.2
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -7.3e-5, 1e-7, 1.2e-7, 7.3e-5
    h["GAIN"] = (2.5, "e-/ADU")
    h["OBJECT"] = "synthetic"
    h.append(("HISTORY", "first history"), bottom=True)
    h.append(("COMMENT", "a comment between histories"), bottom=True)
    h.append(("HISTORY", "second history"), bottom=True)
    return h


@pytest.fixture(scope="module")
def img():
    rng = np.random.default_rng(42)
    a = rng.normal(100.0, 5.0, size=(200, 300)).astype(np.float32)
    a[10, 20] = np.nan
    return a


@pytest.fixture(scope="module")
def mef(tmp_path_factory, img):
    """A multi-extension FITS: empty primary, SCI (big-endian float32), ERR, and a table."""
    p = tmp_path_factory.mktemp("mef") / "mef.fits"
    tab = fits.BinTableHDU(Table({"a": [1, 2]}), name="CAT")
    fits.HDUList([
        fits.PrimaryHDU(),
        fits.ImageHDU(img.astype(">f4"), header=_wcs_header(), name="SCI"),
        fits.ImageHDU((img * 2).astype(">f8"), name="ERR"),
        tab,
    ]).writeto(p)
    return p


class CountingMemoryFS(MemoryFileSystem):
    """memory:// that counts the bytes handed out (ranged reads and file reads)."""

    protocol = ("countmem",)
    nbytes = 0
    ranges: list = []

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start=start, end=end, **kwargs)
        type(self).nbytes += len(data)
        type(self).ranges.append((start, end))
        return data

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "r" not in mode:
            return f
        owner = type(self)

        class Counting(io.BytesIO):
            def read(self, n=-1):
                out = super().read(n)
                owner.nbytes += len(out)
                return out

            def readinto(self, b):
                k = super().readinto(b)
                owner.nbytes += k
                return k

        return Counting(f.getvalue())


fsspec.register_implementation("countmem", CountingMemoryFS, clobber=True)


# ----------------------------------------------------------------- reading FITS
def test_read_fits_default_numbered_named(mef, img):
    data, hdr = tio.read_fits(mef)
    assert data.dtype == np.float32 and data.dtype.isnative
    np.testing.assert_array_equal(data.compute(), img)  # NaN positions equal too
    assert hdr["OBJECT"] == "synthetic"
    d2, _ = tio.read_fits(mef, hdu=2, chunks=64)
    assert d2.dtype == np.float64 and d2.dtype.isnative
    np.testing.assert_array_equal(d2.compute(), img.astype(np.float64) * 2)
    d3, _ = tio.read_fits(mef, hdu="err", chunks=(50, 70))
    assert d3.chunks[0][0] == 50 and d3.chunks[1][0] == 70
    np.testing.assert_array_equal(d3.compute(), d2.compute())


@pytest.mark.parametrize("hdu, match", [("NOPE", "not in"), (7, "not in"), (0, "no 2-D image"), ("CAT", "no 2-D image")])
def test_read_fits_bad_hdu(mef, hdu, match):
    with pytest.raises(ValueError, match=match) as exc:
        tio.read_fits(mef, hdu=hdu)
    assert "SCI" in str(exc.value)  # lists the HDUs


def test_read_fits_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="check the path"):
        tio.read_fits(tmp_path / "missing.fits")
    bad = tmp_path / "bad.fits"
    bad.write_bytes(b"not a fits file" * 300)
    with pytest.raises(OSError, match="FITS"):
        tio.read_fits(bad)
    with pytest.raises(TypeError, match="hdu"):
        tio.read_fits(_write(tmp_path / "ok.fits", np.zeros((4, 4), "f4")), hdu=1.5)


def _write(path, data, header=None, **kw):
    fits.PrimaryHDU(data, header=header, **kw).writeto(path)
    return path


@pytest.mark.parametrize("chunks", [None, 64, (37, 300), (200, 41)])
def test_read_fits_chunked_equals_whole(mef, img, chunks):
    data, _ = tio.read_fits(mef, chunks=chunks)
    np.testing.assert_array_equal(data.compute(scheduler="threads"), img)
    # strided and integer indexing work on the reader too (dask slicing of the lazy array)
    np.testing.assert_array_equal(data[5:150:7, ::-3].compute(), img[5:150:7, ::-3])


def test_tile_compressed_fz(tmp_path, img):
    p = tmp_path / "img.fits.fz"
    clean = np.nan_to_num(img)
    ints = (clean * 10).astype(np.int32)
    fits.HDUList([
        fits.PrimaryHDU(),
        fits.CompImageHDU(clean, header=_wcs_header(), name="SCI", compression_type="GZIP_2", quantize_level=0),
        fits.CompImageHDU(ints, name="INT", compression_type="RICE_1"),
    ]).writeto(p)
    data, hdr = tio.read_fits(p, chunks=(64, 100))  # first 2-D image: the compressed SCI
    assert hdr["OBJECT"] == "synthetic" and "ZIMAGE" not in hdr
    np.testing.assert_array_equal(data.compute(scheduler="threads"), clean)  # lossless
    di, _ = tio.read_fits(p, hdu="INT", chunks=50)
    assert di.dtype == np.int32
    np.testing.assert_array_equal(di.compute(scheduler="threads"), ints)
    ds = tp.open_image(p)
    assert tp.wcs(ds).wcs.ctype[0] == "RA---TAN"


def _open_fds(path) -> int:
    """Open file descriptors of this process on ``path`` (Linux /proc)."""
    target = os.path.realpath(path)
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")) == target
        except OSError:
            pass
    return n


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through Linux /proc")
def test_compressed_readers_bound_their_open_files(tmp_path, img, monkeypatch):
    # section reads keep a file open between chunks; a night of .fits.fz images must not pile up
    # open files: at most _MAX_OPEN_FILES stay open, closed least recently read first, reopened on
    # demand, and a reader's file closes when the reader goes away
    from tilepipe.io import fits as tfits

    monkeypatch.setattr(tfits, "_MAX_OPEN_FILES", 3)
    clean = np.nan_to_num(img)
    arrays, paths = [], []
    for i in range(6):
        p = tmp_path / f"img{i}.fits.fz"
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(clean + i, compression_type="GZIP_2",
                                                            quantize_level=0)]).writeto(p)
        data, _ = tio.read_fits(p, chunks=50)
        np.testing.assert_array_equal(data.compute(scheduler="threads"), clean + i)
        arrays.append(data)
        paths.append(p)
    open_now = [_open_fds(p) for p in paths]
    assert sum(n > 0 for n in open_now) == 3 and all(n > 0 for n in open_now[3:]), open_now
    np.testing.assert_array_equal(arrays[0].compute(scheduler="threads"), clean)  # reopened after eviction
    assert _open_fds(paths[0]) > 0 and _open_fds(paths[3]) == 0
    state = tfits._OPEN_FILES[next(reversed(tfits._OPEN_FILES))][1]
    assert state.get("hdul") is not None
    state["finalizer"]()  # what runs when the reader is collected
    assert _open_fds(paths[0]) == 0


def test_gzipped(tmp_path, img):
    p = tmp_path / "img.fits.gz"
    _write(p, img, header=_wcs_header())
    data, _ = tio.read_fits(p, chunks=80)
    np.testing.assert_array_equal(data.compute(), img)
    url = f"memory://tp-{uuid.uuid4().hex[:8]}/img.fits.gz"  # remote gzip: detected by its magic bytes
    fsspec.filesystem("memory").pipe_file(url, p.read_bytes())
    data, hdr = tio.read_fits(url, chunks=(64, 300))
    assert hdr["OBJECT"] == "synthetic"
    np.testing.assert_array_equal(data.compute(), img)


def test_uint16_bzero_real_file(shared_data):
    path = shared_data / "pair_pydia_microlens" / "AKB13475I0098.fits"
    with fits.open(path) as hdul:
        ref = hdul[0].data.copy()
        assert hdul[0].header["BZERO"] == 32768
    data, hdr = tio.read_fits(path, chunks=100)
    assert data.dtype == np.uint16 == ref.dtype
    out = data.compute()
    np.testing.assert_array_equal(out, ref)
    assert out.max() > 32767  # the sign flip matters
    ds = tp.open_image(path)
    np.testing.assert_array_equal(ds["image"].values, ref.astype(np.float32))
    assert not tp.image.has_wcs(ds)


def test_bscale_bzero_and_blank(tmp_path):
    raw = np.arange(-50, 50, dtype=np.int16).reshape(10, 10)
    p = tmp_path / "scaled.fits"
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BSCALE"], hdu.header["BZERO"] = 0.5, 10.0
    hdu.writeto(p)
    with fits.open(p) as h:
        ref = h[0].data.copy()
    data, _ = tio.read_fits(p, chunks=4)
    assert data.dtype == ref.dtype == np.float32
    np.testing.assert_array_equal(data.compute(), ref)

    pb = tmp_path / "blank.fits"
    h2 = fits.PrimaryHDU(raw)
    h2.header["BLANK"] = -7
    h2.writeto(pb)
    ds = tp.open_image(pb, chunks=4)
    im = ds["image"].values
    assert np.isnan(im[raw == -7]).all() and np.isfinite(im[raw != -7]).all()
    np.testing.assert_array_equal(ds["mask"].values, raw == -7)  # BLANK -> NaN -> mask


def test_open_16k_fits_reads_no_pixels(tmp_path, monkeypatch):
    """Opening a 16k x 16k FITS builds the Dataset from the header alone."""
    n = 16384
    hdr = fits.PrimaryHDU(np.zeros((1, 1), np.float32)).header
    hdr["NAXIS1"], hdr["NAXIS2"] = n, n
    p = tmp_path / "big.fits"
    hb = hdr.tostring().encode()
    with open(p, "wb") as f:  # a sparse 1 GiB file: header + 4 pixels written, the rest holes
        f.write(hb)
        f.write(np.full(4, 7.0, ">f4").tobytes())
        f.truncate(len(hb) + -(-n * n * 4 // 2880) * 2880)
    reads = []
    orig = tio.fits.FitsChunkReader.__getitem__
    monkeypatch.setattr(tio.fits.FitsChunkReader, "__getitem__", lambda self, key: reads.append(key) or orig(self, key))
    with dask.config.set(scheduler=_raise_on_compute):
        ds = tp.open_image(p)
    assert ds["image"].shape == (n, n) and ds["image"].dtype == np.float32
    assert ds["image"].data.npartitions == 64 and reads == []
    corner = ds["image"][:2, :5].compute(scheduler="sync")  # one chunk read, not the whole image
    np.testing.assert_array_equal(corner, [[7, 7, 7, 7, 0], [0, 0, 0, 0, 0]])
    assert len(reads) == 1


def test_remote_fits_fetches_only_needed_bytes(img):
    url = f"countmem://tp-{uuid.uuid4().hex[:8]}/img.fits"
    bio = io.BytesIO()
    fits.PrimaryHDU(img, header=_wcs_header()).writeto(bio)
    fs = fsspec.filesystem("countmem")
    fs.pipe_file(url, bio.getvalue())
    ny, nx = img.shape
    CountingMemoryFS.nbytes = 0
    with dask.config.set(scheduler=_raise_on_compute):
        data, hdr = tio.read_fits(url, chunks=(50, -1))
    header_bytes = CountingMemoryFS.nbytes
    assert header_bytes <= 2 * 2880  # the header only (one block here), no pixels
    CountingMemoryFS.nbytes, CountingMemoryFS.ranges = 0, []
    band = data[50:100].compute(scheduler="sync")  # one full-width chunk
    np.testing.assert_array_equal(band, img[50:100])
    assert CountingMemoryFS.nbytes == 50 * nx * 4  # exactly its bytes
    CountingMemoryFS.nbytes = 0
    sq, _ = tio.read_fits(url, chunks=(40, 30))
    CountingMemoryFS.nbytes = 0
    block = sq[40:80, 60:90].compute(scheduler="sync")
    np.testing.assert_array_equal(block, img[40:80, 60:90])
    # one ranged request from the first to the last pixel of the chunk
    assert CountingMemoryFS.nbytes == header_bytes * 0 + ((40 - 1) * nx + 30) * 4


def test_reader_is_picklable(mef):
    import pickle

    data, _ = tio.read_fits(mef, chunks=64)
    back = pickle.loads(pickle.dumps(data))
    np.testing.assert_array_equal(back.compute(), data.compute())


# ----------------------------------------------------------------- Zarr
@pytest.fixture(scope="module")
def product(img):
    """A Dataset with products: background (float32), flag (bool), attrs with parameters."""
    ds = tp.open_image(img, header=_wcs_header(), chunks=(100, 150), fwhm=3.1)
    ds["background"] = (("y", "x"), da.full(img.shape, 100.0, dtype=np.float32, chunks=(100, 150)))
    ds["flag"] = (("y", "x"), da.from_array(np.arange(img.size).reshape(img.shape) % 7 == 0, chunks=(100, 150)))
    ds.attrs["parameters"] = {"nsigma": 5.0, "nx": np.int64(2), "method": "zogy"}
    return ds


def _assert_same(a: xr.Dataset, b: xr.Dataset, names=("image", "mask", "variance")):
    for k in names:
        x, y = a[k].values, b[k].values
        assert x.dtype == y.dtype, k
        assert x.tobytes() == y.tobytes(), f"{k} differs"  # bit-identical (NaN payloads too)


def test_zarr_layout_and_roundtrip(tmp_path, product):
    import zarr

    url = tmp_path / "p.zarr"
    tio.write_zarr(product, url)
    meta = json.loads((url / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
    assert set(meta["consolidated_metadata"]["metadata"]) == {"image", "mask", "variance", "background", "flag"}
    g = zarr.open_group(str(url), mode="r")
    im = g["image"]
    assert im.chunks == (100, 150) and im.metadata.dimension_names == ("y", "x")
    comp = im.compressors[0]
    assert type(comp).__name__ == "BloscCodec" and comp.cname.value == "zstd" and comp.shuffle.value == "shuffle"
    assert g["mask"].dtype == np.bool_ and g["flag"].dtype == np.bool_
    prov = g.attrs["provenance"]
    assert prov["version"] == tp.__version__ and "dask" in prov["packages"] and prov["date"].endswith("Z")
    assert prov["parameters"] == {"nsigma": 5.0, "nx": 2, "method": "zogy"}
    back = tio.read_zarr(url)
    assert list(back.data_vars)[:3] == ["image", "mask", "variance"]
    _assert_same(product, back, ("image", "mask", "variance", "background", "flag"))
    assert back.attrs["header"] == header_to_cards(_wcs_header())
    assert back["image"].data.chunks == product["image"].data.chunks
    ds = tp.open_image(url)
    assert ds.attrs["gain"] == 2.5 and ds.attrs["fwhm"] == 3.1
    _assert_same(product, ds, ("image", "mask", "variance", "background", "flag"))
    assert tio.is_zarr(url) and not tio.is_zarr(tmp_path)


def test_zarr_chunks_follow_tile_cores(tmp_path, img):
    grid = tp.TileGrid(img.shape, 2, 3)  # nx=2, ny=3: cores (67, 67, 66) x (150, 150): not Zarr-regular in y
    ds = tp.open_image(da.from_array(img, chunks=grid.chunks))
    tio.write_zarr(ds, tmp_path / "g.zarr")
    back = tio.read_zarr(tmp_path / "g.zarr")
    assert back["image"].data.chunks == ((67, 67, 66), (150, 150))
    _assert_same(ds, back)
    tio.write_zarr(ds, tmp_path / "c.zarr", chunks=64)
    assert tio.read_zarr(tmp_path / "c.zarr")["image"].data.chunksize == (64, 64)
    with pytest.raises(ValueError, match="chunks"):
        tio.write_zarr(ds, tmp_path / "bad.zarr", chunks=(1, 2, 3))


def test_zarr_refuses_overwrite(tmp_path, product):
    url = tmp_path / "o.zarr"
    tio.write_zarr(product, url)
    with pytest.raises(FileExistsError, match="overwrite=True") as exc:
        tio.write_zarr(product, url)
    assert "o.zarr" in str(exc.value)
    small = tp.open_image(np.ones((20, 30), np.float32))
    tio.write_zarr(small, url, overwrite=True)
    assert tio.read_zarr(url)["image"].shape == (20, 30)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporaries left


def _failing_dataset(shape=(64, 64)):
    def boom(block, block_info=None):
        if block_info[0]["chunk-location"] == (1, 1):
            raise RuntimeError("disk on fire")
        return block

    img = da.ones(shape, dtype=np.float32, chunks=32).map_blocks(boom, dtype=np.float32)
    return tp.open_image(img, variance=da.ones(shape, np.float32, chunks=32))


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_failed_zarr_write_leaves_nothing(tmp_path, kind):
    url = str(tmp_path / "f.zarr") if kind == "local" else f"memory://tp-{uuid.uuid4().hex[:8]}/f.zarr"
    with pytest.raises(RuntimeError, match="disk on fire"):
        tio.write_zarr(_failing_dataset(), url, storage_options={})
    if kind == "local":
        assert os.listdir(tmp_path) == []
    else:
        fs, path = fsspec.core.url_to_fs(url)
        assert not fs.exists(path)


def test_incomplete_remote_store_is_refused():
    import zarr
    from zarr.storage import FsspecStore

    url = f"memory://tp-{uuid.uuid4().hex[:8]}/half.zarr"
    # what an interrupted remote write leaves: arrays, but no root zarr.json (the completion marker)
    a = zarr.create_array(FsspecStore.from_url(url + "/image"), shape=(8, 8), chunks=(4, 4), dtype="f4")
    a[:] = 1
    assert tio.is_zarr(url)
    with pytest.raises(ValueError, match="incomplete Zarr store"):
        tio.read_zarr(url)
    with pytest.raises(ValueError, match="incomplete"):
        tp.open_image(url)
    with pytest.raises(FileExistsError):
        tio.write_zarr(tp.open_image(np.ones((8, 8))), url)
    tio.write_zarr(tp.open_image(np.ones((8, 8))), url, overwrite=True)
    assert tio.read_zarr(url)["image"].shape == (8, 8)
    with pytest.raises(FileNotFoundError, match="no Zarr store"):
        tio.read_zarr(f"memory://tp-{uuid.uuid4().hex[:8]}/none.zarr")


def test_plain_zarr_array_store_opens_as_image(tmp_path):
    import zarr

    a = np.arange(32 * 40, dtype=np.float32).reshape(32, 40)
    for url in (str(tmp_path / "img.zarr"), f"memory://tp-{uuid.uuid4().hex[:8]}/img.zarr"):
        zarr.save_array(url, a)  # a plain Zarr array store, not a group
        ds = tio.read_zarr(url)
        assert list(ds.data_vars) == ["image"] and ds["image"].dims == ("y", "x")
        ds = tp.open_image(url)
        np.testing.assert_array_equal(ds["image"].values, a)
        assert ds["mask"].shape == a.shape
        np.testing.assert_array_equal(tio.read_array(url).compute(), a)


def test_memory_urls_roundtrip(product):
    base = f"memory://tp-{uuid.uuid4().hex[:8]}"
    tio.write_zarr(product, f"{base}/p.zarr")
    tio.write_fits(product, f"{base}/p.fits")
    for u in (f"{base}/p.zarr", f"{base}/p.fits"):
        _assert_same(product, tp.open_image(u), ("image", "mask", "variance", "background", "flag"))
    with pytest.raises(FileExistsError):
        tio.write_fits(product, f"{base}/p.fits")


# ----------------------------------------------------------------- writing FITS
def test_write_fits_layout(tmp_path, product):
    p = tmp_path / "p.fits"
    assert tio.write_fits(product, p) == str(p)
    with fits.open(p) as hdul:
        hdul.verify("exception")
        assert [h.name for h in hdul] == ["PRIMARY", "MASK", "VARIANCE", "BACKGROUND", "FLAG"]
        prim = hdul[0]
        assert prim.data.dtype == np.dtype(">f4")
        np.testing.assert_array_equal(prim.data, product["image"].values)
        assert hdul["MASK"].data.dtype == np.uint8
        np.testing.assert_array_equal(hdul["MASK"].data, product["mask"].values.astype(np.uint8))
        assert set(np.unique(hdul["MASK"].data)) == {0, 1}
        assert hdul["FLAG"].header["TPDTYPE"] == "bool"
        assert hdul["VARIANCE"].header["CTYPE1"] == "RA---TAN"  # WCS copied to products
        h = prim.header
        assert h["TILEPIPE"] == tp.__version__ and h["GAIN"] == 2.5 and h["FWHM"] == 3.1
        hist = [str(v) for v in h["HISTORY"]]
        assert hist[:2] == ["first history", "second history"]
        assert any(s.startswith(f"tilepipe {tp.__version__} wrote this file on 20") for s in hist)
        assert any("tilepipe parameter nsigma = 5.0" in s for s in hist)
    back = tp.open_image(p)
    _assert_same(product, back, ("image", "mask", "variance", "background", "flag"))
    assert back["flag"].dtype == bool


def test_write_fits_variables_and_errors(tmp_path, product):
    p = tmp_path / "sub.fits"
    tio.write_fits(product, p, variables=["image", "background"])
    with fits.open(p) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "BACKGROUND"]
    p2 = tmp_path / "noimg.fits"
    tio.write_fits(product, p2, variables=["background"])
    with fits.open(p2) as hdul:
        assert hdul[0].data is None and hdul[1].name == "BACKGROUND"
    with pytest.raises(ValueError, match="not in the Dataset"):
        tio.write_fits(product, tmp_path / "x.fits", variables=["nope"])
    with pytest.raises(ValueError, match="tile-compressed"):
        tio.write_fits(product, tmp_path / "x.fits.fz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tio.write_fits(product, tmp_path / "nofolder" / "x.fits")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tio.write_fits(product, p)
    tio.write_fits(product, p, overwrite=True)
    with fits.open(p) as hdul:
        assert len(hdul) == 5


def test_write_fits_gz(tmp_path, product):
    p = tmp_path / "p.fits.gz"
    tio.write_fits(product, p)
    with open(p, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    _assert_same(product, tp.open_image(p))


def test_write_fits_default_skips_non_yx_2d_variables(tmp_path):
    ds = tp.open_image(np.ones((64, 64), np.float32))
    ds["psf"] = (("psf_y", "psf_x"), np.full((15, 15), 1 / 225, np.float32))  # a PSF stamp beside the image
    ds["background"] = ds["image"] * 0.5
    p = tmp_path / "p.fits"
    tio.write_fits(ds, p)
    with fits.open(p) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "MASK", "VARIANCE", "BACKGROUND"]
    np.testing.assert_array_equal(tp.open_image(p)["background"].values, 0.5)
    # asked for explicitly, a stamp alone is written (it is 2-D)
    tio.write_fits(ds, tmp_path / "psf.fits", variables=["psf"])
    with fits.open(tmp_path / "psf.fits") as hdul:
        assert hdul["PSF"].data.shape == (15, 15)
    # and mixing shapes explicitly is still a clear error
    with pytest.raises(ValueError, match="different shapes"):
        tio.write_fits(ds, tmp_path / "x.fits", variables=["image", "psf"])


def test_failed_fits_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="disk on fire"):
        tio.write_fits(_failing_dataset(), tmp_path / "f.fits")
    assert os.listdir(tmp_path) == []
    # an existing product survives a failed overwrite
    good = tmp_path / "f.fits"
    tio.write_fits(tp.open_image(np.zeros((64, 64), np.float32)), good)
    before = good.read_bytes()
    with pytest.raises(RuntimeError):
        tio.write_fits(_failing_dataset(), good, overwrite=True)
    assert good.read_bytes() == before and os.listdir(tmp_path) == ["f.fits"]


# ----------------------------------------------------------------- round trips on real data
def test_decam_fits_zarr_fits_roundtrip(tmp_path, shared_data):
    src = shared_data / "pair_decam_sfft" / "Stack-DEC-OBS04.fits"
    orig = tp.open_image(src, chunks=100)
    tio.write_zarr(orig, tmp_path / "a.zarr")
    z = tp.open_image(tmp_path / "a.zarr")
    tio.write_fits(z, tmp_path / "b.fits")
    b = tp.open_image(tmp_path / "b.fits")
    for ds in (z, b):
        _assert_same(orig, ds)
        assert tp.wcs(ds).to_header_string(relax=True) == tp.wcs(orig).to_header_string(relax=True)
        assert dict((c[0], c[1]) for c in ds.attrs["header"])["CTYPE1"] == "RA---TPV"
        yy, xx = np.mgrid[0:256:15, 0:256:15]
        np.testing.assert_array_equal(tp.wcs(ds).all_pix2world(xx, yy, 0), tp.wcs(orig).all_pix2world(xx, yy, 0))
    # the original cards come back in order (HISTORY/COMMENT included); provenance is appended
    oc = orig.attrs["header"]
    assert z.attrs["header"] == oc
    bc = b.attrs["header"]
    assert bc[: len(oc)] == oc
    assert bc[len(oc)][:2] == ["TILEPIPE", tp.__version__] and {c[0] for c in bc[len(oc) + 1:]} == {"HISTORY"}
    # the float64 file itself: float32 pixels equal the file's values rounded once
    with fits.open(src) as hdul:
        np.testing.assert_array_equal(b["image"].values, hdul[0].data.astype(np.float32))


def test_header_cards_roundtrip_through_zarr(tmp_path):
    h = _wcs_header()
    h["LONGSTR"] = "x" * 120
    h["HIERARCH ESO DET CHIP NAME"] = "chip1"
    h["UNDEF"] = None
    h.append(("COMMENT", "last comment"), bottom=True)
    ds = tp.open_image(np.zeros((16, 16), np.float32), header=h)
    tio.write_zarr(ds, tmp_path / "h.zarr")
    back = tio.read_zarr(tmp_path / "h.zarr")
    hb = cards_to_header(back.attrs["header"])
    def norm(hdr):
        return [(c.keyword, None if isinstance(c.value, fits.card.Undefined) else c.value) for c in hdr.cards]

    assert norm(hb) == norm(h)
    assert [str(v) for v in hb["HISTORY"]] == ["first history", "second history"]
    kinds = [c.keyword for c in hb.cards if c.keyword in ("HISTORY", "COMMENT")]
    assert kinds == ["HISTORY", "COMMENT", "HISTORY", "COMMENT"]


# ----------------------------------------------------------------- read_array, mask/variance paths
def test_read_array_and_mask_paths(tmp_path, img):
    m = np.zeros(img.shape, bool)
    m[5:9, 7] = True
    _write(tmp_path / "mask.fits", m.astype(np.uint8))
    var = np.full(img.shape, 4.0, np.float32)
    tio.write_zarr(tp.open_image(var), tmp_path / "var.zarr")
    np.testing.assert_array_equal(tio.read_array(tmp_path / "mask.fits").compute(), m.astype(np.uint8))
    ds = tp.open_image(img, chunks=64)
    tio.write_fits(ds, tmp_path / "im.fits")
    out = tp.open_image(tmp_path / "im.fits", mask=str(tmp_path / "mask.fits"), variance=str(tmp_path / "var.zarr"))
    assert out["mask"].values[5:9, 7].all() and out["mask"].values[10, 20]  # user mask OR stored (NaN) mask
    assert out["mask"].values.sum() == 5
    np.testing.assert_array_equal(out["variance"].values, var)


# ----------------------------------------------------------------- tables
@pytest.mark.parametrize("ext", [".ecsv", ".fits", ".parquet"])
def test_tables_roundtrip(tmp_path, ext):
    t = Table({"id": np.arange(1, 6), "x": np.linspace(0.5, 4.5, 5), "y": np.linspace(10, 20, 5), "flag": [True, False] * 2 + [True]})
    t.meta["NSIGMA"] = 5.0
    for url in (str(tmp_path / f"cat{ext}"), f"memory://tp-{uuid.uuid4().hex[:8]}/cat{ext}"):
        tio.write_table(t, url)
        back = tio.read_table(url)
        for c in t.colnames:
            np.testing.assert_array_equal(back[c], t[c])
        assert back.meta["TILEPIPE"] == tp.__version__ and back.meta["NSIGMA"] == 5.0
        with pytest.raises(FileExistsError, match="overwrite=True"):
            tio.write_table(t, url)
        tio.write_table(t[:2], url, overwrite=True)
        assert len(tio.read_table(url)) == 2
    assert "TILEPIPE" not in t.meta  # the caller's table is untouched
    assert sorted(os.listdir(tmp_path)) == [f"cat{ext}"]


def test_fits_gz_table_is_gzipped(tmp_path):
    t = Table({"x": np.arange(1000.0), "y": np.zeros(1000)})
    for url in (str(tmp_path / "cat.fits.gz"), f"memory://tp-{uuid.uuid4().hex[:8]}/cat.fits.gz"):
        tio.write_table(t, url)
        with fsspec.open(url, "rb") as f:
            assert f.read(2) == b"\x1f\x8b", url
        back = tio.read_table(url)
        np.testing.assert_array_equal(back["x"], t["x"])
    assert sorted(os.listdir(tmp_path)) == ["cat.fits.gz"]


def test_table_errors(tmp_path):
    with pytest.raises(ValueError, match="ECSV, FITS or Parquet"):
        tio.write_table(Table({"a": [1]}), tmp_path / "cat.txt")
    with pytest.raises(TypeError, match="astropy Table"):
        tio.write_table({"a": [1]}, tmp_path / "cat.ecsv")
    with pytest.raises(FileNotFoundError):
        tio.read_table(tmp_path / "none.ecsv")


# ----------------------------------------------------------------- S3 (moto on loopback)
@pytest.fixture
def bucket(s3_bucket):
    """The shared fresh-bucket fixture of conftest.py: ``(name, storage_options)``."""
    return s3_bucket


def test_s3_roundtrip(bucket, product):
    name, opts = bucket
    for url in (f"s3://{name}/run/p.zarr", f"s3://{name}/run/p.fits"):
        if url.endswith(".zarr"):
            tio.write_zarr(product, url, storage_options=opts)
        else:
            tio.write_fits(product, url, storage_options=opts)
        back = tp.open_image(url, storage_options=opts)
        _assert_same(product, back, ("image", "mask", "variance", "background", "flag"))
        with pytest.raises(FileExistsError):
            (tio.write_zarr if url.endswith(".zarr") else tio.write_fits)(product, url, storage_options=opts)
    tio.write_table(Table({"a": [1, 2]}), f"s3://{name}/run/cat.ecsv", storage_options=opts)
    assert list(tio.read_table(f"s3://{name}/run/cat.ecsv", storage_options=opts)["a"]) == [1, 2]


def test_s3_missing_bucket_clear_error(s3_server, product):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    missing = f"tp-missing-{uuid.uuid4().hex[:8]}"
    before = set(fs.ls("", refresh=True))
    for write, url in ((tio.write_zarr, f"s3://{missing}/a.zarr"), (tio.write_fits, f"s3://{missing}/a.fits"),
                       (tio.write_table, f"s3://{missing}/a.ecsv")):
        obj = Table({"a": [1]}) if write is tio.write_table else product
        with pytest.raises(FileNotFoundError, match=f"bucket '{missing}' does not exist") as exc:
            write(obj, url, storage_options=s3_server)
        assert "endpoint" in str(exc.value) and "storage_options" in str(exc.value)
    assert set(fs.ls("", refresh=True)) == before and not fs.exists(missing)  # nothing written
    with pytest.raises(FileNotFoundError, match="not found"):
        tp.open_image(f"s3://{missing}/a.fits", storage_options=s3_server)


@pytest.mark.cluster
def test_s3_read_on_local_cluster(bucket, local_cluster, product):
    """Chunk tasks run in worker processes: they get the endpoint via storage_options."""
    name, opts = bucket
    tio.write_fits(product, f"s3://{name}/c.fits", storage_options=opts)
    tio.write_zarr(product, f"s3://{name}/c.zarr", storage_options=opts)
    expect = product["image"].values
    for url in (f"s3://{name}/c.fits", f"s3://{name}/c.zarr"):
        ds = tp.open_image(url, storage_options=opts, chunks=(100, 150))
        out, nbad = local_cluster.compute([ds["image"].data, ds["mask"].data.sum()], sync=True)
        assert out.tobytes() == expect.tobytes()
        assert nbad == int(product["mask"].values.sum())


_ESO_LOG = ["ESO-LOG 00:00:00> DATE         = '1992-10-26'  / Mon Oct 26, 1992",
            "ESO-LOG 03:04:08>-START EXPO EMMI RED          / Start exp. on EMMI Red CC"]


def _fz_with_invalid_cards(path, data, gz=False):
    """A tile-compressed file whose primary and image headers carry real cards astropy cannot parse
    (from sep's ESO image), made by overwriting placeholder COMMENT cards byte for byte."""
    ph = fits.PrimaryHDU()
    ph.header["COMMENT"] = "PLACEHOLDER-A"
    h = _wcs_header()
    h["COMMENT"] = "PLACEHOLDER-B"
    buf = io.BytesIO()
    fits.HDUList([ph, fits.CompImageHDU(data, header=h, name="SCI", compression_type="GZIP_2", quantize_level=0)]).writeto(buf)
    raw = bytearray(buf.getvalue())
    for mark, card in zip((b"PLACEHOLDER-A", b"PLACEHOLDER-B"), _ESO_LOG):
        j = raw.find(mark)
        i = j - j % 80
        assert j > 0 and raw[i:i + 8] == b"COMMENT "
        raw[i:i + 80] = card.ljust(80).encode("ascii")
    if gz:
        import gzip

        raw = gzip.compress(bytes(raw))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("gz", [False, True])
def test_fz_with_invalid_cards_reads_on_threads_without_warnings(tmp_path, img, gz):
    """Chunk tasks re-open a tile-compressed file on worker threads.  They must neither warn about
    its unparsable cards (the suite turns warnings into errors) nor silence the warnings with
    warnings.catch_warnings (not thread-safe): the cards are read blanked."""
    from astropy.utils.exceptions import AstropyUserWarning

    from tilepipe.io import fits as tfits

    clean = np.nan_to_num(img)
    p = tmp_path / ("img.fits.fz.gz" if gz else "img.fits.fz")
    _fz_with_invalid_cards(p, clean, gz=gz)
    # the file really makes astropy warn when it is opened plainly
    with pytest.warns(AstropyUserWarning, match="header keyword is invalid"):
        hdul, fobj = tfits._open_hdul(str(p), None)
        hdul[1].header
        hdul.close()
        if fobj is not None:
            fobj.close()
    data, hdr = tio.read_fits(p, chunks=(64, 100))
    logs = [str(c.value) for c in hdr.cards if c.keyword == "COMMENT" and str(c.value).startswith("ESO-LOG")]
    assert logs and "START EXPO" in logs[0]  # kept as COMMENT cards on the client
    np.testing.assert_array_equal(data.compute(scheduler="threads"), clean)
    np.testing.assert_array_equal(data[37:151, 99:260].compute(scheduler="threads"), clean[37:151, 99:260])


def test_nonstandard_cards_kept_as_comments(shared_data, tmp_path):
    """sep's real ESO image carries 'ESO-LOG hh:mm:ss> ...' cards that astropy cannot parse."""
    src = shared_data / "sep_regression" / "image.fits"
    ds = tp.open_image(src)
    logs = [c for c in ds.attrs["header"] if c[0] == "COMMENT" and str(c[1]).startswith("ESO-LOG")]
    assert logs and "DATE" in logs[0][1]
    tio.write_fits(ds, tmp_path / "s.fits")
    back = tp.open_image(tmp_path / "s.fits")
    assert back.attrs["header"][: len(ds.attrs["header"])] == ds.attrs["header"]
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The following header keyword is invalid")
        ref = fits.getdata(src).astype(np.float32)
    np.testing.assert_array_equal(back["image"].values, ref)


@pytest.mark.parametrize("shape", [(300, 400), (2048, 2048)])
def test_default_variance_not_inflated_by_a_sky_gradient(tmp_path, shape):
    """The default variance of a FITS image is the sky noise, not noise + the spread of a sky ramp.

    Sky 200 ADU with a ±20 ADU ramp across x (a global MAD of the values would
    give ~ 100 + 133 ADU²), Gaussian noise sigma 10, a few bright stars, GAIN = 2:
    sky pixels must get 100 ADU² plus at most the ramp's own Poisson term
    ((image - sky) / gain <= 10 ADU²).  Both sample strides (1 and 4) are covered.
    """
    rng = np.random.default_rng(5)
    h, w = shape
    ramp = 200.0 + 20.0 * (np.arange(w) / (w - 1) * 2 - 1)
    img = ramp[None, :] + rng.normal(0.0, 10.0, shape)
    ys, xs = rng.integers(10, h - 10, 30), rng.integers(10, w - 10, 30)
    img[ys, xs] += 5000.0
    hdr = fits.Header()
    hdr["GAIN"] = 2.0
    path = str(tmp_path / "ramp.fits")
    fits.writeto(path, img.astype(np.float32), hdr)
    var = tp.open_image(path)["variance"].values
    sky_var = var[:, : w // 2]  # the fainter half: (image - sky) clipped to 0 except noise upwards
    assert abs(np.median(sky_var) / 100.0 - 1) < 0.05, np.median(sky_var)
    # the variance floor is sigma_sky^2 itself: 100 ADU^2 within 3 %
    assert abs(var.min() / 100.0 - 1) < 0.03, var.min()


def test_robust_sky_equals_the_plain_clipping_loop():
    """The sort-once clipping of the default variance gives the values of the textbook loop (np.median each round)."""
    from tilepipe.image import _robust_sky

    def reference(v):
        v = v[np.isfinite(v)]
        for _ in range(5):
            med = np.median(v)
            sig = 1.4826 * np.median(np.abs(v - med))
            if sig <= 0:
                break
            keep = np.abs(v - med) < 3 * sig
            if keep.all():
                break
            v = v[keep]
        return np.median(v), 1.4826 * np.median(np.abs(v - np.median(v)))

    rng = np.random.default_rng(7)
    for n in (1, 2, 7, 100, 1001, 20000):
        for v in (rng.normal(200.0, 10.0, n), np.round(rng.normal(0.0, 3.0, n)),  # ties
                  np.where(rng.random(n) < 0.1, 1e4, rng.normal(0.0, 1.0, n)),    # outliers
                  np.where(rng.random(n) < 0.2, np.nan, rng.standard_cauchy(n))):
            sky, sig = _robust_sky(v)
            ref_sky, ref_sig = reference(v)
            assert sky == ref_sky
            if ref_sig > 0:
                assert sig == ref_sig


def test_median_of_two_sorted_runs_equals_the_merged_median():
    """The bisection median of two ascending runs (the MAD step of the default variance) equals the median of
    their merge, for every split of small arrays with ties, empty runs and odd/even totals."""
    from tilepipe.image import _median_of_two, _median_sorted

    rng = np.random.default_rng(3)
    for _ in range(3000):
        na, nb = rng.integers(0, 9, 2)
        if na + nb == 0:
            continue
        a = np.sort(rng.integers(0, 4, na).astype(float))
        b = np.sort(rng.normal(2.0, 1.5, nb).round(1))
        assert _median_of_two(a, b) == _median_sorted(np.sort(np.concatenate([a, b])))


# ------------------------------------------------------------------ regions
@pytest.mark.parametrize("planes", [False, True])
def test_fits_regions_equal_the_chunk_graph(tmp_path, planes):
    """Any rectangle read straight from the file equals the same slice of the lazy Dataset."""
    from tilepipe.tiling import evaluate_regions, region_of, resolve_regions

    rng = np.random.default_rng(5)
    img = rng.normal(100.0, 10.0, (300, 260)).astype(np.float32)
    img[10, 20] = np.nan
    img[50:53, 60:62] = 5000.0  # saturated
    path = tmp_path / "img.fits"
    if planes:  # MASK and VARIANCE extensions, as tilepipe.write_fits writes them
        mask = np.zeros(img.shape, bool)
        mask[100:120, 30:90] = True
        var = rng.uniform(50, 150, img.shape).astype(np.float32)
        tp.write_fits(tp.open_image(img, mask=mask, variance=var), path)
        ds = tp.open_image(str(path), chunks=64)
    else:  # a plain image: default variance from the global sky statistics and the gain
        fits.writeto(path, img)
        ds = tp.open_image(str(path), chunks=64, gain=2.0, saturation=4000.0)
    arrays = [ds["image"].data, ds["mask"].data, ds["variance"].data]
    regions = [region_of(a) for a in arrays]
    assert all(r is not None for r in regions)
    resolved = resolve_regions(regions)
    for ys, xs in [(slice(0, 300), slice(0, 260)), (slice(37, 171), slice(5, 250)), (slice(299, 300), slice(0, 1))]:
        got = evaluate_regions(resolved, ys, xs)
        for g, a in zip(got, arrays):
            want = a[ys, xs].compute()
            assert g.dtype == want.dtype
            np.testing.assert_array_equal(g, want)
    assert region_of((ds["image"] * 2).data) is None  # an operation on the array is not a file read


def test_strided_fits_read_equals_numpy_striding(tmp_path):
    """A strided slice (the default variance's sample) is read row by row from the file, same values."""
    data = (np.arange(97 * 131, dtype=np.int32).reshape(97, 131) - 5000).astype(">i2")
    path = tmp_path / "s.fits"
    hdu = fits.PrimaryHDU(data)
    hdu.header["BZERO"], hdu.header["BSCALE"] = 10.0, 0.5
    hdu.writeto(path)
    from tilepipe.tiling import evaluate_regions, region_of

    arr, _ = tio.read_fits(str(path), chunks=40)
    want = fits.getdata(path).astype(np.float64)
    for key in [(slice(None, None, 7), slice(None, None, 3)), (slice(3, 90, 5), slice(None)),
                (slice(None), slice(1, 130, 4))]:
        (got,) = evaluate_regions([region_of(arr)], *key)
        np.testing.assert_array_equal(np.asarray(got, dtype=np.float64), want[key])
        np.testing.assert_array_equal(np.asarray(arr[key].compute(), dtype=np.float64), want[key])
    # the default variance's statistics come from such a sample: the same as from the in-memory image
    img = fits.getdata(path).astype(np.float32)
    np.testing.assert_array_equal(tp.open_image(str(path), gain=2.0)["variance"].values,
                                  tp.open_image(img, gain=2.0)["variance"].values)


@pytest.mark.parametrize("span_bytes", [1, 1000, 4 << 20])
def test_fits_box_reads_all_paths_equal_numpy(tmp_path, monkeypatch, span_bytes):
    """Boxes read from a local FITS file (whole rows, blocked spans of partial rows with a buffer of
    several or single rows, one read per row for narrow boxes) equal numpy slicing."""
    import tilepipe.io.fits as tfits
    from tilepipe.tiling import evaluate_regions, region_of

    monkeypatch.setattr(tfits, "_SPAN_BYTES", span_bytes)
    rng = np.random.default_rng(4)
    data = rng.normal(0, 1, (203, 157)).astype(">f4")
    path = tmp_path / "b.fits"
    fits.writeto(path, data)
    arr, _ = tio.read_fits(str(path), chunks=64)
    for ys, xs in [(slice(0, 203), slice(0, 157)), (slice(5, 190), slice(0, 157)), (slice(7, 201), slice(3, 150)),
                   (slice(30, 31), slice(40, 120)), (slice(11, 97), slice(100, 130)), (slice(0, 203), slice(156, 157))]:
        (got,) = evaluate_regions([region_of(arr)], ys, xs)
        np.testing.assert_array_equal(got, data[ys, xs].astype(np.float32))


@pytest.mark.cluster
def test_fits_chunk_keys_name_their_chunks(tmp_path, client):
    """Two opens of one file with different chunks must not share chunk keys: a cluster still holding the first
    open's blocks would hand them to the second (wrong pixels, or shapes that do not broadcast)."""
    from distributed import wait

    data = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
    path = str(tmp_path / "a.fits")
    fits.writeto(path, data)
    a, _ = tio.read_fits(path, chunks=16)
    b, _ = tio.read_fits(path, chunks=32)
    assert a.name != b.name
    held = client.persist(a)  # the first open's blocks stay on the workers
    wait(held)
    np.testing.assert_array_equal(b.compute(), data)
    np.testing.assert_array_equal((b + held).compute(), 2 * data)


def test_product_without_image_reads_back_its_planes(tmp_path):
    """A Dataset without an `image` variable (a subtraction result) is written with an empty primary; reading
    it back used to give the first extension (MASK) as the image and drop every other plane."""
    rng = np.random.default_rng(0)
    diff = rng.normal(size=(40, 50)).astype(np.float32)
    scorr = rng.normal(size=(40, 50)).astype(np.float32)
    mask = np.zeros((40, 50), bool)
    mask[3, 4] = True
    ds = xr.Dataset({"mask": (("y", "x"), mask), "diff": (("y", "x"), diff), "scorr": (("y", "x"), scorr)})
    tio.write_fits(ds, str(tmp_path / "d.fits"))
    back = tp.open_image(str(tmp_path / "d.fits"))
    np.testing.assert_array_equal(back["image"].values, diff)
    np.testing.assert_array_equal(back["scorr"].values, scorr)
    assert back["mask"].values[3, 4] and back["mask"].values.sum() == 1
    np.testing.assert_array_equal(tp.open_image(str(tmp_path / "d.fits"), hdu="SCORR")["image"].values, scorr)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_xarray_cf_encoded_zarr_is_decoded(tmp_path, zarr_format):
    """A store written by xarray with CF encoding (int16 + scale_factor/add_offset + _FillValue) used to read
    back as the raw integers (twice the values) with the fill value as a pixel value."""
    import zarr

    a = (np.arange(40 * 30, dtype=np.float32).reshape(40, 30) % 1000) * 0.5
    a[7, 9] = np.nan
    sky = np.full((40, 30), 100.25, np.float32)
    sky[0, 0] = np.nan
    xs = xr.Dataset({"image": (("y", "x"), a), "sky": (("y", "x"), sky)}, attrs={"gain": 2.0})
    enc = {"image": {"dtype": "int16", "scale_factor": 0.5, "_FillValue": -999, "chunks": (16, 16)},
           "sky": {"dtype": "int16", "scale_factor": 0.25, "add_offset": 100.0, "_FillValue": -1}}
    url = str(tmp_path / "cf.zarr")
    xs.to_zarr(url, zarr_format=zarr_format, encoding=enc, consolidated=False)
    assert zarr.open_group(url, mode="r")["image"].dtype == np.int16  # really stored as scaled integers
    with dask.config.set(scheduler=_raise_on_compute):  # decoding stays lazy
        ds = tio.read_zarr(url)
        opened = tp.open_image(url)
    assert isinstance(ds["image"].data, da.Array) and ds["image"].data.chunksize == (16, 16)
    assert ds["image"].dtype.kind == "f" and ds.attrs["gain"] == 2.0
    assert not {"scale_factor", "add_offset", "_FillValue"} & set(ds["image"].attrs)
    np.testing.assert_array_equal(ds["image"].values, a)  # NaN at the fill value, scaled elsewhere
    np.testing.assert_allclose(ds["sky"].values, sky)
    assert np.isnan(ds["sky"].values[0, 0])
    assert opened["image"].dtype == np.float32
    np.testing.assert_array_equal(opened["image"].values, a)
    m = opened["mask"].values
    assert m[7, 9] and m.sum() == 1  # the fill value is masked
    # a plain (non-CF) zarr v2 array keeps its zeros (its zarr fill_value 0 is not a CF _FillValue)
    g = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=2)
    g.create_array("image", shape=(8, 8), chunks=(4, 4), dtype="f4", fill_value=0)[:] = np.arange(64.0).reshape(8, 8)
    np.testing.assert_array_equal(tio.read_zarr(str(tmp_path / "plain.zarr"))["image"].values,
                                  np.arange(64.0, dtype=np.float32).reshape(8, 8))
    # tilepipe's own stores read back exactly as written, whatever the attrs of their variables say
    own = tp.open_image(np.arange(64, dtype=np.float32).reshape(8, 8))
    own["image"].attrs.update(scale_factor=2.0, _FillValue=0.0)
    tio.write_zarr(own, tmp_path / "own.zarr")
    back = tio.read_zarr(tmp_path / "own.zarr")
    np.testing.assert_array_equal(back["image"].values, own["image"].values)
    assert back["image"].attrs["scale_factor"] == 2.0
