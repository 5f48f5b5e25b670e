"""Cutouts: geometry and WCS, sigma image, source mask, FITS layout, batch mode reading only regions."""

from __future__ import annotations

import threading
import warnings

import dask.array as da
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

import tilepipe as tp
from tilepipe.coadd import GaussianStamp
from tilepipe.cutout import cutout, cutouts, parse_size, sigma_image, source_mask, write_cutout
from tilepipe.exceptions import FallbackWarning
from tilepipe.image import make_dataset, wcs

DECAM = "pair_decam_sfft/Stack-DEC-OBS18.fits"


def _tan(shape, scale=0.5, crval=(150.0, 2.0)):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
    w.wcs.cdelt = [-scale / 3600, scale / 3600]
    return w


def _gauss(shape, x, y, flux, fwhm):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    s = fwhm / 2.3548
    return flux * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / s**2) / (2 * np.pi * s * s)


@pytest.fixture(scope="module")
def field():
    """A 512 x 512 image with a TAN WCS (0.5"/px), sky 100, noise 5, a few galaxies/stars."""
    rng = np.random.default_rng(3)
    shape = (512, 512)
    img = np.full(shape, 100.0) + rng.normal(0, 5.0, shape)
    pos = [(100.3, 120.6, 5e4, 6.0), (300.0, 310.0, 2e4, 4.0), (450.0, 60.0, 1e4, 3.0), (40.0, 470.0, 3e4, 5.0)]
    for x, y, f, fw in pos:
        img += _gauss(shape, x, y, f, fw)
    hdr = _tan(shape).to_header()
    hdr["GAIN"] = 2.0
    hdr["DETECTOR"] = "SYNTH-1"
    return make_dataset(img.astype(np.float32), header=hdr, chunks=128), pos


# ------------------------------------------------------------------ geometry
def test_parse_size():
    assert parse_size("10arcsec") == ((10.0, 10.0), "arcsec")
    assert parse_size("1.5arcmin") == ((90.0, 90.0), "arcsec")
    assert parse_size("64pix") == ((64.0, 64.0), "pix")
    assert parse_size((20, 30), "pix") == ((20.0, 30.0), "pix")
    for bad in (0, "0arcsec", -3, (10, 0)):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_cutout_centre_wcs_and_header(field):
    ds, pos = field
    w = wcs(ds)
    x, y = pos[0][:2]
    ra, dec = w.pixel_to_world_values(x, y)
    cut = cutout(ds, ra, dec, 20.0)  # 20" at 0.5"/px -> 40 px
    assert cut["image"].shape == (40, 40)
    xt, yt = cut.attrs["x_target"], cut.attrs["y_target"]
    # the target's pixel is at [n // 2, n // 2]
    assert int(np.floor(xt + 0.5)) == 20 and int(np.floor(yt + 0.5)) == 20
    cw = wcs(cut)
    px, py = cw.world_to_pixel_values(ra, dec)
    assert abs(px - xt) < 1e-6 and abs(py - yt) < 1e-6
    y0, x0 = cut.attrs["origin"]
    np.testing.assert_array_equal(cut["image"].values, ds["image"].values[y0 : y0 + 40, x0 : x0 + 40])
    assert not cut["mask"].values.any()
    keys = [c[0] for c in cut.attrs["header"]]
    assert "DETECTOR" in keys and "CUTX0" in keys
    # pixel units and explicit x/y give the same cutout
    c2 = cutout(ds, x, y, 40, unit="pix")
    c3 = cutout(ds, x=x, y=y, size="40pix")
    np.testing.assert_array_equal(c2["image"].values, cut["image"].values)
    np.testing.assert_array_equal(c3["image"].values, cut["image"].values)


def test_cutout_edge_padding_and_errors(field):
    ds, _ = field
    cut = cutout(ds, 5.0, 3.0, 21, unit="pix", fill_value=0.0)
    assert cut.attrs["status"] == "partial"
    y0, x0 = cut.attrs["origin"]
    assert (y0, x0) == (3 - 10, 5 - 10)
    m = cut["mask"].values
    assert m[:7].all() and m[:, :5].all() and not m[7:, 5:].any()
    assert (cut["image"].values[:7] == 0).all()
    np.testing.assert_array_equal(cut["image"].values[7:, 5:], ds["image"].values[0:14, 0:16])
    assert np.isfinite(cut["sigma"].values).all() and (cut["sigma"].values > 0).all()
    trimmed = cutout(ds, 5.0, 3.0, 21, unit="pix", partial="trim")
    assert trimmed["image"].shape == (14, 16)
    with pytest.raises(ValueError, match="crosses the image edge"):
        cutout(ds, 5.0, 3.0, 21, unit="pix", partial="error")
    with pytest.raises(ValueError, match="outside the image"):
        cutout(ds, 600.0, 20.0, 21, unit="pix")
    with pytest.raises(ValueError, match="size must be positive"):
        cutout(ds, 100.0, 100.0, 0, unit="pix")
    nowcs = make_dataset(np.ones((64, 64), np.float32))
    with pytest.raises(ValueError, match="no celestial WCS"):
        cutout(nowcs, 150.0, 2.0, 10)
    with pytest.raises(ValueError, match="pixels"):
        cutout(nowcs, 30.0, 30.0, "10arcsec", unit="pix")


# -------------------------------------------------------------- sigma image
def test_sigma_image_formula():
    rng = np.random.default_rng(1)
    shape = (200, 200)
    gain, sky, rms = 2.5, 300.0, 6.0
    truth = np.full(shape, sky) + _gauss(shape, 100, 100, 4e5, 5.0)
    img = truth + rng.normal(0, rms, shape)
    ds = make_dataset(img.astype(np.float32), gain=gain)
    sig = sigma_image(ds).values
    # measured sky rms recovers the noise level; far from the source sigma = rms
    assert abs(np.median(sig[:40, :40]) - rms) / rms < 0.05
    # explicit sky/sky_rms: exact formula, and the exposure time / read noise terms
    s2 = sigma_image(ds, exptime=10.0, rdnoise=4.0, sky=sky, sky_rms=rms).values.astype(np.float64)
    expect = np.sqrt(np.clip(img - sky, 0, None) / (gain * 10.0) + rms**2 + (4.0 / (gain * 10.0)) ** 2)
    np.testing.assert_allclose(s2, expect, rtol=2e-6)
    # at the source peak, sigma^2 - rms^2 = (I - sky) / gain (Poisson of the source electrons)
    s3 = sigma_image(ds, sky=sky, sky_rms=rms).values.astype(np.float64)
    assert abs(s3[100, 100] ** 2 - rms**2 - (img[100, 100] - sky) / gain) < 1e-2 * s3[100, 100] ** 2
    with pytest.warns(FallbackWarning, match="no gain"):
        s4 = sigma_image(make_dataset(img.astype(np.float32))).values
    assert abs(np.median(s4) - rms) / rms < 0.05
    with pytest.raises(ValueError, match="gain"):
        sigma_image(make_dataset(img.astype(np.float32)), rdnoise=5.0)


# -------------------------------------------------------------- source mask
def test_source_mask_keeps_target_masks_neighbours():
    rng = np.random.default_rng(2)
    shape = (101, 101)
    img = rng.normal(0, 3.0, shape) + 50
    img += _gauss(shape, 50, 50, 3e4, 6.0)  # target
    img += _gauss(shape, 62, 50, 6e3, 3.0)  # blended neighbour, 12 px away
    img += _gauss(shape, 15, 80, 5e3, 3.0)  # isolated neighbour
    img += _gauss(shape, 85, 20, 5e3, 3.0)
    ds = make_dataset(img.astype(np.float32))
    plain = source_mask(ds, fwhm=3.0).values
    assert not plain[50, 50]  # target unmasked
    assert plain[80, 15] and plain[20, 85]
    deb = source_mask(ds, fwhm=3.0, deblend=True, contrast=0.001)
    m = deb.values
    assert not m[50, 50] and m[80, 15] and m[20, 85]
    assert m[50, 62], "the blended neighbour must be masked once deblended"
    assert deb.attrs["target_label"] > 0 and deb.attrs["n_sources"] >= 4
    ell = source_mask(ds, fwhm=3.0, deblend=True, grow=4.0, grow_mode="ellipse").values
    assert ell[80, 15] and not ell[50, 50]
    grown = source_mask(ds, fwhm=3.0, grow=6.0).values
    assert grown.sum() > plain.sum()
    nocenter = source_mask(ds, fwhm=3.0, keep_center=False).values
    assert nocenter[50, 50]
    with pytest.raises(ValueError, match="fwhm"):
        source_mask(ds)


# ------------------------------------------------------------- real image
def test_real_decam_cutout_fits_roundtrip(shared_data, tmp_path):
    path = shared_data / DECAM
    ds = tp.open_image(str(path))
    w = wcs(ds)
    ra, dec = w.pixel_to_world_values(129.0, 128.0)  # the central galaxy
    cut = cutout(str(path), ra, dec, "10arcsec", gain=4.0, sky="auto", mask_sources={"fwhm": 3.9, "deblend": True})
    scale = 3600 * np.sqrt(abs(np.linalg.det(w.pixel_scale_matrix)))
    n = int(round(10.0 / scale))
    assert cut["image"].shape == (n, n)
    # TPV WCS carried: the target's sky position maps to its cutout pixel
    px, py = wcs(cut).world_to_pixel_values(ra, dec)
    assert abs(px - cut.attrs["x_target"]) < 1e-6 and abs(py - cut.attrs["y_target"]) < 1e-6
    ix, iy = int(round(cut.attrs["x_target"])), int(round(cut.attrs["y_target"]))
    assert not cut["mask"].values[iy, ix]  # the galaxy itself is not masked
    out = tmp_path / "galaxy.fits"
    write_cutout(cut, out, psf=GaussianStamp(3.9))
    with pytest.raises(FileExistsError):
        write_cutout(cut, out)
    with fits.open(out) as hdul:
        assert [h.name for h in hdul][1:] == ["IMAGE", "MASK", "SIGMA", "PSF"]
        assert hdul["MASK"].data.dtype == np.uint8
        np.testing.assert_array_equal(hdul["MASK"].data, cut["mask"].values.astype(np.uint8))
        np.testing.assert_allclose(hdul["IMAGE"].data, cut["image"].values)
        assert abs(hdul["PSF"].data.sum() - 1) < 1e-5
        assert hdul[0].header["DETECTOR"] == fits.getheader(path)["DETECTOR"]  # original header carried
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            for ext in ("IMAGE", "SIGMA", "MASK"):
                x2, y2 = WCS(hdul[ext].header).world_to_pixel_values(ra, dec)
                assert abs(x2 - cut.attrs["x_target"]) < 1e-6 and abs(y2 - cut.attrs["y_target"]) < 1e-6
    assert not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------- batch mode
class RecordingArray:
    """A numpy-backed array whose __getitem__ records every region read."""

    def __init__(self, data):
        self.data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.ndim = data.ndim
        self.reads = []
        self._lock = threading.Lock()

    def __getitem__(self, key):
        with self._lock:
            self.reads.append(key)
        return self.data[key]


def test_batch_reads_only_needed_regions_and_matches_single(field, tmp_path):
    ds0, _ = field
    big = np.tile(ds0["image"].values, (2, 2))  # 1024 x 1024
    rec = RecordingArray(big)
    src = tp.open_image(da.from_array(rec, chunks=64, asarray=False), gain=2.0)
    rng = np.random.default_rng(5)
    # two clusters of targets + one outside the image
    xs = np.r_[rng.uniform(100, 180, 15), rng.uniform(700, 760, 15), 2000.0]
    ys = np.r_[rng.uniform(120, 200, 15), rng.uniform(800, 880, 15), 50.0]
    cat = Table({"x": xs, "y": ys, "id": np.arange(len(xs))})
    out = tmp_path / "cuts.zarr"
    table = cutouts(src, cat, 25, unit="pix", output=str(out), group_size=256)
    assert list(table["status"][:30]) == ["ok"] * 30 and table["status"][30] == "outside"
    area = 0
    for ys_, xs_ in rec.reads:
        n = (ys_.stop - ys_.start) * (xs_.stop - xs_.start)
        if n == 0:  # dask probes the dtype with an empty slice
            continue
        area += n
        # every read lies within 64 px (one chunk) of some cutout
        cy = (ys_.start + ys_.stop) / 2
        cx = (xs_.start + xs_.stop) / 2
        assert np.min(np.hypot(xs - cx, ys - cy)) < 64 + 25
    assert area <= 0.15 * big.size, f"read {area / big.size:.0%} of the image"
    import zarr

    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["complete"] is True
    for i in (0, 7, 20):
        single = cutout(src, x=xs[i], y=ys[i], size=25, unit="pix")
        np.testing.assert_array_equal(root["image"][i], single["image"].values)
        np.testing.assert_array_equal(root["mask"][i].astype(bool), single["mask"].values)
        np.testing.assert_allclose(root["sigma"][i], single["sigma"].values, rtol=1e-6)
        assert root["x0"][i] == single.attrs["origin"][1]


@pytest.mark.cluster
def test_batch_fits_folder_cli_and_cluster(field, tmp_path, client):
    from click.testing import CliRunner

    from tilepipe.cli import main
    from tilepipe.io import write_fits

    ds, pos = field
    img_path = tmp_path / "field.fits"
    write_fits(ds, str(img_path))
    w = wcs(ds)
    ra, dec = w.pixel_to_world_values(np.array([p[0] for p in pos]), np.array([p[1] for p in pos]))
    cat = Table({"ra": np.r_[ra, 10.0], "dec": np.r_[dec, -30.0], "id": [f"g{i}" for i in range(len(pos) + 1)]})
    table = cutouts(str(img_path), cat, "12arcsec", output=str(tmp_path / "lib"), group_size=128)
    assert list(table["status"]) == ["ok", "ok", "ok", "ok", "outside"]
    for row in table[:4]:
        with fits.open(row["path"]) as h:
            assert h["IMAGE"].data.shape == (24, 24)
            single = cutout(str(img_path), row["ra"], row["dec"], "12arcsec")
            np.testing.assert_array_equal(h["IMAGE"].data, single["image"].values)
    cat_path = tmp_path / "cat.ecsv"
    cat.write(cat_path)
    res = CliRunner().invoke(main, ["--no-progress", "--scheduler", client.scheduler.address, "cutout", str(img_path), "--catalog", str(cat_path), "--size",
                                    "10arcsec", "-o", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "wrote 4 cutouts of 20 x 20 px" in res.output
    assert sorted(p.name for p in (tmp_path / "cli").glob("*.fits")) == ["g0.fits", "g1.fits", "g2.fits", "g3.fits"]


@pytest.fixture
def bucket(s3_bucket):
    """The shared fresh-bucket fixture of conftest.py: ``(name, storage_options)``."""
    return s3_bucket


def test_batch_s3(field, bucket, tmp_path):
    import s3fs

    from tilepipe.io import write_fits

    bucket, opts = bucket
    ds, pos = field
    url = f"s3://{bucket}/field.fits"
    write_fits(ds, url, storage_options=opts)
    cat = Table({"x": [p[0] for p in pos], "y": [p[1] for p in pos]})
    table = cutouts(url, cat, 31, unit="pix", output=f"s3://{bucket}/cuts", storage_options=opts)
    assert list(table["status"]) == ["ok"] * 4
    fs = s3fs.S3FileSystem(**opts)
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/cuts"))
    assert names == [f"cutout_{i:06d}.fits" for i in range(4)]
    with fs.open(f"{bucket}/cuts/cutout_000001.fits", "rb") as fh:
        with fits.open(fh) as h:
            single = cutout(ds, x=pos[1][0], y=pos[1][1], size=31, unit="pix")
            np.testing.assert_array_equal(h["IMAGE"].data, single["image"].values)


class FailingArray(RecordingArray):
    """Reads fail for regions reaching x >= ``fail_x`` (a lost object, a dead disk)."""

    def __init__(self, data, fail_x):
        super().__init__(data)
        self.fail_x = fail_x

    def __getitem__(self, key):
        xs = key[1] if isinstance(key, tuple) and len(key) > 1 else slice(None)
        if isinstance(xs, slice) and (xs.stop or self.shape[1]) > self.fail_x and (xs.stop is None or xs.stop > xs.start):
            raise OSError("simulated read failure")
        return super().__getitem__(key)


def _zarr_leftovers(folder, name):
    return sorted(p.name for p in folder.iterdir() if name in p.name)


def test_batch_zarr_trim_refused_and_origins_recorded(field, tmp_path):
    """Zarr slots are fixed-size: partial='trim' is refused up front (nothing written); the recorded
    origins are those of the cutouts (padded origin at the edge, -1 for targets not cut)."""
    import zarr

    ds, _ = field
    cat = Table({"x": [100.0, 3.0, 300.0], "y": [100.0, 5.0, 508.0]})
    out = tmp_path / "trim.zarr"
    with pytest.raises(ValueError, match=r"partial='trim'.*Zarr.*partial='pad'.*FITS"):
        cutouts(ds, cat, 21, unit="pix", partial="trim", output=str(out))
    assert not out.exists() and _zarr_leftovers(tmp_path, "trim.zarr") == []
    # FITS folder: trimmed cutouts carry the trimmed origin
    t = cutouts(ds, cat, 21, unit="pix", partial="trim", output=str(tmp_path / "trim_fits"))
    assert list(t["x0"]) == [90, 0, 290] and list(t["y0"]) == [90, 0, 498]
    with fits.open(t["path"][1]) as h:
        assert h["IMAGE"].data.shape == (16, 14)
        assert h["IMAGE"].header["CUTX0"] == 0 and h["IMAGE"].header["CUTY0"] == 0
    # Zarr with padding: the origin is the padded one, as in the table and in cutout()
    for partial, expect in (("pad", ([90, -7, 290], [90, -5, 498])), ("error", ([90, -1, -1], [90, -1, -1]))):
        out = tmp_path / f"{partial}.zarr"
        t = cutouts(ds, cat, 21, unit="pix", partial=partial, output=str(out))
        root = zarr.open_group(str(out), mode="r")
        assert root.attrs["complete"] is True
        assert list(root["x0"][:]) == list(t["x0"]) == expect[0], partial
        assert list(root["y0"][:]) == list(t["y0"]) == expect[1], partial
    single = cutout(ds, x=3.0, y=5.0, size=21, unit="pix")
    assert list(single.attrs["origin"]) == [-5, -7]
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "pad.zarr"), mode="r")["image"][1],
                                  single["image"].values)


def test_batch_zarr_failure_leaves_no_half_written_store(field, tmp_path):
    import zarr

    ds0, _ = field
    cat = Table({"x": [100.0, 450.0], "y": [100.0, 300.0]})
    bad = tp.open_image(da.from_array(FailingArray(ds0["image"].values, fail_x=400), chunks=64, asarray=False))
    out = tmp_path / "cuts.zarr"
    with pytest.raises(OSError, match="simulated"):
        cutouts(bad, cat, 21, unit="pix", output=str(out))
    assert not out.exists() and _zarr_leftovers(tmp_path, "cuts.zarr") == []
    # a complete previous store survives a failed overwrite, unchanged
    good = cutouts(ds0, cat, 21, unit="pix", output=str(out))
    assert list(good["status"]) == ["ok", "ok"]
    before = zarr.open_group(str(out), mode="r")["image"][:]
    with pytest.raises(OSError, match="simulated"):
        cutouts(bad, cat, 21, unit="pix", output=str(out), overwrite=True)
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["complete"] is True
    np.testing.assert_array_equal(root["image"][:], before)
    assert _zarr_leftovers(tmp_path, "cuts.zarr") == ["cuts.zarr"]
    # without overwrite an existing store is refused before anything is written
    with pytest.raises(FileExistsError, match="overwrite"):
        cutouts(ds0, cat, 21, unit="pix", output=str(out))


@pytest.fixture
def remote_zarr(remote_folder):
    """``(url, storage_options)`` of a fresh batch store name on ``memory://`` or on the moto S3 server."""
    return f"{remote_folder[0]}/cuts.zarr", remote_folder[1]


def test_batch_zarr_remote_failed_overwrite_keeps_the_old_store(field, remote_zarr, remote_keys):
    """A remote batch store was opened with mode='w' in place: a failed overwrite deleted the previous
    complete store.  Now the new one is written under a hidden sibling prefix and swapped in when complete."""
    import fsspec
    import zarr

    url, opts = remote_zarr
    ds0, _ = field
    cat = Table({"x": [100.0, 450.0], "y": [100.0, 300.0]})
    good = cutouts(ds0, cat, 21, unit="pix", output=url, output_storage_options=opts)
    assert list(good["status"]) == ["ok", "ok"]
    before_keys = remote_keys(url, opts)
    before = zarr.open_group(url, mode="r", storage_options=opts)["image"][:]
    bad = tp.open_image(da.from_array(FailingArray(ds0["image"].values, fail_x=400), chunks=64, asarray=False))
    with pytest.raises(OSError, match="simulated"):
        cutouts(bad, cat, 21, unit="pix", output=url, output_storage_options=opts, overwrite=True)
    root = zarr.open_group(url, mode="r", storage_options=opts)
    assert root.attrs["complete"] is True and list(root.attrs["status"]) == ["ok", "ok"]
    np.testing.assert_array_equal(root["image"][:], before)
    assert remote_keys(url, opts) == before_keys  # unchanged, and no hidden temporary left beside it
    # without overwrite an existing store is refused before anything is written
    with pytest.raises(FileExistsError, match="overwrite"):
        cutouts(ds0, cat, 21, unit="pix", output=url, output_storage_options=opts)
    assert remote_keys(url, opts) == before_keys
    # a successful overwrite replaces it (the old third slot and its chunks are gone)
    one = cutouts(ds0, cat[:1], 15, unit="pix", output=url, output_storage_options=opts, overwrite=True)
    assert list(one["status"]) == ["ok"]
    root = zarr.open_group(url, mode="r", storage_options=opts)
    assert root["image"].shape == (1, 15, 15) and root.attrs["complete"] is True
    np.testing.assert_array_equal(root["image"][0], cutout(ds0, x=100.0, y=100.0, size=15, unit="pix")["image"].values)
    fs_keys = remote_keys(url, opts)
    prefix = fsspec.core.url_to_fs(url, **opts)[1].rstrip("/")
    assert fs_keys and all(k.startswith(prefix + "/") for k in fs_keys)  # no temporaries
    assert not any(k.endswith("image/c/1/0/0") for k in fs_keys)


def test_batch_zarr_compute_false_records_the_origins(tmp_path):
    """compute=False (the caller runs the tasks) stores the same cutout origins x0/y0 as compute=True (not the
    -1 fill value), so the stored WCS note can rebuild each cutout's WCS."""
    import dask
    import zarr

    img = np.random.default_rng(0).normal(100, 5, (256, 256)).astype("f4")
    cat = Table({"x": [50.0, 120.0, 3.0], "y": [60.0, 200.0, 5.0]})
    with dask.config.set(scheduler="synchronous"):
        tasks = tp.cutouts(tp.open_image(img), cat, 21, output=str(tmp_path / "lazy.zarr"), unit="pix", compute=False)
        dask.compute(*tasks)
        table = tp.cutouts(tp.open_image(img), cat, 21, output=str(tmp_path / "now.zarr"), unit="pix")
    lazy, now = (zarr.open_group(str(tmp_path / n), mode="r") for n in ("lazy.zarr", "now.zarr"))
    np.testing.assert_array_equal(lazy["x0"][:], np.asarray(table["x0"]))
    np.testing.assert_array_equal(lazy["y0"][:], np.asarray(table["y0"]))
    np.testing.assert_array_equal(now["x0"][:], lazy["x0"][:])
    np.testing.assert_array_equal(lazy["image"][:], now["image"][:])
