"""Tests of the halo-tile engine."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import scipy.ndimage as ndi
from astropy.table import Table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tilepipe as tp
from tilepipe.tiling import TileGrid, merge_tables


@pytest.mark.parametrize("shape,nx,ny", [((2047, 3001), 3, 3), ((12, 12), 5, 5), ((12, 12), 5, 2), ((1, 7), 7, 1), ((100, 37), 4, 9)])
@pytest.mark.parametrize("overlap", [0, 1, 3])
def test_cores_partition_exactly(shape, nx, ny, overlap):
    g = TileGrid(shape, nx=nx, ny=ny, overlap=overlap)
    assert g.ntiles == nx * ny
    count = np.zeros(shape, dtype=int)
    for t in g:
        count[t.core] += 1
        # the outer box is the core grown by overlap and clipped
        assert t.outer[0].start == max(0, t.core[0].start - overlap)
        assert t.outer[1].stop == min(shape[1], t.core[1].stop + overlap)
        # inner slices address the core inside the outer box
        outer = np.arange(shape[0] * shape[1]).reshape(shape)[t.outer]
        assert np.array_equal(outer[t.inner], np.arange(shape[0] * shape[1]).reshape(shape)[t.core])
    assert (count == 1).all()
    sizes_y, sizes_x = g.chunks
    assert max(sizes_x) - min(sizes_x) <= 1 and max(sizes_y) - min(sizes_y) <= 1


def test_alignment_to_mesh():
    g = TileGrid((2047, 3001), nx=3, ny=3, overlap=64, align=64)
    assert all(e % 64 == 0 for e in g.x_edges[:-1]) and g.x_edges[-1] == 3001
    assert all(e % 64 == 0 for e in g.y_edges[:-1]) and g.y_edges[-1] == 2047


def test_owner_half_open_rule():
    g = TileGrid((10, 10), nx=2, ny=2)
    # core edges at 5: pixel 4 -> tile 0, pixel 5 -> tile 1; 4.49 rounds to pixel 4, 4.5 to pixel 5
    assert g.owner(4.0, 0.0) == 0 and g.owner(5.0, 0.0) == 1
    assert g.owner(4.49, 0.0) == 0 and g.owner(4.5, 0.0) == 1
    assert g.owner(0.0, 5.0) == 2 and g.owner(9.0, 9.0) == 3
    assert g.owner(-0.6, 0) == -1 and g.owner(0, 9.5) == -1
    xs, ys = np.meshgrid(np.arange(10), np.arange(10))
    own = g.owner(xs.ravel(), ys.ravel()).reshape(10, 10)
    for t in g:
        assert (own[t.core] == t.index).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(shape=(10, 10), nx=0), "nx must be >= 1"),
        (dict(shape=(10, 10), nx=2, ny=0), "ny must be >= 1"),
        (dict(shape=(10, 10), nx=11), "at most 10 tiles"),
        (dict(shape=(10, 10), nx=2, overlap=-1), "overlap must be >= 0"),
        (dict(shape=(10, 10, 3), nx=2), "2-D"),
        (dict(shape=(100, 100), nx=3, align=64), "at most 2 tiles"),
    ],
)
def test_grid_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TileGrid(**kwargs)


def test_overlap_larger_than_core_is_refused():
    x = np.zeros((20, 20), np.float32)
    with pytest.raises(ValueError, match="larger than the smallest tile core"):
        tp.map_tiles(lambda b, tile: b, x, nx=4, overlap=6)


def _gauss(b, tile):
    return ndi.gaussian_filter(b, 1.5, truncate=4.0, mode="reflect")


def _median(b, tile):
    return ndi.median_filter(b, size=5, mode="reflect")


_K = np.outer(np.hanning(9), np.hanning(9)).astype(np.float64)
_K /= _K.sum()


def _fftconv(b, tile):
    """Linear (non-wrapping) FFT convolution with a 9x9 kernel, edges reflected."""
    p = 4
    a = np.pad(b.astype(np.float64), p, mode="symmetric")  # = scipy.ndimage "reflect"
    s = (a.shape[0] + 8, a.shape[1] + 8)
    f = np.fft.irfft2(np.fft.rfft2(a, s) * np.fft.rfft2(_K, s), s)
    return f[2 * p : 2 * p + b.shape[0], 2 * p : 2 * p + b.shape[1]].astype(np.float32)


SUPPORT = {"gauss": (_gauss, 6), "median": (_median, 2), "fft": (_fftconv, 4)}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.integers(30, 120),
    w=st.integers(30, 120),
    nx=st.integers(1, 4),
    ny=st.integers(1, 4),
    extra=st.integers(0, 3),
    which=st.sampled_from(sorted(SUPPORT)),
    seed=st.integers(0, 2**16),
)
def test_tiled_equals_untiled_bitwise(h, w, nx, ny, extra, which, seed):
    func, support = SUPPORT[which]
    x = np.random.default_rng(seed).normal(size=(h, w)).astype(np.float32)
    whole = func(x, tile=None)
    overlap = support + extra
    g = TileGrid((h, w), nx=nx, ny=ny, overlap=overlap)
    if (ny > 1 and overlap > g.min_core[0]) or (nx > 1 and overlap > g.min_core[1]):
        return  # refused by the engine (tested above)
    tiled = tp.map_tiles(func, x, grid=g).compute(scheduler="threads")
    if which == "fft":
        # FFT round-off differs with the transform length, so compare to float32 precision
        np.testing.assert_allclose(tiled, whole, rtol=0, atol=2e-6)
    else:
        assert np.array_equal(tiled, whole)


def test_fft_convolution_tiled_matches_direct_convolution():
    x = np.random.default_rng(3).normal(size=(90, 110)).astype(np.float32)
    direct = ndi.convolve(x.astype(np.float64), _K, mode="reflect")
    tiled = tp.map_tiles(_fftconv, x, nx=3, ny=2, overlap=4).compute()
    np.testing.assert_allclose(tiled, direct, atol=1e-6)


def test_too_small_overlap_changes_result():
    """The invariance test can fail: with overlap < support the tiled result differs."""
    x = np.random.default_rng(1).normal(size=(80, 80)).astype(np.float32)
    tiled = tp.map_tiles(_gauss, x, nx=3, ny=3, overlap=1).compute()
    assert not np.array_equal(tiled, _gauss(x, None))


class _FailOnCompute:
    """A dask scheduler that fails on any compute (xarray's raise_if_dask_computes)."""

    def __call__(self, dsk, keys, **kwargs):
        raise RuntimeError("something computed while the graph was being built")


def test_building_the_graph_computes_nothing(tmp_path):
    x = dask.array.random.RandomState(0).normal(size=(300, 300), chunks=100).astype(np.float32)
    with dask.config.set(scheduler=_FailOnCompute()):
        ds = tp.open_image(x, gain=2.0)
        out = tp.map_tiles(_gauss, ds["image"], nx=3, ny=3, overlap=8)
        a, b = tp.map_tiles(lambda b, tile: (b, b > 0), ds["image"], nx=2, overlap=4, n_out=2, dtype=[np.float32, bool])
        var = ds["variance"]
    with pytest.raises(RuntimeError, match="computed"):
        with dask.config.set(scheduler=_FailOnCompute()):
            out.compute()
    assert out.chunks == TileGrid((300, 300), 3, 3).chunks
    assert var.shape == (300, 300) and b.dtype == bool


def test_multiple_outputs_and_core_shaped_returns():
    x = np.arange(48 * 50, dtype=np.float32).reshape(48, 50)

    def f(b, tile):
        return b[tile.inner] * 2, (b > 100)

    a, m = tp.map_tiles(f, x, nx=3, ny=2, overlap=3, n_out=2, dtype=[np.float64, bool])
    assert a.dtype == np.float64 and m.dtype == bool
    assert np.array_equal(a.compute(), x * 2) and np.array_equal(m.compute(), x > 100)


def _pixels_above(b, tile, thresh):
    yy, xx = np.nonzero(b > thresh)
    return Table({"x": xx.astype(float), "y": yy.astype(float), "value": b[yy, xx]})


@pytest.mark.parametrize("nx,ny,overlap", [(1, 1, 0), (3, 2, 5), (4, 4, 10)])
def test_map_tiles_table_each_row_once(nx, ny, overlap):
    x = np.random.default_rng(2).normal(size=(97, 131)).astype(np.float32)
    t = tp.map_tiles_table(_pixels_above, x, nx=nx, ny=ny, overlap=overlap, thresh=2.5)
    yy, xx = np.nonzero(x > 2.5)
    assert len(t) == len(yy)
    assert np.array_equal(t["id"], np.arange(1, len(t) + 1))
    assert np.array_equal(np.asarray(t["y"]), yy) and np.array_equal(np.asarray(t["x"]), xx)
    g = TileGrid(x.shape, nx, ny, overlap)
    assert np.array_equal(t["tile"], g.owner(t["x"], t["y"]))


def test_merge_tables_empty():
    out = merge_tables([None, Table({"x": [], "y": []})])
    assert len(out) == 0 and "id" in out.colnames


def test_map_tiles_on_local_cluster(client):
    """The engine runs on a real LocalCluster with worker processes."""
    x = np.random.default_rng(5).normal(size=(200, 160)).astype(np.float32)
    res = tp.map_tiles(_gauss, x, nx=2, ny=3, overlap=8).compute()
    assert np.array_equal(res, _gauss(x, None))
    t = tp.map_tiles_table(_pixels_above, x, nx=2, ny=2, overlap=4, thresh=3.0)
    assert len(t) == int((x > 3.0).sum())


# ------------------------------------------------------------------ regions
def test_regions_resolve_dask_arguments_once_and_share_sub_regions():
    from tilepipe.tiling import Region, evaluate_regions, region_of, register_region, resolve_regions

    calls = []
    base = np.arange(60 * 80, dtype=np.float64).reshape(60, 80)

    def read(ys, xs, *, a):
        calls.append((ys, xs))
        return a[ys, xs]

    def scaled(ys, xs, *, img, k):
        return img * float(k[0])

    src = Region(read, {"a": base})
    k = dask.array.from_array(np.array([3.0]))  # a lazy global statistic
    twice = Region(scaled, {"img": src, "k": k})
    arr = register_region(dask.array.from_array(base * 3.0, chunks=20), twice)
    assert region_of(arr) is twice and region_of(arr + 1) is None  # another operation: another name, no region
    (r_src, r_twice) = resolve_regions([src, twice])
    assert isinstance(r_twice.kwargs["k"], np.ndarray)  # computed once, before any rectangle
    assert r_twice.kwargs["img"] is r_src  # shared sub-regions stay shared
    ys, xs = slice(7, 41), slice(13, 77)
    got_src, got = evaluate_regions([r_src, r_twice], ys, xs)
    assert calls == [(ys, xs)]  # the source was read once for both
    np.testing.assert_array_equal(got_src, base[ys, xs])
    np.testing.assert_array_equal(got, arr[ys, xs].compute())


def test_bound_regions_filled_in_a_graph_equal_resolved_regions():
    """bind_regions/fill_regions: the statistics computed inside the graph that uses them, same values."""
    from tilepipe.tiling import Region, bind_regions, evaluate_regions, fill_regions, resolve_regions

    base = np.random.default_rng(1).normal(size=(40, 50))
    offset = dask.array.from_array(base, chunks=10).mean()  # a lazy global statistic, several chunks

    def shifted(ys, xs, *, a, off):
        return a[ys, xs] - off

    reg = Region(shifted, {"a": base, "off": offset})
    templates, lazies = bind_regions([reg])
    assert len(lazies) == 1 and lazies[0].npartitions == 1
    assert not any(isinstance(v, dask.array.Array) for v in templates[0].kwargs.values())
    filled = dask.delayed(fill_regions)(templates, [lazies[0]]).compute()
    ys, xs = slice(3, 31), slice(9, 50)
    np.testing.assert_array_equal(evaluate_regions(filled, ys, xs)[0],
                                  evaluate_regions(resolve_regions([reg]), ys, xs)[0])
    np.testing.assert_allclose(evaluate_regions(filled, ys, xs)[0], base[ys, xs] - base.mean(), rtol=1e-12)


def test_map_windows_computes_each_window_from_its_sources():
    from tilepipe.tiling import Region, map_windows

    base = np.random.default_rng(2).normal(size=(60, 70))
    mean = dask.array.from_array(base, chunks=20).mean()  # a lazy global statistic

    def centred(ys, xs, *, a, m):
        return a[ys, xs] - m

    regions = [Region(centred, {"a": base, "m": mean})]
    windows = [(0, 30, 0, 35), (25, 60, 30, 70)]

    def total(pix, *, window, scale, tag):
        return tag, window, scale * float(pix.sum())

    res, filled = map_windows(total, regions, windows, [{"tag": "a"}, {"tag": "b"}], scale=2.0)
    for (tag, w, got), want_w, want_tag in zip(res, windows, "ab"):
        assert tag == want_tag and w == want_w
        np.testing.assert_allclose(got, 2.0 * (base[w[0]:w[1], w[2]:w[3]] - base.mean()).sum(), rtol=1e-10)
    assert not isinstance(filled[0].kwargs["m"], dask.array.Array)  # statistics come back computed


def test_tile_boxes_are_windows_of_the_same_pixels():
    """``outer_box``/``core_box`` are the ``(y0, y1, x0, x1)`` windows :func:`map_windows` takes: the same
    pixels as the tile's slices, rows first."""
    img = np.arange(100 * 90).reshape(100, 90)
    for t in TileGrid((100, 90), nx=3, ny=2, overlap=5).tiles:
        for box, sl in ((t.outer_box, t.outer), (t.core_box, t.core)):
            y0, y1, x0, x1 = box
            np.testing.assert_array_equal(img[y0:y1, x0:x1], img[sl])
