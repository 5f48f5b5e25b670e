"""Mosaic benchmark: peak memory per worker stays bounded while the mosaic grows past a memory budget.

For each size S, a grid of k x k overlapping exposures (each S/k·1.3 px on a
side, 1"/px, different sky offsets) is written as FITS files; then

* tilepipe: ``tp.mosaic(paths, output=<zarr>, tile_size=T)`` on a LocalCluster
  of 2 single-threaded worker processes, each with ``memory_limit`` = the
  budget; the peak RSS of every worker is sampled with psutil;
* peer: ``reproject.mosaicking.reproject_and_coadd`` (``reproject_interp``,
  ``match_background=True``, in-memory numpy output) in a subprocess whose
  peak RSS is read from ``resource.getrusage``.

Quality: both mosaics against the noiseless truth (robust std of the residual
on covered pixels, in units of the input noise).

Usage::

    python benchmarks/bench_mosaic.py --sizes 2048 --budget-mb 400
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

NOISE = 5.0


def _wcs(crpix, shape, c0=(150.0, 2.0)):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(c0)
    w.wcs.crpix = list(crpix)
    w.wcs.cdelt = [-1 / 3600, 1 / 3600]
    w.array_shape = shape
    return w


def make_inputs(size: int, folder: str, k: int = 3, seed: int = 0) -> tuple[list[str], dict]:
    """k x k exposures tiling a size x size sky with 30 % overlap; returns paths and the truth recipe."""
    from astropy.io import fits

    rng = np.random.default_rng(seed)
    side = int(size / k * 1.3)
    step = (size - side) / max(k - 1, 1)
    paths = []
    n = int(size * size / 4000)
    sx, sy = rng.uniform(0, size, n), rng.uniform(0, size, n)
    sf = 10 ** rng.uniform(2.5, 4.5, n)
    for iy in range(k):
        for ix in range(k):
            x0, y0 = int(round(ix * step)), int(round(iy * step))
            shape = (side, side)
            w = _wcs([size / 2 + 0.5 - x0, size / 2 + 0.5 - y0], shape)
            img = np.full(shape, 100.0 + 10.0 * (iy * k + ix)) + rng.normal(0, NOISE, shape)
            sel = (sx >= x0 - 10) & (sx < x0 + side + 10) & (sy >= y0 - 10) & (sy < y0 + side + 10)
            yy, xx = np.mgrid[-8:9, -8:9]
            for x, y, f in zip(sx[sel] - x0, sy[sel] - y0, sf[sel]):
                ix_, iy_ = int(round(x)), int(round(y))
                g = f * np.exp(-0.5 * ((xx + ix_ - x) ** 2 + (yy + iy_ - y) ** 2) / 1.7**2) / (2 * np.pi * 1.7**2)
                ys0, xs0 = iy_ - 8, ix_ - 8
                a0, b0 = max(0, ys0), max(0, xs0)
                a1, b1 = min(side, ys0 + 17), min(side, xs0 + 17)
                if a1 > a0 and b1 > b0:
                    img[a0:a1, b0:b1] += g[a0 - ys0 : a1 - ys0, b0 - xs0 : b1 - xs0]
            p = os.path.join(folder, f"exp_{iy}_{ix}.fits")
            fits.PrimaryHDU(img.astype(np.float32), header=w.to_header()).writeto(p, overwrite=True)
            paths.append(p)
    return paths, {"size": size, "stars": (sx, sy, sf)}


def truth_image(recipe: dict) -> np.ndarray:
    size = recipe["size"]
    img = np.zeros((size, size), np.float32)
    sx, sy, sf = recipe["stars"]
    yy, xx = np.mgrid[-8:9, -8:9]
    for x, y, f in zip(sx, sy, sf):
        ix, iy = int(round(x)), int(round(y))
        g = f * np.exp(-0.5 * ((xx + ix - x) ** 2 + (yy + iy - y) ** 2) / 1.7**2) / (2 * np.pi * 1.7**2)
        a0, b0 = max(0, iy - 8), max(0, ix - 8)
        a1, b1 = min(size, iy + 9), min(size, ix + 9)
        if a1 > a0 and b1 > b0:
            img[a0:a1, b0:b1] += g[a0 - (iy - 8) : a1 - (iy - 8), b0 - (ix - 8) : b1 - (ix - 8)]
    return img


def quality(img: np.ndarray, truth: np.ndarray, covered: np.ndarray) -> float:
    r = (img - truth)[covered & np.isfinite(img)]
    r = r - np.median(r)  # the absolute level is a gauge choice
    return float(1.4826 * np.median(np.abs(r)) / NOISE)


def run_tilepipe(paths: list[str], size: int, out: str, budget_mb: int, tile: int) -> dict:
    import psutil
    from distributed import Client, LocalCluster

    import tilepipe as tp

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=f"{budget_mb}MB",
                           dashboard_address=":0")
    client = Client(cluster)
    pids = [p for p in client.run(os.getpid).values()]
    peaks = {p: 0 for p in pids}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for p in pids:
                try:
                    peaks[p] = max(peaks[p], psutil.Process(p).memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    base = {p: psutil.Process(p).memory_info().rss for p in pids}
    th.start()
    t0 = time.perf_counter()
    from astropy.wcs import WCS

    w = _wcs([size / 2 + 0.5, size / 2 + 0.5], (size, size))
    assert isinstance(w, WCS)
    m = tp.mosaic(paths, wcs_out=w, output=out, tile_size=tile, chunks=512)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    client.close()
    cluster.close()
    return {"wall": wall, "peak_mb": max(peaks.values()) / 2**20, "base_mb": max(base.values()) / 2**20, "out": m}


_PEER = r"""
import json, resource, sys, time
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from reproject import reproject_interp
from reproject.mosaicking import reproject_and_coadd
paths, size, outp = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
w = WCS(naxis=2); w.wcs.ctype = ["RA---TAN", "DEC--TAN"]; w.wcs.crval = [150.0, 2.0]
w.wcs.crpix = [size / 2 + 0.5, size / 2 + 0.5]; w.wcs.cdelt = [-1 / 3600, 1 / 3600]
t0 = time.perf_counter()
hdus = [fits.open(p)[0] for p in paths]
arr, fp = reproject_and_coadd(hdus, w, shape_out=(size, size), reproject_function=reproject_interp,
                              match_background=True, combine_function="mean")
wall = time.perf_counter() - t0
np.save(outp, np.where(fp > 0, arr, np.nan).astype(np.float32))
print(json.dumps({"wall": wall, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_peer(paths: list[str], size: int, outp: str) -> dict:
    res = subprocess.run([sys.executable, "-c", _PEER, json.dumps(paths), str(size), outp], capture_output=True,
                         text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048], help="mosaic side(s) in pixels")
    ap.add_argument("--budget-mb", type=int, default=400, help="memory_limit per tilepipe worker (MB)")
    ap.add_argument("--tile", type=int, default=512, help="output tile (Zarr chunk) side")
    ap.add_argument("--no-peer", action="store_true", help="skip reproject_and_coadd")
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            paths, recipe = make_inputs(size, tmp)
            truth = truth_image(recipe)
            out_mb = size * size * (4 + 4 + 1 + 2) / 2**20
            tpr = run_tilepipe(paths, size, os.path.join(tmp, "m.zarr"), args.budget_mb, args.tile)
            img = tpr["out"]["image"].values
            cov = tpr["out"]["coverage"].values > 0
            q_tp = quality(img, truth, cov)
            row = {"size": size, "out_mb": out_mb, "tp_wall": tpr["wall"], "tp_peak": tpr["peak_mb"],
                   "tp_base": tpr["base_mb"], "q_tp": q_tp}
            if not args.no_peer:
                peer = run_peer(paths, size, os.path.join(tmp, "peer.npy"))
                pimg = np.load(os.path.join(tmp, "peer.npy"))
                row.update(peer_wall=peer["wall"], peer_peak=peer["peak_mb"],
                           q_peer=quality(pimg, truth, np.isfinite(pimg) & cov))
            rows.append(row)
    print(f"\nmemory budget per tilepipe worker: {args.budget_mb} MB, tile {args.tile} px, 2 workers x 1 thread\n")
    print("| mosaic (px) | output (MB) | tilepipe wall (s) | tilepipe peak RSS/worker (MB) | reproject_and_coadd wall (s) "
          "| peer peak RSS (MB) | wall ratio tp/peer | residual std/σ tilepipe | residual std/σ peer |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pw = r.get("peer_wall", float("nan"))
        print(f"| {r['size']}² | {r['out_mb']:.0f} | {r['tp_wall']:.1f} | {r['tp_peak']:.0f} (idle {r['tp_base']:.0f}) | "
              f"{pw:.1f} | {r.get('peer_peak', float('nan')):.0f} | {r['tp_wall'] / pw:.2f} | {r['q_tp']:.3f} | "
              f"{r.get('q_peer', float('nan')):.3f} |")


if __name__ == "__main__":
    main()
