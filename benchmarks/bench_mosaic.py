"""Mosaic benchmark: speed against reproject_and_coadd, and peak memory per worker as the mosaic grows.

For each size S, a grid of 3 x 3 overlapping exposures (each 1.3·S/3 px on a
side, 1"/px, 30 % overlaps, sky levels 100 ... 180 ADU, Gaussian noise
σ = 5 ADU, S²/4000 Gaussian stars) is written as float32 FITS files to a
temporary folder (removed afterwards); then

* tilepipe: ``tp.mosaic(paths, wcs_out=<S x S TAN grid>, output=<zarr>,
  tile_size=T)`` on a LocalCluster of ``--workers`` single-threaded worker
  processes, each with ``memory_limit`` = ``--budget-mb``; the RSS of every
  worker process is sampled every 50 ms with psutil (peak per worker
  reported; flat across sizes = bounded memory).  The wall time covers opening
  the inputs, noise estimation, planning, the background-offset pass and the
  tiled combination written to Zarr on local disk.  Workers import their
  modules before the clock starts.
* peer: ``reproject.mosaicking.reproject_and_coadd`` (``reproject_interp``,
  ``match_background=True``, ``combine_function="mean"``, in-memory numpy
  output, one process, imports before the clock) in a subprocess whose peak
  RSS comes from ``resource.getrusage``.  It is skipped ("n/a (exceeds
  budget)") where its estimated peak memory (``--peer-bytes-per-px`` x S², a
  figure measured with this script: it keeps every reprojected input and
  footprint in float64 plus the float64 output) would exceed
  ``--peer-budget-mb``.

Quality: both mosaics against the noiseless truth in a window of at most
2048 x 2048 px centred on a corner where four exposures overlap (1-, 2- and
4-fold coverage): robust std of the residual on covered pixels in units of the
input noise (1.0 = one exposure's noise; overlaps average it down).

Usage::

    python benchmarks/bench_mosaic.py --sizes 2048 4096 --workers 1          # speed, 1 worker vs the peer
    python benchmarks/bench_mosaic.py --sizes 4096 8192 16384 --budget-mb 1000 # bounded memory, 2 workers
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

NOISE = 5.0
K = 3  # exposures per side
PSF_SIGMA = 1.7
HALF = 8  # star stamp half-size (px)


def _wcs(crpix, shape, c0=(150.0, 2.0)):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(c0)
    w.wcs.crpix = list(crpix)
    w.wcs.cdelt = [-1 / 3600, 1 / 3600]
    w.array_shape = shape
    return w


def _layout(size: int) -> tuple[int, float]:
    side = int(size / K * 1.3)
    return side, (size - side) / max(K - 1, 1)


def _stars(size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(size * size / 4000)
    return rng.uniform(0, size, n), rng.uniform(0, size, n), 10 ** rng.uniform(2.5, 4.5, n)


def _add_stars(img: np.ndarray, x0: float, y0: float, stars: tuple[np.ndarray, ...]) -> None:
    """Add Gaussian stars (global positions) to ``img`` whose pixel [0, 0] sits at global (x0, y0)."""
    sx, sy, sf = stars
    h, w = img.shape
    sel = (sx >= x0 - HALF - 1) & (sx < x0 + w + HALF + 1) & (sy >= y0 - HALF - 1) & (sy < y0 + h + HALF + 1)
    yy, xx = np.mgrid[-HALF : HALF + 1, -HALF : HALF + 1]
    norm = 1.0 / (2 * np.pi * PSF_SIGMA**2)
    for x, y, f in zip(sx[sel] - x0, sy[sel] - y0, sf[sel]):
        ix, iy = int(round(x)), int(round(y))
        a0, b0 = max(0, iy - HALF), max(0, ix - HALF)
        a1, b1 = min(h, iy + HALF + 1), min(w, ix + HALF + 1)
        if a1 <= a0 or b1 <= b0:
            continue
        g = f * norm * np.exp(-0.5 * ((xx + ix - x) ** 2 + (yy + iy - y) ** 2) / PSF_SIGMA**2)
        oy, ox = iy - HALF, ix - HALF
        img[a0:a1, b0:b1] += g[a0 - oy : a1 - oy, b0 - ox : b1 - ox].astype(img.dtype)


def make_inputs(size: int, folder: str, seed: int = 0) -> tuple[list[str], dict]:
    """K x K exposures tiling a size x size sky with 30 % overlap; returns paths and the truth recipe."""
    from astropy.io import fits

    rng = np.random.default_rng(seed + 1)
    side, step = _layout(size)
    stars = _stars(size, seed)
    paths = []
    for iy in range(K):
        for ix in range(K):
            x0, y0 = int(round(ix * step)), int(round(iy * step))
            shape = (side, side)
            w = _wcs([size / 2 + 0.5 - x0, size / 2 + 0.5 - y0], shape)
            img = rng.standard_normal(shape, dtype=np.float32)
            img *= np.float32(NOISE)
            img += np.float32(100.0 + 10.0 * (iy * K + ix))
            _add_stars(img, x0, y0, stars)
            p = os.path.join(folder, f"exp_{iy}_{ix}.fits")
            fits.PrimaryHDU(img, header=w.to_header()).writeto(p, overwrite=True)
            del img
            paths.append(p)
    return paths, {"size": size, "stars": stars}


def window(size: int) -> tuple[slice, slice]:
    """The evaluation window: at most 2048 x 2048 px centred on the corner where exposures (0, 0), (0, 1),
    (1, 0) and (1, 1) overlap, so that it holds 1-, 2- and 4-fold coverage at every size."""
    side, step = _layout(size)
    n = min(size, 2048)
    a = min(max(int(round((step + side) / 2)) - n // 2, 0), size - n)
    return slice(a, a + n), slice(a, a + n)


def truth_window(recipe: dict, win: tuple[slice, slice]) -> np.ndarray:
    img = np.zeros((win[0].stop - win[0].start, win[1].stop - win[1].start), np.float32)
    _add_stars(img, win[1].start, win[0].start, recipe["stars"])
    return img


def quality(img: np.ndarray, truth: np.ndarray, covered: np.ndarray) -> float:
    r = (img - truth)[covered & np.isfinite(img)].astype(np.float64)
    r = r - np.median(r)  # the absolute level is a gauge choice
    return float(1.4826 * np.median(np.abs(r)) / NOISE)


def _warm() -> None:
    import reproject.mosaicking  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import zarr  # noqa: F401

    import tilepipe.io  # noqa: F401
    import tilepipe.mosaic  # noqa: F401


def run_tilepipe(paths: list[str], size: int, out: str, budget_mb: int, tile: int, workers: int) -> dict:
    import psutil
    from distributed import Client, LocalCluster

    import tilepipe as tp

    import dask
    from tilepipe.cluster import WORKER_ENVIRON

    dask.config.set(WORKER_ENVIRON)  # the worker environment tilepipe's CLI uses
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=f"{budget_mb}MB",
                           dashboard_address=":0")
    client = Client(cluster)
    try:
        client.run(_warm)
        pids = sorted(client.run(os.getpid).values())
        procs = {p: psutil.Process(p) for p in pids}
        base = {p: procs[p].memory_info().rss for p in pids}
        peaks = dict(base)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for p in pids:
                    try:
                        peaks[p] = max(peaks[p], procs[p].memory_info().rss)
                    except psutil.Error:
                        pass
                time.sleep(0.05)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        w = _wcs([size / 2 + 0.5, size / 2 + 0.5], (size, size))
        m = tp.mosaic(paths, wcs_out=w, output=out, tile_size=tile)
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
        alive = len(client.scheduler_info()["workers"])
    finally:
        client.close()
        cluster.close()
    return {"wall": wall, "peaks_mb": [peaks[p] / 2**20 for p in pids], "base_mb": [base[p] / 2**20 for p in pids],
            "out": m, "workers_alive": alive}


_PEER = r"""
import json, resource, sys, time
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from reproject import reproject_interp
from reproject.mosaicking import reproject_and_coadd
paths, size, outp, win = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
w = WCS(naxis=2); w.wcs.ctype = ["RA---TAN", "DEC--TAN"]; w.wcs.crval = [150.0, 2.0]
w.wcs.crpix = [size / 2 + 0.5, size / 2 + 0.5]; w.wcs.cdelt = [-1 / 3600, 1 / 3600]
t0 = time.perf_counter()
hdus = [fits.open(p)[0] for p in paths]
arr, fp = reproject_and_coadd(hdus, w, shape_out=(size, size), reproject_function=reproject_interp,
                              match_background=True, combine_function="mean")
wall = time.perf_counter() - t0
sl = (slice(win[0], win[1]), slice(win[0], win[1]))
np.save(outp, np.where(fp[sl] > 0, arr[sl], np.nan).astype(np.float32))
print(json.dumps({"wall": wall, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_peer(paths: list[str], size: int, outp: str, win: tuple[slice, slice]) -> dict:
    res = subprocess.run([sys.executable, "-c", _PEER, json.dumps(paths), str(size), outp,
                          json.dumps([win[0].start, win[0].stop])], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"reproject_and_coadd failed (rc {res.returncode}):\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048], help="mosaic side(s) in pixels")
    ap.add_argument("--workers", type=int, default=2, help="tilepipe worker processes (1 thread each)")
    ap.add_argument("--budget-mb", type=int, default=1000, help="memory_limit per tilepipe worker (MB)")
    ap.add_argument("--tile", type=int, default=1024, help="output tile (Zarr chunk) side")
    ap.add_argument("--peer-budget-mb", type=int, default=2000,
                    help="skip reproject_and_coadd where its estimated peak memory exceeds this (MB)")
    ap.add_argument("--peer-bytes-per-px", type=float, default=56.0,
                    help="reproject_and_coadd peak memory per output pixel (bytes; measured with this script)")
    ap.add_argument("--no-peer", action="store_true", help="skip reproject_and_coadd")
    ap.add_argument("--tmp", default=None, help="folder for the temporary inputs and outputs (default: system temp)")
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        side, _ = _layout(size)
        need = K * K * side * side * 4 + size * size * 11
        free = shutil.disk_usage(args.tmp or tempfile.gettempdir()).free
        if need > 0.8 * free:
            raise SystemExit(f"size {size} needs ~{need / 2**30:.1f} GiB of temporary disk; "
                             f"only {free / 2**30:.1f} GiB free")
        with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench_mosaic_") as tmp:
            t0 = time.perf_counter()
            paths, recipe = make_inputs(size, tmp)
            t_make = time.perf_counter() - t0
            win = window(size)
            truth = truth_window(recipe, win)
            tpr = run_tilepipe(paths, size, os.path.join(tmp, "m.zarr"), args.budget_mb, args.tile, args.workers)
            img = tpr["out"]["image"][win].values
            cov = tpr["out"]["coverage"][win].values > 0
            row = {"size": size, "out_mb": size * size * (4 + 4 + 1 + 2) / 2**20,
                   "in_mb": K * K * side * side * 4 / 2**20, "tp": tpr, "q_tp": quality(img, truth, cov),
                   "t_make": t_make}
            est = args.peer_bytes_per_px * size * size / 2**20
            if args.no_peer:
                row["peer"] = "skipped"
            elif est > args.peer_budget_mb:
                row["peer"] = "n/a (exceeds budget)"
            else:
                pp = os.path.join(tmp, "peer.npy")
                peer = run_peer(paths, size, pp, win)
                pimg = np.load(pp)
                row["peer"] = peer
                row["q_peer"] = quality(pimg, truth, np.isfinite(pimg) & cov)
            rows.append(row)
            print(f"size {size}: inputs written in {t_make:.0f} s, tilepipe {tpr['wall']:.1f} s, peer "
                  f"{row['peer']['wall'] if isinstance(row['peer'], dict) else row['peer']}", file=sys.stderr,
                  flush=True)
    print(f"\n{args.workers} tilepipe worker process(es) x 1 thread, memory_limit {args.budget_mb} MB each, "
          f"tile {args.tile} px; peer skipped above {args.peer_budget_mb} MB estimated "
          f"({args.peer_bytes_per_px:.0f} B/px); {K}x{K} float32 FITS inputs\n")
    print("| mosaic (px) | inputs (MB) | output (MB) | tilepipe wall (s) | tilepipe peak RSS per worker (MB) "
          "| worker idle RSS (MB) | reproject_and_coadd wall (s) | peer peak RSS (MB) | wall ratio tp/peer "
          "| residual std/σ tilepipe | residual std/σ peer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tp = r["tp"]
        peaks = " / ".join(f"{v:.0f}" for v in tp["peaks_mb"])
        base = " / ".join(f"{v:.0f}" for v in tp["base_mb"])
        if isinstance(r["peer"], dict):
            pw, pm = f"{r['peer']['wall']:.1f}", f"{r['peer']['peak_mb']:.0f}"
            ratio, qp = f"{tp['wall'] / r['peer']['wall']:.2f}", f"{r['q_peer']:.3f}"
        else:
            pw = pm = ratio = qp = r["peer"]
        print(f"| {r['size']}² | {r['in_mb']:.0f} | {r['out_mb']:.0f} | {tp['wall']:.1f} | {peaks} | {base} | {pw} "
              f"| {pm} | {ratio} | {r['q_tp']:.3f} | {qp} |")
    if any(r["tp"]["workers_alive"] < args.workers for r in rows):
        print("\nWARNING: a tilepipe worker died during a run (memory limit?)")


if __name__ == "__main__":
    main()
