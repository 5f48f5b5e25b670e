"""Benchmark: tilepipe.calibrate against ccdproc and plain numpy on the same FITS frames.

Each method runs in its own fresh process (imports done before timing; peak RSS
sampled with psutil, reported above the post-import baseline) on the same uint16 FITS files (raw, bias, dark, flat with
EXPTIME), writes a float32 FITS result, and is compared with a float64 numpy
reference computed here (median-normalised, bias-subtracted flat; dark scaled by
exposure time).  tilepipe runs on dask's threaded scheduler with ``--chunk``
tiles, streaming from the input files to the output file.

    /work/benchvenv/bin/python benchmarks/bench_calibrate.py --sizes 1024 2048

Requirements: benchmarks/requirements-calibrate.txt (ccdproc).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
import warnings

import numpy as np

T_RAW, T_DARK, T_FLAT = 30.0, 300.0, 2.0


def make_frames(n: int, folder: str, seed: int = 0) -> dict[str, str]:
    from astropy.io import fits

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    r2 = ((xx - n / 2) ** 2 + (yy - n / 2) ** 2) / (n / 2) ** 2
    vign = (1.0 - 0.15 * r2).astype(np.float32)
    bias = 300.0 + rng.normal(0, 4, (n, n)).astype(np.float32)
    dcur = np.full((n, n), 0.02, np.float32)
    hot = rng.random((n, n)) < 1e-4
    dcur[hot] = rng.uniform(1, 20, hot.sum())
    frames = {
        "bias": bias,
        "dark": bias + dcur * T_DARK + rng.normal(0, 4, (n, n)),
        "flat": bias + dcur * T_FLAT + 20000.0 * vign + rng.normal(0, 140, (n, n)),
        "raw": bias + dcur * T_RAW + 400.0 * vign + rng.normal(0, 21, (n, n)),
    }
    times = {"bias": 0.0, "dark": T_DARK, "flat": T_FLAT, "raw": T_RAW}
    paths = {}
    for k, a in frames.items():
        hdu = fits.PrimaryHDU(np.clip(np.round(a), 0, 65535).astype(np.uint16))
        hdu.header["EXPTIME"] = times[k]
        paths[k] = os.path.join(folder, f"{k}_{n}.fits")
        hdu.writeto(paths[k], overwrite=True)
    return paths


def run_tilepipe(paths: dict[str, str], out: str, chunk: int) -> None:
    import dask

    import tilepipe as tp

    with dask.config.set(scheduler="threads"):
        cal = tp.calibrate(paths["raw"], paths["bias"], paths["dark"], paths["flat"], chunks=chunk)
        tp.write_fits(cal, out, overwrite=True)


def run_ccdproc(paths: dict[str, str], out: str, chunk: int) -> None:
    import astropy.units as u
    import ccdproc
    from astropy.nddata import CCDData

    raw, bias, dark, flat = (CCDData.read(paths[k], unit="adu") for k in ("raw", "bias", "dark", "flat"))
    for c in (raw, bias, dark, flat):  # uint16 arithmetic would wrap around
        c.data = c.data.astype(np.float32)
    dark_b = ccdproc.subtract_bias(dark, bias)
    flat_b = ccdproc.subtract_dark(ccdproc.subtract_bias(flat, bias), dark_b, exposure_time="EXPTIME",
                                   exposure_unit=u.s, scale=True)
    r = ccdproc.subtract_dark(ccdproc.subtract_bias(raw, bias), dark_b, exposure_time="EXPTIME",
                              exposure_unit=u.s, scale=True)
    r = ccdproc.flat_correct(r, flat_b, norm_value=float(np.median(flat_b.data)))
    r.data = r.data.astype(np.float32)
    r.write(out, overwrite=True)


def run_numpy(paths: dict[str, str], out: str, chunk: int) -> None:
    from astropy.io import fits

    R, B, D, F = (fits.getdata(paths[k]).astype(np.float32) for k in ("raw", "bias", "dark", "flat"))
    dc = D - B
    fc = F - B - (T_FLAT / T_DARK) * dc
    res = (R - B - (T_RAW / T_DARK) * dc) / (fc / np.median(fc[fc > 0]))
    fits.PrimaryHDU(res.astype(np.float32)).writeto(out, overwrite=True)


METHODS = {"tilepipe": run_tilepipe, "ccdproc": run_ccdproc, "numpy": run_numpy}


_IMPORTS = {"tilepipe": ("dask", "tilepipe", "tilepipe.calibrate", "tilepipe.io", "astropy.io.fits"),
            "ccdproc": ("ccdproc", "astropy.nddata", "astropy.io.fits"), "numpy": ("astropy.io.fits",)}


def _child(name: str, paths: dict, out: str, chunk: int, q: mp.Queue) -> None:
    """Run one method in a fresh process: imports first (not timed), then wall time and peak RSS.

    ru_maxrss is inherited across fork/exec on Linux, so the peak is sampled with psutil
    (every 10 ms) and reported above the RSS after the imports.
    """
    import importlib
    import threading

    import psutil

    warnings.simplefilter("ignore")
    for mod in _IMPORTS[name]:
        importlib.import_module(mod)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    METHODS[name](paths, out, chunk)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    q.put({"wall": wall, "peak_mb": (peak[0] - base) / 2**20})


def reference(paths: dict[str, str]) -> np.ndarray:
    from astropy.io import fits

    R, B, D, F = (fits.getdata(paths[k]).astype(np.float64) for k in ("raw", "bias", "dark", "flat"))
    dc = D - B
    fc = F - B - (T_FLAT / T_DARK) * dc
    return (R - B - (T_RAW / T_DARK) * dc) / (fc / np.median(fc[fc > 0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--chunk", type=int, default=1024, help="tilepipe tile (chunk) edge, pixels")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    args = ap.parse_args()
    from astropy.io import fits

    ctx = mp.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            paths = make_frames(n, tmp)
            ref = reference(paths)
            res = {}
            for name in args.methods:
                out = os.path.join(tmp, f"out_{name}_{n}.fits")
                q = ctx.Queue()
                p = ctx.Process(target=_child, args=(name, paths, out, args.chunk, q))
                p.start()
                r = q.get()
                p.join()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = fits.getdata(out).astype(np.float64)
                ok = np.isfinite(got) & np.isfinite(ref)
                r["max_rel_err"] = float(np.max(np.abs(got[ok] - ref[ok]) / np.abs(ref[ok]).clip(1)))
                res[name] = r
            base = res.get("ccdproc")
            for name, r in res.items():
                rows.append((n, name, r["wall"], r["peak_mb"], r["wall"] / base["wall"] if base else float("nan"),
                             r["peak_mb"] / base["peak_mb"] if base else float("nan"), r["max_rel_err"]))
    print("| size | method | wall (s) | peak RSS above imports (MB) | wall / ccdproc | memory / ccdproc | max rel. error vs float64 numpy |")
    print("|---|---|---|---|---|---|---|")
    for n, name, w, m, rw, rm, e in rows:
        print(f"| {n} | {name} | {w:.2f} | {m:.0f} | {rw:.2f} | {rm:.2f} | {e:.1e} |")
    print(json.dumps({"chunk": args.chunk}))


if __name__ == "__main__":
    main()
