"""Mosaics: synthetic exposures with known WCS and sky offsets, seams, real DECam stacks, S3, CLI."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

import tilepipe as tp
from tilepipe.image import make_dataset, wcs
from tilepipe.mosaic import mosaic, solve_offsets
from tilepipe.tiling import TileGrid

NOISE = 5.0
C0 = np.array([150.0, 2.0])
TRUTH_SHAPE = (300, 360)


def _tan(crpix, rot_deg=0.0, scale=1.0, shape=None):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(C0)
    w.wcs.crpix = list(crpix)
    s, t = scale / 3600.0, np.deg2rad(rot_deg)
    w.wcs.cd = np.array([[-s * np.cos(t), s * np.sin(t)], [s * np.sin(t), s * np.cos(t)]])
    if shape is not None:
        w.array_shape = shape
    return w


def _sky(lon, lat):
    return 100.0 + 3000.0 * (lon - C0[0]) + 1500.0 * (lat - C0[1])


def _render(w, shape, ra, dec, flux, fwhm, noise, seed, offset):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lon, lat = w.pixel_to_world_values(xx, yy)
    img = _sky(lon, lat) + offset
    px, py = w.world_to_pixel_values(ra, dec)
    s = fwhm / 2.3548
    for x, y, f in zip(px, py, flux):
        img += f * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / s**2) / (2 * np.pi * s * s)
    return img + (rng.normal(0, noise, shape) if noise else 0)


@pytest.fixture(scope="module")
def exposures():
    rng = np.random.default_rng(11)
    wt = _tan([180.5, 150.5], shape=TRUTH_SHAPE)
    n = 40
    ra, dec = wt.pixel_to_world_values(rng.uniform(5, 355, n), rng.uniform(5, 295, n))
    flux = 10 ** rng.uniform(3, 4.3, n)
    truth = _render(wt, TRUTH_SHAPE, ra, dec, flux, 4.0, 0, 0, 0.0)
    offsets = [0.0, 40.0, -25.0, 15.0]
    specs = [([180.5 + 80, 150.5 + 60], 0.0), ([180.5 - 70, 150.5 + 65], 0.0), ([180.5 + 75, 150.5 - 55], 0.0),
             ([180.5 - 60, 150.5 - 50], 8.0)]
    exps, wins = [], []
    for k, (crpix, rot) in enumerate(specs):
        w = _tan(crpix, rot)
        img = _render(w, (200, 230), ra, dec, flux, 4.0, NOISE, k + 1, offsets[k])
        hdr = w.to_header()
        exps.append(make_dataset(img.astype(np.float32), header=hdr, fwhm=4.0))
        wins.append(w)
    return {"truth": truth, "wcs": wt, "exps": exps, "offsets": offsets, "wins": wins}


def test_matches_truth_within_noise_and_no_seams(exposures):
    e = exposures
    m = mosaic(e["exps"], wcs_out=e["wcs"], tile_size=100, reference=0)
    assert m["image"].data.numblocks == (3, 4)
    np.testing.assert_allclose(m.attrs["background_offsets"], e["offsets"], atol=1.0)
    m = m.compute()
    cov = m["coverage"].values
    assert set(np.unique(cov)) >= {0, 1, 2}
    assert (m["mask"].values == (cov == 0)).all()
    res = (m["image"].values - e["truth"])
    ok = cov > 0
    # sky-limited pixels: residual mean ~ 0 and std at most the input noise
    yy, xx = np.mgrid[: TRUTH_SHAPE[0], : TRUTH_SHAPE[1]]
    faint = ok & (np.abs(e["truth"] - _sky(*e["wcs"].pixel_to_world_values(xx, yy))) < 1.0)
    r = res[faint]
    assert abs(np.mean(r)) < 3 * NOISE / np.sqrt(r.size) + 0.05
    assert 0.5 * NOISE < r.std() < 1.05 * NOISE
    # the mean is the inverse-variance mean: where 2 exposures overlap the noise drops by ~sqrt(2)
    one, two = faint & (cov == 1), faint & (cov == 2)
    assert res[two].std() < 0.85 * res[one].std()
    # no seams at tile borders
    g = TileGrid(TRUTH_SHAPE, nx=4, ny=3, align=100)
    near = (g.border_distance() < 2) & faint
    far = (g.border_distance() > 10) & faint
    assert abs(res[near].mean() - res[far].mean()) < 4 * NOISE / np.sqrt(near.sum())
    # no seams at exposure borders: pixels next to a coverage change vs the rest
    from scipy import ndimage

    edge = (ndimage.maximum_filter(cov, 3) != ndimage.minimum_filter(cov, 3)) & faint
    inner = faint & ~ndimage.binary_dilation(edge, iterations=5)
    assert abs(res[edge].mean() - res[inner].mean()) < 4 * NOISE / np.sqrt(edge.sum()) + 0.1
    # tiled == one tile
    whole = mosaic(e["exps"], wcs_out=e["wcs"], tile_size=512, reference=0).compute()
    np.testing.assert_allclose(m["image"].values, whole["image"].values, rtol=1e-5, atol=1e-3 * NOISE)
    np.testing.assert_array_equal(m["coverage"].values, whole["coverage"].values)


def test_median_proper_and_optimal_grid(exposures):
    e = exposures
    for comb in ("median", "proper"):
        m = mosaic(e["exps"], wcs_out=e["wcs"], tile_size=160, reference=0, combine=comb).compute()
        ok = m["coverage"].values > 0
        res = (m["image"].values - e["truth"])[ok]
        assert abs(np.median(res)) < 0.5 and np.percentile(np.abs(res), 50) < 1.2 * NOISE
    auto = mosaic(e["exps"], tile_size=256)
    wo = wcs(auto)
    # the optimal grid covers every input corner
    for ds, w in zip(e["exps"], e["wins"]):
        h, wd = ds["image"].shape
        x, y = wo.world_to_pixel_values(*w.pixel_to_world_values([0, wd - 1, 0, wd - 1], [0, 0, h - 1, h - 1]))
        assert (x > -1).all() and (y > -1).all() and (x < auto["image"].shape[1]).all() and (y < auto["image"].shape[0]).all()
    # default gauge: offsets sum to zero, differences recovered
    b = np.array(auto.attrs["background_offsets"])
    assert abs(b.sum()) < 1e-6
    np.testing.assert_allclose(b - b[0], e["offsets"], atol=1.0)


def test_resampling_matches_reproject_interp(exposures):
    """The node-interpolated pixel mapping reproduces reproject_interp on a grid with another tangent point."""
    from reproject import reproject_interp

    e = exposures
    w_in = e["wins"][3]  # the rotated exposure, with a block of masked (NaN) pixels
    img = e["exps"][3]["image"].values.copy()
    img[80:95, 100:130] = np.nan
    ds = make_dataset(img, header=w_in.to_header(), fwhm=4.0)
    # output TAN grid with its tangent point 0.4 deg away: a non-affine pixel-to-pixel mapping
    w = _tan([0.0, 0.0], scale=0.9)
    w.wcs.crval = [C0[0] + 0.3, C0[1] + 0.25]
    w.wcs.set()
    px, py = w.world_to_pixel_values(*C0)
    w.wcs.crpix = [180.5 - float(px), 150.5 - float(py)]
    w.wcs.set()
    ref = reproject_interp((img.astype(np.float64), w_in), w, shape_out=TRUTH_SHAPE, return_footprint=False)
    fast = mosaic([ds], wcs_out=w, shape_out=TRUTH_SHAPE, tile_size=128, match_background=False).compute()
    exact = mosaic([ds], wcs_out=w, shape_out=TRUTH_SHAPE, tile_size=200, coord_step=1,
                   match_background=False).compute()
    ok = np.isfinite(ref)
    assert 0.3 < ok.mean() < 0.9
    full = reproject_interp((np.nan_to_num(img, nan=0.0), w_in), w, shape_out=TRUTH_SHAPE, return_footprint=False)
    assert (np.isfinite(full) & ~ok).sum() > 400  # the masked block leaves a hole
    for m in (fast, exact):
        cov = m["coverage"].values > 0
        # same footprint (pixels on the footprint's edge may flip on a 1e-5 px difference)
        assert (cov != ok).sum() <= 2
        both = cov & ok
        np.testing.assert_allclose(m["image"].values[both], ref[both], rtol=0, atol=2e-3)
    np.testing.assert_allclose(fast["image"].values, exact["image"].values, rtol=0, atol=2e-3)


def test_solve_offsets_and_bad_input(exposures):
    b = solve_offsets([(0, 1, -2.0, 100), (1, 2, -3.0, 100), (0, 2, -5.0, 50), (3, 4, 1.0, 10)], 5, reference=0)
    np.testing.assert_allclose(b[:3], [0.0, 2.0, 5.0], atol=1e-6)
    assert abs(b[3] + b[4]) < 1e-6 and abs(b[3] - b[4] - 1.0) < 1e-6
    nowcs = make_dataset(np.zeros((50, 50), np.float32))
    with pytest.raises(ValueError, match=r"input #1 .* has no celestial WCS"):
        mosaic([exposures["exps"][0], nowcs])
    with pytest.raises(ValueError, match="empty"):
        mosaic([])
    with pytest.raises(ValueError, match="shape_out"):
        mosaic(exposures["exps"], wcs_out=_tan([10, 10]))
    with pytest.raises(ValueError, match="combine"):
        mosaic(exposures["exps"], combine="sum")


def test_real_decam_stacks_to_zarr(shared_data, tmp_path):
    d = shared_data / "pair_decam_sfft"
    paths = [str(d / "Stack-DEC-OBS04.fits"), str(d / "Stack-DEC-OBS18.fits")]
    out = tmp_path / "decam.zarr"
    m = mosaic(paths, output=str(out), tile_size=128, chunks=128)
    assert m["image"].shape[0] >= 256 and m["image"].shape[1] >= 256
    cov = m["coverage"].values
    assert (cov == 2).mean() > 0.8
    # the offset between the stacks equals the difference of their sky levels
    from tilepipe.cutout import _clipped_stats

    skies = [_clipped_stats(tp.open_image(p)["image"].values)[0] for p in paths]
    b = m.attrs["background_offsets"]
    sig = min(m.attrs["sigmas"])
    assert abs((b[0] - b[1]) - (skies[0] - skies[1])) < 0.3 * sig
    # astrometry preserved: the nucleus of the central galaxy has the same sky position in input and mosaic
    def centroid(img, x, y, r=4):
        ix, iy = int(round(float(x))), int(round(float(y)))
        st = np.clip(img[iy - r : iy + r + 1, ix - r : ix + r + 1] - np.median(img), 0, None)
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        return ix + (st * xx).sum() / st.sum(), iy + (st * yy).sum() / st.sum()

    src = tp.open_image(paths[1])
    w_in = wcs(src)
    sx, sy = centroid(src["image"].values, 129.0, 128.0)
    x, y = wcs(m).world_to_pixel_values(*w_in.pixel_to_world_values(sx, sy))
    img = m["image"].values
    mx, my = centroid(img, x, y)
    assert np.hypot(mx - x, my - y) < 0.3
    # the mosaic noise is below the single stack's
    assert _clipped_stats(img[cov == 2])[1] < _clipped_stats(tp.open_image(paths[1])["image"].values)[1]


@pytest.fixture
def bucket(s3_bucket):
    """The shared fresh-bucket fixture of conftest.py: ``(name, storage_options)``."""
    return s3_bucket


def test_s3_inputs_and_output(exposures, bucket):
    from tilepipe.io import write_fits, write_zarr

    name, opts = bucket
    urls = []
    for k, ds in enumerate(exposures["exps"][:2]):
        u = f"s3://{name}/exp{k}." + ("fits" if k == 0 else "zarr")
        (write_fits if k == 0 else write_zarr)(ds, u, storage_options=opts)
        urls.append(u)
    out = f"s3://{name}/mosaic.zarr"
    m = mosaic(urls, wcs_out=exposures["wcs"], tile_size=150, reference=0, output=out, storage_options=opts)
    local = mosaic(exposures["exps"][:2], wcs_out=exposures["wcs"], tile_size=150, reference=0).compute()
    np.testing.assert_allclose(m["image"].values, local["image"].values, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(m["coverage"].values, local["coverage"].values)
    again = tp.open_image(out, storage_options=opts)
    assert "coverage" in again and again["image"].shape == TRUTH_SHAPE


@pytest.mark.cluster
def test_cli_mosaic(exposures, tmp_path, client):
    from click.testing import CliRunner

    from tilepipe.cli import main
    from tilepipe.io import write_fits

    paths = []
    for k, ds in enumerate(exposures["exps"][:2]):
        p = tmp_path / f"e{k}.fits"
        write_fits(ds, str(p))
        paths.append(str(p))
    out = tmp_path / "m.zarr"
    res = CliRunner().invoke(main, ["--no-progress", "--scheduler", client.scheduler.address, "mosaic", *paths,
                                    "-o", str(out), "--tile-size", "256", "--reference", "0"])
    assert res.exit_code == 0, res.output
    assert "mosaic of 2 inputs" in res.output
    m = tp.open_image(str(out))
    np.testing.assert_allclose(m.attrs["background_offsets"], exposures["offsets"][:2], atol=1.0)
    nowcs = tmp_path / "nowcs.fits"
    write_fits(make_dataset(np.zeros((40, 40), np.float32)), str(nowcs))
    bad = CliRunner().invoke(main, ["--no-progress", "--scheduler", client.scheduler.address, "mosaic", paths[0],
                                    str(nowcs), "-o", str(tmp_path / "x.zarr")])
    assert bad.exit_code != 0 and "no celestial WCS" in bad.output


def test_noise_levels_ignore_sky_gradient_and_stars(exposures):
    """The inputs carry a ~300 ADU sky gradient and stars on 5 ADU of noise: ``sigmas`` must be the noise."""
    e = exposures
    m = mosaic(e["exps"], wcs_out=e["wcs"], tile_size=512, reference=0)
    np.testing.assert_allclose(m.attrs["sigmas"], NOISE, rtol=0.03)
    m = m.compute()
    # one exposure, far from its edges: the reported variance is that input's noise variance
    from scipy import ndimage

    cov = m["coverage"].values
    one = ndimage.binary_erosion(cov == 1, iterations=3)
    np.testing.assert_allclose(np.median(m["variance"].values[one]), NOISE**2, rtol=0.06)
    two = ndimage.binary_erosion(cov == 2, iterations=3)
    np.testing.assert_allclose(np.median(m["variance"].values[two]), NOISE**2 / 2, rtol=0.06)
    # fluxes scale the inputs and their noise
    m2 = mosaic(e["exps"], wcs_out=e["wcs"], tile_size=512, reference=0, fluxes=[2.0, 1.0, 1.0, 1.0])
    assert abs(m2.attrs["sigmas"][0] - NOISE / 2) < 0.03 * NOISE


def test_proper_variance_tile_invariant_and_exact(exposures):
    """combine="proper": the variance is the same whatever tile_size (tile invariance) and is right.

    Outside an input's footprint its pixels are filled from the other inputs
    (tilepipe.coadd); the filled pixels are copies of their noise, so where a
    single input covers the sky the coadd variance is that input's σ², and
    where two do it is σ²/2 (equal PSFs: the ZO17 filter is then all-pass).
    """
    from scipy import ndimage

    e = exposures
    a = mosaic(e["exps"], wcs_out=e["wcs"], tile_size=64, reference=0, combine="proper").compute()
    b = mosaic(e["exps"], wcs_out=e["wcs"], tile_size=512, reference=0, combine="proper").compute()
    np.testing.assert_allclose(a["image"].values, b["image"].values, rtol=0, atol=1e-4 * NOISE)
    np.testing.assert_allclose(a["variance"].values, b["variance"].values, rtol=1e-4, atol=1e-6 * NOISE**2)
    cov = b["coverage"].values
    sig2 = np.asarray(b.attrs["sigmas"]) ** 2
    one = ndimage.binary_erosion(cov == 1, iterations=20)
    two = ndimage.binary_erosion(cov == 2, iterations=20)
    assert one.sum() > 1000 and two.sum() > 500
    np.testing.assert_allclose(b["variance"].values[one], sig2.mean(), rtol=0.02)
    np.testing.assert_allclose(b["variance"].values[two], sig2.mean() / 2, rtol=0.02)


def test_input_in_galactic_coordinates_lands_at_its_sky_position():
    """An input whose WCS is galactic (or has latitude first) is mapped onto an ICRS output through the sky,
    not by passing its raw world values (l, b read as RA, Dec) to the output WCS."""
    from astropy.coordinates import SkyCoord

    c = SkyCoord(C0[0], C0[1], unit="deg").galactic
    wg = WCS(naxis=2)
    wg.wcs.ctype = ["GLON-TAN", "GLAT-TAN"]
    wg.wcs.crval = [c.l.deg, c.b.deg]
    wg.wcs.crpix = [60.5, 50.5]
    wg.wcs.cd = np.array([[-1 / 3600, 0.0], [0.0, 1 / 3600]])
    star = SkyCoord(C0[0] + 8 / 3600, C0[1] - 5 / 3600, unit="deg")  # ICRS
    gx, gy = wg.world_to_pixel(star)
    yy, xx = np.mgrid[:100, :120]
    img = 100.0 + 5000.0 * np.exp(-0.5 * ((xx - gx) ** 2 + (yy - gy) ** 2) / 1.7**2)
    ds = make_dataset(img.astype(np.float32), header=wg.to_header(), fwhm=4.0)
    w_out = _tan([100.5, 90.5], shape=(180, 200))
    res = mosaic([ds], wcs_out=w_out, combine="mean")
    out = np.nan_to_num(res["image"].values)
    py, px = np.unravel_index(np.argmax(out), out.shape)
    ox, oy = w_out.world_to_pixel(star)
    assert abs(px - ox) <= 1 and abs(py - oy) <= 1


def test_proper_without_a_psf_says_how_to_give_one(exposures):
    """combine='proper' on inputs without a FWHM names every way to give one (the CLI has no psfs= option)."""
    exps = [make_dataset(e["image"].values, header=e.attrs["header"]) for e in exposures["exps"][:2]]
    with pytest.raises(ValueError, match="SEEING_PIX or PSF_FWHM header card.*fwhm=.*'mean'"):
        mosaic(exps, combine="proper")
