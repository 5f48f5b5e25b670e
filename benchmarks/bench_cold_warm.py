"""Benchmark: first call (cold) against repeated calls (warm) in one process, for the short runs.

The 1k ZOGY and 2k detection rows of ``bench_zogy.py`` / ``bench_detect.py``
run each method once in a fresh process.  This script shows how much of such a
run is first-use cost: it calls the same tilepipe function ``--calls`` times
in one process (imports done before the first clock) and prints, per call,
the wall time, the minor page faults and the user / system CPU seconds
(``resource.getrusage``).  Same inputs as the two benchmarks (seeded
``make_pair`` 1k pair with its true PSFs, seeded ``make_field`` 2k field
written to FITS); one thread (dask's threaded scheduler with one worker), and
sep on the same 2k field in the same process for reference.

Usage::

    python benchmarks/bench_cold_warm.py [--calls 4] [--zogy-size 1024] [--detect-size 2048]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import warnings

import numpy as np


def _timed(fn):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return wall, r1.ru_minflt - r0.ru_minflt, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--zogy-size", type=int, default=1024)
    ap.add_argument("--detect-size", type=int, default=2048)
    args = ap.parse_args()

    import dask
    import distributed  # noqa: F401  (dask imports it at the first compute)
    import sep
    from astropy.io import fits

    import tilepipe as tp
    import tilepipe.detect  # noqa: F401
    import tilepipe.subtract.zogy  # noqa: F401
    from tilepipe.datasets import make_field, make_pair, true_psf

    rows = []
    with tempfile.TemporaryDirectory() as tmp, dask.config.set(scheduler="threads", num_workers=1):
        pair = make_pair((args.zogy_size,) * 2, seed=11, n_transients=40)
        paths = {}
        for name, ds in (("new", pair.new), ("ref", pair.ref)):
            paths[name] = os.path.join(tmp, f"{name}.fits")
            hdr = fits.Header({"GAIN": float(ds.attrs["gain"]), "FWHM": float(ds.attrs["fwhm"])})
            fits.writeto(paths[name], ds["image"].values.astype(np.float32), hdr)
        psf_n, psf_r = true_psf(pair.new), true_psf(pair.ref)
        del pair

        def zogy():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = tp.subtract(tp.open_image(paths["new"]), tp.open_image(paths["ref"]), nx=1,
                                  new_psf=psf_n, ref_psf=psf_r)
                dask.compute(*(res[k].data for k in ("scorr", "fpsf", "fpsf_err", "mask", "diff")))

        field = os.path.join(tmp, "field.fits")
        fits.writeto(field, np.asarray(make_field((args.detect_size,) * 2, seed=1).image["image"].values,
                                       dtype=np.float32))
        nt = max(1, args.detect_size // 1024)

        def detect():
            tp.detect_sources(tp.open_image(field, chunks=1024), nsigma=1.5, nx=nt, ny=nt)

        data = fits.getdata(field).astype(np.float32)

        def sep_run():
            bkg = sep.Background(data, bw=64, bh=64, fw=3, fh=3)
            sep.extract(data - bkg, 1.5, err=bkg.rms(), filter_type="conv")

        for label, fn in ((f"tilepipe ZOGY {args.zogy_size}, nx=1", zogy),
                          (f"tilepipe detect {args.detect_size}, {nt}x{nt} tiles", detect),
                          (f"sep {args.detect_size}", sep_run)):
            for call in range(args.calls):
                rows.append((label, call + 1, *_timed(fn)))

    print("\n| run | call | wall (s) | minor page faults | user CPU (s) | system CPU (s) |\n|---|---|---|---|---|---|")
    for label, call, wall, flt, ut, st in rows:
        print(f"| {label} | {call} | {wall:.3f} | {flt} | {ut:.2f} | {st:.2f} |")


if __name__ == "__main__":
    main()
