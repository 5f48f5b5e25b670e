"""Benchmark: where the time goes, piece by piece (detection at 2k; ZOGY tasks on threads vs worker processes).

Two measurements that back the explanations next to the README's detection and ZOGY tables:

1. **Detection pieces** (one process, warm: one untimed call first).  tilepipe's
   ``detect_sources`` on the seeded ``make_field`` image written to FITS
   (``--detect-size``, 2×2 tiles of ~1024², dask's synchronous scheduler), with
   its main steps wrapped by timers (total seconds per call, median of
   ``--calls``), next to sep's own steps on the same image (``sep.Background``,
   the ``back()``/``rms()`` maps, ``sep.extract`` of the whole image).
2. **ZOGY tasks** (``--zogy-size``, nx=4, true PSFs, the ``bench_zogy.py``
   pair): the run on one thread of the client process (task functions wrapped
   by timers) and on a LocalCluster of 1 and 2 single-threaded workers
   (``distributed.get_task_stream``: compute and transfer seconds summed per
   task-name prefix), each in a fresh process, with the process's (or the
   workers') minor page faults and user/system CPU.  The pair is read from
   FITS files, so every task reads its own box (``tilepipe-windows``: the
   per-core statistics, then the star measurements; ``zogy-tile``: the
   tiles; ``zogy``: the feathered blend).  For the worker runs, the
   timeline: seconds during which 0, 1 or 2 tasks were computing, and the
   seconds after the last task (the five outputs' trip to the client), and
   the CPU time of the client process, which hosts the LocalCluster's
   scheduler and receives the outputs (it shares the machine's cores with
   the workers).
3. **The machine's two-process ceiling** (``--ceiling``): the same ZOGY run
   (``--zogy-size``, nx=4, one thread, outputs computed to numpy) in one fresh
   process alone, then in two independent fresh processes started together
   (each does the whole job: nothing is shared, nothing travels, no serial
   part).  Throughput gain = 2 × (time alone) / (slower time of the pair):
   what two processes can gain on this machine for this work, the upper
   bound for "two workers ÷ one worker" on one job.  ``--repeat`` rounds,
   alone and pair interleaved.

4. **The machine's first-touch cost** (``--first-touch``): a fresh process
   writes one float per 4 KB page of a ``--touch-mb`` array (the kernel must
   supply and zero every page), frees it and does it again (pages the kernel
   just got back); ``--idle`` seconds of sleep before each round.  On a VM
   whose balloon device reports free pages to the host (virtio-balloon
   ``VIRTIO_BALLOON_F_REPORTING``, printed when present), memory left free for
   a few seconds goes back to the host and the next first touch is much
   slower: the cost every fresh worker, every received task result and every
   output landing in the client pays.

5. **Detection's fixed cost** (``--fixed-cost``): ``detect_sources`` on a 256²
   ``make_field`` image read from FITS (2×2 tiles), where the computing is
   negligible: ``--calls`` calls on a LocalCluster of one single-threaded
   worker (``WORKER_ENVIRON``, imports done first) and in the same process
   with dask's synchronous scheduler; median of the calls after an untimed
   first one.  What every call costs however small the image: opening the
   file, building the graph, the scheduler's round trips, the catalog.

Usage::

    python benchmarks/bench_breakdown.py [--detect-size 2048] [--calls 3] [--zogy-size 4096] [--skip-zogy]
    python benchmarks/bench_breakdown.py --keep-heap   # the ZOGY worker runs with KEEP_HEAP's glibc settings
    python benchmarks/bench_breakdown.py --ceiling [--repeat 5]   # the two-process ceiling only
    python benchmarks/bench_breakdown.py --first-touch [--touch-mb 512] [--idle 8] [--repeat 3]
    python benchmarks/bench_breakdown.py --fixed-cost [--calls 7]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

from _runs import peak_rss_mb  # benchmarks/_runs.py (this script's folder is on sys.path)


def _timers(targets):
    """Wrap ``(module, attribute, label)`` functions with accumulating timers; returns the totals dict."""
    acc: dict[str, float] = collections.defaultdict(float)
    for mod, attr, label in targets:
        f = getattr(mod, attr)

        @functools.wraps(f)
        def g(*a, __f=f, __label=label, **k):
            t0 = time.perf_counter()
            try:
                return __f(*a, **k)
            finally:
                acc[__label] += time.perf_counter() - t0

        setattr(mod, attr, g)
    return acc


def _rusage() -> tuple[int, float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_utime, r.ru_stime


# ------------------------------------------------------------------ detection
def detect_pieces(size: int, calls: int) -> None:
    import dask
    import distributed  # noqa: F401  (dask imports it at the first compute)
    import scipy.ndimage
    import sep
    from astropy.io import fits

    import tilepipe as tp
    import tilepipe.background as B
    import tilepipe.detect as D
    import tilepipe.image as I
    from tilepipe.datasets import make_field

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "field.fits")
        fits.writeto(path, np.asarray(make_field((size, size), seed=0).image["image"].values, dtype=np.float32))
        acc = _timers([
            (D, "_sep_extract", "sep.extract on tile boxes + blend re-extractions"),
            (B, "_stacked_mesh_stats", "mesh statistics (per chunk)"),
            (B, "_eval_solved_region", "background + rms maps on the windows"),
            (I, "_sky_and_noise", "default variance: sky statistics"),
            (I, "_bad_region", "bad-pixel masks"),
            (D, "_bundle_block", "detection stack (image - background, noise, variance)"),
            (scipy.ndimage, "label", "labelling the blends"),
            (D, "_rows", "catalog columns from sep objects"),
        ])
        nt = max(1, size // 1024)
        per_call: list[dict[str, float]] = []
        with dask.config.set(scheduler="synchronous"):
            for i in range(calls + 1):
                acc.clear()
                t0 = time.perf_counter()
                tp.detect_sources(tp.open_image(path, chunks=1024), nsigma=1.5, nx=nt, ny=nt)
                total = time.perf_counter() - t0
                if i:  # the first call is untimed (first-use costs)
                    per_call.append({**acc, "total (detect_sources, open_image included)": total})
        data = np.ascontiguousarray(fits.getdata(path), dtype=np.float32)
        seps: list[dict[str, float]] = []
        for i in range(calls + 1):
            t0 = time.perf_counter()
            bkg = sep.Background(data, bw=64, bh=64, fw=3, fh=3)
            t1 = time.perf_counter()
            sub = data - bkg.back()
            rms = bkg.rms()
            t2 = time.perf_counter()
            sep.set_extract_pixstack(max(300_000, data.size // 8))
            sep.set_sub_object_limit(4096)
            sep.extract(sub, 1.5, err=rms, filter_type="conv")
            t3 = time.perf_counter()
            if i:
                seps.append({"sep.Background": t1 - t0, "back() + rms() maps": t2 - t1,
                             "sep.extract (whole image)": t3 - t2, "total": t3 - t0})
    print(f"\nDetection pieces, {size}² field, {nt}x{nt} tiles, one warm process (median of {calls} calls, seconds)\n")
    print("| step | seconds |\n|---|---|")
    for k in per_call[0]:
        print(f"| tilepipe: {k} | {np.median([c.get(k, 0.0) for c in per_call]):.3f} |")
    for k in seps[0]:
        print(f"| sep: {k} | {np.median([c[k] for c in seps]):.3f} |")


def fixed_cost(calls: int) -> None:
    """``detect_sources`` on a 256² image: on one worker and in one process (see the module docstring, 5)."""
    import dask
    from astropy.io import fits
    from distributed import Client, LocalCluster

    from bench_detect import _import_modules as imports  # what a detection task needs, imported first

    import tilepipe as tp
    from tilepipe.cluster import WORKER_ENVIRON
    from tilepipe.datasets import make_field

    imports()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "field256.fits")
        fits.writeto(path, np.asarray(make_field((256, 256), seed=0).image["image"].values, dtype=np.float32))

        def timed() -> float:
            walls = []
            for _ in range(calls + 1):
                t0 = time.perf_counter()
                tp.detect_sources(tp.open_image(path, chunks=128), nsigma=1.5, nx=2, ny=2)
                walls.append(time.perf_counter() - t0)
            return float(np.median(walls[1:]))

        with dask.config.set(WORKER_ENVIRON):
            cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        try:
            client.run(imports)
            worker = timed()
            with dask.config.set(scheduler="synchronous"):
                local = timed()
        finally:
            client.close()
            cluster.close()
    print(f"\ndetect_sources on a 256² image, 2×2 tiles (median of {calls} calls after an untimed first)\n")
    print("| where | seconds |\n|---|---|")
    print(f"| one single-threaded worker (LocalCluster) | {worker:.3f} |")
    print(f"| this process, synchronous scheduler | {local:.3f} |")


# ----------------------------------------------------------------------- ZOGY
def _zogy_inputs(size: int):
    from bench_zogy import _warm, pair_files, true_psfs

    d = pair_files(size, os.path.join(tempfile.gettempdir(), "tilepipe-bench-zogy"))
    return (d, *true_psfs(d), _warm)


def _zogy_run(d, pn, pr) -> tuple[float, float]:
    """Wall seconds of one ZOGY run (outputs computed into this process) and the outputs' size in MB."""
    import dask

    import tilepipe as tp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        res = tp.subtract(tp.open_image(os.path.join(d, "new.fits")), tp.open_image(os.path.join(d, "ref.fits")),
                          nx=4, new_psf=pn, ref_psf=pr)
        out = dask.compute(*(res[k].data for k in ("scorr", "fpsf", "fpsf_err", "mask", "diff")))
        return time.perf_counter() - t0, sum(a.nbytes for a in out) / 2**20


#: ``--keep-heap``: glibc settings that keep freed memory in a worker's heap (no dynamic mmap threshold
#: drop, no trimming): fewer fresh pages to fault in per task, at the price of a worker RSS that stays at
#: its high-water mark (not what tilepipe.cluster.WORKER_ENVIRON sets; measured here for comparison)
KEEP_HEAP = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in
             (("MALLOC_MMAP_THRESHOLD_", 33554432), ("MALLOC_TRIM_THRESHOLD_", 4294967296),
              ("MALLOC_TOP_PAD_", 67108864))}


def _timeline(spans: list[tuple[float, float]], wall: float, step: float = 0.01) -> dict:
    """Seconds of the run during which 0, 1, 2, ... tasks were computing (``spans``: task compute
    intervals, seconds from the start), and the seconds after the last task ended (the outputs'
    trip to the client)."""
    grid = np.arange(0.0, wall, step)
    running = np.zeros(grid.size, dtype=int)
    for a, b in spans:
        running[(grid >= a) & (grid < b)] += 1
    counts = np.bincount(running)
    return {"running": [float(c * step) for c in counts], "after_last_task": wall - max((b for _, b in spans), default=0.0)}


def zogy_child(size: int, workers: int, keep_heap: bool = False) -> dict:
    """One fresh-process ZOGY run: ``workers`` = 0 for one thread of this process."""
    import importlib

    import dask

    d, pn, pr, warm = _zogy_inputs(size)
    warm()
    if workers == 0:
        zm = importlib.import_module("tilepipe.subtract.zogy")
        import tilepipe.background as B

        # FITS inputs take the region path (tasks read their own boxes); the chunk path's functions are
        # wrapped too, for runs with tilepipe.subtract.zogy._USE_REGIONS set to False
        acc = _timers([(zm, "_zogy_region_tile", "zogy-tile"), (zm, "_zogy_tile_delayed", "zogy-tile"),
                       (zm, "_stars_window", "zogy-stars"), (zm, "_stars_task", "zogy-stars"),
                       (zm, "_core_stats", "per-tile core statistics"), (zm, "_assemble_core", "zogy (blend)"),
                       (B, "_stacked_mesh_stats", "tilepipe-mesh-stats")])
        r0 = _rusage()
        with dask.config.set(scheduler="threads", num_workers=1):
            wall, out_mb = _zogy_run(d, pn, pr)
        r1 = _rusage()
        return {"wall": wall, "out_mb": out_mb, "compute": dict(acc), "transfer": {},
                "faults": r1[0] - r0[0], "user": r1[1] - r0[1], "sys": r1[2] - r0[2]}
    from dask.utils import key_split
    from distributed import Client, LocalCluster, get_task_stream

    from tilepipe.cluster import WORKER_ENVIRON

    dask.config.set({**WORKER_ENVIRON, **(KEEP_HEAP if keep_heap else {})})
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=50) as cluster, Client(cluster) as client:
        client.run(warm)
        w0 = client.run(_rusage)
        with get_task_stream(client) as ts:
            c0 = _rusage()
            start = time.time()
            wall, out_mb = _zogy_run(d, pn, pr)
            c1 = _rusage()
        w1 = client.run(_rusage)
        peak = max(client.run(peak_rss_mb).values())
    comp: dict[str, float] = collections.defaultdict(float)
    xfer: dict[str, float] = collections.defaultdict(float)
    spans = []
    for t in ts.data:
        for s in t["startstops"]:
            (comp if s["action"] == "compute" else xfer)[key_split(t["key"])] += s["stop"] - s["start"]
            if s["action"] == "compute":
                spans.append((s["start"] - start, s["stop"] - start))
    return {"wall": wall, "out_mb": out_mb, "compute": dict(comp), "transfer": dict(xfer),
            "timeline": _timeline(spans, wall),
            "client_cpu": (c1[1] - c0[1], c1[2] - c0[2]),
            "faults": sum(w1[k][0] - w0[k][0] for k in w0), "user": sum(w1[k][1] - w0[k][1] for k in w0),
            "sys": sum(w1[k][2] - w0[k][2] for k in w0), "peak_mb": peak}


def zogy_tasks(size: int, keep_heap: bool = False) -> None:
    print(f"\nZOGY tasks, {size}² pair, nx=4, each configuration in a fresh process (seconds summed over tasks)\n")
    if keep_heap:
        print("workers started with --keep-heap's glibc settings: " + ", ".join(
            f"{k.rsplit('.', 1)[1]}={v}" for k, v in KEEP_HEAP.items()) + "\n")
    for workers in ((1, 2) if keep_heap else (0, 1, 2)):
        p = subprocess.run([sys.executable, __file__, "--zogy-child", str(workers), "--zogy-size", str(size)]
                           + (["--keep-heap"] if keep_heap else []), capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            print(f"workers={workers}: failed\n{p.stderr[-2000:]}")
            continue
        r = json.loads(line[-1][7:])
        what = "one thread of the client process" if workers == 0 else f"{workers} worker process(es)"
        print(f"**{what}**: wall {r['wall']:.2f} s (outputs {r['out_mb']:.0f} MB); compute summed {sum(r['compute'].values()):.2f} s; "
              f"transfer summed {sum(r['transfer'].values()):.2f} s; minor page faults {r['faults']}, "
              f"user {r['user']:.2f} s, system {r['sys']:.2f} s ({'process' if workers == 0 else 'workers'})"
              + (f", largest worker peak RSS {r['peak_mb']:.0f} MB" if workers else "") + "\n")
        if "timeline" in r:
            tl = r["timeline"]
            print("time with " + " / ".join(str(i) for i in range(len(tl["running"]))) + " tasks computing: "
                  + " / ".join(f"{x:.2f}" for x in tl["running"]) + f" s; after the last task ended (outputs to "
                  f"the client): {tl['after_last_task']:.2f} s; client process (with the scheduler): user "
                  f"{r['client_cpu'][0]:.2f} s, system {r['client_cpu'][1]:.2f} s\n")
        print("| task | compute | transfer |\n|---|---|---|")
        keys = sorted(set(r["compute"]) | set(r["transfer"]), key=lambda k: -r["compute"].get(k, 0.0))
        for k in keys[:12]:
            print(f"| {k} | {r['compute'].get(k, 0.0):.2f} | {r['transfer'].get(k, 0.0):.2f} |")
        print()


def ceiling_child(size: int) -> None:
    """Import and load, say READY, wait for GO on stdin, run ZOGY once on one thread, print the wall time."""
    import dask

    d, pn, pr, warm = _zogy_inputs(size)
    warm()
    print("READY", flush=True)
    sys.stdin.readline()
    with dask.config.set(scheduler="threads", num_workers=1):
        wall, _ = _zogy_run(d, pn, pr)
    print("RESULT " + json.dumps({"wall": wall}), flush=True)


def _together(size: int, n: int) -> list[float]:
    """``n`` ceiling children started together (each released once all are loaded); their wall times."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--ceiling-child", "--zogy-size", str(size)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    for p in procs:
        while p.stdout.readline().strip() != "READY":
            if p.poll() is not None:
                raise RuntimeError("a ceiling child failed before it was ready")
    for p in procs:
        p.stdin.write("GO\n")
        p.stdin.flush()
    walls = []
    for p in procs:
        out, _ = p.communicate()
        walls.append(next(json.loads(ln[7:])["wall"] for ln in out.splitlines() if ln.startswith("RESULT ")))
    return walls


def ceiling(size: int, repeat: int) -> None:
    print(f"\nTwo-process ceiling: ZOGY {size}² pair, nx=4, one thread per process, fresh processes "
          f"(BLAS limited to one thread), {repeat} rounds\n")
    print("| round | alone (s) | two together (s) | throughput gain |\n|---|---|---|---|")
    gains = []
    for i in range(repeat):
        (alone,) = _together(size, 1)
        pair = _together(size, 2)
        gains.append(2 * alone / max(pair))
        print(f"| {i + 1} | {alone:.2f} | {' / '.join(f'{w:.2f}' for w in pair)} | {gains[-1]:.2f} |")
    print(f"\nmedian throughput gain of two processes: {np.median(gains):.2f} "
          f"(range {min(gains):.2f}-{max(gains):.2f})")


# ---------------------------------------------------------------- first touch
def touch_child(mb: int) -> dict:
    """Seconds to touch ``mb`` MB of new memory (one write per 4 KB page), then again after freeing it."""
    out = {}
    for what in ("fresh", "again"):
        t0 = time.perf_counter()
        a = np.empty(mb << 18, dtype=np.float32)
        a[::1024] = 1.0  # one float per 4 KB page: every page faulted in and zeroed by the kernel
        out[what] = time.perf_counter() - t0
        del a
    return out


def _free_page_reporting() -> str:
    """Whether a virtio balloon device offers free page reporting (feature bit 5) to the host."""
    import glob

    for dev in glob.glob("/sys/bus/virtio/devices/*"):
        try:
            with open(os.path.join(dev, "device")) as f:
                if int(f.read(), 16) != 5:  # virtio device id 5: memory balloon
                    continue
            with open(os.path.join(dev, "features")) as f:
                bits = f.read().strip()
        except OSError:
            continue
        return "on" if len(bits) > 5 and bits[5] == "1" else "off"
    return "no virtio balloon device"


def first_touch(mb: int, idle: float, repeat: int) -> None:
    print(f"\nFirst touch of {mb} MB in a fresh process, after {idle:g} s idle; virtio-balloon free page "
          f"reporting: {_free_page_reporting()}\n")
    print("| round | new memory (MB/s) | the same amount again, just freed (MB/s) |\n|---|---|---|")
    rates = []
    for i in range(repeat):
        time.sleep(idle)
        p = subprocess.run([sys.executable, __file__, "--touch-child", str(mb)], capture_output=True, text=True,
                           check=True)
        r = json.loads(next(ln[7:] for ln in p.stdout.splitlines() if ln.startswith("RESULT ")))
        rates.append((mb / r["fresh"], mb / r["again"]))
        print(f"| {i + 1} | {rates[-1][0]:.0f} | {rates[-1][1]:.0f} |")
    fresh, again = np.median([r[0] for r in rates]), np.median([r[1] for r in rates])
    print(f"\nmedian: new memory {fresh:.0f} MB/s, just freed {again:.0f} MB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--detect-size", type=int, default=2048)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--zogy-size", type=int, default=4096)
    ap.add_argument("--skip-zogy", action="store_true")
    ap.add_argument("--keep-heap", action="store_true",
                    help="ZOGY worker runs only, with glibc settings that keep freed memory in the heap (KEEP_HEAP)")
    ap.add_argument("--ceiling", action="store_true",
                    help="only the two-process ceiling: ZOGY alone vs two independent runs together")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of --ceiling or --first-touch")
    ap.add_argument("--first-touch", action="store_true",
                    help="only the first-touch cost of new memory (--touch-mb, after --idle seconds)")
    ap.add_argument("--fixed-cost", action="store_true",
                    help="only detection's fixed cost: detect_sources on a 256² image, one worker and in-process")
    ap.add_argument("--touch-mb", type=int, default=512)
    ap.add_argument("--idle", type=float, default=8.0)
    ap.add_argument("--touch-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--zogy-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ceiling-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ceiling_child:
        return ceiling_child(args.zogy_size)
    if args.touch_child is not None:
        print("RESULT " + json.dumps(touch_child(args.touch_child)))
        return
    if args.first_touch:
        return first_touch(args.touch_mb, args.idle, args.repeat)
    if args.fixed_cost:
        return fixed_cost(args.calls)
    if args.ceiling:
        return ceiling(args.zogy_size, args.repeat)
    if args.zogy_child is not None:
        print("RESULT " + json.dumps(zogy_child(args.zogy_size, args.zogy_child, args.keep_heap)))
        return
    if not args.keep_heap:
        detect_pieces(args.detect_size, args.calls)
    if not args.skip_zogy:
        zogy_tasks(args.zogy_size, args.keep_heap)


if __name__ == "__main__":
    main()
