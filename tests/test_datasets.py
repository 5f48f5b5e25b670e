"""tilepipe.datasets: synthetic fields and pairs checked against their own truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from scipy import stats
from scipy.spatial import cKDTree

from tilepipe.datasets import Field, Pair, TruePSF, make_field, make_pair, true_psf

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@pytest.fixture(scope="module")
def field() -> Field:
    return make_field((512, 512), 3, chunks=128)


@pytest.fixture(scope="module")
def field_np(field):
    ds = field.image.compute()
    return ds["image"].values, ds["variance"].values, ds["mask"].values


@pytest.fixture(scope="module")
def bright():
    """Few very bright, isolated-ish stars: shape measurements with tiny noise."""
    return make_field((384, 384), 11, n_stars=25, flux_range=(1e6, 2e6), ellipticity=0.3, fwhm=3.0,
                      psf_variation=0.4, edge=20)


@pytest.fixture(scope="module")
def pair() -> Pair:
    return make_pair((512, 512), 5, n_transients=25, shift=(0.37, -0.61))


def _isolated(x, y, radius):
    tree = cKDTree(np.column_stack([x, y]))
    d, _ = tree.query(np.column_stack([x, y]), k=2)
    return d[:, 1] > radius


# ---------------------------------------------------------------- structure
def test_field_structure(field):
    ds, stars, sky = field
    assert isinstance(ds, xr.Dataset)
    assert ds["image"].shape == (512, 512) and ds["image"].dtype == np.float32
    assert ds["variance"].dtype == np.float32 and ds["mask"].dtype == bool
    assert ds["image"].data.chunksize == (128, 128)
    assert sky.shape == (512, 512) and sky.dtype == np.float32
    for col in ("id", "x", "y", "flux", "fwhm", "ellipticity", "theta", "peak", "snr", "saturated"):
        assert col in stars.colnames
    assert stars["x"].dtype == np.float64
    assert len(stars) == round(512 * 512 / 2000)
    assert list(stars["id"]) == list(range(1, len(stars) + 1))
    yx = np.column_stack([stars["y"], stars["x"]])
    assert np.all(np.diff(yx[:, 0]) >= 0)  # sorted by y
    assert stars["x"].min() >= 8 and stars["x"].max() <= 511 - 8 and stars["y"].min() >= 8
    whole_field = make_field((128, 128), 3, edge=None, n_stars=200)  # edge=None: whole stamps inside
    whole, R = whole_field.stars, true_psf(whole_field.image).radius
    assert whole["x"].min() >= R and whole["x"].max() <= 127 - R and whole["y"].min() >= R
    assert stars["flux"].min() >= 100 and stars["flux"].max() <= 3e5
    assert ds.attrs["gain"] == 2.0 and ds.attrs["read_noise"] == 5.0
    assert "saturation" not in ds.attrs
    assert abs(ds.attrs["fwhm"] - 3.0) < 0.3
    json.dumps(ds.attrs)  # every attribute is JSON-able (Zarr attrs)
    cards = {c[0]: c[1] for c in ds.attrs["header"]}
    assert cards["GAIN"] == 2.0 and cards["RDNOISE"] == 5.0


def test_deterministic_per_seed():
    a = make_field((128, 160), 7, cosmic_rays=5, bad_columns=1)
    b = make_field((128, 160), 7, cosmic_rays=5, bad_columns=1)
    c = make_field((128, 160), 8, cosmic_rays=5, bad_columns=1)
    assert np.array_equal(a.image["image"].values, b.image["image"].values)
    assert np.array_equal(a.image["mask"].values, b.image["mask"].values)
    assert all(np.array_equal(a.stars[k], b.stars[k]) for k in a.stars.colnames)
    assert a.image.attrs == b.image.attrs
    assert not np.array_equal(a.image["image"].values, c.image["image"].values)
    # independent random streams: adding cosmic rays does not move the stars
    d = make_field((128, 160), 7, cosmic_rays=0, bad_columns=1)
    assert np.array_equal(a.stars["x"], d.stars["x"]) and np.array_equal(a.stars["flux"], d.stars["flux"])
    p1 = make_pair((128, 128), 2, n_transients=3)
    p2 = make_pair((128, 128), 2, n_transients=3)
    assert np.array_equal(p1.new["image"].values, p2.new["image"].values)
    assert np.array_equal(p1.ref["image"].values, p2.ref["image"].values)
    assert np.array_equal(p1.transients["flux"], p2.transients["flux"])


def test_power_law_fluxes():
    f = make_field((1024, 1024), 4, n_stars=3000, flux_range=(100, 1e5), edge=3)
    fl = np.asarray(f.stars["flux"])
    lo, hi = 100.0, 1e5
    cdf15 = lambda F: (lo**-0.5 - F**-0.5) / (lo**-0.5 - hi**-0.5)  # default dN/dF ∝ F^-1.5, truncated
    cdf2 = lambda F: (1 / lo - 1 / F) / (1 / lo - 1 / hi)  # dN/dF ∝ F^-2
    assert stats.kstest(fl, cdf15).pvalue > 1e-3
    assert stats.kstest(fl, cdf2).pvalue < 1e-6  # the test has power
    f2 = make_field((1024, 1024), 4, n_stars=3000, flux_range=(100, 1e5), edge=3, flux_slope=2.0)
    assert stats.kstest(np.asarray(f2.stars["flux"]), cdf2).pvalue > 1e-3
    assert stats.kstest(np.asarray(f2.stars["flux"]), cdf15).pvalue < 1e-6


# ---------------------------------------------------------------------- PSF
def test_true_psf_stamps(field):
    psf = true_psf(field.image)
    assert isinstance(psf, TruePSF)
    for size, ov in ((25, 1), (24, 1), (11, 3), (8, 4)):
        st = psf.at(100.0, 400.0, size=size, oversampling=ov)
        assert st.shape == (size * ov, size * ov)
        assert st.sum() == pytest.approx(1.0, abs=1e-12)
        # source at the geometric centre: first moments vanish (profile evaluated in float32)
        c = (size * ov - 1) / 2.0
        yy, xx = np.indices(st.shape)
        assert abs((st * (xx - c)).sum()) < 1e-6 and abs((st * (yy - c)).sum()) < 1e-6
    # the stamp used for a star centred on a pixel is exactly at()
    R = psf.radius
    st, origin = psf.stamp(200.0, 300.0)
    assert origin == (300 - R, 200 - R)
    np.testing.assert_allclose(st, psf.at(200.0, 300.0, size=2 * R + 1), rtol=0, atol=1e-15)
    # ... and a sub-pixel star's stamp is centred on its true position
    st, (y0, x0) = psf.stamp(200.3, 299.8)
    yy, xx = np.indices(st.shape)
    assert (st * (xx + x0)).sum() == pytest.approx(200.3, abs=2e-3)
    assert (st * (yy + y0)).sum() == pytest.approx(299.8, abs=2e-3)


def test_psf_varies_smoothly(field):
    psf = true_psf(field.image)
    xs = np.linspace(0, 511, 9)
    X, Y = np.meshgrid(xs, xs)
    f, e, th = psf.shape_params(X, Y)
    # psf_variation=0.3: peak-to-peak FWHM change about 30% of the mean (on this grid <= 30%)
    assert 0.2 < (f.max() - f.min()) / f.mean() <= 0.3 + 1e-9
    assert abs(f.mean() - 3.0) < 0.15
    assert 0 < e.min() and e.max() < 0.2
    assert np.ptp(th) > 0.01  # the angle changes across the field
    # smooth: neighbouring grid points differ little
    assert np.abs(np.diff(f, axis=1)).max() < 0.1 * f.mean()
    const = true_psf(make_field((64, 64), 1, psf_variation=0.0, n_stars=1).image)
    fc = const.fwhm(X / 8, Y / 8)
    assert np.ptp(fc) < 1e-12


@pytest.mark.parametrize("model", ["gaussian", "moffat"])
def test_profile_fwhm_definition(model):
    """A round PSF's oversampled stamp is at half maximum at r = FWHM/2."""
    f = make_field((64, 64), 2, fwhm=4.0, psf_variation=0.0, ellipticity=0.0, n_stars=1, psf_model=model)
    psf = true_psf(f.image)
    assert psf.fwhm(10, 10) == pytest.approx(4.0)
    ov = 15
    st = psf.at(32, 32, size=15, oversampling=ov)
    row = st[st.shape[0] // 2]
    r = (np.arange(row.size) - (row.size - 1) / 2) / ov
    half = row.max() / 2
    right = r >= 0
    r_half = np.interp(-half, -row[right], r[right])  # profile decreasing with r
    assert r_half == pytest.approx(2.0, rel=0.01)


def test_rendered_star_is_true_psf(field, field_np):
    """image - sky around stars == flux * true stamp, within the true noise (chi^2 per dof ~ 1)."""
    img, var, _ = field_np
    psf = true_psf(field.image)
    s = field.stars
    ok = _isolated(np.asarray(s["x"]), np.asarray(s["y"]), 2.5 * psf.radius) & (s["snr"] > 50)
    assert ok.sum() >= 5
    chi_true, chi_wrong = [], []
    wrong = TruePSF(dict(field.image.attrs["truth_psf"], fwhm=(np.asarray(field.image.attrs["truth_psf"]["fwhm"])
                                                               * 1.08).tolist()))
    for row in s[ok]:
        for model, acc in ((psf, chi_true), (wrong, chi_wrong)):
            st, (y0, x0) = model.stamp(row["x"], row["y"])
            sl = (slice(y0, y0 + st.shape[0]), slice(x0, x0 + st.shape[1]))
            r = (img[sl] - field.sky[sl] - row["flux"] * st) / np.sqrt(var[sl])
            acc.append(np.mean(r**2))
    dof = st.size
    assert abs(np.mean(chi_true) - 1) < 4 * np.sqrt(2 / (dof * ok.sum()))
    assert np.mean(chi_wrong) > 1.5  # an 8% wrong FWHM is clearly visible on these stars


def test_aperture_flux_matches_truth(field, field_np):
    img, var, _ = field_np
    psf = true_psf(field.image)
    R = psf.radius
    s = field.stars
    ok = _isolated(np.asarray(s["x"]), np.asarray(s["y"]), 2.5 * R + 2)
    pulls = []
    for row in s[ok]:
        ix, iy = int(np.floor(row["x"] + 0.5)), int(np.floor(row["y"] + 0.5))
        sl = (slice(iy - R, iy + R + 1), slice(ix - R, ix + R + 1))
        meas = float((img[sl] - field.sky[sl]).sum())
        pulls.append((meas - row["flux"]) / np.sqrt(var[sl].sum()))
    pulls = np.asarray(pulls)
    assert len(pulls) > 30
    assert abs(np.mean(pulls)) < 4 / np.sqrt(len(pulls))
    assert abs(np.std(pulls) - 1) < 0.25


def test_bright_star_shapes_match_truth(bright):
    """Second moments of pixelated bright stars == true (FWHM, e, theta) + the pixel's 1/12."""
    ds, s, sky = bright
    img = ds["image"].values - sky
    psf = true_psf(ds)
    R = psf.radius
    ok = _isolated(np.asarray(s["x"]), np.asarray(s["y"]), 2 * R + 2)
    assert ok.sum() >= 10
    for row in s[ok]:
        ix, iy = int(np.floor(row["x"] + 0.5)), int(np.floor(row["y"] + 0.5))
        cut = img[iy - R:iy + R + 1, ix - R:ix + R + 1].astype(np.float64)
        yy, xx = np.mgrid[iy - R:iy + R + 1, ix - R:ix + R + 1]
        tot = cut.sum()
        mx, my = (cut * xx).sum() / tot, (cut * yy).sum() / tot
        assert mx == pytest.approx(row["x"], abs=0.02) and my == pytest.approx(row["y"], abs=0.02)
        cxx = (cut * (xx - mx) ** 2).sum() / tot - 1 / 12
        cyy = (cut * (yy - my) ** 2).sum() / tot - 1 / 12
        cxy = (cut * (xx - mx) * (yy - my)).sum() / tot
        ev = np.linalg.eigvalsh([[cxx, cxy], [cxy, cyy]])
        sa, sb = np.sqrt(ev[1]), np.sqrt(ev[0])
        fwhm_meas = FWHM_PER_SIGMA * np.sqrt(sa * sb)
        assert fwhm_meas == pytest.approx(row["fwhm"], rel=0.03)
        assert fwhm_meas == pytest.approx(psf.fwhm(row["x"], row["y"]), rel=0.03)
        assert 1 - sb / sa == pytest.approx(row["ellipticity"], abs=0.03)
        theta = 0.5 * np.arctan2(2 * cxy, cxx - cyy)
        d = (theta - row["theta"] + np.pi / 2) % np.pi - np.pi / 2
        assert abs(d) < 0.05


def test_noise_matches_variance():
    f = make_field((256, 256), 9, n_stars=0, sky=150.0, sky_gradient=0.5, gain=3.0, read_noise=7.0)
    img = f.image["image"].values.astype(np.float64)
    var = f.image["variance"].values.astype(np.float64)
    np.testing.assert_allclose(var, f.sky / 3.0 + (7.0 / 3.0) ** 2, rtol=1e-6)
    z = (img - f.sky) / np.sqrt(var)
    n = z.size
    assert abs(z.mean()) < 4 / np.sqrt(n)
    assert abs(z.std() - 1) < 4 / np.sqrt(2 * n)
    # the sky has the requested gradient: half of 0.5 either way along some direction
    assert f.sky.max() / 150.0 - 1 == pytest.approx(0.25 * (abs(np.cos(0)) + 0), abs=0.26)
    assert 0.3 < (f.sky.max() - f.sky.min()) / 150.0 <= 0.5 * np.sqrt(2) + 1e-6


def test_empty_region_noise_in_star_field(field, field_np):
    img, var, _ = field_np
    s = field.stars
    yy, xx = np.mgrid[0:512:4, 0:512:4]
    d, _ = cKDTree(np.column_stack([s["x"], s["y"]])).query(np.column_stack([xx.ravel(), yy.ravel()]))
    far = d > 4 * true_psf(field.image).radius
    assert far.sum() > 500
    z = ((img - field.sky)[yy, xx].ravel()[far]) / np.sqrt(var[yy, xx].ravel()[far])
    assert abs(z.std() - 1) < 0.1 and abs(z.mean()) < 0.1


# ------------------------------------------------------------------ defects
def test_saturation_bad_columns_cosmic_rays():
    f = make_field((256, 256), 6, saturation=20000.0, bad_columns=3, cosmic_rays=15, flux_range=(1e3, 1e6))
    ds = f.image
    img, mask = ds["image"].values, ds["mask"].values
    assert ds.attrs["saturation"] == 20000.0
    assert img.max() <= 20000.0
    assert np.all(mask[img >= 20000.0])
    sat = f.stars[f.stars["saturated"]]
    assert len(sat) > 0 and not f.stars["saturated"][f.stars["peak"] < 1000].any()
    for row in sat:
        assert mask[int(np.floor(row["y"] + 0.5)), int(np.floor(row["x"] + 0.5))]
    cols = ds.attrs["truth_bad_columns"]
    assert len(cols) == 3
    assert np.all(mask[:, cols]) and np.all(img[:, cols] == 0.0)
    others = np.setdiff1d(np.arange(256), cols)
    assert mask[:, others].mean() < 0.05
    crs = ds.attrs["truth_cosmic_rays"]
    assert len(crs) >= 15
    var = ds["variance"].values
    for x, y, adu in crs:
        x, y = int(x), int(y)
        if x in cols or adu < 50 * np.sqrt(var[y, x]) or img[y, x] >= 20000.0:
            continue
        assert (img[y, x] - f.sky[y, x]) > 20 * np.sqrt(var[y, x])
        assert not mask[y, x]  # cosmic rays are not masked: finding them is the job
    nanf = make_field((64, 64), 1, bad_columns=1, bad_column_value=np.nan, n_stars=2)
    c = nanf.image.attrs["truth_bad_columns"][0]
    assert np.all(np.isnan(nanf.image["image"].values[:, c])) and np.all(nanf.image["mask"].values[:, c])


# --------------------------------------------------------------------- pairs
def test_pair_truth(pair):
    new, ref, s, tr, new_sky, ref_sky = pair
    np.testing.assert_allclose(s["x_new"] - s["x"], 0.37, atol=1e-12)
    np.testing.assert_allclose(s["y_new"] - s["y"], -0.61, atol=1e-12)
    np.testing.assert_allclose(s["flux_new"] / s["flux_ref"], 1.1, rtol=1e-12)
    assert new.attrs["truth_shift"] == [0.37, -0.61] and new.attrs["truth_flux_scale"] == 1.1
    assert np.median(s["fwhm_new"]) > 3.2 and np.median(s["fwhm_ref"]) < 2.8
    assert new.attrs["fwhm"] == pytest.approx(3.5, abs=0.3) and ref.attrs["fwhm"] == pytest.approx(2.5, abs=0.3)
    assert true_psf(new).fwhm(256, 256) != true_psf(ref).fwhm(256, 256)
    assert len(tr) == 25 and set(tr.colnames) >= {"id", "x", "y", "flux", "snr"}
    assert np.all((tr["snr"] >= 8 * 0.999) & (tr["snr"] <= 50 * 1.001))
    d, _ = cKDTree(np.column_stack([s["x_new"], s["y_new"]])).query(np.column_stack([tr["x"], tr["y"]]))
    assert d.min() >= 2 * 3.5


def test_pair_shift_measured():
    """Centroids of bright isolated stars move by the true shift between ref and new."""
    new, ref, s, _, new_sky, ref_sky = make_pair((256, 256), 8, n_stars=40, flux_range=(2e4, 2e5),
                                                 n_transients=0, shift=(0.37, -0.61), edge=20)
    a = new["image"].values - new_sky
    b = ref["image"].values - ref_sky
    R = 6
    ok = _isolated(np.asarray(s["x"]), np.asarray(s["y"]), 15)
    assert ok.sum() >= 8
    dxs, dys = [], []
    for row in s[ok]:
        ix, iy = int(round(row["x"])), int(round(row["y"]))
        yy, xx = np.mgrid[iy - R:iy + R + 1, ix - R:ix + R + 1]
        for im, acc in ((a, 0), (b, 1)):
            cut = im[iy - R:iy + R + 1, ix - R:ix + R + 1]
            cx, cy = (cut * xx).sum() / cut.sum(), (cut * yy).sum() / cut.sum()
            if acc == 0:
                nx_, ny_ = cx, cy
        dxs.append(nx_ - cx)
        dys.append(ny_ - cy)
    assert np.median(dxs) == pytest.approx(0.37, abs=0.05)
    assert np.median(dys) == pytest.approx(-0.61, abs=0.05)


def test_transients_only_in_new_with_true_snr(pair):
    new, ref, _, tr, new_sky, ref_sky = pair
    a = new["image"].values.astype(np.float64) - new_sky
    va = new["variance"].values.astype(np.float64)
    b = ref["image"].values.astype(np.float64) - ref_sky
    vb = ref["variance"].values.astype(np.float64)
    psf = true_psf(new)
    pulls_new, pulls_ref, snr_ratio = [], [], []
    for row in tr:
        st, (y0, x0) = psf.stamp(row["x"], row["y"])
        sl = (slice(y0, y0 + st.shape[0]), slice(x0, x0 + st.shape[1]))
        # optimal PSF-fit flux and its error with the true PSF and variance
        w = st / va[sl]
        fhat = (w * a[sl]).sum() / (w * st).sum()
        err = 1 / np.sqrt((st * st / va[sl]).sum())
        pulls_new.append((fhat - row["flux"]) / err)
        snr_ratio.append(row["flux"] / err / row["snr"])
        wb = st / vb[sl]
        pulls_ref.append(((wb * b[sl]).sum() / (wb * st).sum()) / (1 / np.sqrt((st * st / vb[sl]).sum())))
    pulls_new, pulls_ref = np.asarray(pulls_new), np.asarray(pulls_ref)
    assert abs(np.mean(pulls_new)) < 4 / np.sqrt(len(tr)) + 0.1 and 0.6 < np.std(pulls_new) < 1.5
    assert abs(np.mean(pulls_ref)) < 4 / np.sqrt(len(tr)) + 0.1  # nothing there in the reference
    np.testing.assert_allclose(snr_ratio, 1.0, rtol=0.02)


# ---------------------------------------------------------- round trip, errors
def test_truth_psf_survives_zarr(tmp_path, field):
    ds = field.image.isel(y=slice(0, 64), x=slice(0, 64))
    path = tmp_path / "f.zarr"
    ds.to_zarr(path, consolidated=False)
    back = xr.open_zarr(path, consolidated=False)
    a, b = true_psf(ds), true_psf(back)
    np.testing.assert_array_equal(a.at(100.5, 20.25, size=15, oversampling=2), b.at(100.5, 20.25, size=15, oversampling=2))
    assert true_psf(json.dumps(ds.attrs["truth_psf"])).fwhm(3, 4) == a.fwhm(3, 4)
    with pytest.raises(ValueError, match="truth_psf"):
        true_psf(back.drop_attrs() if hasattr(back, "drop_attrs") else xr.Dataset({"image": back["image"]}))


def test_bad_input_errors():
    with pytest.raises(TypeError, match="shape"):
        make_field(100)
    with pytest.raises(ValueError, match="shape"):
        make_field((8, 8))
    with pytest.raises(ValueError, match="flux_range"):
        make_field((64, 64), flux_range=(0, 10))
    with pytest.raises(ValueError, match="gain"):
        make_field((64, 64), gain=-1)
    with pytest.raises(ValueError, match="psf_model"):
        make_field((64, 64), psf_model="airy")
    with pytest.raises(ValueError, match="edge"):
        make_field((64, 64), edge=40)
    with pytest.raises(TypeError, match="shift"):
        make_pair((64, 64), shift=1.0)
    with pytest.raises(ValueError, match="transient_snr"):
        make_pair((64, 64), transient_snr=(10, 5))
    with pytest.raises(ValueError, match="psf_variation"):
        make_field((64, 64), fwhm=1.0, psf_variation=1.9)


def test_moffat_and_big_pair_smoke():
    """Moffat fields render; a 2k x 2k pair builds quickly enough for tests (no timing assertion)."""
    f = make_field((128, 128), 1, psf_model="moffat", beta=2.5)
    assert true_psf(f.image).model == "moffat" and f.image.attrs["truth_psf"]["radius"] > 10
    p = make_pair((2048, 2048), 1, n_transients=50, chunks=1024)
    assert p.new["image"].shape == (2048, 2048) and len(p.transients) == 50
    assert len(p.stars) == round(2048 * 2048 / 2000)
