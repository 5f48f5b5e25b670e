"""tilepipe.calibrate: real frames (procastro) against numpy, synthetic truth, laziness, CLI."""

from __future__ import annotations

import warnings

import dask
import numpy as np
import pytest
from astropy.io import fits
from click.testing import CliRunner

import tilepipe as tp
from tilepipe.calibrate import calibrate, exposure_time, flat_normalization
from tilepipe.exceptions import FallbackWarning
from tilepipe.image import make_dataset

SAT = 65535.0

# The procastro files have zero padding after the last block; astropy warns on every open.  That is a
# property of these files (tilepipe.io reads them correctly), not of the code under test.
pytestmark = pytest.mark.filterwarnings("ignore:Unexpected extra padding at the end of the file")


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the procastro files carry extra padding after the data
        with fits.open(path) as hdul:
            return hdul[0].data.astype(np.float64), hdul[0].header["EXPTIME"]


@pytest.fixture(scope="module")
def frames(shared_data):
    d = shared_data / "wide_calib_procastro"
    paths = {k: str(d / f"{k}.fits") for k in ("bias", "dark", "flat")}
    paths["raw"] = str(d / "wasp19-005.fits")
    arrays = {k: _read(p) for k, p in paths.items()}
    return paths, arrays


def _numpy_reference(arrays, hot_sigma=None):
    """The textbook calibration, written out in numpy (float64)."""
    (R, t_r), (B, _), (D, t_d), (F, t_f) = (arrays[k] for k in ("raw", "bias", "dark", "flat"))
    s, sf = t_r / t_d, t_f / t_d
    DC = D - B
    num = R - B - s * DC
    Fc = F - B - sf * DC
    sat = (R >= SAT) | (B >= SAT) | (D >= SAT) | (F >= SAT)
    fbad = (F >= SAT) | (B >= SAT) | (D >= SAT) | (Fc <= 0) | ~np.isfinite(Fc)
    norm = np.median(Fc[~fbad])
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / (Fc / norm)
    bad = sat | fbad | ~np.isfinite(out)
    if hot_sigma is not None:
        good = ~((D >= SAT) | (B >= SAT))
        med = np.median(DC[good])
        mad = np.median(np.abs(DC[good] - med))
        bad |= (DC - med) > hot_sigma * 1.4826 * mad
    return out, bad, norm, Fc / norm, num


@pytest.fixture(scope="module")
def calibrated(frames):
    paths, _ = frames
    ds = calibrate(paths["raw"], paths["bias"], paths["dark"], paths["flat"], saturation=SAT)
    return ds, ds.compute()


def test_matches_numpy_on_real_frames(frames, calibrated):
    paths, arrays = frames
    lazy, ds = calibrated
    out, bad, norm, Fn, num = _numpy_reference(arrays)
    img, mask, var = ds["image"].values, ds["mask"].values, ds["variance"].values
    assert img.dtype == np.float32 and var.dtype == np.float32 and mask.dtype == bool
    np.testing.assert_array_equal(mask, bad)
    good = ~bad
    np.testing.assert_allclose(img[good], out[good], rtol=1e-6, atol=1e-4)
    assert np.all(np.isnan(img[bad & ~np.isfinite(out)]))
    # variance: the raw frame's variance divided by the normalised flat squared (masters noise-free)
    raw_var = tp.open_image(paths["raw"], saturation=SAT)["variance"].values.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected_var = raw_var / Fn**2
    np.testing.assert_allclose(var[good], expected_var[good], rtol=1e-5)
    # masked: the 65535 pixels (a run of row 0, in every frame), the unilluminated strip x >= 999
    # (flat <= bias there), and a few hundred dead pixels elsewhere
    assert np.all(mask[arrays["raw"][0] >= SAT]) and np.all(mask[arrays["dark"][0] >= SAT])
    assert mask[:, 999:].mean() > 0.9
    assert mask[1:, :999].mean() < 0.002
    p = ds.attrs["parameters"]["calibrate"]
    assert p["dark_scale"] == pytest.approx(25.0 / 200.0) and p["flat_norm"] == "median"
    cards = {c[0]: c[1] for c in ds.attrs["header"] if c[0] != "HISTORY"}
    assert cards["DARKSCAL"] == pytest.approx(0.125) and cards["CALFLAT"] == "flat.fits"
    assert cards["IMAGETYP"] == "Light"  # the raw header is kept
    hist = [c[1] for c in ds.attrs["header"] if c[0] == "HISTORY"]
    assert any("calibrate" in h for h in hist) and any("flat.fits" in h for h in hist)


def test_flat_norm_is_exact_median_and_max(frames):
    _, arrays = frames
    out, bad, norm, Fn, _ = _numpy_reference(arrays)
    (B, _), (D, t_d), (F, t_f) = arrays["bias"], arrays["dark"], arrays["flat"]
    Fc = F - B - t_f / t_d * (D - B)
    fbad = (F >= SAT) | (B >= SAT) | (D >= SAT) | (Fc <= 0)
    fd = dask.array.from_array(Fc, chunks=(300, 400))
    gd = dask.array.from_array(~fbad, chunks=(300, 400))
    assert float(flat_normalization(fd, gd, "median").compute()) == np.median(Fc[~fbad])
    assert float(flat_normalization(fd, gd, "max").compute()) == Fc[~fbad].max()
    # odd and even counts, ties (integer values)
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 1000, 1001):
        v = rng.integers(0, 5, size=(n, 1)).astype(float)
        a = dask.array.from_array(v, chunks=(max(1, n // 3), 1))
        assert float(flat_normalization(a, a == a).compute()) == np.median(v)
    with pytest.raises(ValueError, match="no good pixels"):
        flat_normalization(fd, gd & False).compute()


def test_flat_norm_max_option(frames):
    paths, arrays = frames
    ds = calibrate(paths["raw"], paths["bias"], paths["dark"], paths["flat"], saturation=SAT, flat_norm="max")
    out_med, bad, norm, Fn, num = _numpy_reference(arrays)
    Fc = Fn * norm
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = num / (Fc / Fc[~bad & np.isfinite(Fc) & (Fc > 0)].max())
    good = ~ds["mask"].values
    np.testing.assert_allclose(ds["image"].values[good], ref[good], rtol=1e-6, atol=1e-4)
    # the lazy norm can be returned, computed once and passed back as a number: same result
    lazy, n = calibrate(paths["raw"], paths["bias"], paths["dark"], paths["flat"], saturation=SAT, return_norm=True)
    value = float(n.compute())
    assert value == norm
    fixed = calibrate(paths["raw"], paths["bias"], paths["dark"], paths["flat"], saturation=SAT, flat_norm=value)
    np.testing.assert_array_equal(fixed["image"].values, lazy["image"].values)
    assert [c for c in fixed.attrs["header"] if c[0] == "FLATNORM"][0][1] == value


def test_flat_fielding_flattens_the_sky(frames, calibrated):
    """The raw sky follows the flat's vignetting/dust pattern; the calibrated sky does not."""
    _, arrays = frames
    _, ds = calibrated
    out, bad, norm, Fn, num = _numpy_reference(arrays)
    sl = (slice(16, 1008), slice(0, 992))  # skip row 0 and the dark strip at the right edge

    def mesh(a, m=62):
        a = np.where(bad, np.nan, a)[sl]
        ny, nx = a.shape
        return np.nanmedian(a.reshape(ny // m, m, nx // m, m), axis=(1, 3)).ravel()

    mf = mesh(Fn)
    raw_sky = mesh(num)
    cal_sky = mesh(ds["image"].values)
    slope_raw = np.polyfit(mf, raw_sky / np.median(raw_sky), 1)[0]
    slope_cal = np.polyfit(mf, cal_sky / np.median(cal_sky), 1)[0]
    assert slope_raw > 0.8  # the raw sky carries the flat's pattern
    assert abs(slope_cal) < 0.3 * slope_raw  # mostly gone after flat-fielding
    assert np.std(cal_sky) / np.median(cal_sky) < 0.85 * np.std(raw_sky) / np.median(raw_sky)
    # dividing instead of multiplying matters: the wrong operation makes it worse
    wrong = mesh(num * Fn)
    assert np.polyfit(mf, wrong / np.median(wrong), 1)[0] > slope_raw


def test_dark_outliers_masked_on_real_frames(frames):
    """The single 200 s dark's outliers (mostly cosmic rays, absent from the raw) are masked on request."""
    paths, arrays = frames
    ds = calibrate(paths["raw"], paths["bias"], paths["dark"], paths["flat"], saturation=SAT,
                   hot_pixel_sigma=5.0).compute()
    out, bad, *_ = _numpy_reference(arrays, hot_sigma=5.0)
    np.testing.assert_array_equal(ds["mask"].values, bad)
    plain, bad0, *_ = _numpy_reference(arrays)
    hot = bad & ~bad0
    assert hot.sum() > 50
    # why: the raw frame does not carry the dark's excess charge at these pixels, so scaled
    # subtraction would punch holes (cosmic rays of the single dark, not persistent hot pixels)
    (R, t_r), (B, _), (D, t_d) = arrays["raw"], arrays["bias"], arrays["dark"]
    dc = D - B
    dark_excess = t_r / t_d * (dc - np.median(dc[~bad0]))
    raw_excess = (R - B) - np.median((R - B)[~bad0])
    assert np.median(dark_excess[hot]) > 10
    assert np.median(raw_excess[hot]) < 0.2 * np.median(dark_excess[hot])
    assert np.median(plain[hot]) < np.median(plain[~bad]) - 0.5 * np.median(dark_excess[hot])


def _ds(data, exptime=None, mask=None, variance=None, imagetyp=""):
    hdr = [["IMAGETYP", imagetyp, ""]]
    if exptime is not None:
        hdr.append(["EXPTIME", float(exptime), "[s]"])
    return make_dataset(data, header=hdr, mask=mask, variance=variance, chunks=32)


@pytest.fixture(scope="module")
def synthetic():
    """Bias + dark current with real (persistent) hot pixels + a flat with a donut; known truth."""
    rng = np.random.default_rng(3)
    ny, nx = 96, 128
    bias_lvl = 300.0 + rng.normal(0, 3, (ny, nx))  # fixed pattern
    dcur = np.full((ny, nx), 0.05)  # ADU/s
    hot = np.zeros((ny, nx), bool)
    hot[rng.integers(0, ny, 40), rng.integers(0, nx, 40)] = True
    dcur[hot] = rng.uniform(2, 20, hot.sum())
    yy, xx = np.mgrid[0:ny, 0:nx]
    flat_true = 1.0 - 0.1 * ((xx - 60) ** 2 + (yy - 40) ** 2 < 15**2) + 0.002 * (xx - nx / 2)
    sky = 500.0
    t_raw, t_dark, t_flat = 30.0, 300.0, 2.0
    raw = bias_lvl + dcur * t_raw + sky * flat_true
    dark = bias_lvl + dcur * t_dark
    flat = bias_lvl + dcur * t_flat + 20000.0 * flat_true
    return dict(raw=raw, dark=dark, flat=flat, bias=bias_lvl, hot=hot, sky=sky, flat_true=flat_true,
                t=(t_raw, t_dark, t_flat))


def test_synthetic_truth_hot_pixels_and_donut(synthetic):
    s = synthetic
    t_raw, t_dark, t_flat = s["t"]
    out = calibrate(_ds(s["raw"], t_raw), _ds(s["bias"], 0.0), _ds(s["dark"], t_dark), _ds(s["flat"], t_flat))
    img = out["image"].values
    # noiseless input: the sky comes back flat, hot pixels and donut gone, to float32 precision
    expected = s["sky"] * np.median(s["flat_true"])
    np.testing.assert_allclose(img, expected, rtol=2e-5)
    assert not out["mask"].values.any()
    assert out.attrs["parameters"]["calibrate"]["dark_scale"] == pytest.approx(0.1)


def test_variance_propagation_monte_carlo(synthetic):
    """With noisy frames and calib_variance=True the predicted variance matches the scatter."""
    s = synthetic
    t_raw, t_dark, t_flat = s["t"]
    rng = np.random.default_rng(7)
    shape = (256, 256)  # 65536 independent realisations of one pixel
    base = {k: np.full(shape, float(np.median(s[k]))) for k in ("raw", "bias", "dark", "flat")}
    sig = {"raw": 9.0, "bias": 4.0, "dark": 6.0, "flat": 150.0}
    frames = {k: base[k] + rng.normal(0, sig[k], shape) for k in base}
    dss = [_ds(frames[k], t, variance=np.full(shape, sig[k] ** 2))
           for k, t in (("raw", t_raw), ("bias", 0.0), ("dark", t_dark), ("flat", t_flat))]
    o = calibrate(*dss, calib_variance=True).compute()
    pred = float(np.median(o["variance"].values))
    emp = np.var(o["image"].values.astype(np.float64))
    assert emp == pytest.approx(pred, rel=0.03)
    # the master frames' noise matters here: ignoring it under-predicts
    o0 = calibrate(*dss, calib_variance=False).compute()
    assert float(np.median(o0["variance"].values)) < 0.85 * emp


def test_mask_propagation_and_bad_flat(synthetic):
    s = synthetic
    t_raw, t_dark, t_flat = s["t"]
    bmask = np.zeros(s["raw"].shape, bool)
    bmask[5, 7] = True
    flat = s["flat"].copy()
    flat[10, 20] = 0.0  # <= 0 after bias removal
    flat[11, 21] = np.nan
    dmask = np.zeros_like(bmask)
    dmask[30, 40] = True
    out = calibrate(_ds(s["raw"], t_raw), _ds(s["bias"], 0.0, mask=bmask), _ds(s["dark"], t_dark, mask=dmask),
                    _ds(flat, t_flat)).compute()
    m = out["mask"].values
    assert m[5, 7] and m[10, 20] and m[11, 21] and m[30, 40]
    assert m.sum() == 4
    assert np.isnan(out["image"].values[10, 20]) and np.isnan(out["image"].values[11, 21])
    assert np.isfinite(out["image"].values[~m]).all()


def test_dark_scale_rules(synthetic):
    s = synthetic
    raw_no_t, dark_no_t = _ds(s["raw"]), _ds(s["dark"])
    with pytest.warns(FallbackWarning, match="dark not scaled"):
        o = calibrate(raw_no_t, _ds(s["bias"]), dark_no_t)
    assert o.attrs["parameters"]["calibrate"]["dark_scale"] == 1.0
    o = calibrate(raw_no_t, _ds(s["bias"]), dark_no_t, dark_scale=0.1)
    np.testing.assert_allclose(o["image"].values, s["sky"] * s["flat_true"], rtol=1e-5)
    # a dark that contains the bias cannot be scaled without a bias frame
    with pytest.raises(ValueError, match="bias"):
        calibrate(_ds(s["raw"], 30.0), None, _ds(s["dark"], 300.0))
    # ... but a bias-subtracted dark can
    dc = _ds(s["dark"] - s["bias"], 300.0)
    o = calibrate(_ds(s["raw"], 30.0), None, dc, dark_has_bias=False)
    np.testing.assert_allclose(o["image"].values, s["bias"] + s["sky"] * s["flat_true"], rtol=1e-5)
    # DARKTIME is preferred over EXPTIME
    d = make_dataset(s["dark"], header=[["EXPTIME", 290.0, ""], ["DARKTIME", 300.0, ""]])
    assert exposure_time(d) == 300.0
    with pytest.warns(FallbackWarning, match="flat used as given"):
        calibrate(_ds(s["raw"], 30.0), flat=_ds(s["flat"], 2.0))


@pytest.mark.parametrize("t_flat", [10.0, 10.5])
def test_flat_with_the_darks_exposure_time_loses_its_bias(t_flat):
    """A raw flat exposed as long as the dark: F - B - (t_flat/t_dark)(D - B) must still remove the bias
    (with t_flat == t_dark the bias terms' net coefficient is 0, but the bias frame is still subtracted
    once and added back with the dark current: the flat is F - D, not F - D + B)."""
    shape = (32, 32)
    bias = np.full(shape, 500.0)
    dark_rate = 1.0  # ADU / s
    illum = np.ones(shape)
    illum[:, 16:] = 2.0  # the right half twice as sensitive
    dark = bias + 10.0 * dark_rate  # 10 s, bias included
    flat = bias + t_flat * dark_rate + 1000.0 * illum
    raw = bias + 30.0 * dark_rate + 100.0 * illum  # 30 s of a flat sky of 100 ADU (x illumination)
    out = calibrate(_ds(raw, 30.0), _ds(bias, 0.0), _ds(dark, 10.0), _ds(flat, t_flat))
    img = out["image"].values
    # flat normalised to its median (1000 * 1.5 on a half-and-half chip): a flat-fielded sky of 150 everywhere
    np.testing.assert_allclose(img, 150.0, rtol=1e-6)


def test_lazy_and_chunk_invariant(frames):
    paths, _ = frames

    def fail_compute(*args, **kwargs):
        raise AssertionError("calibrate computed something while building the graph")

    with dask.config.set(scheduler=fail_compute):
        lazy = calibrate(paths["raw"], paths["bias"], paths["dark"], paths["flat"], saturation=SAT, chunks=256)
    assert lazy["image"].data.chunksize == (256, 256)
    a = lazy.compute()
    b = calibrate(paths["raw"], paths["bias"], paths["dark"], paths["flat"], saturation=SAT, chunks=(1024, 384)).compute()
    np.testing.assert_array_equal(a["image"].values, b["image"].values)
    np.testing.assert_array_equal(a["mask"].values, b["mask"].values)
    np.testing.assert_array_equal(a["variance"].values, b["variance"].values)


def test_bad_input(frames, synthetic):
    paths, _ = frames
    s = synthetic
    with pytest.raises(ValueError, match="flat has shape"):
        calibrate(paths["raw"], flat=np.ones((100, 100)))
    with pytest.raises(ValueError, match="flat_norm"):
        calibrate(paths["raw"], flat=paths["flat"], flat_norm="mean")
    with pytest.raises(ValueError, match="dark_scale"):
        calibrate(paths["raw"], dark=paths["dark"], dark_scale=-1)
    with pytest.raises(TypeError, match="raw"):
        calibrate(None)
    with pytest.raises((OSError, ValueError), match="bias"):
        calibrate(paths["raw"], bias=paths["raw"] + ".missing")
    with pytest.raises(ValueError, match="no good pixels"):
        calibrate(_ds(s["raw"]), flat=np.zeros(s["raw"].shape), flat_has_bias=False).compute()
    assert tp.calibrate is calibrate  # the public name stays the function after the module import


@pytest.mark.cluster
def test_cli_calibrate(frames, tmp_path, client):
    from tilepipe.cli import main

    full, _ = frames
    paths = {}
    for k, p in full.items():  # 256 x 256 crops of the real frames (headers kept) keep the test quick
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(p) as hdul:
                paths[k] = str(tmp_path / f"{k}.fits")
                fits.PrimaryHDU(hdul[0].data[:256, 760:].astype(np.float32), hdul[0].header).writeto(paths[k])
    runner = CliRunner()
    fits_out = tmp_path / "cal.fits"
    zarr_out = tmp_path / "cal.zarr"
    args = [paths["raw"], "--bias", paths["bias"], "--dark", paths["dark"], "--flat", paths["flat"],
            "--saturation", "65535"]
    r = runner.invoke(main, ["--no-progress", "calibrate", *args, "-o", str(fits_out)])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "x 0.125" in r.output
    r = runner.invoke(main, ["--no-progress", "calibrate", *args, "-o", str(zarr_out)])
    assert r.exit_code == 0, r.output
    ref = calibrate(paths["raw"], paths["bias"], paths["dark"], paths["flat"], saturation=SAT).compute()
    for path in (fits_out, zarr_out):
        back = tp.open_image(str(path)).compute()
        np.testing.assert_array_equal(back["mask"].values, ref["mask"].values)
        good = ~ref["mask"].values
        np.testing.assert_array_equal(back["image"].values[good], ref["image"].values[good])
    # refuses to overwrite; clear errors
    r = runner.invoke(main, ["--no-progress", "calibrate", *args, "-o", str(fits_out)])
    assert r.exit_code != 0
    r = runner.invoke(main, ["--no-progress", "calibrate", paths["raw"], "-o", str(tmp_path / "x.fits")])
    assert r.exit_code != 0 and "at least one" in r.output
    r = runner.invoke(main, ["calibrate", "--help"])
    assert r.exit_code == 0 and "--flat-norm" in r.output
