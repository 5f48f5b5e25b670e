"""Aperture and Gaussian-PSF photometry: against truth, tile invariance, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import sep
from scipy.spatial import cKDTree

import tilepipe as tp
from tilepipe.datasets import make_field, true_psf


def _isolated(stars, r):
    d, _ = cKDTree(np.c_[stars["x"], stars["y"]]).query(np.c_[stars["x"], stars["y"]], k=2)
    return d[:, 1] > r


@pytest.fixture(scope="module")
def fields():
    out = []
    for seed in (1, 2):
        f = make_field((1024, 1024), seed=seed, n_stars=900)
        bk = tp.estimate_background(f.image)
        out.append((f, f.image.assign(background=bk["background"]).persist()))
    return out


def test_aperture_fluxes_unbiased_with_honest_errors(fields):
    """Isolated stars with S/N > 30: median flux bias < 1 %, pull std 1 +- 0.15.

    The aperture (r = 2 FWHM) is aperture-corrected with the true PSF's
    encircled energy at each star (``true_psf(ds).at(x, y)`` summed in the same
    circle); two seeded fields are pooled (about 200 stars).
    """
    ratios, pulls = [], []
    for f, ds in fields:
        s = f.stars
        r = 2.0 * f.image.attrs["fwhm"]
        ph = tp.aperture_photometry(ds, s, [r])
        psf = true_psf(f.image)
        frac = np.array([sep.sum_circle(psf.at(x, y, size=31).astype(np.float64), [15.0], [15.0], r, subpix=5)[0][0]
                         for x, y in zip(s["x"], s["y"])])
        sel = _isolated(s, 15.0) & (np.asarray(s["snr"]) > 30) & (np.asarray(ph["flags"]) == 0)
        sel &= ~np.asarray(s["saturated"])
        true_in = frac[sel] * np.asarray(s["flux"])[sel]
        ratios.append(np.asarray(ph["flux"])[sel] / frac[sel] / np.asarray(s["flux"])[sel])
        pulls.append((np.asarray(ph["flux"])[sel] - true_in) / np.asarray(ph["flux_err"])[sel])
    ratio, pull = np.concatenate(ratios), np.concatenate(pulls)
    assert ratio.size > 120
    assert abs(np.median(ratio) - 1) < 0.01
    assert abs(np.std(pull) - 1) < 0.15


def test_annulus_median_and_mean(fields):
    f, ds = fields[0]
    s = f.stars[_isolated(f.stars, 30.0) & (np.asarray(f.stars["snr"]) > 30)]
    raw = f.image  # no background variable: the annulus takes the sky
    med = tp.aperture_photometry(raw, s, [6.0], annulus=(12.0, 20.0))
    mean = tp.aperture_photometry(raw, s, [6.0], annulus=(12.0, 20.0), annulus_stat="mean")
    psf = true_psf(f.image)
    frac = np.array([sep.sum_circle(psf.at(x, y, size=31).astype(np.float64), [15.0], [15.0], 6.0, subpix=5)[0][0]
                     for x, y in zip(s["x"], s["y"])])
    for t in (med, mean):
        assert abs(np.median(t["flux"] / frac / s["flux"]) - 1) < 0.01
        np.testing.assert_allclose(np.median(t["annulus_sky"]), np.median(f.sky), rtol=0.05)
    # the median's sky error is sqrt(pi/2) larger than the mean's
    assert np.all(med["flux_err"] >= mean["flux_err"])
    assert "flux_6" in med.colnames and "flux_err_6" in med.colnames and "flux_in" in med.colnames


def test_aperture_photometry_is_tile_invariant(fields):
    f, ds = fields[0]
    cat = tp.detect_sources(ds, nsigma=5.0, background=ds["background"].data)
    whole = tp.aperture_photometry(ds, cat, [3.0, 7.5], annulus=(10.0, 15.0))
    tiled = tp.aperture_photometry(ds, cat, [3.0, 7.5], annulus=(10.0, 15.0), nx=4, ny=3)
    for col in ("flux", "flux_err", "flux_7p5", "flux_err_7p5", "annulus_sky", "flags"):
        np.testing.assert_array_equal(whole[col], tiled[col], err_msg=col)


def _gauss_field(sigma=1.6, n=10, seed=4):
    rng = np.random.default_rng(seed)
    g = np.arange(20.0, 400.0, 38.0)
    xs, ys = [a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g)]
    flux = rng.uniform(2e3, 2e4, xs.size)
    from scipy.special import erf

    ny = nx = 420
    img = np.zeros((ny, nx))
    edges = np.arange(nx + 1) - 0.5
    for x, y, fl in zip(xs, ys, flux):
        gx = 0.5 * np.diff(erf((edges - x) / (np.sqrt(2) * sigma)))
        gy = 0.5 * np.diff(erf((edges - y) / (np.sqrt(2) * sigma)))
        img += fl * gy[:, None] * gx[None, :]
    sky, gain = 100.0, 2.0
    var = (img + sky) / gain
    noisy = img + sky + rng.normal(0, 1, img.shape) * np.sqrt(var)
    ds = tp.open_image(noisy.astype(np.float32), variance=var.astype(np.float32), gain=gain)
    from astropy.table import Table

    return ds, Table({"x": xs, "y": ys, "flux": flux}), sky


def test_gaussian_psf_photometry_against_truth_and_tiles():
    ds, stars, sky = _gauss_field()
    known = tp.gaussian_psf_photometry(ds, stars, box=11, sigma=1.6, background=sky)
    ratio = known["flux"] / known["flux_in"]
    pull = (known["flux"] - known["flux_in"]) / known["flux_err"]
    assert abs(np.median(ratio) - 1) < 0.01
    assert abs(np.std(pull) - 1) < 0.2
    meas = tp.gaussian_psf_photometry(ds, stars, box=11, background=sky)
    assert abs(np.median(meas["sigma"]) / 1.6 - 1) < 0.05
    assert abs(np.median(meas["flux"] / meas["flux_in"]) - 1) < 0.03
    tiled = tp.gaussian_psf_photometry(ds, stars, box=11, background=sky, nx=3, ny=2)
    np.testing.assert_array_equal(meas["flux"], tiled["flux"])
    np.testing.assert_array_equal(meas["flux_err"], tiled["flux_err"])


def test_photometry_bad_input(fields):
    f, ds = fields[0]
    with pytest.raises(ValueError, match="radii"):
        tp.aperture_photometry(ds, f.stars, [-1.0])
    with pytest.raises(ValueError, match="r_in < r_out"):
        tp.aperture_photometry(ds, f.stars, [3.0], annulus=(10.0, 5.0))
    with pytest.raises(ValueError, match="odd"):
        tp.gaussian_psf_photometry(ds, f.stars, box=10)
    with pytest.raises(ValueError, match="x, y"):
        tp.aperture_photometry(ds, np.zeros((3, 3)), [3.0])
    # a star off the image gets NaN and the edge flag, not an exception
    from astropy.table import Table

    t = Table({"x": [-50.0, 500.0], "y": [10.0, 500.0]})
    out = tp.aperture_photometry(ds, t, [3.0])
    assert np.isnan(out["flux"][0]) and out["flags"][0] & 16 and np.isfinite(out["flux"][1])
