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


def test_find_peaks_zero_d_threshold():
    """A 0-d array threshold (e.g. ``5 * np.std(...)`` kept as an array) acts as the scalar."""
    f = make_field((256, 256), seed=2, psf_variation=0.0, sky_gradient=0.0, n_stars=40, flux_range=(3e3, 1e5))
    img = np.asarray(f.image["image"].values, dtype=np.float64) - np.asarray(f.sky)
    rms = np.sqrt(np.median(np.asarray(f.image["variance"].values)))
    thr = np.array(10.0 * rms)
    assert thr.ndim == 0
    got = tp.find_peaks(img, thr)
    ref = tp.find_peaks(img, float(thr))
    np.testing.assert_array_equal(np.asarray(got["x"]), np.asarray(ref["x"]))
    np.testing.assert_array_equal(np.asarray(got["y"]), np.asarray(ref["y"]))
    # every bright star of the truth (true peak > 3 x threshold) has a peak within 1 px
    bright = f.stars[np.asarray(f.stars["peak"]) > 3 * thr]
    assert len(bright) >= 5
    d, _ = cKDTree(np.c_[got["x"], got["y"]]).query(np.c_[bright["x"], bright["y"]])
    assert np.all(d < 1.0), d
    with pytest.raises(ValueError, match="threshold"):
        tp.find_peaks(img, np.ones((3, 3)))


def _star_on_flat_sky(sky=1000.0, flux=5e4, sigma=1.5, x0=64.3, y0=63.8, n=128):
    yy, xx = np.mgrid[0:n, 0:n]
    star = flux / (2 * np.pi * sigma ** 2) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma ** 2))
    return star, (star + sky).astype(np.float32)


def test_aperture_annulus_sky_uses_the_summed_area():
    """Annulus sky x the area sep actually sums (subpix weights), so a flat sky cancels exactly.

    Noise-free star on a flat sky of 1000: the flux must equal the aperture sum
    of the star alone (same sep weights), for every radius, with the default
    ``subpix=5`` whose weights do not add up to ``pi r^2``.
    """
    from astropy.table import Table
    from tilepipe.image import make_dataset

    star, img = _star_on_flat_sky()
    ds = make_dataset(img, variance=np.ones_like(img))
    cat = Table({"x": [64.3], "y": [63.8]})
    radii = [3.0, 7.5, 10.0]
    out = tp.aperture_photometry(ds, cat, radii, annulus=(15.0, 25.0))
    assert out["annulus_sky"][0] == 1000.0 and out["flags"][0] == 0
    for r in radii:
        true_sum = sep.sum_circle(star, [64.3], [63.8], r, subpix=5)[0][0]
        assert abs(out[f"flux_{tp.photometry._fmt(r)}"][0] - true_sum) < 0.05, (r, true_sum)


def _sep_weights(x, y, r, subpix, shape):
    """sep.sum_circle's weight of every pixel, one delta image at a time (independent of tilepipe's code)."""
    w = np.zeros(shape)
    half = int(np.ceil(r)) + 1
    px, py = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    for iy in range(max(py - half, 0), min(py + half + 1, shape[0])):
        for ix in range(max(px - half, 0), min(px + half + 1, shape[1])):
            delta = np.zeros(shape, np.float32)
            delta[iy, ix] = 1.0
            w[iy, ix] = sep.sum_circle(delta, [x], [y], r, subpix=subpix)[0][0]
    return w


def test_aperture_masked_pixels_are_filled_by_the_aperture_mean():
    """sep scales the unmasked sum by (summed area / unmasked area), FLAG_MASKED set; flux_err is its noise.

    The flux is ``S = (A / A_good) sum_good w f``, so for independent pixels
    ``flux_err^2 = (A / A_good)^2 sum_good w^2 var + A^2 var(sky)``, with sep's
    own pixel weights ``w`` (one delta image per pixel).
    """
    from astropy.table import Table
    from tilepipe.image import make_dataset

    star, img = _star_on_flat_sky()
    mask = np.zeros(img.shape, bool)
    mask[50:80, 72] = True  # a bad column 8 px from the star: no star light in it
    ds = make_dataset(img, mask=mask, variance=np.ones_like(img))
    cat = Table({"x": [64.3], "y": [63.8]})
    out = tp.aperture_photometry(ds, cat, 10.0, annulus=(15.0, 25.0))
    assert out["flags"][0] & tp.photometry.FLAG_MASKED
    ones = np.ones(img.shape)
    area = sep.sum_circle(ones, [64.3], [63.8], 10.0, subpix=5)[0][0]
    unmasked = sep.sum_circle(np.where(mask, 0.0, 1.0), [64.3], [63.8], 10.0, subpix=5)[0][0]
    star_unmasked = sep.sum_circle(np.where(mask, 0.0, star), [64.3], [63.8], 10.0, subpix=5)[0][0]
    assert area / unmasked > 1.03  # the column covers ~4 % of the aperture
    np.testing.assert_allclose(out["flux"][0], star_unmasked * area / unmasked, rtol=1e-5)
    w = _sep_weights(64.3, 63.8, 10.0, 5, img.shape)
    np.testing.assert_allclose(w.sum(), area, rtol=1e-12)
    var_sum = (area / unmasked) ** 2 * (w[~mask] ** 2).sum()  # variance 1 per pixel
    n = out["annulus_npix"][0]
    sky_var = np.pi / 2 * n / n ** 2
    np.testing.assert_allclose(out["flux_err"][0] ** 2, var_sum + area ** 2 * sky_var, rtol=1e-6)


@pytest.mark.parametrize("subpix", [0, 1, 5])
@pytest.mark.parametrize("r", [0.5, 2.3, 6.0])
def test_aperture_weights_are_seps(subpix, r):
    """The pixel weights behind flux_err (sum w^2 var) are sep.sum_circle's, at the image edge too."""
    from tilepipe.photometry import _aperture_weights

    shape = (20, 24)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    for x, y in [(10.0, 9.0), (11.37, 8.61), (0.2, 19.4), (23.5, 3.25)]:
        ref = _sep_weights(x, y, r, subpix, shape)
        got = _aperture_weights(xx - x, yy - y, r, subpix)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12, err_msg=f"{(x, y)}")


def test_aperture_flux_err_without_mask_is_sum_w2_var():
    """Unmasked aperture, no annulus: flux_err^2 = sum w^2 var exactly (not sep's sum w var)."""
    from astropy.table import Table
    from tilepipe.image import make_dataset

    _, img = _star_on_flat_sky()
    var = np.random.default_rng(5).uniform(1.0, 3.0, img.shape).astype(np.float32)
    ds = make_dataset(img, variance=var)
    out = tp.aperture_photometry(ds, Table({"x": [64.3], "y": [63.8]}), 3.0, background=1000.0)
    assert out["flags"][0] == 0
    w = _sep_weights(64.3, 63.8, 3.0, 5, img.shape)
    np.testing.assert_allclose(out["flux_err"][0] ** 2, (w * w * var).sum(), rtol=1e-6)


def _masked_star_grid(seed, flux=2e4, sigma=1.5, sky_var=100.0, gain=2.0, step=40, n=8, frac=(0.3, -0.2)):
    """``n x n`` identical Gaussian stars (same sub-pixel offset) on a sky-subtracted image, one noise draw.

    Returns the noisy image, its true variance map, the bad-pixel mask (the same pattern at every
    star: two bad columns 2 and 3 px right of the centre pixel and a 4 x 4 block on the lower left) and the
    star positions.
    """
    size = step * n + step // 2
    yy, xx = np.mgrid[0:size, 0:size]
    centres = step * np.arange(1, n + 1) - step // 2
    xs, ys = np.meshgrid(centres + frac[0], centres + frac[1])
    xs, ys = xs.ravel(), ys.ravel()
    model = np.zeros((size, size))
    mask = np.zeros((size, size), bool)
    for x0, y0 in zip(xs, ys):
        model += flux / (2 * np.pi * sigma ** 2) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma ** 2))
        px, py = int(np.floor(x0 + 0.5)), int(np.floor(y0 + 0.5))
        mask[py - 7:py + 8, px + 2:px + 4] = True
        mask[py - 5:py - 1, px - 5:px - 1] = True
    var = sky_var + model / gain
    rng = np.random.default_rng(seed)
    img = model + rng.normal(0.0, 1.0, model.shape) * np.sqrt(var)
    return img.astype(np.float32), var.astype(np.float32), mask, xs, ys


@pytest.mark.parametrize("annulus", [None, (10.0, 16.0)])
@pytest.mark.parametrize("subpix", [5, 0])
def test_aperture_flux_err_with_masked_pixels_monte_carlo(annulus, subpix):
    """flux_err is the noise of the reported flux, also when masked pixels are filled (Monte Carlo).

    30 noise realisations x 64 identical stars whose r = 6 apertures hold the same masked pixels
    (``A / A_good = 1.44``): the standard deviation of the measured fluxes must equal the mean
    reported ``flux_err`` to 5 % (the statistical error of a standard deviation from 1920 draws is
    1.6 %).  Before the fix the error was the scaled variance sum ``(A / A_good) sum w var``
    instead of ``(A / A_good)^2 sum w^2 var``: 15 % too small here.
    """
    from astropy.table import Table
    from tilepipe.image import make_dataset

    fluxes, errs = [], []
    for seed in range(30):
        img, var, mask, xs, ys = _masked_star_grid(seed)
        ds = make_dataset(img, mask=mask, variance=var)
        out = tp.aperture_photometry(ds, Table({"x": xs, "y": ys}), 6.0, annulus=annulus, annulus_stat="mean",
                                     background=0.0, subpix=subpix)
        assert np.all(out["flags"] & tp.photometry.FLAG_MASKED)
        fluxes.append(np.asarray(out["flux"]))
        errs.append(np.asarray(out["flux_err"]))
    fluxes, errs = np.concatenate(fluxes), np.concatenate(errs)
    if annulus is None:  # every star has the same pixels, weights and variances: one error for all
        assert np.ptp(errs) / np.mean(errs) < 1e-3
    ratio = np.std(fluxes, ddof=1) / np.mean(errs)
    assert abs(ratio - 1) < 0.05, ratio


def test_default_background_fits_small_images_and_many_tiles():
    """Without a background, the photometry functions estimate the mesh background like detect_sources: a tiling
    the mesh allows and, on an image smaller than one mesh, a smaller mesh with a warning (both used to raise)."""
    from tilepipe.exceptions import FallbackWarning

    f = make_field((512, 512), seed=4)
    cat = f.stars[np.asarray(f.stars["snr"]) > 30]
    one = tp.aperture_photometry(f.image, cat, 4.0)
    many = tp.aperture_photometry(f.image, cat, 4.0, nx=10)  # 8 meshes across
    np.testing.assert_allclose(many["flux"], one["flux"], rtol=1e-4)
    np.testing.assert_allclose(tp.gaussian_psf_photometry(f.image, cat, nx=10)["flux"],
                               tp.gaussian_psf_photometry(f.image, cat)["flux"], rtol=1e-4)
    small = make_field((48, 48), seed=1, n_stars=2)
    with pytest.warns(FallbackWarning, match="smaller than one 64-px background mesh"):
        out = tp.aperture_photometry(small.image, small.stars, 4.0)
    bright = np.asarray(small.stars["snr"]) > 30
    np.testing.assert_allclose(np.asarray(out["flux"])[bright], np.asarray(small.stars["flux"])[bright], rtol=0.1)
