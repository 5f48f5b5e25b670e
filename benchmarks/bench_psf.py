"""Benchmark: tilepipe PSF (build + PSF photometry) vs photutils (EPSFBuilder + PSFPhotometry)
and properimage's KL PSF, on the same synthetic field with a strongly varying PSF.

Run with the benchmark venv (peers installed there, see requirements-psf.txt)::

    /work/benchvenv/bin/python benchmarks/bench_psf.py --sizes 512 1024

Every tool gets the same stars: the truth catalog filtered by
``tilepipe.select_stars`` (kept rows).  Quality: Σ|model - truth| of the
normalised 25x25 PSF at the 3x3 tile centres (mean, max), relative FWHM
error there; photometry: median flux bias and pull std of isolated
S/N > 50 stars.  Time: wall seconds; memory: tracemalloc peak (Python/numpy
allocations) of each step.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
import warnings

import numpy as np


def measure(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, dt, peak / 2**20


def grid_positions(n):
    return [(n / 6 + i * n / 3, n / 6 + j * n / 3) for j in range(3) for i in range(3)]


def psf_quality(at, tp, n):
    from tilepipe.psf._stamps import half_max_fwhm

    res, ferr = [], []
    for x, y in grid_positions(n):
        m = at(x, y)
        m = m / m.sum()
        res.append(np.abs(m - tp.at(x, y)).sum())
        ferr.append(abs(half_max_fwhm(m) / tp.fwhm(x, y) - 1))
    return float(np.mean(res)), float(np.max(res)), float(np.max(ferr))


def phot_quality(flux, err, truth, iso):
    f = np.asarray(flux, float)[iso]
    e = np.asarray(err, float)[iso]
    t = np.asarray(truth["flux"], float)[iso]
    ok = np.isfinite(f) & np.isfinite(e) & (e > 0)
    return float(np.median(f[ok] / t[ok] - 1)), float(np.std((f[ok] - t[ok]) / e[ok])), int(ok.sum())


def run(n, seed=1):
    from scipy.spatial import cKDTree

    from tilepipe.datasets import make_field, true_psf
    from tilepipe.psf import build_psf, psf_photometry, select_stars

    f = make_field((n, n), seed, psf_variation=0.35, ellipticity=0.15, n_stars=int(1500 * n * n / 1024**2))
    ds, stars = f.image, f.stars
    tp = true_psf(ds)
    img = np.asarray(ds["image"].values, dtype=np.float64)
    var = np.asarray(ds["variance"].values, dtype=np.float64)
    sel = select_stars(ds, stars)
    kept = sel[sel["keep"]]
    xy = np.column_stack([np.asarray(stars["x"]), np.asarray(stars["y"])])
    target = np.asarray(stars["snr"]) > 50
    near = np.zeros(len(stars), bool)
    for js in cKDTree(xy).query_ball_point(xy[target], r=30.0):
        near[js] = True
    phot_cat = stars[near | target]
    tgt = np.asarray(phot_cat["snr"]) > 50
    rows = []

    # ---- tilepipe
    psf, t_b, m_b = measure(lambda: build_psf(ds, kept))
    q = psf_quality(psf.at, tp, n)
    ph, t_p, m_p = measure(lambda: psf_photometry(ds, phot_cat, psf))
    gs = np.bincount(np.asarray(ph["group"]))
    iso = tgt & (np.asarray(ph["flags"]) == 0) & (gs[np.asarray(ph["group"])] == 1)
    pq = phot_quality(ph["flux"], ph["flux_err"], phot_cat, iso)
    rows.append(("tilepipe pixel (deg 2)", t_b, m_b, *q, t_p, m_p, *pq))
    psf_kl, t_k, m_k = measure(lambda: build_psf(ds, kept, model="kl"))
    rows.append(("tilepipe KL (deg 2)", t_k, m_k, *psf_quality(psf_kl.at, tp, n), np.nan, np.nan, np.nan, np.nan, 0))

    # ---- photutils: EPSFBuilder (constant ePSF) + PSFPhotometry
    try:
        from astropy.nddata import NDData
        from astropy.table import Table
        from photutils.psf import EPSFBuilder, PSFPhotometry, extract_stars

        sky = float(np.median(img))

        def build_epsf():
            data = img - np.median(img)
            t = Table({"x": np.asarray(kept["x"]), "y": np.asarray(kept["y"])})
            st = extract_stars(NDData(data), t, size=25)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                epsf, _ = EPSFBuilder(oversampling=2, maxiters=10, progress_bar=False).build_epsf(st)
            return epsf

        epsf, t_e, m_e = measure(build_epsf)
        yy, xx = np.mgrid[0:25, 0:25]

        def at_epsf(x, y):
            return epsf.evaluate(xx, yy, 1.0, 12.0, 12.0)

        qe = psf_quality(at_epsf, tp, n)

        def phot_pu():
            init = Table({"x": np.asarray(phot_cat["x"]), "y": np.asarray(phot_cat["y"]),
                          "flux": np.asarray(phot_cat["flux"])})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = PSFPhotometry(epsf, fit_shape=(13, 13), aperture_radius=6)
                return p(img - sky, error=np.sqrt(var), init_params=init)

        pt, t_pp, m_pp = measure(phot_pu)
        names = pt.colnames
        fcol = "flux_fit" if "flux_fit" in names else "flux"
        ecol = "flux_err" if "flux_err" in names else ("flux_fit_err" if "flux_fit_err" in names else None)
        pqe = phot_quality(pt[fcol], pt[ecol] if ecol else np.full(len(pt), np.nan), phot_cat, iso)
        rows.append(("photutils EPSFBuilder (constant)", t_e, m_e, *qe, t_pp, m_pp, *pqe))
    except ImportError as exc:  # pragma: no cover - peer missing
        print(f"photutils unavailable: {exc}")

    # ---- properimage: KL variable PSF (Lauer 2002)
    try:
        from properimage.single_image import SingleImage

        def build_pi():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                si = SingleImage(img.copy(), stamp_shape=(25, 25), gain=2.0)
                a_fields, basis = si.get_variable_psf(inf_loss=0.15)
            return a_fields, basis

        (a_fields, basis), t_pi, m_pi = measure(build_pi)

        def at_pi(x, y, transpose=False):
            if a_fields[0] is None:
                m = np.asarray(basis[0], float)
            else:
                m = sum(float(a(x, y)) * np.asarray(b, float) for a, b in zip(a_fields, basis))
            m = m.T if transpose else m
            if m.shape != (25, 25):  # centre-crop or pad to 25x25
                out = np.zeros((25, 25))
                h = min(25, m.shape[0])
                o = (m.shape[0] - h) // 2
                p = (25 - h) // 2
                out[p:p + h, p:p + h] = m[o:o + h, o:o + h]
                m = out
            return m

        qa = psf_quality(at_pi, tp, n)
        qb = psf_quality(lambda x, y: at_pi(y, x, transpose=True), tp, n)
        qp = qa if qa[0] <= qb[0] else qb  # properimage's (x, y) orientation: take the better one
        rows.append((f"properimage KL ({len(basis)} comps)", t_pi, m_pi, *qp, np.nan, np.nan, np.nan, np.nan, 0))
    except ImportError as exc:  # pragma: no cover - peer missing
        print(f"properimage unavailable: {exc}")
    return rows, len(kept)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512])
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    for n in args.sizes:
        rows, nst = run(n, args.seed)
        ref = rows[0]
        print(f"\n### PSF benchmark, {n} x {n} field, {nst} selected stars (same stars for every tool)\n")
        print("| tool | build s | build MiB | Σ|Δ| mean | Σ|Δ| max | FWHM err max | phot s | phot MiB "
              "| flux bias | pull std | n iso | build time / tilepipe |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.0f} | {r[3]:.4f} | {r[4]:.4f} | {r[5]:.3f} | {r[6]:.2f} | "
                  f"{r[7]:.0f} | {r[8]:+.4f} | {r[9]:.2f} | {r[10]} | {r[1] / ref[1]:.2f} |")


if __name__ == "__main__":
    main()
