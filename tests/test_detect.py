"""Detection (sep per tile) and peak tools: against truth, tiled == whole image, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.table import Table
from scipy.spatial import cKDTree

import tilepipe as tp
from tilepipe.datasets import make_field
from tilepipe.detect import FLAG_HALO_CUT
from tilepipe.exceptions import FallbackWarning, OverlapWarning


@pytest.fixture(scope="module")
def field():
    return make_field((768, 768), seed=11)


@pytest.fixture(scope="module")
def bkg(field):
    return tp.estimate_background(field.image).compute()


@pytest.fixture(scope="module")
def whole(field, bkg):
    return tp.detect_sources(field.image, background=bkg)


def _match(cat, stars, r=1.5):
    d, i = cKDTree(np.c_[cat["x"], cat["y"]]).query(np.c_[stars["x"], stars["y"]])
    return d < r, i


# ------------------------------------------------------------------ truth
def test_completeness_and_purity_against_truth(field):
    cat = tp.detect_sources(field.image, nsigma=1.5)  # background=None -> estimate_background
    stars = field.stars
    found, _ = _match(cat, stars)
    bright = np.asarray(stars["snr"]) > 10
    assert bright.sum() > 80
    assert found[bright].mean() >= 0.95
    d, _ = cKDTree(np.c_[stars["x"], stars["y"]]).query(np.c_[cat["x"], cat["y"]])
    spurious = d > 3.0
    assert spurious.mean() < 0.01
    for col in ("id", "x", "y", "flux", "flux_err", "a", "b", "theta", "fwhm", "ellipticity", "peak", "npix",
                "flags", "tile"):
        assert col in cat.colnames
    np.testing.assert_array_equal(cat["id"], np.arange(1, len(cat) + 1))
    # isolated bright stars: the isophotal FWHM is below but near the true one; flux_err positive
    good = found & bright
    assert np.all(np.asarray(cat["flux_err"]) > 0)
    m = cat[_match(cat, stars)[1][good]]
    assert 0.5 * field.image.attrs["fwhm"] < np.median(m["fwhm"]) < 1.3 * field.image.attrs["fwhm"]


# ------------------------------------------------------------ invariance
def _assert_same(c1, c2):
    assert len(c1) == len(c2)
    np.testing.assert_array_equal(c1["xpeak"], c2["xpeak"])
    np.testing.assert_array_equal(c1["ypeak"], c2["ypeak"])
    np.testing.assert_array_equal(c1["id"], c2["id"])
    np.testing.assert_array_equal(c1["npix"], c2["npix"])
    for col in ("x", "y", "flux", "flux_err", "a", "b", "peak"):
        np.testing.assert_allclose(c1[col], c2[col], rtol=1e-6, atol=1e-9, err_msg=col)


@pytest.mark.parametrize("nx,ny", [(2, 2), (3, 2), (1, 4), (5, 3)])
def test_tiled_equals_whole(field, bkg, whole, nx, ny):
    cat = tp.detect_sources(field.image, background=bkg, nx=nx, ny=ny)
    _assert_same(whole, cat)
    assert set(np.unique(cat["tile"])) <= set(range(nx * ny))
    assert len(np.unique(cat["tile"])) > 1
    assert not np.any(np.asarray(cat["flags"]) & FLAG_HALO_CUT)


def test_small_overlap_warns_and_regrows_to_the_whole_image_result(field, bkg, whole):
    with pytest.warns(OverlapWarning, match="smaller than the support"):
        cat = tp.detect_sources(field.image, background=bkg, nx=3, ny=3, overlap=3)
    assert cat.meta["regrown_tiles"]  # some tiles had cut objects and were re-run with larger halos
    _assert_same(whole, cat)


def test_no_regrow_flags_cut_objects(field, bkg):
    with pytest.warns(OverlapWarning):
        cat = tp.detect_sources(field.image, background=bkg, nx=3, ny=3, overlap=3, max_regrow=0)
    assert np.any(np.asarray(cat["flags"]) & FLAG_HALO_CUT)


def test_real_image_tiled_equals_whole(shared_data):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unexpected extra padding")
        ds = tp.open_image(str(shared_data / "wide_calib_procastro" / "wasp19-005.fits"))
    bk = tp.estimate_background(ds).compute()
    whole = tp.detect_sources(ds, nsigma=3.0, background=bk)
    assert 900 < len(whole) < 2500  # "about 1300 sources"
    assert 1.0 < np.median(whole["fwhm"]) < 10.0
    # ny > 1 would cut the 1024-px-long artefact at the right edge: its tiles are re-run up to the whole height
    tiled = tp.detect_sources(ds, nsigma=3.0, background=bk, nx=3, ny=1)
    _assert_same(whole, tiled)


@pytest.mark.cluster
def test_tiled_equals_whole_on_local_cluster(field, client):
    lazy = tp.estimate_background(field.image).persist()  # on the workers: no numpy arrays in the graph
    ref = tp.detect_sources(field.image, background=lazy)
    cat = tp.detect_sources(field.image, background=lazy, nx=3, ny=3)
    _assert_same(ref, cat)
    assert len(np.unique(cat["tile"])) == 9


# -------------------------------------------------------------- bad input
def test_pixel_stack_overflow_is_a_flagged_tile(field, bkg):
    img = field.image["image"].values.copy()
    yy, xx = np.mgrid[:768, :768]
    img += 2000.0 * np.exp(-((xx - 200) ** 2 + (yy - 200) ** 2) / (2 * 20.0**2))  # a big galaxy in tile 0
    ds = tp.open_image(img, variance=field.image["variance"].values)
    with pytest.warns(FallbackWarning, match="sep failed"):
        cat = tp.detect_sources(ds, background=bkg, nx=2, ny=2, pixstack=1000)
    assert cat.meta["tile_status"]
    assert all("failed" in v for v in cat.meta["tile_status"].values())
    assert len(cat) > 0 and 0 not in set(cat["tile"])


def test_small_first_pixel_stack_is_retried_with_the_full_one(field, bkg, monkeypatch):
    """sep starts with a small pixel stack; a box that overflows it is extracted again with the full stack:
    no failed tile, and the same catalog as with the full stack from the start."""
    import sep

    import tilepipe.detect as det

    img = field.image["image"].values.copy()
    yy, xx = np.mgrid[:768, :768]
    img += 2000.0 * np.exp(-((xx - 200) ** 2 + (yy - 200) ** 2) / (2 * 20.0**2))  # ~10^4 pixels above threshold
    ds = tp.open_image(img, variance=field.image["variance"].values)
    full = tp.detect_sources(ds, background=bkg, nx=2, ny=2, pixstack=300_000)  # given: no retry
    overflows = []
    extract = sep.extract

    def counting(*args, **kwargs):
        try:
            return extract(*args, **kwargs)
        except Exception as exc:
            overflows.append(str(exc))
            raise

    monkeypatch.setattr(det, "_PIXSTACK_FIRST", 1000)
    monkeypatch.setattr(sep, "extract", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        cat = tp.detect_sources(ds, background=bkg, nx=2, ny=2)
    assert overflows and all("pixel buffer full" in m for m in overflows)
    assert not cat.meta["tile_status"]
    _assert_same(full, cat)


def test_all_nan_tile_and_fully_masked_image(field, bkg):
    img = field.image["image"].values.copy()
    img[:420, :420] = np.nan  # tile 0's whole outer box (core 384 + halo)
    ds = tp.open_image(img, variance=field.image["variance"].values, gain=2.0)
    with pytest.warns(FallbackWarning, match="entirely masked"):
        cat = tp.detect_sources(ds, background=bkg, nx=2, ny=2)
    assert len(cat) > 10
    assert not np.any((cat["x"] < 415) & (cat["y"] < 415))
    ds_all = tp.open_image(field.image["image"].values, mask=np.ones((768, 768), bool),
                           variance=field.image["variance"].values)
    with pytest.raises(ValueError, match="masked"):
        tp.detect_sources(ds_all, background=bkg)


def test_big_endian_input_equals_native(field, bkg, whole):
    img = field.image["image"].values.astype(">f4")
    var = field.image["variance"].values.astype(">f4")
    cat = tp.detect_sources(tp.open_image(img, variance=var), background=bkg["background"].values.astype(">f8"))
    ref = tp.detect_sources(tp.open_image(img.astype("<f4"), variance=var.astype("<f4")),
                            background=bkg["background"].values)
    _assert_same(ref, cat)


def test_argument_errors(field):
    with pytest.raises(ValueError, match="nsigma"):
        tp.detect_sources(field.image, nsigma=-1, background=0.0)
    with pytest.raises(ValueError, match="filter_type"):
        tp.detect_sources(field.image, filter_type="nope", background=0.0)
    with pytest.raises(ValueError, match="background has shape"):
        tp.detect_sources(field.image, background=np.zeros((5, 5)))


def test_wcs_adds_ra_dec(shared_data):
    ds = tp.open_image(str(shared_data / "pair_decam_sfft" / "Stack-DEC-OBS04.fits"))
    cat = tp.detect_sources(ds, nsigma=5.0)
    assert len(cat) > 5 and "ra" in cat.colnames and "dec" in cat.colnames
    assert np.all(np.isfinite(cat["ra"]))


# ------------------------------------------------------------ peak tools
def _gauss_image(shape, stars, sigma, noise, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.zeros(shape)
    for x, y, f in stars:
        img += f / (2 * np.pi * sigma**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return img + rng.normal(0, noise, shape)


@pytest.fixture(scope="module")
def peak_field():
    rng = np.random.default_rng(5)
    g = np.arange(24.0, 233.0, 46.0)
    xs, ys = [a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g)]
    stars = [(x, y, f) for x, y, f in zip(xs, ys, rng.uniform(2e4, 1e5, xs.size))]
    img = _gauss_image((256, 256), stars, 3.0, 5.0)
    hot = [(47, 47), (93, 139), (185, 231)]  # between the stars: hot pixels, no neighbours
    for y, x in hot:
        img[y, x] += 5000.0
    return img, np.array(stars), hot


def test_find_peaks_rejects_hot_pixels(peak_field):
    img, stars, hot = peak_field
    pk = tp.find_peaks(img, threshold=50.0)
    d, _ = cKDTree(np.c_[pk["x"], pk["y"]]).query(stars[:, :2])
    assert np.all(d < 1.0)  # every star found once at its peak pixel
    assert len(pk) == len(stars)
    for y, x in hot:
        assert not np.any((pk["x"] == x) & (pk["y"] == y))
    raw = tp.find_peaks(img, threshold=50.0, min_neighbors=0)
    assert len(raw) == len(stars) + len(hot)
    tiled = tp.find_peaks(tp.open_image(img.astype(np.float32)), threshold=50.0, nx=3, ny=2)
    np.testing.assert_array_equal(tiled["x"], pk["x"])
    np.testing.assert_array_equal(tiled["y"], pk["y"])


def test_centroids_and_second_moments(peak_field):
    img, stars, _ = peak_field
    pk = tp.find_peaks(img, threshold=50.0)
    assert len(pk) >= 10
    cen = tp.centroids(img, pk, box=21, edge="skip")
    d, i = cKDTree(stars[:, :2]).query(np.c_[cen["x"], cen["y"]])
    assert np.median(d) < 0.05 and d.max() < 0.2
    mom = tp.second_moments(img, cen, 25, edge="skip")
    sig = np.asarray(mom["sigma"])
    assert np.all(np.abs(sig / 3.0 - 1) < 0.10)  # the lab check: true sigma 3 px within 10 %
    assert abs(np.median(sig) / 3.0 - 1) < 0.02
    tiled = tp.centroids(tp.open_image(img.astype(np.float32)), pk, box=21, edge="skip", nx=2, ny=3)
    ref = tp.centroids(img.astype(np.float32), pk, box=21, edge="skip")
    np.testing.assert_array_equal(tiled["x"], ref["x"])


def test_centroid_edge_rule():
    img = _gauss_image((64, 64), [(3.2, 30.0, 1e4), (32.0, 32.0, 1e4)], 1.5, 1.0)
    peaks = np.array([[3.0, 30.0], [32.0, 32.0]])
    with pytest.raises(ValueError, match="edge='skip'"):
        tp.centroids(img, peaks, box=11)
    out = tp.centroids(img, peaks, box=11, edge="skip")
    assert len(out) == 1 and abs(out["x"][0] - 32.0) < 0.05
    with pytest.raises(ValueError, match="odd"):
        tp.centroids(img, peaks, box=10)


def test_remove_close():
    t = Table({"x": [10.0, 12.0, 50.0, 80.0, 83.5], "y": [10.0, 10.0, 50.0, 80.0, 80.0],
               "peak": [5.0, 9.0, 1.0, 2.0, 1.0]})
    out = tp.remove_close(t, 3.0)
    np.testing.assert_array_equal(out["x"], [50.0, 80.0, 83.5])
    out = tp.remove_close(t, 4.0, keep="brightest")
    np.testing.assert_array_equal(out["x"], [12.0, 50.0, 80.0])
    arr = tp.remove_close(np.c_[t["x"], t["y"]], 3.0)
    assert arr.shape == (3, 2)


# -------------------------------------------------------------------- CLI
@pytest.mark.cluster
def test_cli_detect_writes_catalog_and_plot(tmp_path, field, client):
    from click.testing import CliRunner

    from tilepipe.cli import main

    src = tmp_path / "img.fits"
    from astropy.io import fits

    fits.writeto(src, field.image["image"].values[:256, :320])
    out = tmp_path / "cat.ecsv"
    png = tmp_path / "q.png"
    res = CliRunner().invoke(main, ["--no-progress", "--nx", "2", "detect", str(src),
                                    "-o", str(out), "--nsigma", "3", "--plot", str(png)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cat = Table.read(out)
    assert len(cat) > 15 and "flux" in cat.colnames
    assert png.stat().st_size > 5_000
    res = CliRunner().invoke(main, ["detect", str(tmp_path / "missing.fits"), "-o", str(out)])
    assert res.exit_code != 0 and "cannot open" in res.output


# ------------------------------------------------- windows read from the file
def _field_file(tmp_path, field):
    from astropy.io import fits

    path = tmp_path / "field.fits"
    fits.writeto(path, field.image["image"].values.astype(np.float32))
    return str(path)


def test_windows_read_from_the_file_equal_chunk_exchange_and_whole(tmp_path, field, monkeypatch):
    import tilepipe.detect as det

    path = _field_file(tmp_path, field)
    calls = []
    run = det.map_windows
    monkeypatch.setattr(det, "map_windows", lambda f, r, w, *a, **k: calls.append(len(w)) or run(f, r, w, *a, **k))
    ds = tp.open_image(path, chunks=256)
    whole = tp.detect_sources(ds, nsigma=2.0)  # background=None: estimated inside, lazily
    tiled = tp.detect_sources(ds, nsigma=2.0, nx=3, ny=2)
    assert calls[:1] == [1] and 6 in calls  # both ran from the file, one task per window
    token = det._USE_REGIONS.set(False)
    try:
        exchanged = tp.detect_sources(ds, nsigma=2.0, nx=3, ny=2)
    finally:
        det._USE_REGIONS.reset(token)
    assert len(calls) == 2  # the forced chunk-exchange run did not read windows
    _assert_same(whole, tiled)
    _assert_same(tiled, exchanged)
    assert len(whole) > 100


@pytest.mark.cluster
def test_windows_read_from_the_file_on_local_cluster(tmp_path, field, client):
    path = _field_file(tmp_path, field)
    import dask

    with dask.config.set(scheduler="synchronous"):
        ref = tp.detect_sources(tp.open_image(path, chunks=256), nsigma=2.0)
    cat = tp.detect_sources(tp.open_image(path, chunks=256), nsigma=2.0, nx=3, ny=3)  # workers read the file
    _assert_same(ref, cat)
    assert len(np.unique(cat["tile"])) == 9


def test_windows_with_bad_meshes_warn_like_the_chunk_exchange(tmp_path, field, monkeypatch):
    """From a file, the mesh statistics run in the same graph as the windows: bad meshes still warn (same
    text as estimate_background), the catalog equals the chunk-exchange one, an all-NaN file is a clear error."""
    import tilepipe.background as bg
    import tilepipe.detect as det
    from astropy.io import fits

    eager = []
    run = bg.mesh_statistics
    monkeypatch.setattr(bg, "mesh_statistics", lambda *a, **k: eager.append(1) or run(*a, **k))

    img = field.image["image"].values.astype(np.float32)
    img[300:420, 0:200] = np.nan
    path = tmp_path / "holes.fits"
    fits.writeto(path, img)
    ds = tp.open_image(str(path), chunks=256)
    with pytest.warns(FallbackWarning, match="filled from their nearest good meshes") as rec_w:
        windows = tp.detect_sources(ds, nsigma=2.0, nx=3, ny=2)
    assert not eager  # no separate compute of the mesh statistics
    token = det._USE_REGIONS.set(False)
    try:
        with pytest.warns(FallbackWarning, match="filled from their nearest good meshes") as rec_x:
            exchanged = tp.detect_sources(ds, nsigma=2.0, nx=3, ny=2)
    finally:
        det._USE_REGIONS.reset(token)
    assert eager == [1]
    mesh_warnings = [[str(w.message) for w in rec if "meshes" in str(w.message)] for rec in (rec_w, rec_x)]
    assert mesh_warnings[0] == mesh_warnings[1] and len(mesh_warnings[0]) == 1
    _assert_same(windows, exchanged)
    assert len(windows) > 100
    nan = tmp_path / "nan.fits"
    fits.writeto(nan, np.full((300, 300), np.nan, np.float32))
    with pytest.raises(ValueError, match="no mesh has enough good pixels"):
        tp.detect_sources(tp.open_image(str(nan)), nx=2, ny=2)


@pytest.mark.parametrize("axes", [("DEC--TAN", "RA---TAN"), ("GLON-TAN", "GLAT-TAN")])
def test_ra_dec_are_icrs_whatever_the_header_axes(axes):
    """ra, dec are ICRS degrees also for a header with latitude first or a galactic frame (they used to be
    the raw world values of the header's axes: dec = 150 deg for swapped axes, l and b for galactic)."""
    from astropy.io import fits
    from astropy.wcs import WCS

    from tilepipe.image import pixel_to_radec, radec_to_pixel

    rng = np.random.default_rng(0)
    h, w = 200, 240
    yy, xx = np.mgrid[:h, :w].astype(float)
    img = (100 + 3000 * np.exp(-((xx - 60) ** 2 + (yy - 150) ** 2) / 8.0) + rng.normal(0, 1, (h, w))).astype(np.float32)
    hdr = fits.Header()
    hdr["CTYPE1"], hdr["CTYPE2"] = axes
    hdr["CRPIX1"], hdr["CRPIX2"] = 100.0, 100.0
    hdr["CRVAL1"], hdr["CRVAL2"] = (-30.0, 150.0) if axes[0].startswith("DEC") else (30.0, 1.0)
    hdr["CDELT1"], hdr["CDELT2"] = 1 / 3600, -1 / 3600
    cat = tp.detect_sources(tp.open_image(img, variance=np.ones((h, w), np.float32), header=hdr), background=100.0,
                            nsigma=5)
    r = cat[np.argmax(cat["flux"])]
    truth = WCS(hdr).pixel_to_world(r["x"], r["y"]).icrs
    assert abs(r["ra"] - truth.ra.deg) < 1e-9 and abs(r["dec"] - truth.dec.deg) < 1e-9
    assert -90 <= r["dec"] <= 90
    ra, dec = pixel_to_radec(WCS(hdr), [r["x"]], [r["y"]])
    px, py = radec_to_pixel(WCS(hdr), ra, dec)
    np.testing.assert_allclose([px[0], py[0]], [r["x"], r["y"]], atol=1e-6)


def test_default_background_fits_small_images_and_many_tiles():
    """With background=None the mesh background takes any tiling the detection grid allows (its maps do not
    depend on it) and an image smaller than one mesh gets a smaller mesh with a warning; both used to raise
    errors about a `mesh` argument that detect_sources does not have."""
    from tilepipe.datasets import make_field

    f = make_field((200, 200), seed=1)
    whole = tp.detect_sources(f.image)
    tiled = tp.detect_sources(f.image, nx=5)  # 4 meshes across: the mesh background runs on fewer tiles
    assert len(tiled) == len(whole) > 5
    for c in ("x", "y", "flux"):
        np.testing.assert_allclose(np.sort(tiled[c]), np.sort(whole[c]), rtol=1e-5)
    small = make_field((50, 60), seed=1, n_stars=3)
    with pytest.warns(FallbackWarning, match="smaller than one 64-px background mesh"):
        cat = tp.detect_sources(small.image)
    d = np.hypot(np.asarray(cat["x"])[:, None] - np.asarray(small.stars["x"])[None],
                 np.asarray(cat["y"])[:, None] - np.asarray(small.stars["y"])[None])
    bright = np.asarray(small.stars["snr"]) > 10
    assert (d.min(axis=0)[bright] < 1.5).all()
