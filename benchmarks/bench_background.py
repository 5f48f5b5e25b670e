"""Benchmark: tilepipe.estimate_background against sep and photutils on the same synthetic field.

Each (method, size) runs in a fresh subprocess (so peak memory is that
method's own); the image is a seeded ``tilepipe.datasets.make_field`` with a
known sky.  Printed as a markdown table:

* wall: best of ``--repeat`` runs of background + rms maps as numpy arrays
  (tilepipe: the per-mesh statistics, the client-side solve and the lazy
  per-tile evaluation, all computed);
* wall / sep: ratio to sep's wall time on the same size (1.0 = as fast as sep);
* CPU: process CPU time (threads summed), less sensitive to a busy machine;
* peak MB: peak RSS of the process minus its RSS after the image was made;
* err/noise: rms of (background - true sky) / mean sky noise (ideal: small);
* |d sep|/rms: max |background - sep background| / sep's global rms.

Usage::

    python benchmarks/bench_background.py --sizes 1024,2048 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = ["sep", "photutils", "tilepipe-1", "tilepipe-2x2-threads", "tilepipe-poly"]


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _worker(method: str, size: int, repeat: int) -> dict:
    import numpy as np

    from tilepipe.datasets import make_field

    f = make_field((size, size), seed=1)
    img = np.ascontiguousarray(f.image["image"].values, dtype=np.float32)
    mask = np.ascontiguousarray(f.image["mask"].values)
    sky = f.sky
    noise = float(np.mean(np.sqrt(sky / f.image.attrs["gain"] + (f.image.attrs["read_noise"] / f.image.attrs["gain"]) ** 2)))
    import sep

    ref = sep.Background(img, mask=mask, bw=64, bh=64, fw=3, fh=3)
    ref_back, ref_rms = ref.back(), ref.globalrms
    del ref
    base = _rss_mb()

    def run():
        if method == "sep":
            b = sep.Background(img, mask=mask, bw=64, bh=64, fw=3, fh=3)
            return b.back(), b.rms()
        if method == "photutils":
            from astropy.stats import SigmaClip
            from photutils.background import Background2D, SExtractorBackground

            b = Background2D(img, (64, 64), filter_size=(3, 3), mask=mask, sigma_clip=SigmaClip(sigma=3.0),
                             bkg_estimator=SExtractorBackground())
            return b.background, b.background_rms
        import dask

        from tilepipe import estimate_background

        if method == "tilepipe-1":
            with dask.config.set(scheduler="sync"):
                r = estimate_background(img, 64, 3, mask=mask)
                return dask.compute(r["background"].data, r["rms"].data)
        if method == "tilepipe-2x2-threads":
            with dask.config.set(scheduler="threads", num_workers=2):
                r = estimate_background(img, 64, 3, mask=mask, nx=2, ny=2)
                return dask.compute(r["background"].data, r["rms"].data)
        if method == "tilepipe-poly":
            with dask.config.set(scheduler="sync"):
                r = estimate_background(img, 64, 3, mask=mask, method="poly")
                return dask.compute(r["background"].data, r["rms"].data)
        raise ValueError(method)

    walls, cpus = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        back, rms = run()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    back = np.asarray(back, dtype=np.float64)
    return {
        "method": method,
        "size": size,
        "wall": min(walls),
        "cpu": min(cpus),
        "peak_mb": max(peak - base, 0.0),
        "err_noise": float(np.sqrt(np.mean((back - sky) ** 2)) / noise),
        "dsep": float(np.max(np.abs(back - ref_back)) / ref_rms),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048", help="comma-separated image sides (default 2048)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        print(json.dumps(_worker(args.worker[0], int(args.worker[1]), args.repeat)))
        return
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for m in args.methods.split(","):
            env = dict(os.environ)
            if m != "tilepipe-2x2-threads":  # one core for the single-worker runs
                env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
            out = subprocess.run([sys.executable, __file__, "--worker", m, str(size), "--repeat", str(args.repeat)],
                                 capture_output=True, text=True, env=env)
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| size | method | wall (s) | wall / sep | CPU (s) | CPU / sep | peak MB | err/noise | max abs(d sep)/rms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next((q for q in rows if q["size"] == r["size"] and q["method"] == "sep"), None)
        sw, sc = (ref["wall"], ref["cpu"]) if ref else (float("nan"), float("nan"))
        print(f"| {r['size']} | {r['method']} | {r['wall']:.3f} | {r['wall'] / sw:.2f} | {r['cpu']:.3f} | "
              f"{r['cpu'] / sc:.2f} | {r['peak_mb']:.0f} | {r['err_noise']:.4f} | {r['dsep']:.4f} |")


if __name__ == "__main__":
    main()
