"""Tests of tilepipe.background: SExtractor mesh background and polynomial sky.

Checked against SExtractor's own maps (real image), sep on the same pixels,
the known sky of synthetic fields, and tiled == whole image.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

import tilepipe as tp
from tilepipe.background import estimate_background, mesh_statistics, subtract_background
from tilepipe.datasets import make_field
from tilepipe.exceptions import FallbackWarning, OverlapWarning
from tilepipe.tiling import TileGrid

sep = pytest.importorskip("sep")


def _getdata(path):
    # the ESO NTT header has non-standard "ESO-LOG" cards: astropy warns about them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        warnings.simplefilter("ignore", AstropyUserWarning)
        return np.asarray(fits.getdata(path), dtype=np.float32)


@pytest.fixture(scope="module")
def field():
    """512 x 512 synthetic field: planar sky gradient 200 ADU +-10 %, gain 2, read noise 5 e-."""
    return make_field((512, 512), seed=3)


@pytest.fixture(scope="module")
def awkward():
    """300 x 457 image (partial last meshes for mesh=32 on both axes) with stars, a NaN patch and a mask."""
    rng = np.random.default_rng(11)
    h, w = 300, 457
    yy, xx = np.mgrid[:h, :w]
    img = rng.normal(100.0, 5.0, (h, w)) + 0.02 * xx + 0.01 * yy + 3e-5 * (xx - 200.0) ** 2
    for _ in range(40):
        y, x = rng.integers(0, h), rng.integers(0, w)
        img[max(0, y - 3):y + 4, max(0, x - 3):x + 4] += rng.uniform(50, 2000)
    img = img.astype(np.float32)
    img[40:70, 100:190] = np.nan
    mask = np.zeros((h, w), dtype=bool)
    mask[200:260, 300:330] = True
    return img, mask


# ----------------------------------------------------------------- references
def test_matches_sextractor_maps_on_real_image(shared_data):
    """SExtractor's own BACKGROUND/BACKGROUND_RMS maps (BACK_SIZE 64, BACK_FILTERSIZE 3, as in sep's test)."""
    d = shared_data / "sep_regression"
    img = _getdata(d / "image.fits")
    back_ref = _getdata(d / "back.fits")
    rms_ref = _getdata(d / "rms.fits")
    bkg = estimate_background(img, mesh=64, filter_size=3)
    back, rms = bkg["background"].values, bkg["rms"].values
    grms = float(np.median(rms_ref))
    # stated tolerance: background within 0.05 x rms everywhere, rms within 1 %
    assert np.max(np.abs(back - back_ref)) < 0.05 * grms
    assert np.max(np.abs(rms / rms_ref - 1)) < 0.01
    assert bkg.attrs["global_rms"] == pytest.approx(grms, rel=0.01)
    # the same with 2 x 2 tiles
    tiled = estimate_background(img, mesh=64, filter_size=3, nx=2, ny=2)
    np.testing.assert_allclose(tiled["background"].values, back, rtol=1e-5)


def test_tile_evaluation_is_the_natural_bicubic_spline():
    """Each tile's map equals scipy's natural cubic spline through the mesh nodes, applied along y then x."""
    from scipy.interpolate import CubicSpline

    from tilepipe.background import _eval_mesh_tile, _spline_matrix
    from tilepipe.tiling import TileGrid

    rng = np.random.default_rng(4)
    mesh, shape = (16, 20), (150, 141)  # partial meshes at the top and right edges: extrapolated end segments
    nodes = rng.normal(100.0, 3.0, (-(-shape[0] // mesh[0]), -(-shape[1] // mesh[1])))
    cy = (np.arange(nodes.shape[0]) + 0.5) * mesh[0] - 0.5  # node centres (pixels)
    cx = (np.arange(nodes.shape[1]) + 0.5) * mesh[1] - 0.5
    along_y = CubicSpline(cy, nodes, axis=0, bc_type="natural")(np.arange(shape[0]))
    truth = CubicSpline(cx, along_y, axis=1, bc_type="natural")(np.arange(shape[1]))
    grid = TileGrid(shape, nx=3, ny=2, overlap=0, align=mesh)
    Ky, Kx = _spline_matrix(nodes.shape[0]), _spline_matrix(nodes.shape[1])
    for t in grid.tiles:
        got = _eval_mesh_tile(None, tile=t, nodes=nodes, mesh=mesh, Ky=Ky, Kx=Kx)
        np.testing.assert_allclose(got, truth[t.core], rtol=1e-6)


def test_map_regions_evaluate_strided_samples():
    """A region's slices may have a step (strided samples, as the default variance's sky sample reads the
    file): the mesh and polynomial maps then give the full map's samples, not a wrong-shaped block."""
    from tilepipe.background import _eval_mesh_region, _eval_poly_region, _spline_matrix

    rng = np.random.default_rng(5)
    nodes = rng.normal(100.0, 3.0, (6, 7))
    kw = dict(nodes=nodes, mesh=(16, 20), Ky=_spline_matrix(6), Kx=_spline_matrix(7))
    full = _eval_mesh_region(slice(0, 96), slice(0, 140), **kw)
    got = _eval_mesh_region(slice(3, 96, 7), slice(0, 140, 5), **kw)
    assert got.shape == full[3::7, ::5].shape
    np.testing.assert_allclose(got, full[3::7, ::5], rtol=1e-6)
    coef = rng.normal(0.0, 1.0, (3, 3))
    full = _eval_poly_region(slice(0, 96), slice(0, 140), coef=coef, shape=(96, 140))
    got = _eval_poly_region(slice(0, 96, 32), slice(1, 140, 9), coef=coef, shape=(96, 140))
    np.testing.assert_allclose(got, full[::32, 1::9], rtol=1e-6)


def test_matches_sep_background(field):
    """sep.Background on the same pixels and mask: background within 0.05 x rms (median 0.01), rms within 2 %."""
    ds = field.image
    img = np.ascontiguousarray(ds["image"].values, dtype=np.float32)
    mask = ds["mask"].values
    s = sep.Background(img, mask=mask, bw=64, bh=64, fw=3, fh=3)
    bkg = estimate_background(ds, mesh=64, filter_size=3, nx=2, ny=3)
    diff = np.abs(bkg["background"].values - s.back())
    assert diff.max() < 0.05 * s.globalrms
    assert np.median(diff) < 0.01 * s.globalrms
    assert np.max(np.abs(bkg["rms"].values / s.rms() - 1)) < 0.02
    assert bkg.attrs["global_background"] == pytest.approx(s.globalback, abs=0.02 * s.globalrms)


def test_matches_sep_with_mask_and_nan(awkward):
    img, mask = awkward
    bad = mask | ~np.isfinite(img)
    s = sep.Background(np.where(bad, 0, img).astype(np.float32), mask=bad, bw=32, bh=32, fw=3, fh=3)
    with pytest.warns(FallbackWarning, match="filled from their nearest good meshes"):
        bkg = estimate_background(img, mesh=32, filter_size=3, mask=mask)
    assert np.max(np.abs(bkg["background"].values - s.back())) < 0.05 * s.globalrms
    assert np.max(np.abs(bkg["rms"].values / s.rms() - 1)) < 0.03


def test_background_vs_truth(field):
    """Background error rms < 0.1 x sky noise (issue 3 item 7), for the mesh and the poly method."""
    ds = field.image
    noise = np.sqrt(field.sky / ds.attrs["gain"] + (ds.attrs["read_noise"] / ds.attrs["gain"]) ** 2)
    for method in ("mesh", "poly"):
        bkg = estimate_background(ds, mesh=64, method=method, nx=2, ny=2)
        err = bkg["background"].values - field.sky
        assert np.sqrt(np.mean(err ** 2)) < 0.1 * np.mean(noise), method
        # rms map is the sky noise (stars add a little)
        assert np.median(bkg["rms"].values / noise) == pytest.approx(1.0, abs=0.03)
    assert bkg.attrs["poly_pixels"] > 0.7 * field.sky.size


# ------------------------------------------------------------ tile invariance
@pytest.mark.parametrize("nx,ny", [(2, 1), (1, 3), (3, 2), (5, 4), (15, 10)])
def test_tiled_equals_whole_mesh(awkward, nx, ny):
    img, mask = awkward
    with pytest.warns(FallbackWarning):
        whole = estimate_background(img, mesh=32, filter_size=3, mask=mask)
    with pytest.warns(FallbackWarning):
        tiled = estimate_background(img, mesh=32, filter_size=3, mask=mask, nx=nx, ny=ny)
    assert tiled["background"].data.chunks == TileGrid(img.shape, nx, ny, align=32).chunks
    for v in ("background", "rms"):
        a, b = tiled[v].values, whole[v].values
        assert a.dtype == np.float32 and a.shape == img.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=v)
    np.testing.assert_array_equal(np.array(tiled.attrs["mesh_background"]), np.array(whole.attrs["mesh_background"]))


def test_partial_last_mesh_uses_its_own_pixels():
    """A partial last mesh is computed on its fewer pixels (as sep): a step there shows up in its value."""
    img = np.full((100, 150), 10.0, dtype=np.float32)
    img[:, 128:] = 20.0  # the partial last mesh column (pixels 128..149)
    st = mesh_statistics(img, 64)
    assert st["mode"].shape == (2, 3)
    np.testing.assert_allclose(st["mode"][:, :2], 10.0)
    np.testing.assert_allclose(st["mode"][:, 2], 20.0)
    assert st["valid"].all()


def _reference_mesh_stats(values):
    """SExtractor's mesh recipe written plainly (one mesh, float64): (mode, sigma, mean, median)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    m, s = v.mean(), v.std()
    lo, hi = np.float32(m - 2 * s), np.float32(m + 2 * s)
    w = v[(v >= lo) & (v <= hi)]
    m1, s1 = w.mean(), w.std()
    rlo, rhi = m1 - 5 * s1, m1 + 5 * s1
    v = v[(v >= rlo) & (v <= rhi)]
    for _ in range(100):
        med, sd = np.median(v), v.std()
        sel = (v >= max(med - 3 * sd, rlo)) & (v <= min(med + 3 * sd, rhi))
        if sel.all():
            break
        v = v[sel]
    med, mean, sd = np.median(v), v.mean(), v.std()
    mode = 2.5 * med - 1.5 * mean if abs(mean - med) / sd < 0.3 else med
    return mode, sd, mean, med


@pytest.mark.parametrize("kind", ["normal", "skewed"])
def test_sextractor_mode_rule(kind):
    """mode = 2.5 median - 1.5 mean for mildly skewed meshes, the median when |mean - median| >= 0.3 sigma."""
    rng = np.random.default_rng(5)
    if kind == "normal":
        img = rng.normal(50.0, 2.0, (64, 64))
        img[:3, :3] += 500.0  # a star: clipped away
    else:
        img = rng.exponential(10.0, (64, 64)) ** 2  # |mean - median| / sigma = 0.4 after clipping
    img = img.astype(np.float32)
    mode, sd, mean, med = _reference_mesh_stats(img)
    assert (abs(mean - med) / sd < 0.3) == (kind == "normal")
    st = mesh_statistics(img, 64)
    assert st["mode"][0, 0] == pytest.approx(mode, rel=1e-6)
    assert st["sigma"][0, 0] == pytest.approx(sd, rel=1e-5)
    if kind == "normal":
        assert mode == pytest.approx(50.0, abs=0.25) and sd == pytest.approx(2.0, rel=0.05)


def test_filter_size_and_threshold():
    """A single hot mesh is removed by the 3 x 3 median filter, kept with filter_size=1 or a high threshold."""
    rng = np.random.default_rng(2)
    img = rng.normal(100.0, 1.0, (320, 320)).astype(np.float32)
    img[128:192, 128:192] += 30.0  # one whole mesh raised: its mode is 130
    f1 = estimate_background(img, mesh=64, filter_size=1)
    f3 = estimate_background(img, mesh=64, filter_size=3)
    ft = estimate_background(img, mesh=64, filter_size=3, filter_threshold=1000.0)
    assert np.array(f1.attrs["mesh_background"])[2, 2] == pytest.approx(130.0, abs=0.2)
    assert np.array(f3.attrs["mesh_background"])[2, 2] == pytest.approx(100.0, abs=0.2)
    assert np.array(ft.attrs["mesh_background"])[2, 2] == pytest.approx(130.0, abs=0.2)
    assert float(f3["background"][160, 160]) == pytest.approx(100.0, abs=0.3)


# ------------------------------------------------------------------- poly sky
def test_poly_tiled_equals_whole(awkward):
    img, mask = awkward
    with pytest.warns(FallbackWarning):
        whole = estimate_background(img, mesh=32, method="poly", order=3, mask=mask)
    with pytest.warns(FallbackWarning):
        tiled = estimate_background(img, mesh=32, method="poly", order=3, mask=mask, nx=3, ny=2)
    cw = np.array(whole.attrs["poly_coefficients"])
    ct = np.array(tiled.attrs["poly_coefficients"])
    np.testing.assert_allclose(ct, cw, rtol=1e-6, atol=1e-6 * np.abs(cw).max())
    assert tiled.attrs["poly_pixels"] == whole.attrs["poly_pixels"]
    np.testing.assert_allclose(tiled["background"].values, whole["background"].values, rtol=1e-6)
    # the polynomial recovers the smooth truth (quadratic in x, linear in y)
    h, w = img.shape
    yy, xx = np.mgrid[:h, :w]
    truth = 100.0 + 0.02 * xx + 0.01 * yy + 3e-5 * (xx - 200.0) ** 2
    assert np.sqrt(np.mean((whole["background"].values - truth) ** 2)) < 0.1 * 5.0
    # only degree <= 3 terms
    assert all(cw[j, i] == 0 for j in range(4) for i in range(4) if i + j > 3)


def test_poly_iterations_and_small_overlap(awkward):
    img, _ = awkward
    img = np.nan_to_num(img, nan=100.0)
    b2 = estimate_background(img, mesh=32, method="poly", order=2, iters=2, grow=3, nx=2, ny=1)
    assert b2.attrs["iters"] == 2 and b2.attrs["poly_fits"] >= 2
    assert np.isfinite(b2["background"].values).all()
    with pytest.warns(OverlapWarning):
        estimate_background(img, mesh=32, method="poly", nx=2, ny=1, overlap=2, maxiters=1)


# ------------------------------------------------------------------ bad input
def test_all_nan_tile_falls_back_with_warning(awkward):
    img, _ = awkward
    img = img.copy()
    img[:, :160] = np.nan  # the whole first tile of nx=3 (cores 0..160)
    with pytest.warns(FallbackWarning, match=r"tiles \[0\] have no good mesh"):
        bkg = estimate_background(img, mesh=32, nx=3, ny=1)
    out = bkg["background"].values
    assert np.isfinite(out).all()
    assert bkg.attrs["n_bad_meshes"] >= 50


def test_everything_masked_is_a_clear_error(awkward):
    img, _ = awkward
    with pytest.raises(ValueError, match="mask covers everything"):
        estimate_background(img, mesh=32, mask=np.ones(img.shape, bool))
    with pytest.raises(ValueError, match="all NaN"):
        estimate_background(np.full((100, 100), np.nan, np.float32), mesh=32, nx=2)


def test_image_smaller_than_mesh():
    with pytest.raises(ValueError, match="mesh"):
        estimate_background(np.zeros((50, 300), np.float32), mesh=64)


def test_non_native_endian(awkward):
    img, mask = awkward
    img = np.nan_to_num(img, nan=100.0)
    big = img.astype(">f4")
    a = estimate_background(big, mesh=32, nx=2)
    b = estimate_background(img, mesh=32, nx=2)
    np.testing.assert_array_equal(a["background"].values, b["background"].values)
    f64 = estimate_background(img.astype(">f8"), mesh=32)
    np.testing.assert_allclose(f64["background"].values, b["background"].values, rtol=1e-6)


def test_parameter_errors(awkward):
    img, _ = awkward
    with pytest.raises(ValueError, match="method"):
        estimate_background(img, method="spline")
    with pytest.raises(ValueError, match="mask has shape"):
        estimate_background(img, mesh=32, mask=np.zeros((10, 10), bool))
    with pytest.raises(ValueError, match="align"):
        estimate_background(img, mesh=32, grid=TileGrid(img.shape, nx=3))
    with pytest.raises(ValueError, match="nx=20"):
        estimate_background(img, mesh=32, nx=20, ny=1)
    with pytest.raises(ValueError, match="filter_size"):
        estimate_background(img, mesh=32, filter_size=0)


# ------------------------------------------------------------- subtract & CLI
def test_subtract_background(field):
    ds = field.image
    out = subtract_background(ds, mesh=64, nx=2, ny=2)
    assert {"image", "mask", "variance", "background", "rms"} <= set(out.data_vars)
    np.testing.assert_allclose(out["image"].values, ds["image"].values - out["background"].values, atol=1e-3)
    np.testing.assert_array_equal(out["variance"].values, ds["variance"].values)
    assert out["image"].dtype == np.float32
    assert out.attrs["background"]["method"] == "mesh"
    bkg = tp.estimate_background(ds, mesh=64)
    again = tp.subtract_background(ds, bkg)
    np.testing.assert_allclose(again["background"].values, bkg["background"].values)
    assert abs(float(np.median(again["image"].values))) < 0.5


def test_result_is_lazy_and_json_safe(field):
    import json

    bkg = estimate_background(field.image, mesh=64, nx=2)
    assert isinstance(bkg, xr.Dataset)
    assert hasattr(bkg["background"].data, "dask") and hasattr(bkg["rms"].data, "dask")
    json.dumps({k: v for k, v in bkg.attrs.items()})
    assert bkg.attrs["mesh"] == [64, 64] and len(bkg.attrs["mesh_background"]) == 8


def test_cli_background_on_cluster(client, tmp_path, field):
    """The CLI on a real 2-process LocalCluster, 2 x 2 tiles: equals the local whole-image result."""
    from click.testing import CliRunner

    from tilepipe.cli import main
    from tilepipe.io import read_zarr, write_fits

    src = tmp_path / "in.fits"
    write_fits(field.image, str(src))
    runner = CliRunner()
    out_z = tmp_path / "bkg.zarr"
    res = runner.invoke(main, ["--nx", "2", "--no-progress", "background", str(src), "-o", str(out_z),
                               "--mesh", "64", "--filter-size", "3"])
    assert res.exit_code == 0, res.output
    got = read_zarr(str(out_z))
    import dask

    with dask.config.set(scheduler="sync"):
        ref = estimate_background(field.image, mesh=64)
        ref_b, ref_r = ref["background"].values, ref["rms"].values
    np.testing.assert_allclose(got["background"].values, ref_b, rtol=1e-5)
    np.testing.assert_allclose(got["rms"].values, ref_r, rtol=1e-5)
    assert got.attrs["mesh"] == [64, 64] and got.attrs["tiles"] == [2, 2]
    out_f = tmp_path / "bkg.fits"
    res = runner.invoke(main, ["--no-progress", "background", str(src), "-o", str(out_f), "--method", "poly"])
    assert res.exit_code == 0, res.output
    with fits.open(out_f) as hdul:
        names = [h.name for h in hdul]
        assert "BACKGROUND" in names and "RMS" in names
        assert hdul["BACKGROUND"].data.shape == field.sky.shape
    res = runner.invoke(main, ["background", str(src), "-o", str(tmp_path / "x.zarr"), "--mesh", "4096"])
    assert res.exit_code != 0 and "mesh" in res.output


def test_thread_safety(awkward):
    """Concurrent calls (and dask's threaded tiles inside each) give identical maps."""
    from concurrent.futures import ThreadPoolExecutor

    img, _ = awkward
    img = np.nan_to_num(img, nan=100.0)

    def run(n):
        b = estimate_background(img, mesh=32, nx=n, ny=2)
        return b["background"].values, b["rms"].values

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(run, [1, 2, 3, 4]))
    for b, r in results[1:]:
        np.testing.assert_allclose(b, results[0][0], rtol=1e-5)
        np.testing.assert_allclose(r, results[0][1], rtol=1e-5)


@pytest.mark.parametrize("method", ["mesh", "poly"])
def test_background_regions_equal_the_tiled_maps(method):
    """The background maps evaluated on any rectangle (tile tasks that read their own halo) equal the tiled maps."""
    from tilepipe.tiling import evaluate_regions, region_of

    f = make_field((512, 448), seed=2)
    bk = estimate_background(f.image, mesh=32, nx=3, ny=2, method=method, order=2)
    names = ["background", "rms"] if method == "mesh" else ["background"]
    regions = [region_of(bk[n]) for n in names]
    assert all(r is not None for r in regions)
    for ys, xs in [(slice(0, 512), slice(0, 448)), (slice(150, 390), slice(101, 333))]:
        for n, got in zip(names, evaluate_regions(regions, ys, xs)):
            want = bk[n][ys, xs].values
            scale = float(np.max(np.abs(want)))
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale, err_msg=n)


@pytest.mark.parametrize("nx,ny", [(1, 1), (3, 2)])
def test_lazy_mesh_background_equals_estimate_background(awkward, nx, ny):
    """mesh_background_lazy (statistics, solve and maps in one graph) == estimate_background, incl. bad meshes."""
    from tilepipe.background import mesh_background_lazy
    from tilepipe.tiling import evaluate_regions, region_of, resolve_regions

    img, mask = awkward
    ds = tp.open_image(img, mask=mask)
    with pytest.warns(FallbackWarning) as rec:
        ref = estimate_background(ds, mesh=32, filter_size=3, nx=nx, ny=ny)
    b, r, solved, check = mesh_background_lazy(ds, 32, 3, nx=nx, ny=ny)
    assert solved.npartitions == 1
    np.testing.assert_array_equal(b.compute(), ref["background"].values)
    np.testing.assert_array_equal(r.compute(), ref["rms"].values)
    s = solved.compute()
    np.testing.assert_array_equal(s[0], np.array(ref.attrs["mesh_background"]))
    np.testing.assert_array_equal(s[1], np.array(ref.attrs["mesh_rms"]))
    np.testing.assert_array_equal(s[2], np.array(ref.attrs["mesh_valid"]))
    assert check(s) == str(rec[0].message)
    # the maps' regions: the solve is a lazy argument, resolved once
    regions = resolve_regions([region_of(b), region_of(r)])
    for got, want in zip(evaluate_regions(regions, slice(17, 230), slice(90, 401)),
                         (ref["background"].values, ref["rms"].values)):
        np.testing.assert_allclose(got, want[17:230, 90:401], rtol=0, atol=1e-6 * float(np.max(np.abs(want))))


def test_lazy_mesh_background_errors_when_computed():
    from tilepipe.background import mesh_background_lazy

    b, _, solved, _ = mesh_background_lazy(np.full((100, 100), np.nan, np.float32), 32, nx=2)
    with pytest.raises(ValueError, match="all NaN"):
        solved.compute()
    with pytest.raises(ValueError, match="smaller than one mesh"):
        mesh_background_lazy(np.zeros((50, 300), np.float32), 64)


def test_poly_partial_last_mesh_never_forms_a_core_alone():
    """1030 px = 16 meshes of 64 + 6 px: with nx=9 the last core used to be those 6 px alone, narrower than
    the poly default overlap (a ValueError the user had not asked for); now it takes a whole mesh too."""
    from tilepipe.tiling import split_edges

    edges = split_edges(1030, 9, 64)
    assert np.diff(edges).min() >= 64 and edges[-1] == 1030 and (edges[1:-1] % 64 == 0).all()
    assert np.diff(split_edges(1030, 17, 64))[-1] == 6  # as many tiles as meshes: unavoidable
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:512, :1030]
    img = rng.normal(100.0, 5.0, (512, 1030)) + 0.01 * xx - 0.02 * yy
    whole = estimate_background(img, mesh=64, method="poly", order=1)
    tiled = estimate_background(img, mesh=64, method="poly", order=1, nx=9, ny=2)
    np.testing.assert_allclose(tiled["background"].values, whole["background"].values, rtol=1e-6)
