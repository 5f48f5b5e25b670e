"""Benchmark: SFFT on a large pair (default 8192²) read from FITS on a LocalCluster — memory per worker.

The issue's scaling claim: the normal-equation sums are computed tile by
tile, so memory per task grows with the tile, not with the image, and an
8k x 8k pair runs in a few GB.  This script

1. makes the pair once (``tilepipe.datasets.make_pair``, seeded, in a separate
   process whose memory is not counted) and writes ``new.fits`` / ``ref.fits``
   (with ``GAIN``) and ``truth.json`` under ``--workdir``;
2. starts a ``LocalCluster`` of ``--workers`` single-threaded worker processes
   (``tilepipe.cluster.WORKER_ENVIRON``), opens both files lazily in 1024²
   chunks, runs ``tilepipe.subtract(method="sfft", nx=ny=--tiles)`` and writes
   every output to a Zarr store on disk (nothing image-sized is gathered to the
   client), timing the whole;
3. reports the wall time, the peak resident memory (``VmHWM``) of each worker
   and of the client, and the quality against the truth: the fitted flux ratio
   and the robust std of ``scaled`` on a strided sample of unmasked pixels.

Usage::

    python benchmarks/bench_sfft_large.py --size 8192 --tiles 8 --workers 2

No peer runs here: the sfft package needs more than 22 GB at 2048² and
stdpipe's run_sfft ~5.5 GB at 4096² (see ``bench_sfft.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from _runs import peak_rss_mb  # benchmarks/_runs.py (this script's folder is on sys.path)

MAKE = """
import json, sys
import numpy as np
from astropy.io import fits
from tilepipe.datasets import make_pair
size, d = int(sys.argv[1]), sys.argv[2]
p = make_pair((size, size), seed=11, n_transients=40)
for name, ds in (("new", p.new), ("ref", p.ref)):
    hdr = fits.Header()
    hdr["GAIN"] = float(ds.attrs["gain"])
    fits.writeto(f"{d}/{name}.fits", ds["image"].values.astype(np.float32), hdr, overwrite=True)
json.dump({"flux_scale": float(p.new.attrs["truth_flux_scale"])}, open(f"{d}/truth.json", "w"))
"""


def _import() -> None:
    import scipy.fft  # noqa: F401
    import scipy.ndimage  # noqa: F401

    import tilepipe.subtract.sfft  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--tiles", type=int, default=8, help="tiles along each axis")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--half-width", type=int, default=3)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tilepipe-bench-sfft-large"))
    args = ap.parse_args()

    d = os.path.join(args.workdir, f"pair{args.size}")
    if not os.path.exists(os.path.join(d, "truth.json")):
        os.makedirs(d, exist_ok=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", MAKE, str(args.size), d], check=True)
        print(f"made the {args.size}² pair in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    truth = json.load(open(os.path.join(d, "truth.json")))

    import dask
    from distributed import Client, LocalCluster

    import tilepipe as tp
    from tilepipe.cluster import WORKER_ENVIRON

    dask.config.set(WORKER_ENVIRON)
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           memory_limit=None, silence_logs=50)
    client = Client(cluster)
    out = os.path.join(d, "sfft.zarr")
    try:
        client.run(_import)
        _import()
        load0 = "/".join(f"{v:.1f}" for v in os.getloadavg())
        t0 = time.perf_counter()
        new = tp.open_image(os.path.join(d, "new.fits"), chunks=1024)
        ref = tp.open_image(os.path.join(d, "ref.fits"), chunks=1024)
        res = tp.subtract(new, ref, method="sfft", kernel_half_width=args.half_width, nx=args.tiles, ny=args.tiles)
        t_fit = time.perf_counter() - t0
        tp.write_zarr(res, out, overwrite=True)
        wall = time.perf_counter() - t0
        wmem = client.run(peak_rss_mb)
    finally:
        client.close()
        cluster.close()
    import zarr

    g = zarr.open_group(out, mode="r")
    step = max(1, args.size // 1024)
    scaled = np.asarray(g["scaled"][::step, ::step], dtype=np.float64)
    bad = np.asarray(g["mask"][::step, ::step], dtype=bool)
    v = scaled[~bad & np.isfinite(scaled)]
    rstd = float(1.4826 * np.median(np.abs(v - np.median(v))))
    ratio = float(res.attrs["flux_ratio"]) / truth["flux_scale"] - 1
    print(f"\n{args.size}² pair, {args.tiles}x{args.tiles} tiles, {args.workers} worker(s) x 1 thread, "
          f"kernel {2 * args.half_width + 1}x{2 * args.half_width + 1}; load at start {load0}\n")
    print("| size | tiles | workers | wall (s) | fit (s) | peak MB per worker | client peak MB | flux-ratio error "
          "| robust std(scaled) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.size} | {args.tiles}x{args.tiles} | {args.workers} | {wall:.1f} | {t_fit:.1f} | "
          f"{' / '.join(f'{m:.0f}' for m in wmem.values())} | {peak_rss_mb():.0f} | {100 * ratio:+.2f} % | {rstd:.3f} |")


if __name__ == "__main__":
    main()
