"""Benchmark: tilepipe ZOGY vs stdpipe.subtraction.run_zogy and properimage.operations.subtract.

Same synthetic pair (``tilepipe.datasets.make_pair``: spatially varying PSF,
flux scale 1.1, shift (0.3, -0.2) px, transients with S/N 8-50) for every
method in the same run; each method runs in its own subprocess so its peak
memory (sum of the RSS of the process and its children, sampled every 20 ms)
is its own.  Quality against truth, for every method with the same metric
code and the same candidate finder (``tilepipe.find_transients`` on the
method's S_corr / Fpsf):

* ``std``: robust std of S_corr in source-free pixels (ideal 1.00 +- 0.05)
* ``stars>5``: fraction of stars with S/N < 1000 whose |S_corr| > 5 (< 1 %)
* ``compl``: fraction of transients with S/N > 8 found at 5 sigma (>= 95 %)
* ``false/MP``: candidates farther than 2 px from any transient, per megapixel (< 1)
* ``flux``: median recovered/true flux (1 +- 0.02); ``pull``: std of (flux - true)/err (1 +- 0.15)

Run with the peers' venv::

    /work/benchvenv/bin/python benchmarks/bench_zogy.py --sizes 1024 2048

``--repeat N`` runs every method N times (fresh processes, the methods
interleaved; the slow peers only once above ``--repeat-max-size``) and reports
the median wall time with its range: on this shared 2-core VM one run varies
by up to 2x.

``--fft`` also reports, for the single-thread tilepipe rows, the time spent
inside its ``scipy.fft`` transforms divided by the total.

tilepipe runs in three set-ups: the threaded scheduler with 1 or 2 threads
(one process), and a ``LocalCluster`` of 1 or 2 single-threaded worker
processes (dask's default worker settings).  The cluster is started, and the
modules tilepipe uses are imported in every process, before the clock starts
(as the peers' modules are imported before theirs).  Each row also gives the
CPU seconds (process + children) and the 1/5/15-minute load average when it
started: on a shared 2-core machine the two-thread/two-worker gain depends on
how much of the second core is free.
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
import warnings

import numpy as np

from _runs import summarize  # benchmarks/_runs.py (this script's folder is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- the pair
def pair_files(size: int, workdir: str) -> str:
    """Make (once) the pair of ``size`` and store it in ``workdir``; return the folder."""
    from astropy.io import fits

    from tilepipe.datasets import make_pair

    d = os.path.join(workdir, f"pair{size}")
    if os.path.exists(os.path.join(d, "done")):
        return d
    os.makedirs(d, exist_ok=True)
    n_tr = max(40, int(100 * (size / 1024) ** 2))
    p = make_pair((size, size), seed=11, n_transients=n_tr)
    for name, ds in (("new", p.new), ("ref", p.ref)):
        hdr = fits.Header()
        hdr["GAIN"] = float(ds.attrs["gain"])
        hdr["FWHM"] = float(ds.attrs["fwhm"])
        fits.writeto(os.path.join(d, f"{name}.fits"), ds["image"].values.astype(np.float32), hdr, overwrite=True)
        with open(os.path.join(d, f"{name}_psf.json"), "w") as f:
            json.dump(ds.attrs["truth_psf"], f)
    p.stars.write(os.path.join(d, "stars.ecsv"), overwrite=True)
    p.transients.write(os.path.join(d, "transients.ecsv"), overwrite=True)
    open(os.path.join(d, "done"), "w").close()
    return d


# ------------------------------------------------------------- the metrics
def quality(d: str, scorr: np.ndarray, fpsf, fpsf_err, mask: np.ndarray, diff: np.ndarray) -> dict:
    import xarray as xr
    from astropy.table import Table

    import tilepipe as tp
    from tilepipe.subtract.noise import robust_std

    stars = Table.read(os.path.join(d, "stars.ecsv"))
    tr = Table.read(os.path.join(d, "transients.ecsv"))
    h, w = scorr.shape
    near = np.zeros((h, w), bool)
    for tab, xc, yc in ((stars, "x_new", "y_new"), (tr, "x", "y")):
        for x, y in zip(tab[xc], tab[yc]):
            ix, iy = int(round(x)), int(round(y))
            near[max(0, iy - 12):iy + 13, max(0, ix - 12):ix + 13] = True
    ok = np.isfinite(scorr) & ~mask
    out = {"std": robust_std(scorr[ok & ~near])}
    faint = stars[stars["snr_new"] < 1000]
    bad = 0
    for x, y in zip(faint["x_new"], faint["y_new"]):
        ix, iy = int(round(x)), int(round(y))
        win = scorr[max(0, iy - 2):iy + 3, max(0, ix - 2):ix + 3]
        bad += bool(np.nanmax(np.abs(win)) > 5) if np.isfinite(win).any() else 0
    out["stars>5"] = bad / max(1, len(faint))
    data = {"scorr": (("y", "x"), np.where(ok, scorr, np.nan).astype(np.float32)),
            "mask": (("y", "x"), ~ok), "diff": (("y", "x"), diff.astype(np.float32))}
    if fpsf is not None:
        data["fpsf"] = (("y", "x"), fpsf.astype(np.float32))
        data["fpsf_err"] = (("y", "x"), fpsf_err.astype(np.float32))
    else:
        data["noise"] = (("y", "x"), np.ones((h, w), np.float32))
    res = xr.Dataset(data, attrs={"fwhm_new": 3.5, "fwhm_ref": 2.5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = tp.find_transients(res, nsigma=5.0)
    cx, cy = np.asarray(c["x"]), np.asarray(c["y"])
    idx = np.full(len(tr), -1)
    for i, (x, y) in enumerate(zip(tr["x"], tr["y"])):
        dd = np.hypot(cx - x, cy - y) if len(c) else np.array([np.inf])
        if dd.min() < 2:
            idx[i] = int(np.argmin(dd))
    bright = np.asarray(tr["snr"]) > 8
    out["compl"] = float((idx[bright] >= 0).mean())
    trx, try_ = np.asarray(tr["x"]), np.asarray(tr["y"])
    false = sum(np.hypot(trx - x, try_ - y).min() > 2 for x, y in zip(cx, cy))
    out["false/MP"] = false / (h * w / 1e6)
    if fpsf is not None and (idx >= 0).any():
        got = idx >= 0
        f = np.asarray(c["flux"])[idx[got]]
        e = np.asarray(c["flux_err"])[idx[got]]
        t = np.asarray(tr["flux"])[got]
        out["flux"] = float(np.median(f / t))
        out["pull"] = float(np.std((f - t) / e))
    else:
        out["flux"] = out["pull"] = float("nan")
    return out


# ------------------------------------------------------------- the runners
class PeakRSS:
    """Sample the RSS of this process plus its children every ``dt`` s."""

    def __init__(self, dt: float = 0.02) -> None:
        import psutil

        self.p = psutil.Process()
        self.peak = 0
        self.dt = dt
        self._stop = False
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop:
            try:
                rss = self.p.memory_info().rss + sum(c.memory_info().rss for c in self.p.children(recursive=True))
            except psutil.Error:
                rss = 0
            self.peak = max(self.peak, rss)
            time.sleep(self.dt)

    def __enter__(self) -> "PeakRSS":
        self.t.start()
        return self

    def __exit__(self, *a) -> None:
        self._stop = True
        self.t.join()


def true_psfs(d: str) -> tuple:
    """The true PSFs of the pair in folder ``d`` (written by :func:`pair_files`), as ``TruePSF`` models."""
    from tilepipe.datasets import TruePSF

    out = []
    for name in ("new", "ref"):
        with open(os.path.join(d, f"{name}_psf.json")) as f:
            out.append(TruePSF(json.load(f)))
    return tuple(out)


def _warm() -> None:
    """Import what tilepipe's ZOGY uses (outside the timed section, as the peers' imports are)."""
    import astropy.table  # noqa: F401
    import astropy.wcs  # noqa: F401
    import distributed  # noqa: F401  (dask imports it at the first compute, to look for a client: ~0.5 s)
    import scipy.ndimage  # noqa: F401
    import scipy.spatial  # noqa: F401

    import tilepipe.background  # noqa: F401
    import tilepipe.io  # noqa: F401  (open_image imports it at its first call: fsspec and its entry points, ~0.1 s)
    import tilepipe.subtract.transients  # noqa: F401
    import tilepipe.subtract.zogy  # noqa: F401


def run_tilepipe(d: str, nx: int, mode: str, fft: bool) -> dict:
    """One tilepipe run; ``mode`` is ``"threads:N"`` (threaded scheduler, N threads, one process)
    or ``"workers:N"`` (a LocalCluster of N single-threaded worker processes, started and warmed
    before the clock starts); ``"workers:N:chunks"`` forces the chunk path on the cluster (persisted
    inputs, outer boxes assembled from neighbouring chunks) instead of tasks reading their own boxes."""
    import tilepipe as tp
    from tilepipe.subtract import zogy as zmod

    _warm()
    pn, pr = true_psfs(d)
    fft_time = [0.0]
    kind, n, *path = mode.split(":")
    if path == ["chunks"]:  # the chunk path on a cluster: persisted inputs, outer boxes from neighbouring chunks
        import importlib

        importlib.import_module("tilepipe.subtract.zogy")._USE_REGIONS.set(False)
    n = int(n)
    if fft:
        import scipy.fft as sfft

        class Timed:
            def __getattr__(self, name):
                fn = getattr(sfft, name)
                if name not in ("rfft2", "irfft2"):
                    return fn

                def wrapped(*a, **k):
                    t0 = time.perf_counter()
                    try:
                        return fn(*a, **k)
                    finally:
                        fft_time[0] += time.perf_counter() - t0

                return wrapped

        zmod.sfft = Timed()
    client = None
    if kind == "workers":
        from distributed import Client, LocalCluster

        import dask
        from tilepipe.cluster import WORKER_ENVIRON

        dask.config.set(WORKER_ENVIRON)  # the worker environment tilepipe's CLI uses
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=50)
        client = Client(cluster)
        client.run(_warm)
    import dask

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = tp.open_image(os.path.join(d, "new.fits"))
        ref = tp.open_image(os.path.join(d, "ref.fits"))
        cfg = dask.config.set(scheduler="threads", num_workers=n) if kind == "threads" else dask.config.set({})
        with cfg, PeakRSS() as mem:
            c0 = _cpu_seconds()
            t0 = time.perf_counter()
            res = tp.subtract(new, ref, nx=nx, new_psf=pn, ref_psf=pr)
            sc, fp, fe, m, df = dask.compute(res["scorr"].data, res["fpsf"].data, res["fpsf_err"].data,
                                             res["mask"].data, res["diff"].data)
            wall = time.perf_counter() - t0
            cpu = _cpu_seconds() - c0
    if client is not None:
        client.close()
        cluster.close()
    out = {"wall": wall, "peak_mb": mem.peak / 2**20, "cpu": cpu}
    if fft:
        out["fft_frac"] = fft_time[0] / wall
    out.update(quality(d, sc, fp, fe, m, df))
    return out


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (worker processes)."""
    import psutil

    p = psutil.Process()
    t = p.cpu_times()
    tot = t.user + t.system
    for c in p.children(recursive=True):
        try:
            ct = c.cpu_times()
            tot += ct.user + ct.system
        except psutil.Error:
            pass
    return tot


def run_stdpipe(d: str, nx: int) -> dict:
    from astropy.io import fits
    from stdpipe import subtraction

    new = fits.getdata(os.path.join(d, "new.fits")).astype(np.float64)
    ref = fits.getdata(os.path.join(d, "ref.fits")).astype(np.float64)
    with warnings.catch_warnings(), PeakRSS() as mem:
        warnings.simplefilter("ignore")
        c0 = _cpu_seconds()
        t0 = time.perf_counter()
        D, Scorr, Fpsf, Fpsf_err = subtraction.run_zogy(new, ref, image_gain=2.0, template_gain=2.0,
                                                        image_fwhm=3.5, template_fwhm=2.5, nx=nx, ny=nx,
                                                        overlap=50, get_Fpsf=True)
        wall = time.perf_counter() - t0
        cpu = _cpu_seconds() - c0
    m = ~np.isfinite(Scorr)
    out = {"wall": wall, "peak_mb": mem.peak / 2**20, "cpu": cpu}
    out.update(quality(d, np.asarray(Scorr, float), np.asarray(Fpsf, float), np.asarray(Fpsf_err, float), m,
                       np.asarray(D, float)))
    return out


def run_properimage(d: str) -> dict:
    from properimage import operations

    from tilepipe.subtract.noise import robust_std

    with warnings.catch_warnings(), PeakRSS() as mem:
        warnings.simplefilter("ignore")
        c0 = _cpu_seconds()
        t0 = time.perf_counter()
        D, P, Scorr, mask = operations.subtract(ref=os.path.join(d, "ref.fits"), new=os.path.join(d, "new.fits"))
        wall = time.perf_counter() - t0
        cpu = _cpu_seconds() - c0
    sc = np.asarray(np.real(Scorr), float)
    sc = sc / robust_std(sc)  # properimage's Scorr is not unit-normalised (PEERS.md)
    m = np.asarray(mask, bool) if np.ndim(mask) == 2 else ~np.isfinite(sc)
    out = {"wall": wall, "peak_mb": mem.peak / 2**20, "cpu": cpu}
    out.update(quality(d, sc, None, None, m, np.asarray(np.real(D), float)))
    return out


# ------------------------------------------------------------------ driver
METHODS = {
    "tilepipe nx=1 (1 thread)": ("tilepipe", 1, "threads:1"),
    "tilepipe nx=4 (1 thread)": ("tilepipe", 4, "threads:1"),
    "tilepipe nx=4 (2 threads)": ("tilepipe", 4, "threads:2"),
    "tilepipe nx=1 (1 worker)": ("tilepipe", 1, "workers:1"),
    "tilepipe nx=4 (1 worker)": ("tilepipe", 4, "workers:1"),
    "tilepipe nx=4 (2 workers)": ("tilepipe", 4, "workers:2"),
    "tilepipe nx=4 (1 worker, chunk path)": ("tilepipe", 4, "workers:1:chunks"),
    "tilepipe nx=4 (2 workers, chunk path)": ("tilepipe", 4, "workers:2:chunks"),
    "stdpipe run_zogy nx=1": ("stdpipe", 1, ""),
    "stdpipe run_zogy nx=4": ("stdpipe", 4, ""),
    "properimage subtract": ("properimage", 1, ""),
}


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def child(args: argparse.Namespace) -> None:
    kind, nx, mode = METHODS[args.child]
    d = args.dir
    if kind == "tilepipe":
        r = run_tilepipe(d, nx, mode, fft=args.fft and mode == "threads:1")
    elif kind == "stdpipe":
        r = run_stdpipe(d, nx)
    else:
        r = run_properimage(d)
    print("RESULT " + json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="subset of: " + "; ".join(METHODS))
    ap.add_argument("--peer-max-size", type=int, default=2048, help="skip properimage/stdpipe nx=4 above this size")
    ap.add_argument("--fft", action="store_true", help="measure tilepipe's FFT time / total")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tilepipe-bench-zogy"))
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per method (fresh processes, interleaved across methods); the table gives the "
                         "median wall time and its range; the peers above --repeat-max-size run once")
    ap.add_argument("--repeat-max-size", type=int, default=1024)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    for size in args.sizes:
        d = pair_files(size, args.workdir)
        runs: dict[str, list[dict]] = {}
        for rep in range(args.repeat):  # interleaved: a slow spell of the machine hits every method alike
            for name in args.methods:
                kind, nx, _ = METHODS[name]
                if kind != "tilepipe" and (kind == "properimage" or nx > 1) and size > args.peer_max_size:
                    continue
                if rep and kind != "tilepipe" and size > args.repeat_max_size:
                    continue  # the slow peers once only at large sizes (stdpipe: minutes per run at 4k)
                cmd = [sys.executable, __file__, "--child", name, "--dir", d] + (["--fft"] if args.fft else [])
                load0 = _load()
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                    r = json.loads(line[-1][7:]) if line else {"error": (p.stderr or p.stdout)[-300:]}
                except subprocess.TimeoutExpired:
                    r = {"error": f"timeout {args.timeout} s"}
                r["load"] = load0
                runs.setdefault(name, []).append(r)
                print(f"[{size}] {name}: {r}", file=sys.stderr, flush=True)
        results = {name: summarize(rs, ("peak_mb",)) for name, rs in runs.items()}
        ref_t = results.get("stdpipe run_zogy nx=1", {}).get("wall")
        ref_m = results.get("stdpipe run_zogy nx=1", {}).get("peak_mb")
        for name, r in results.items():
            rows.append((size, name, r, ref_t, ref_m))
    if args.repeat > 1:
        print(f"\n{args.repeat} runs per method (the peers once above {args.repeat_max_size} px): median wall time "
              "[min-max]; speed-up = ratio of the medians; peak memory = the largest of the runs")
    print("\n| size | method | wall (s) | speed-up vs stdpipe nx=1 | CPU (s) | peak mem (MB) | mem ratio | FFT/total "
          "| load 1/5/15 min | std | stars>5 | compl | false/MP | flux | pull |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size, name, r, ref_t, ref_m in rows:
        if "error" in r:
            print(f"| {size} | {name} | error: {r['error'][-80:]!r} |" + " |" * 12)
            continue
        sp = f"{ref_t / r['wall']:.1f}x" if ref_t else "-"
        wall = f"{r['wall']:.2f}"
        if r.get("runs", 1) > 1:
            wall += f" [{r['wall_range'][0]:.2f}-{r['wall_range'][1]:.2f}]"
        mr = f"{r['peak_mb'] / ref_m:.2f}" if ref_m else "-"
        ff = f"{r['fft_frac']:.2f}" if "fft_frac" in r else "-"
        print(f"| {size} | {name} | {wall} | {sp} | {r.get('cpu', float('nan')):.1f} | {r['peak_mb']:.0f} | "
              f"{mr} | {ff} | {r['load']} | {r['std']:.3f} | {100 * r['stars>5']:.2f}% | {100 * r['compl']:.1f}% | "
              f"{r['false/MP']:.2f} | {r['flux']:.3f} | {r['pull']:.2f} |")
    # the scaling target: wall time of one worker (thread) / two workers (threads), nx=4
    print("\n| size | 1 → 2 workers (nx=4) | 1 → 2 threads (nx=4) |\n|---|---|---|")
    walls = {(size, name): r.get("wall") for size, name, r, _, _ in rows}
    for size in args.sizes:
        cells = []
        for one, two in (("tilepipe nx=4 (1 worker)", "tilepipe nx=4 (2 workers)"),
                         ("tilepipe nx=4 (1 thread)", "tilepipe nx=4 (2 threads)")):
            a, b = walls.get((size, one)), walls.get((size, two))
            cells.append(f"{a / b:.2f}x" if a and b else "-")
        print(f"| {size} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
