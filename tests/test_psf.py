"""Star selection, empirical PSF, analytic PSFs and PSF photometry against synthetic truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.table import Table

from tilepipe.datasets import make_field, true_psf
from tilepipe.exceptions import FallbackWarning
from tilepipe.psf import (
    REASONS,
    GaussianPSF,
    MoffatPSF,
    PSFModel,
    build_psf,
    load_psf,
    psf_photometry,
    select_stars,
)

GRID = (170.0, 512.0, 853.0)  # centres of a 3 x 3 tiling of a 1024 px field


@pytest.fixture(scope="module")
def field():
    # strongly varying PSF: 35% peak-to-peak FWHM change, ellipticity 0.15 with a varying angle
    return make_field((1024, 1024), 11, psf_variation=0.35, ellipticity=0.15, n_stars=1500)


@pytest.fixture(scope="module")
def selection(field):
    return select_stars(field.image, field.stars)


@pytest.fixture(scope="module")
def psf_pixel(field, selection):
    return build_psf(field.image, selection)


@pytest.fixture(scope="module")
def photometry(field, psf_pixel):
    # targets: S/N > 50; every catalog source near a target is fitted too (neighbours in the same group)
    from scipy.spatial import cKDTree

    stars = field.stars
    xy = np.column_stack([np.asarray(stars["x"]), np.asarray(stars["y"])])
    target = np.asarray(stars["snr"]) > 50
    near = np.zeros(len(stars), bool)
    for js in cKDTree(xy).query_ball_point(xy[target], r=30.0):
        near[js] = True
    sub = stars[near | target]
    sub["target"] = np.asarray(sub["snr"]) > 50
    return psf_photometry(field.image, sub, psf_pixel), sub


# ----------------------------------------------------------------- selection
def test_select_stars_reasons(field, selection):
    reasons = set(np.asarray(selection["reason"]).astype(str))
    assert reasons <= set(REASONS) | {""}
    assert np.array_equal(np.asarray(selection["keep"]), np.asarray(selection["reason"]) == "")
    kept = selection[selection["keep"]]
    assert len(kept) >= 60
    # kept stars are bright, round enough and isolated
    assert np.all(np.asarray(kept["snr"]) >= 20)
    assert np.all(np.asarray(kept["contamination"]) <= 0.02)
    # measured centroids agree with the truth
    assert np.median(np.hypot(kept["xc"] - kept["x"], kept["yc"] - kept["y"])) < 0.05


def test_select_saturated_drop_user_refcat(tmp_path):
    f = make_field((256, 256), 2, n_stars=60, saturation=20000.0, flux_range=(2000, 4e5))
    cat = f.stars.copy()
    cat.remove_column("saturated")  # the chain must find saturation from the pixels
    sel = select_stars(f.image, cat, plot=tmp_path / "sel.png")
    sat = np.asarray(f.stars["saturated"])
    assert sat.any()
    assert np.all(np.asarray(sel["reason"])[sat & (np.asarray(sel["reason"]) != "edge")] == "saturated")
    assert (tmp_path / "sel.png").stat().st_size > 1000
    # drop list
    first = int(np.nonzero(np.asarray(sel["keep"]))[0][0])
    sel2 = select_stars(f.image, cat, drop=[first])
    assert sel2["reason"][first] == "dropped" and not sel2["keep"][first]
    # user positions override the statistical cuts, not the saturation check
    user = np.column_stack([np.asarray(cat["x"]), np.asarray(cat["y"])])
    sel3 = select_stars(f.image, cat, stars=user)
    assert set(np.asarray(sel3["reason"]).astype(str)) <= {"", "saturated", "edge", "bad_pixels"}
    # reference catalog: only matched sources survive
    ref = Table({"x": cat["x"][:10] + 0.3, "y": cat["y"][:10] - 0.2})
    ref.write(tmp_path / "ref.ecsv")
    sel4 = select_stars(f.image, cat, refcat=str(tmp_path / "ref.ecsv"))
    assert not np.any(np.asarray(sel4["keep"])[10:])
    assert np.all(np.asarray(sel4["reason"])[10:][np.asarray(sel["keep"])[10:]] == "no_refcat")


# ----------------------------------------------------------------- PSF truth
def _residuals(psf, tp):
    return np.array([[np.abs(psf.at(x, y) - tp.at(x, y)).sum() for x in GRID] for y in GRID])


def test_pixel_psf_matches_truth(field, psf_pixel):
    tp = true_psf(field.image)
    res = _residuals(psf_pixel, tp)
    assert res.max() < 0.05, res
    assert psf_pixel.meta["n_stars"] >= 60
    for x in GRID:
        for y in GRID:
            s = psf_pixel.at(x, y)
            assert s.shape == (25, 25) and abs(s.sum() - 1) < 1e-12


def test_fwhm_map_within_3_percent(field, psf_pixel):
    tp = true_psf(field.image)
    fmap = psf_pixel.fwhm_map((1024, 1024), step=64)
    assert fmap.shape == (1024, 1024)
    for x in GRID:
        for y in GRID:
            assert abs(fmap[int(y), int(x)] / tp.fwhm(x, y) - 1) < 0.03
    # the map follows the variation (35% peak-to-peak in the truth)
    assert fmap.max() / fmap.min() > 1.2


def test_kl_psf_matches_truth(field, selection):
    psf = build_psf(field.image, selection, model="kl", inf_loss=0.05)
    assert psf.kind == "kl" and 1 <= psf.meta["n_components"] <= 30
    assert psf.basis.shape[0] == psf.meta["n_components"] + 1
    res = _residuals(psf, true_psf(field.image))
    assert res.max() < 0.05, res


def test_build_psf_tiled_equals_whole(field, selection, psf_pixel):
    tiled = build_psf(field.image, selection, nx=3, ny=3)
    np.testing.assert_allclose(tiled.basis, psf_pixel.basis, rtol=0, atol=1e-12)


def test_build_psf_without_catalog():
    f = make_field((512, 512), 4, psf_variation=0.3, ellipticity=0.12, n_stars=500)
    psf = build_psf(f.image, nx=2, ny=2)  # detects and selects itself
    tp = true_psf(f.image)
    for x, y in ((128, 128), (256, 256), (384, 384)):
        assert np.abs(psf.at(x, y) - tp.at(x, y)).sum() < 0.06
    # per-tile PSFs for consumers such as ZOGY
    g = psf.grid(2, 2)
    assert g.shape == (2, 2, 25, 25)
    np.testing.assert_allclose(g[1, 0], psf.at(127.5, 383.5))


def test_oversampled_psf(field, selection):
    psf = build_psf(field.image, selection, oversampling=2, degree=1, size=21)
    fine = psf.at(512, 512, oversampled=True)
    assert fine.shape == (43, 43) and abs(fine.sum() - 1) < 1e-12
    # the pixel-resolution stamp is the phase-0 sampling of the fine model
    pix = psf.at(512, 512)
    np.testing.assert_allclose(pix, fine[1::2, 1::2] / fine[1::2, 1::2].sum(), rtol=1e-12, atol=1e-15)
    assert pix.shape == (21, 21)


# ----------------------------------------------------------------- bad input
def test_too_few_stars_falls_back():
    f = make_field((200, 200), 5, n_stars=7, flux_range=(2e4, 5e4), psf_variation=0.0)
    xy = np.column_stack([np.asarray(f.stars["x"]), np.asarray(f.stars["y"])])
    with pytest.warns(FallbackWarning, match="degree"):
        psf = build_psf(f.image, xy, degree=2)
    assert psf.degree < 2
    tp = true_psf(f.image)
    assert np.abs(psf.at(100, 100) - tp.at(100, 100)).sum() < 0.1


def test_no_stars_and_all_saturated():
    blank = np.random.default_rng(0).normal(100, 5, (128, 128)).astype(np.float32)
    with pytest.raises(ValueError, match="no usable PSF star"):
        build_psf(blank, np.array([[64.0, 64.0]]))
    f = make_field((200, 200), 6, n_stars=15, flux_range=(3e5, 5e5), saturation=5000.0)
    assert np.all(f.stars["saturated"])
    with pytest.raises(ValueError, match="saturated"):
        build_psf(f.image, f.stars)
    with pytest.raises(ValueError, match="model"):
        build_psf(f.image, f.stars, model="nope")
    with pytest.raises(TypeError, match="stars"):
        build_psf(f.image, "stars.txt")


def test_edge_stamps_are_rejected():
    f = make_field((256, 256), 8, n_stars=40, edge=2.0, flux_range=(5e3, 1e5))
    sel = select_stars(f.image, f.stars)
    near = (np.asarray(f.stars["x"]) < 12) | (np.asarray(f.stars["y"]) < 12)
    assert near.any()
    assert np.all(np.asarray(sel["reason"])[near] == "edge")


# ----------------------------------------------------------------- storage
def test_fits_and_attrs_round_trip(tmp_path, psf_pixel):
    p = tmp_path / "psf.fits"
    psf_pixel.to_fits(p)
    back = PSFModel.from_fits(p)
    for x, y in ((3.0, 1000.0), (512.0, 512.0)):
        np.testing.assert_allclose(back.at(x, y), psf_pixel.at(x, y), rtol=1e-12, atol=1e-17)
    attrs = json.loads(json.dumps(psf_pixel.to_attrs()))
    again = PSFModel.from_attrs(attrs)
    np.testing.assert_allclose(again.at(700.0, 20.0), psf_pixel.at(700.0, 20.0), rtol=1e-12, atol=1e-17)
    # through real Zarr attrs
    import zarr

    g = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    g.attrs["psf"] = psf_pixel.to_attrs()
    z = load_psf(dict(g.attrs["psf"]))
    np.testing.assert_allclose(z.at(100.0, 900.0), psf_pixel.at(100.0, 900.0), rtol=1e-12, atol=1e-17)


# ----------------------------------------------------------------- analytic
def test_analytic_psfs(tmp_path):
    g = GaussianPSF(3.0, ellipticity=0.2, theta=0.5)
    s = g.at(10, 10)
    assert s.shape == (25, 25) and abs(s.sum() - 1) < 1e-12
    assert abs(g.fwhm(0, 0) - 3.0) < 1e-12
    m = MoffatPSF(4.0, beta=2.5)
    m.to_fits(tmp_path / "m.fits")
    back = load_psf(str(tmp_path / "m.fits"))
    assert isinstance(back, MoffatPSF) and back.beta == 2.5
    np.testing.assert_array_equal(back.at(0, 0), m.at(0, 0))
    with pytest.raises(ValueError, match="beta"):
        MoffatPSF(3.0, beta=0.9)
    # fitted to a constant Moffat field
    f = make_field((384, 384), 9, psf_model="moffat", beta=3.0, psf_variation=0.0, ellipticity=0.0, n_stars=120,
                   fwhm=3.5)
    fit = MoffatPSF.fit(f.image, f.stars)
    assert abs(fit.fwhm_value / 3.5 - 1) < 0.03
    assert abs(fit.beta - 3.0) < 0.4
    gfit = GaussianPSF.fit(f.image, f.stars)
    assert 3.0 < gfit.fwhm_value < 4.5


# ----------------------------------------------------------------- photometry
def test_psf_photometry_truth(photometry):
    ph, truth = photometry
    iso = (np.asarray(ph["flags"]) == 0) & np.asarray(truth["target"])
    gsize = np.bincount(np.asarray(ph["group"]))
    iso &= gsize[np.asarray(ph["group"])] == 1
    assert iso.sum() >= 50
    flux = np.asarray(ph["flux"])[iso]
    err = np.asarray(ph["flux_err"])[iso]
    true = np.asarray(truth["flux"])[iso]
    assert abs(np.median(flux / true - 1)) < 0.01
    pulls = (flux - true) / err
    assert abs(np.std(pulls) - 1) < 0.15, np.std(pulls)
    # positions: unbiased, sub-0.05 px scatter for S/N > 50
    dx = np.asarray(ph["x_fit"])[iso] - np.asarray(truth["x"])[iso]
    assert abs(np.median(dx)) < 0.01 and np.std(dx) < 0.05
    assert {"x_fit", "y_fit", "flux", "flux_err", "chi2", "flags", "flux_in"} <= set(ph.colnames)


def test_psf_photometry_tiled_equals_whole(field, psf_pixel, photometry):
    ph, truth = photometry
    sub = truth[:150]
    sub.remove_column("target")
    whole = psf_photometry(field.image, sub, psf_pixel)
    tiled = psf_photometry(field.image, sub, psf_pixel, nx=3, ny=2)
    assert set(np.asarray(tiled["tile"])) != {0}
    np.testing.assert_allclose(tiled["flux"], whole["flux"], rtol=1e-9)
    np.testing.assert_allclose(tiled["x_fit"], whole["x_fit"], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(tiled["flags"], whole["flags"])
    fixed = psf_photometry(field.image, sub[:20], psf_pixel, fit_position=False)
    np.testing.assert_array_equal(fixed["x_fit"], sub["x"][:20])


# ----------------------------------------------------------------- CLI
@pytest.mark.cluster
def test_cli_psf_and_photometry(tmp_path, local_cluster):
    from astropy.io import fits
    from click.testing import CliRunner

    from tilepipe.cli import main

    f = make_field((384, 384), 12, n_stars=300, psf_variation=0.0, flux_range=(300, 3e5))
    img = tmp_path / "img.fits"
    hdr = fits.Header([("GAIN", 2.0)])
    fits.PrimaryHDU(np.asarray(f.image["image"].values), header=hdr).writeto(img)
    runner = CliRunner()
    sched = ["--scheduler", local_cluster.scheduler.address, "--no-progress"]
    r = runner.invoke(main, [*sched, "psf", str(img), "-o", str(tmp_path / "psf.fits"), "--degree", "1",
                             "--plot", str(tmp_path / "psf.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "psf.png").stat().st_size > 1000
    psf = load_psf(str(tmp_path / "psf.fits"))
    assert np.abs(psf.at(192, 192) - true_psf(f.image).at(192, 192)).sum() < 0.05
    cat = tmp_path / "cat.ecsv"
    f.stars[f.stars["snr"] > 30].write(cat)
    r = runner.invoke(main, [*sched, "photometry", str(img), "--psf", str(tmp_path / "psf.fits"),
                             "-o", str(tmp_path / "phot.ecsv"), "--catalog", str(cat)])
    assert r.exit_code == 0, r.output
    out = Table.read(tmp_path / "phot.ecsv")
    assert len(out) == int(np.sum(f.stars["snr"] > 30)) and "flux_err" in out.colnames
    r = runner.invoke(main, [*sched, "photometry", str(img), "--psf", str(img), "-o", str(tmp_path / "x.ecsv")])
    assert r.exit_code != 0 and "PSF" in r.output


def test_psf_photometry_rows_off_the_image():
    """Rows off the image get NaN flux with the edge and failed flags; the other rows are unchanged.

    Off-image rows: two far outside (x = -30, x = 300), one whose fitting box
    has no pixel on the image but lies within a box of a real S/N ~ 30 star
    near the top edge (it must not spoil that star's fit), and one just below
    the bottom edge whose box touches the image.
    """
    f = make_field((256, 256), 2, psf_variation=0.0, ellipticity=0.0, sky_gradient=0.0, fwhm=3.0, edge=2.0)
    ds = f.image.assign(background=(f.image["image"].dims, f.sky))
    psf = GaussianPSF(3.0)
    stars = f.stars[np.asarray(f.stars["snr"]) > 20]["x", "y", "flux"]
    top = int(np.argmax(np.asarray(stars["y"])))
    assert stars["y"][top] > 250  # the star near the top edge
    off = Table({"x": [-30.0, 300.0, float(stars["x"][top]) + 0.2, 120.0],
                 "y": [50.0, 50.0, float(stars["y"][top]) + 12.4, -2.0],
                 "flux": [1e3, 1e3, 1e3, 1e3]})
    from astropy.table import vstack

    cat = vstack([stars, off])
    n = len(stars)
    ph = psf_photometry(ds, cat, psf)
    assert len(ph) == len(cat)
    for col in ("flux", "flux_err"):
        assert np.all(np.isnan(np.asarray(ph[col])[n:])), col
    flags = np.asarray(ph["flags"])[n:]
    assert np.all(flags & 1) and np.all(flags & 16)  # FLAG_EDGE and FLAG_FAILED (16: the others' edge bit)
    assert np.all(np.asarray(ph["npix"])[n:] == 0)
    # the on-image rows: exactly as without the off-image rows, and right
    alone = psf_photometry(ds, stars, psf)
    np.testing.assert_array_equal(np.asarray(ph["flags"])[:n], np.asarray(alone["flags"]))
    for col in ("flux", "flux_err", "x_fit", "y_fit"):  # equal up to round-off
        np.testing.assert_allclose(np.asarray(ph[col])[:n], np.asarray(alone[col]), rtol=1e-12, err_msg=col)
    pull = (np.asarray(ph["flux"])[:n] - np.asarray(stars["flux"])) / np.asarray(ph["flux_err"])[:n]
    assert np.all(np.isfinite(pull)) and np.all(np.abs(pull) < 5), pull
    # tile invariant (to round-off, as test_psf_photometry_tiled_equals_whole)
    tiled = psf_photometry(ds, cat, psf, nx=2, ny=2)
    assert set(np.asarray(tiled["tile"])[:n]) != {0}
    np.testing.assert_array_equal(np.asarray(tiled["flags"]), np.asarray(ph["flags"]))
    for col in ("flux", "flux_err", "x_fit"):
        np.testing.assert_allclose(np.asarray(tiled[col]), np.asarray(ph[col]), rtol=1e-9, err_msg=col)


def test_select_saturated_with_background_variable():
    """Saturation is tested on the raw pixels (stamp + background), not the sky-subtracted ones."""
    f = make_field((512, 512), 3, fwhm=3.0, sky=2000.0, saturation=12000.0, n_stars=150, flux_range=(1e4, 3e6))
    cat = f.stars["x", "y"]
    sat = np.asarray(f.stars["saturated"])
    assert sat.sum() >= 20
    dsb = f.image.assign(background=(f.image["image"].dims, f.sky))
    plain = select_stars(f.image, cat)
    sel = select_stars(dsb, cat)
    reason = np.asarray(sel["reason"])[sat]
    assert np.mean(reason == "saturated") > 0.9, dict(zip(*np.unique(reason, return_counts=True)))
    np.testing.assert_array_equal(reason, np.asarray(plain["reason"])[sat])
    # the background variable changes no saturation verdict (also for the stars next to a saturated one)
    np.testing.assert_array_equal(np.asarray(sel["reason"]) == "saturated", np.asarray(plain["reason"]) == "saturated")
    # tolerating masked (saturated) pixels must not let saturated stars through
    lax = select_stars(dsb, cat, central_tol=4)
    assert not np.any(np.asarray(lax["keep"])[sat])


# ----------------------------------------------------------------- PSF files at URLs
def _put(local, url, storage_options=None):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.put_file(str(local), path)


@pytest.mark.parametrize("suffix", [".fits", ".fits.gz"])
def test_load_psf_from_a_memory_url(tmp_path, suffix):
    """load_psf reads a PSF file at an fsspec URL (gzipped too) exactly like the local file."""
    import uuid

    psf = MoffatPSF(fwhm=3.2, beta=2.8, size=21)
    local = tmp_path / f"psf{suffix}"
    psf.to_fits(local)
    url = f"memory://tp-{uuid.uuid4().hex[:8]}/psf{suffix}"
    _put(local, url)
    for back in (load_psf(url), load_psf(url, storage_options={}), load_psf(str(local)), load_psf(local)):
        assert back.kind == "moffat" and back.to_attrs() == psf.to_attrs()
        np.testing.assert_array_equal(back.at(10.0, 10.0), psf.at(10.0, 10.0))
    missing = url.replace("psf", "nopsf")
    with pytest.raises(FileNotFoundError, match=r"PSF file not found: 'memory://.*nopsf"):
        load_psf(missing)
    with pytest.raises(FileNotFoundError, match="PSF file not found: .*check the path"):
        load_psf(str(tmp_path / "nopsf.fits"))


def test_load_psf_from_s3_with_storage_options(tmp_path, s3_bucket, psf_pixel):
    """A pixel PSF model on an S3-compatible server, read with the credentials/endpoint in storage_options."""
    name, opts = s3_bucket
    psf_pixel.to_fits(tmp_path / "psf.fits")
    url = f"s3://{name}/models/psf.fits"
    _put(tmp_path / "psf.fits", url, opts)
    back = load_psf(url, storage_options=opts)
    local = load_psf(str(tmp_path / "psf.fits"))
    assert back.to_attrs() == local.to_attrs()
    np.testing.assert_array_equal(back.at(300.0, 700.0), local.at(300.0, 700.0))
    np.testing.assert_allclose(back.at(300.0, 700.0), psf_pixel.at(300.0, 700.0), rtol=0, atol=1e-12)
