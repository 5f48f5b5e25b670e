"""Coaddition: proper (Zackay & Ofek 2017) vs weighted mean vs median, against truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

import tilepipe as tp
from tilepipe.coadd import GaussianStamp, coadd, proper_kernels
from tilepipe.exceptions import OverlapWarning
from tilepipe.image import make_dataset

SHAPE = (448, 448)
NOISE = 5.0


def _render(xs, ys, fl, fwhm, sky, F, seed):
    """Pixel-sampled circular Gaussian stars (sum 1 per star), sky, white Gaussian noise."""
    rng = np.random.default_rng(seed)
    img = np.zeros(SHAPE)
    s = fwhm / 2.3548200450309493
    r = int(np.ceil(4 * fwhm))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    for x, y, f in zip(xs, ys, fl):
        ix, iy = int(round(x)), int(round(y))
        st = np.exp(-0.5 * ((xx - (x - ix)) ** 2 + (yy - (y - iy)) ** 2) / s**2)
        img[iy - r : iy + r + 1, ix - r : ix + r + 1] += F * f * st / st.sum()
    return img + sky + rng.normal(0, NOISE, SHAPE)


@pytest.fixture(scope="module")
def stack():
    """Same stars, different seeing / transparency / sky; the top band (y >= 340) holds no source."""
    rng = np.random.default_rng(7)
    nb = 30
    bx, by = rng.uniform(40, 408, nb), rng.uniform(40, 240, nb)
    bf = 10 ** rng.uniform(4.0, 5.3, nb)
    # bright PSF-test stars at integer positions, faint sources on a grid (sub-pixel offsets)
    px, py = np.array([80.0, 200.0, 330.0]), np.array([275.0, 275.0, 275.0])
    fx, fy = np.meshgrid(np.arange(50, 400, 35.0), np.arange(50, 260, 35.0))
    fx, fy = fx.ravel() + 0.3, fy.ravel() - 0.2
    far = np.min(np.hypot(fx[:, None] - bx[None], fy[:, None] - by[None]), axis=1) > 20
    fx, fy = fx[far], fy[far]
    xs, ys = np.r_[bx, px, fx], np.r_[by, py, fy]
    fl = np.r_[bf, [2e5] * 3, np.full(fx.size, 300.0)]
    sharp = _render(xs, ys, fl, 2.5, 100.0, 1.0, 1)
    same = _render(xs, ys, fl, 2.5, 250.0, 1.3, 2)
    broad = _render(xs, ys, fl, 6.0, 250.0, 1.3, 3)
    var = np.full(SHAPE, NOISE**2, np.float32)
    mk = lambda a: make_dataset(a.astype(np.float32), variance=var)  # noqa: E731
    return {"sharp": mk(sharp), "same": mk(same), "broad": mk(broad), "faint": (fx, fy), "psfstars": (px, py)}


def _snr(res, fx, fy):
    """Median matched-filter S/N of the faint sources; noise from the source-free band."""
    img = res["coadd"].values.astype(np.float64)
    psf = res["psf"].values[0].astype(np.float64)
    filt = fftconvolve(img, psf[::-1, ::-1], mode="same")
    empty = filt[345:440, 40:-40]
    noise = empty.std()
    vals = filt[np.round(fy).astype(int), np.round(fx).astype(int)] - np.median(empty)
    return float(np.median(vals / noise))


def test_scales_and_fwhm_measured_on_stars(stack):
    res = coadd([stack["sharp"], stack["broad"]], method="weighted")
    F = res.attrs["fluxes"]
    assert F[0] == 1.0 and abs(F[1] - 1.3) < 0.02
    assert abs(res.attrs["fwhm_inputs"][0] - 2.5) < 0.1 and abs(res.attrs["fwhm_inputs"][1] - 6.0) < 0.2
    assert abs(res.attrs["sigmas"][0] - NOISE) < 0.15 and abs(res.attrs["sigmas"][1] - NOISE) < 0.15
    assert abs(res.attrs["backgrounds"][1] - 250.0) < 1.0


def test_proper_snr_at_least_weighted(stack):
    fx, fy = stack["faint"]
    # equal seeing: proper == weighted mean (up to noise)
    p_same = _snr(coadd([stack["sharp"], stack["same"]], None, "proper").compute(), fx, fy)
    w_same = _snr(coadd([stack["sharp"], stack["same"]], None, "weighted").compute(), fx, fy)
    assert p_same >= 0.99 * w_same
    # different seeing: proper is better, close to the optimum of ZO17 paper I
    p = _snr(coadd([stack["sharp"], stack["broad"]], None, "proper").compute(), fx, fy)
    w = _snr(coadd([stack["sharp"], stack["broad"]], None, "weighted").compute(), fx, fy)
    m = _snr(coadd([stack["sharp"], stack["broad"]], None, "median").compute(), fx, fy)
    assert p >= 1.08 * w, (p, w)
    assert p > m
    # optimal S/N^2 = f^2 sum_j F_j^2 / sigma_j^2 sum P_j^2 (sum P^2 = 1 / (4 pi s^2) for a Gaussian)
    s1, s2 = 2.5 / 2.3548, 6.0 / 2.3548
    opt = 300.0 * np.sqrt((1 / (4 * np.pi * s1**2) + 1.3**2 / (4 * np.pi * s2**2)) / NOISE**2)
    assert 0.85 * opt < p < 1.1 * opt, (p, opt)


def test_coadd_psf_matches_prediction(stack):
    res = coadd([stack["sharp"], stack["broad"]], method="proper", fluxes=[1.0, 1.3], sigmas=[NOISE, NOISE]).compute()
    psf = res["psf"].values[0].astype(np.float64)
    G = psf.shape[0]
    # Eq. 10 evaluated analytically for Gaussians: |P_j^|(k) = exp(-2 pi^2 s_j^2 k^2)
    k = np.fft.fftfreq(G)
    k2 = k[None, :] ** 2 + k[:, None] ** 2
    w = np.array([1.0, 1.3**2]) / NOISE**2
    s = np.array([2.5, 6.0]) / 2.3548
    D = np.sqrt(sum(wj * np.exp(-4 * np.pi**2 * sj**2 * k2) for wj, sj in zip(w, s)))
    pred = np.fft.fftshift(np.fft.ifft2(D / np.sqrt(w.sum())).real)
    assert np.abs(psf - pred).max() < 0.03 * pred.max()
    # and empirically: bright stars at integer positions in the coadd
    px, py = stack["psfstars"]
    img = res["coadd"].values.astype(np.float64)
    r = 10
    c = G // 2
    stamps = [img[int(y) - r : int(y) + r + 1, int(x) - r : int(x) + r + 1] for x, y in zip(px, py)]
    emp = np.mean([st / st.sum() for st in stamps], axis=0)
    model = psf[c - r : c + r + 1, c - r : c + r + 1]
    model = model / model.sum()
    assert np.abs(emp - model).max() < 0.05 * model.max()
    # coadd noise = 1 / F_R (white, ZO17)
    FR = np.sqrt(w.sum())
    assert abs(img[345:440, 40:-40].std() * FR - 1.0) < 0.05
    assert abs(np.sqrt(res["variance"].values[345:440, 50:-50].mean()) * FR - 1.0) < 0.02


def test_tiled_equals_whole_and_kernels(stack):
    imgs = [stack["sharp"], stack["broad"]]
    kw = dict(fluxes=[1.0, 1.3], sigmas=[NOISE, NOISE], psfs=[GaussianStamp(2.5), GaussianStamp(6.0)])
    whole = coadd(imgs, **kw).compute()
    tiled = coadd(imgs, nx=3, ny=2, **kw)
    assert tiled["coadd"].data.numblocks == (2, 3)
    tiled = tiled.compute()
    np.testing.assert_allclose(tiled["coadd"].values, whole["coadd"].values, atol=1e-4 * NOISE, rtol=0)
    np.testing.assert_allclose(tiled["variance"].values, whole["variance"].values, rtol=1e-4)
    assert tiled["psf"].shape[0] == 6
    # the filters carry unit total noise (sum_j sigma_j^2 |k_j|^2 = 1)
    kern, psf, FR = proper_kernels([GaussianStamp(2.5).at(), GaussianStamp(6.0).at()], [1.0, 1.3], [NOISE, NOISE], 75)
    assert abs(sum(NOISE**2 * (k**2).sum() for k in kern) - 1.0) < 1e-6
    assert abs(psf.sum() - 1.0) < 1e-9
    with pytest.warns(OverlapWarning):
        coadd(imgs, nx=2, overlap=4, **kw)


def test_masks_get_zero_weight(stack):
    a = stack["sharp"].copy()
    b = stack["broad"].copy()
    ma = np.zeros(SHAPE, bool)
    ma[100:140, 100:140] = True
    mb = np.zeros(SHAPE, bool)
    mb[120:160, 120:160] = True
    a["mask"] = (("y", "x"), ma)
    b["mask"] = (("y", "x"), mb)
    kw = dict(fluxes=[1.0, 1.3], sigmas=[NOISE, NOISE])
    # a masked pixel's value must not matter: put garbage under the mask
    a2 = a.copy()
    a2["image"] = a["image"].where(~a["mask"], 1e6)
    for method in ("weighted", "median", "proper"):
        r1 = coadd([a, b], method=method, **kw).compute()
        r2 = coadd([a2, b], method=method, **kw).compute()
        np.testing.assert_allclose(r1["coadd"].values, r2["coadd"].values, atol=1e-3)
        nexp = r1["nexp"].values
        assert nexp[110, 110] == 1 and nexp[130, 130] == 0 and nexp[150, 150] == 1 and nexp[300, 300] == 2
        assert r1["mask"].values[130, 130] and not r1["mask"].values[110, 110]
    w = coadd([a, b], method="weighted", **kw).compute()
    # where only b is valid, the weighted mean is b / F_b
    bb = (b["image"].values - w.attrs["backgrounds"][1]) / 1.3
    np.testing.assert_allclose(w["coadd"].values[105:118, 105:118], bb[105:118, 105:118], rtol=1e-5, atol=1e-4)


def test_bad_input(stack):
    small = make_dataset(np.zeros((100, 100), np.float32))
    with pytest.raises(ValueError, match="same shape"):
        coadd([stack["sharp"], small])
    with pytest.raises(ValueError, match="psfs has 1 entries for 2"):
        coadd([stack["sharp"], stack["broad"]], psfs=[GaussianStamp(2.0)])
    with pytest.raises(ValueError, match="method"):
        coadd([stack["sharp"], stack["broad"]], method="mean")
    with pytest.raises(ValueError, match="fluxes"):
        coadd([stack["sharp"], stack["broad"]], fluxes=[1.0, -1.0], psfs=[GaussianStamp(2.0)] * 2)


def test_real_properimage_null_pair_fits_and_zarr(shared_data, tmp_path):
    from tilepipe.io import write_zarr

    d = shared_data / "pair_properimage_null"
    a, b = str(d / "aligned_eso085-030-004.fit"), str(d / "aligned_eso085-030-005.fit")
    zb = str(tmp_path / "b.zarr")
    write_zarr(tp.open_image(b), zb)
    res = coadd([a, zb], method="proper", nx=2, ny=1)
    F = res.attrs["fluxes"]
    assert res.attrs["n_stars"] >= 10
    assert 0.85 < F[1] < 1.15  # frames 74 s apart, same exposure
    f1, f2 = res.attrs["fwhm_inputs"]
    assert 1.0 < f1 < 15 and 1.0 < f2 < 15
    res = res.compute()
    sig = np.array(res.attrs["sigmas"])
    FR = res.attrs["F_R"]
    assert abs(FR - np.sqrt(np.sum(np.array(F) ** 2 / sig**2))) < 1e-9 * FR
    # the coadd is deeper than either frame: its sky noise ~ 1 / F_R, measured as the sigmas are (differences of
    # pixels 4 px apart: the frames' sky structure is not noise; a MAD of the values gave 71 against 1/F_R = 53)
    from tilepipe.image import _sky_and_noise

    noise = _sky_and_noise(np.where(res["mask"].values, np.nan, res["coadd"].values), 1)[1]
    assert noise < 0.85 * sig.min()
    assert abs(noise * FR - 1) < 0.05
    # FITS + FITS gives the same as FITS + Zarr
    res2 = coadd([a, b], method="proper", nx=2, ny=1, fluxes=F, sigmas=list(sig), fwhm=[f1, f2]).compute()
    np.testing.assert_allclose(res2["coadd"].values, res["coadd"].values, atol=1e-3 * sig.min())


@pytest.mark.cluster
def test_cli_coadd(stack, tmp_path, client):
    from click.testing import CliRunner

    from tilepipe.cli import main
    from tilepipe.io import write_fits

    paths = []
    for k in ("sharp", "broad"):
        p = tmp_path / f"{k}.fits"
        write_fits(stack[k].isel(y=slice(0, 256), x=slice(0, 256)), str(p))
        paths.append(str(p))
    out = tmp_path / "coadd.zarr"
    res = CliRunner().invoke(main, ["--no-progress", "--scheduler", client.scheduler.address, "--nx", "2", "coadd",
                                    *paths, "-o", str(out), "--fwhm", "2.5", "--fwhm", "6.0"])
    assert res.exit_code == 0, res.output
    assert "proper coadd of 2 images" in res.output
    ds = tp.open_image(str(out))
    assert ds["image"].shape == (256, 256) and "nexp" in ds
    bad = CliRunner().invoke(main, ["--no-progress", "--scheduler", client.scheduler.address, "coadd", paths[0],
                                    str(tmp_path / "nope.fits"), "-o", str(tmp_path / "x.zarr")])
    assert bad.exit_code != 0 and "cannot open" in bad.output


def test_proper_variance_with_masks_matches_monte_carlo():
    """Reported ``variance`` of a proper coadd with masked inputs vs the empirical per-pixel variance.

    Three images (different PSFs, flux scales, weights and non-uniform
    variance maps); image 1 and image 2 are masked in overlapping blocks, image
    0 in a small one.  A masked pixel is filled from the other images, so its
    noise is theirs: a variance that adds it as independent noise is wrong by
    up to 2x in the masked blocks (ZO17 filters, exact propagation).
    """
    import dask

    shape = (80, 80)
    nreal = 400
    F = np.array([1.0, 1.3, 0.8])
    sig = np.array([1.0, 1.5, 2.0])
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    varis = [(s**2 * (1.0 + 0.5 * (xx + 2 * yy) / 240.0)).astype(np.float32) for s in sig]
    masks = [np.zeros(shape, bool) for _ in range(3)]
    masks[0][60:70, 8:20] = True
    masks[1][18:48, 18:48] = True
    masks[2][32:62, 32:62] = True
    psfs = [GaussianStamp(1.5), GaussianStamp(2.5), GaussianStamp(3.0)]
    rng = np.random.default_rng(42)
    kw = dict(method="proper", psfs=psfs, fluxes=list(F), sigmas=list(sig), backgrounds=[0.0] * 3)
    stack, reported = [], None
    with dask.config.set(scheduler="synchronous"):
        for _ in range(nreal):
            ims = [make_dataset((rng.normal(0.0, 1.0, shape) * np.sqrt(varis[j])).astype(np.float32),
                                mask=masks[j], variance=varis[j]) for j in range(3)]
            res = coadd(ims, **kw).compute()
            stack.append(res["coadd"].values.astype(np.float64))
            if reported is None:
                reported = res["variance"].values.astype(np.float64)
    emp = np.var(np.stack(stack), axis=0, ddof=1)
    ratio = emp / reported
    m0, m1, m2 = masks
    regions = {
        "all valid": ~(m0 | m1 | m2),
        "masked in 1 only": m1 & ~m2,
        "masked in 2 only": m2 & ~m1,
        "masked in 1 and 2": m1 & m2,
        "masked in 0": m0,
    }
    from scipy import ndimage

    edge = ndimage.binary_dilation(m1 | m2, iterations=6) & ~ndimage.binary_erosion(m1 | m2, iterations=6)
    regions["mask edges"] = edge
    for name, sel in regions.items():
        assert abs(ratio[sel].mean() - 1.0) < 0.03, (name, ratio[sel].mean())
    # pixel by pixel: the scatter of the ratio is that of a variance estimated from nreal draws
    assert ratio.std() < 1.3 * np.sqrt(2.0 / (nreal - 1)), ratio.std()
    # where nothing is masked the variance is ZO17's 1 / F_R^2 x the local variance scale
    FR2 = np.sum(F**2 / sig**2)
    far = np.zeros(shape, bool)
    far[2:12, 60:78] = True
    scale = 1.0 + 0.5 * (xx + 2 * yy) / 240.0
    np.testing.assert_allclose(reported[far], scale[far] / FR2, rtol=0.01)


def test_default_sigmas_ignore_a_sky_gradient(stack):
    """The default sigmas are the images' noise (5 ADU), not the spread of a sky gradient left in them
    (the default background is one constant): they used to be the clipped MAD of the pixel values."""
    ramp = np.linspace(-150.0, 150.0, SHAPE[1])[None, :]  # a +-150 ADU gradient across the image
    imgs = [make_dataset(stack[k]["image"].values + ramp.astype(np.float32), variance=stack[k]["variance"].values)
            for k in ("sharp", "same")]
    res = coadd(imgs, fwhm=[2.5, 2.5], fluxes=[1.0, 1.3], method="weighted")
    np.testing.assert_allclose(res.attrs["sigmas"], NOISE, rtol=0.05)
