"""``tilepipe demo``: every stage on a seeded synthetic pair, with pictures.

Run on whatever Dask client is current (the CLI starts a LocalCluster).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["run_demo", "plot_images"]


def plot_images(panels: list[tuple[str, np.ndarray, dict[str, Any]]], path: str, catalog: Any = None,
                ncols: int | None = None) -> str:
    """Save a row of zscale (or fixed-range) image panels as a PNG; circle ``catalog`` on each."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from astropy.visualization import ZScaleInterval

    n = len(panels)
    ncols = ncols or n
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.2 * nrows), dpi=100, squeeze=False)
    for ax, (title, img, kw) in zip(axes.ravel(), panels):
        img = np.asarray(img, dtype=np.float32)
        if "vmin" not in kw:
            finite = img[np.isfinite(img)]
            vmin, vmax = ZScaleInterval().get_limits(finite) if finite.size else (0, 1)
            kw = dict(kw, vmin=vmin, vmax=vmax)
        ax.imshow(img, origin="lower", cmap=kw.pop("cmap", "gray"), **kw)
        if catalog is not None and len(catalog):
            ax.scatter(catalog["x"], catalog["y"], s=60, facecolors="none", edgecolors="tab:red", linewidths=0.8)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_demo(output: str = "tilepipe-demo", size: int = 1024, seed: int = 1, nx: int = 2, ny: int = 2,
             overlap: int | None = None) -> list[tuple[str, str]]:
    """Make a synthetic pair and run background, detection, PSF, photometry, ZOGY and SFFT on it.

    Returns the list of ``(path, description)`` written into ``output``.
    """
    import tilepipe as tp
    from tilepipe import datasets
    from tilepipe.pipeline import quicklook

    os.makedirs(output, exist_ok=True)
    written: list[tuple[str, str]] = []

    def out(name: str, what: str) -> str:
        path = os.path.join(output, name)
        written.append((path, what))
        return path

    def stamp(msg: str, t0: float) -> None:
        log.info("%s in %.1f s", msg, time.perf_counter() - t0)
        print(f"  {msg}: {time.perf_counter() - t0:.1f} s", flush=True)

    tiles = dict(nx=nx, ny=ny)
    t0 = time.perf_counter()
    pair = datasets.make_pair((size, size), seed=seed)
    new, ref = pair.new, pair.ref
    tp.write_fits(new, out("new.fits", "synthetic new image (FITS)"), overwrite=True)
    tp.write_fits(ref, out("ref.fits", "synthetic reference image (FITS)"), overwrite=True)
    # work from the files, as a user would: tasks read their own tiles (no arrays shipped in the graph)
    chunks = max(256, -(-size // max(nx, ny)))
    new = tp.open_image(os.path.join(output, "new.fits"), chunks=chunks)
    ref = tp.open_image(os.path.join(output, "ref.fits"), chunks=chunks)
    stamp("synthetic pair", t0)

    t0 = time.perf_counter()
    bkg = tp.estimate_background(new, **tiles, **({"overlap": overlap} if overlap is not None else {}))
    cat = tp.detect_sources(new, nsigma=5.0, background=bkg, **tiles, **({"overlap": overlap} if overlap is not None else {}))
    tp.write_table(cat, out("catalog.ecsv", f"{len(cat)} detected sources"), overwrite=True)
    quicklook(new["image"].data, out("quicklook.png", "quick-look with detections circled"), title="new image: detections", catalog=cat)
    stamp(f"background + detection ({len(cat)} sources)", t0)

    t0 = time.perf_counter()
    stars = tp.select_stars(new, cat)
    psf = tp.build_psf(new, stars[stars["keep"]] if "keep" in stars.colnames else stars, degree=2)
    psf.to_fits(out("psf.fits", "spatially varying PSF model"))
    from tilepipe.psf.plots import plot_psf

    plot_psf(psf, out("psf_grid.png", "PSF model across the field (3 x 3) and its FWHM map"), n=3)
    stamp("PSF model", t0)

    t0 = time.perf_counter()
    res = tp.subtract(new, ref, method="zogy", new_psf=psf, **tiles, **({"overlap": overlap} if overlap is not None else {}))
    cand = tp.find_transients(res, nsigma=5.0, plot=out("candidates.png", "cutouts of transient candidates"))
    tp.write_table(cand, out("candidates.ecsv", f"{len(cand)} transient candidates (ZOGY)"), overwrite=True)
    keep = [v for v in ("diff", "scorr", "fpsf", "fpsf_err", "mask") if v in res]
    tp.write_zarr(res[keep], out("zogy.zarr", "ZOGY products: diff, scorr, fpsf, fpsf_err, mask (Zarr v3)"), overwrite=True)
    tp.write_fits(res[keep], out("zogy_diff.fits", "ZOGY products as FITS extensions"), overwrite=True)
    scorr = np.asarray(res["scorr"])
    plot_images(
        [("new", np.asarray(new["image"]), {}), ("ref", np.asarray(ref["image"]), {}),
         ("ZOGY D", np.asarray(res["diff"]), {}), ("ZOGY S_corr", scorr, {"vmin": -5, "vmax": 5, "cmap": "coolwarm"})],
        out("zogy.png", "new, ref, difference and S_corr with candidates circled"), catalog=cand, ncols=4)
    stamp(f"ZOGY subtraction ({len(cand)} candidates; {len(pair.transients)} injected)", t0)

    t0 = time.perf_counter()
    sres = tp.subtract(new, ref, method="sfft", **tiles, **({"overlap": overlap} if overlap is not None else {}))
    scand = tp.find_transients(sres, nsigma=5.0)
    tp.write_table(scand, out("candidates_sfft.ecsv", f"{len(scand)} transient candidates (SFFT)"), overwrite=True)
    skeep = [v for v in ("diff", "scaled", "noise", "mask") if v in sres]
    tp.write_zarr(sres[skeep], out("sfft.zarr", "SFFT products: diff, scaled, noise, mask (Zarr v3)"), overwrite=True)
    plot_images([("SFFT diff", np.asarray(sres["diff"]), {}),
                 ("SFFT diff / noise", np.asarray(sres["scaled"]), {"vmin": -5, "vmax": 5, "cmap": "coolwarm"})],
                out("sfft.png", "SFFT difference and scaled difference"), catalog=scand, ncols=2)
    stamp(f"SFFT subtraction ({len(scand)} candidates)", t0)
    return written
