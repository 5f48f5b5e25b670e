"""Benchmark: tiled background + detection (tilepipe) vs sep and photutils on the whole image.

Usage::

    /work/benchvenv/bin/python benchmarks/bench_detect.py --sizes 2048 4096 [--workers 1 2]

For each size a seeded synthetic field (``tilepipe.datasets.make_field``) is
written to a FITS file; every method then runs **once** in its own fresh
Python process on that same file, so wall time and peak memory are not
polluted by the other runs:

* ``sep``: ``sep.Background(bw=64, bh=64, fw=3, fh=3)`` + ``sep.extract(data -
  bkg, 1.5, err=rms, filter_type="conv")`` (SExtractor threshold semantics, the
  same as tilepipe's default) on the whole image held in memory;
* ``photutils``: ``Background2D((64, 64), filter_size=(3, 3))`` + 3x3 kernel
  convolution + ``SourceFinder(n_pixels=5)`` at ``1.5 * background_rms`` +
  ``SourceCatalog`` centroids;
* ``tilepipe``: ``detect_sources(open_image(path, chunks=T), nsigma=1.5,
  nx=ny=size/T)``, tiles of ``T = --tile`` pixels (default 1024), the mesh
  background via ``estimate_background`` inside, on a
  ``LocalCluster`` of 1 or 2 worker processes (1 thread each), the FITS file
  read lazily by the workers; ``--workers 0`` adds a run in one process with
  dask's synchronous scheduler (the compute cost without the cluster).  Each
  tile task reads its own window from the file (``--halo read``, the default);
  ``--halo exchange`` adds runs where tasks assemble their windows from the
  neighbouring chunks instead (the path for in-memory arrays).

Imports are outside every clock (``sep``/``photutils`` are imported before
their clocks start; the tilepipe workers import ``tilepipe.detect``, ``sep``,
``scipy.ndimage`` before theirs); cluster start-up is excluded too.

``--repeat N`` runs every method N times per size (each run in a fresh
process, the methods interleaved so that a slow spell of the shared machine
hits all of them) and reports the median wall time with its range: on a
shared VM one run of sep at 2k varies by up to 2x between runs.

``--warm`` times a second image (a copy of the first under another name) in
each process, and for tilepipe on the same workers, after an untimed run on
the first: the cost per image of a night once the processes have run, without
their first-use costs (on this project's VM a fresh process's first touch of
new memory is slow: ``bench_breakdown.py --first-touch``).

Peak memory is the peak resident set size (``VmHWM``) of the process
doing the work; for tilepipe it is reported for the client process and for the
largest worker.  Completeness = fraction of true stars with S/N > 10 matched
within 1.5 px; "spurious" = detections farther than 3 px from any true star.
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

from _runs import peak_rss_mb, summarize  # benchmarks/_runs.py (this script's folder is on sys.path)


def _quality(x, y, truth_path):
    from astropy.table import Table
    from scipy.spatial import cKDTree

    stars = Table.read(truth_path)
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.size == 0:
        return 0.0, 0.0
    d, _ = cKDTree(np.c_[x, y]).query(np.c_[stars["x"], stars["y"]])
    bright = np.asarray(stars["snr"]) > 10
    comp = float(np.mean(d[bright] < 1.5))
    d2, _ = cKDTree(np.c_[stars["x"], stars["y"]]).query(np.c_[x, y])
    return comp, float(np.mean(d2 > 3.0))


def _warm_copy(path):
    """A copy of ``path`` under another name: ``--warm`` measures a second image, not a cached first one."""
    import shutil

    root, ext = os.path.splitext(path)
    other = f"{root}-second{ext}"
    if not os.path.exists(other):
        shutil.copyfile(path, other)
    return other


def run_sep(path, truth, warm=False):
    import sep
    from astropy.io import fits

    if warm:  # --warm: the same work on a first image, untimed, then the timed run on a second one
        run_sep(path, truth)
        path = _warm_copy(path)
    t0 = time.perf_counter()
    data = np.ascontiguousarray(fits.getdata(path), dtype=np.float32)
    bkg = sep.Background(data, bw=64, bh=64, fw=3, fh=3)
    sub = data - bkg.back()
    sep.set_extract_pixstack(max(300_000, data.size // 8))
    sep.set_sub_object_limit(4096)
    objs = sep.extract(sub, 1.5, err=bkg.rms(), filter_type="conv")
    wall = time.perf_counter() - t0
    comp, spur = _quality(objs["x"], objs["y"], truth)
    return {"wall": wall, "n": int(len(objs)), "completeness": comp, "spurious": spur, "mem": peak_rss_mb()}


def run_photutils(path, truth, warm=False):
    from astropy.convolution import convolve
    from astropy.io import fits
    from photutils.background import Background2D
    from photutils.segmentation import SourceCatalog, SourceFinder

    if warm:
        run_photutils(path, truth)
        path = _warm_copy(path)
    t0 = time.perf_counter()
    data = fits.getdata(path).astype(np.float32)
    bkg = Background2D(data, (64, 64), filter_size=(3, 3))
    sub = data - bkg.background
    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=float) / 16.0
    conv = convolve(sub, kernel)
    segm = SourceFinder(n_pixels=5, progress_bar=False)(conv, 1.5 * bkg.background_rms)
    if segm is None:
        x = y = np.zeros(0)
    else:
        cat = SourceCatalog(sub, segm, convolved_data=conv)
        x, y = cat.x_centroid, cat.y_centroid
    wall = time.perf_counter() - t0
    comp, spur = _quality(x, y, truth)
    return {"wall": wall, "n": int(len(x)), "completeness": comp, "spurious": spur, "mem": peak_rss_mb()}


def _import_modules():
    """Import what a detection task needs (the peers' imports are outside their clocks too)."""
    import distributed  # noqa: F401  (dask imports it at the first compute, to look for a client: ~0.5 s)
    import scipy.ndimage  # noqa: F401
    import sep  # noqa: F401

    import tilepipe.background  # noqa: F401
    import tilepipe.detect  # noqa: F401
    import tilepipe.io.fits  # noqa: F401


def run_tilepipe(path, truth, workers, size, tile, warm=False):
    import dask

    import tilepipe as tp

    _import_modules()
    if os.environ.get("TILEPIPE_BENCH_HALO") == "exchange":  # --halo exchange: the chunk-exchange path
        import tilepipe.detect

        tilepipe.detect._USE_REGIONS.set(False)
    nt = max(1, size // tile)

    def detect(p):
        return tp.detect_sources(tp.open_image(p, chunks=tile), nsigma=1.5, nx=nt, ny=nt)

    def timed():  # (wall, catalog); with --warm an untimed first image, then the timed second one
        p = path
        if warm:
            detect(p)
            p = _warm_copy(p)
        t0 = time.perf_counter()
        cat = detect(p)
        return time.perf_counter() - t0, cat

    if workers == 0:  # one process, dask's synchronous scheduler: the pure compute cost, no cluster
        with dask.config.set(scheduler="synchronous"):
            wall, cat = timed()
        comp, spur = _quality(cat["x"], cat["y"], truth)
        return {"wall": wall, "n": int(len(cat)), "completeness": comp, "spurious": spur, "mem": peak_rss_mb(),
                "tiles": f"{nt}x{nt}", "regrown": len(cat.meta["regrown_tiles"])}

    from distributed import Client, LocalCluster

    import tilepipe.cluster

    if not os.environ.get("TILEPIPE_BENCH_DASK_DEFAULT_ENV"):
        dask.config.set(tilepipe.cluster.WORKER_ENVIRON)  # the worker environment tilepipe's CLI uses
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    try:
        client.run(_import_modules)  # workers up, modules imported, before the clock starts
        wall, cat = timed()
        wmem = max(client.run(peak_rss_mb).values())
    finally:
        client.close()
        cluster.close()
    comp, spur = _quality(cat["x"], cat["y"], truth)
    return {"wall": wall, "n": int(len(cat)), "completeness": comp, "spurious": spur, "mem": peak_rss_mb(),
            "worker_mem": wmem, "tiles": f"{nt}x{nt}", "regrown": len(cat.meta["regrown_tiles"])}


def child(args):
    if args.method == "sep":
        res = run_sep(args.input, args.truth, args.warm)
    elif args.method == "photutils":
        res = run_photutils(args.input, args.truth, args.warm)
    else:
        res = run_tilepipe(args.input, args.truth, args.workers, args.size, args.tile, args.warm)
    print("RESULT " + json.dumps(res))


def spawn(method, path, truth, size, tile, workers=1, timeout=600, halo="read", warm=False):
    cmd = [sys.executable, __file__, "--child", method, "--input", path, "--truth", truth, "--size", str(size),
           "--tile", str(tile), "--workers", str(workers)] + (["--warm"] if warm else [])
    env = dict(os.environ, TILEPIPE_BENCH_HALO=halo)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{method} failed:\n{p.stderr[-3000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                    help="LocalCluster worker counts; 0 = synchronous scheduler in one process")
    ap.add_argument("--peers", nargs="+", default=["sep", "photutils"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per method and size, each in a fresh process, interleaved across methods; the "
                         "table gives the median wall time (range in brackets) and the largest peak memory")
    ap.add_argument("--halo", nargs="+", default=["read"], choices=["read", "exchange"],
                    help="how tilepipe's tile tasks get their halos from a file: 'read' (default: each task "
                         "reads its own window) and/or 'exchange' (tasks take the neighbouring chunks)")
    ap.add_argument("--tile", type=int, default=1024,
                    help="tilepipe's tile size in pixels (nx = ny = size / tile; 2048 at 2k = one tile, "
                         "detect_sources' default nx=1)")
    ap.add_argument("--dask-default-env", action="store_true",
                    help="start workers with distributed's default environment (MALLOC_TRIM_THRESHOLD_=65536) "
                         "instead of tilepipe.cluster.WORKER_ENVIRON, to measure what that setting costs")
    ap.add_argument("--warm", action="store_true",
                    help="time a second image in each process (and on the same workers) after an untimed "
                         "first one: what a night of images costs per image once the processes have run, "
                         "without their first-use costs (fresh memory pages, first calls)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--input", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--truth", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.child and any(s % args.tile for s in args.sizes):
        ap.error(f"--tile {args.tile} must divide every size in --sizes {args.sizes} (nx = size / tile)")
    if args.dask_default_env:
        os.environ["TILEPIPE_BENCH_DASK_DEFAULT_ENV"] = "1"  # read by the child processes
    if args.child:
        args.method = args.child
        args.workers = args.workers[0]
        return child(args)

    from astropy.io import fits

    from tilepipe.datasets import make_field

    rows = []
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            f = make_field((size, size), seed=args.seed)
            path = os.path.join(tmp, f"field{size}.fits")
            truth = os.path.join(tmp, f"stars{size}.ecsv")
            fits.writeto(path, np.asarray(f.image["image"].values, dtype=np.float32), overwrite=True)
            f.stars.write(truth, overwrite=True)
            del f
            jobs = [(p, p, 1, "read") for p in args.peers]
            for halo in args.halo:
                for w in args.workers:
                    name = (f"tilepipe-{w}w" if w else "tilepipe-sync") + ("" if halo == "read" else f"-{halo}")
                    jobs.append((name, "tilepipe", w, halo))
            runs: dict[str, list[dict]] = {name: [] for name, *_ in jobs}
            for _ in range(args.repeat):  # interleaved: a slow spell of the machine hits every method alike
                for name, method, w, halo in jobs:
                    runs[name].append(spawn(method, path, truth, size, args.tile, workers=w, halo=halo,
                                            warm=args.warm))
            res = {name: summarize(rs, ("mem", "worker_mem")) for name, rs in runs.items()}
            ref = res.get("sep")
            for name, r in res.items():
                rows.append((size, name, r, ref))
            os.remove(path)
            if os.path.exists(path.replace(".fits", "-second.fits")):
                os.remove(path.replace(".fits", "-second.fits"))
    print()
    print(f"1-min load average: {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
          f"({os.cpu_count()} cores)")
    print()
    if args.warm:
        print("--warm: each process (and its workers) ran the method once on a first image before the timed "
              "run on a second one")
        print()
    if args.repeat > 1:
        print(f"{args.repeat} runs per row: median wall time [min-max]; time / sep = ratio of the medians; "
              "peak memory = the largest of the runs")
        print()
    print("| size | method | tiles | wall [s] | time / sep | peak mem [MB] (worker) | detections | completeness S/N>10 | spurious |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, name, r, ref in rows:
        ratio = f"{r['wall'] / ref['wall']:.2f}" if ref else "-"
        mem = f"{r['mem']:.0f}" + (f" ({r['worker_mem']:.0f})" if "worker_mem" in r else "")
        lo, hi = r["wall_range"]
        wall = f"{r['wall']:.2f}" + (f" [{lo:.2f}-{hi:.2f}]" if args.repeat > 1 else "")
        print(f"| {size} | {name} | {r.get('tiles', '1x1')} | {wall} | {ratio} | {mem} | {r['n']} | "
              f"{r['completeness']:.3f} | {r['spurious']:.4f} |")


if __name__ == "__main__":
    main()
