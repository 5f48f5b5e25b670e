"""find_transients on hand-made results: ownership merge across tiles, SFFT-style inputs, flags."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import tilepipe as tp


def _gauss(shape, xs, ys, amps, sigma=1.5):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    out = np.zeros(shape)
    for x, y, a in zip(xs, ys, amps):
        out += a * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return out


@pytest.fixture(scope="module")
def fake():
    rng = np.random.default_rng(1)
    shape = (300, 400)
    # sources on tile borders (x=200, y=150 with a 2x2 grid) and inside
    xs = np.array([199.7, 200.2, 50.3, 320.6, 120.0, 377.4])
    ys = np.array([40.2, 150.4, 149.6, 260.1, 80.5, 20.3])
    amps = np.array([12.0, -9.0, 20.0, 7.0, 30.0, -15.0])
    sc = rng.normal(0, 1, shape) * 0.5 + _gauss(shape, xs, ys, amps)
    flux = _gauss(shape, xs, ys, amps * 100.0)
    mask = np.zeros(shape, bool)
    mask[:, 398:] = True
    return shape, xs, ys, amps, sc.astype(np.float32), flux.astype(np.float32), mask


def _res(shape, sc, flux, mask, nx):
    ny = nx
    grid = tp.TileGrid(shape, nx=nx, ny=ny)
    data = {
        "scorr": (("y", "x"), sc),
        "fpsf": (("y", "x"), flux),
        "fpsf_err": (("y", "x"), np.full(shape, 10.0, np.float32)),
        "mask": (("y", "x"), mask),
        "diff": (("y", "x"), flux),
    }
    ds = xr.Dataset(data, attrs={"grid": {"nx": nx, "ny": ny}, "fwhm_new": 3.0})
    return ds.chunk({"y": grid.chunks[0], "x": grid.chunks[1]})


def test_ownership_merge_equals_single_tile(fake):
    shape, xs, ys, amps, sc, flux, mask = fake
    one = tp.find_transients(_res(shape, sc, flux, mask, 1), nsigma=5.0)
    four = tp.find_transients(_res(shape, sc, flux, mask, 2), nsigma=5.0)
    assert len(one) == len(four) == len(xs)
    assert np.allclose(one["x"], four["x"]) and np.allclose(one["y"], four["y"])
    assert list(four["id"]) == list(range(1, len(xs) + 1))
    assert set(np.asarray(four["tile"])) == {0, 1, 2, 3}
    # every truth source found once, with the sign and the parabolic peak flux
    for x, y, a in zip(xs, ys, amps):
        d = np.hypot(np.asarray(four["x"]) - x, np.asarray(four["y"]) - y)
        k = int(np.argmin(d))
        assert d[k] < 0.3
        assert np.sign(four["scorr_peak"][k]) == np.sign(a)
        assert abs(four["flux"][k] / (100 * a) - 1) < 0.02
        assert bool(four["flags"][k] & 4) == (a < 0)
    assert np.all(np.isnan(four["ra"]))


def test_sfft_style_result_and_flags(fake):
    shape, xs, ys, amps, sc, flux, mask = fake
    noise = np.full(shape, 2.0, np.float32)
    diff = _gauss(shape, xs, ys, amps * 4.0).astype(np.float32)
    ds = xr.Dataset({"scaled": (("y", "x"), sc), "diff": (("y", "x"), diff), "noise": (("y", "x"), noise),
                     "mask": (("y", "x"), mask)}, attrs={"fwhm": 2.3548 * 1.5})
    c = tp.find_transients(ds, nsigma=5.0)
    assert len(c) == len(xs)
    assert c.meta["detection"] == "scaled" and c.meta["flux_from"] == "psf"
    k = int(np.argmin(np.hypot(np.asarray(c["x"]) - 120.0, np.asarray(c["y"]) - 80.5)))
    # Gaussian PSF of the sources' FWHM: the PSF-weighted flux is their total flux
    total = 30.0 * 4.0 * 2 * np.pi * 1.5**2
    assert abs(c["flux"][k] / total - 1) < 0.05
    assert c["flux_err"][k] > 0 and np.isfinite(c["snr"][k])
    # a peak 1 px from the masked columns and 3 px from the edge gets flags 1 and 2
    sc2 = sc.copy()
    sc2[100, 397] = 50
    ds2 = ds.assign(scaled=(("y", "x"), sc2))
    c2 = tp.find_transients(ds2, nsigma=5.0)
    k2 = int(np.argmin(np.hypot(np.asarray(c2["x"]) - 397, np.asarray(c2["y"]) - 100)))
    assert c2["flags"][k2] & 1 and c2["flags"][k2] & 2
    drop = tp.find_transients(ds2, nsigma=5.0, flag_masked=False)
    assert len(drop) == len(c2) - 1


def test_bad_input():
    with pytest.raises(TypeError, match="Dataset"):
        tp.find_transients(np.zeros((10, 10)))
    with pytest.raises(ValueError, match="scorr"):
        tp.find_transients(xr.Dataset({"image": (("y", "x"), np.zeros((10, 10)))}))
    with pytest.raises(ValueError, match="nsigma"):
        tp.find_transients(xr.Dataset({"scorr": (("y", "x"), np.zeros((10, 10)))}), nsigma=-1)
