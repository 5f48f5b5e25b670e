"""Night throughput: exposures per hour of `tilepipe.run_pipeline` with 1 and 2 workers.

Makes ``--n-exposures`` synthetic exposures of one field (``tilepipe.datasets.make_pair``, written
as FITS) plus the reference, then reduces the night on a LocalCluster with 1 and then 2 worker
processes (1 thread each), running the steps background → detect → subtract (ZOGY) → transients,
and prints a markdown table (exposures/hour, wall time, ratio to 1 worker, peak RSS per worker).

    python benchmarks/bench_pipeline.py --size 4096 --n-exposures 3 --workers 1 2

Cold start (worker imports) is excluded: each cluster runs one warm-up exposure first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time


def _make_night(root: str, size: int, n: int) -> None:
    import tilepipe as tp
    from tilepipe import datasets

    os.makedirs(os.path.join(root, "raw"), exist_ok=True)
    for i in range(n + 1):
        pair = datasets.make_pair((size, size), seed=100 + i, n_transients=20)
        name = "warmup" if i == n else f"exp{i:03d}"
        tp.write_fits(pair.new, os.path.join(root, "raw" if i < n else "", f"{name}.fits"), overwrite=True)
        if i == 0:
            tp.write_fits(pair.ref, os.path.join(root, "ref.fits"), overwrite=True)


def _config(root: str, out: str, pattern: str, tiles: int) -> dict:
    return {
        "run": {"output": out, "nx": tiles, "ny": tiles, "overlap": 64, "quicklook": True},
        "exposures": {"paths": [pattern], "field": "F1"},
        "references": {"F1": os.path.join(root, "ref.fits")},
        "steps": {"background": {}, "detect": {"nsigma": 5.0}, "subtract": {"method": "zogy"},
                  "transients": {"nsigma": 5.0}},
    }


def _peak_rss(client) -> float:
    import psutil  # noqa: F401  (imported on the workers)

    def rss():
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    return max(client.run(rss).values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="exposure side in pixels")
    p.add_argument("--n-exposures", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tiles", type=int, default=4, help="nx = ny")
    args = p.parse_args(argv)

    from distributed import Client, LocalCluster

    import tilepipe as tp

    root = tempfile.mkdtemp(prefix="tp-night-")
    rows = []
    try:
        t0 = time.perf_counter()
        _make_night(root, args.size, args.n_exposures)
        print(f"made {args.n_exposures} exposures of {args.size}² in {time.perf_counter() - t0:.1f} s", flush=True)
        for nw in args.workers:
            import dask
            from tilepipe.cluster import WORKER_ENVIRON

            dask.config.set(WORKER_ENVIRON)  # the worker environment tilepipe's CLI uses
            with LocalCluster(n_workers=nw, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, \
                    Client(cl) as client:
                warm = _config(root, os.path.join(root, f"warm{nw}"), os.path.join(root, "warmup.fits"), args.tiles)
                tp.run_pipeline(warm, client=client)
                cfg = _config(root, os.path.join(root, f"out{nw}"), os.path.join(root, "raw", "exp*.fits"), args.tiles)
                t1 = time.perf_counter()
                s = tp.run_pipeline(cfg, client=client)
                wall = time.perf_counter() - t1
                rows.append((nw, wall, s["n_done"], 3600.0 * s["n_done"] / wall, _peak_rss(client)))
                print(f"{nw} worker(s): {s['n_done']} done, {s['n_failed']} failed in {wall:.1f} s", flush=True)
        load = os.getloadavg()[0]
        print(f"\n{args.n_exposures} exposures of {args.size}² (steps background, detect, ZOGY, transients; "
              f"{args.tiles}x{args.tiles} tiles); load average {load:.1f}\n")
        print("| workers | wall (s) | exposures done | exposures / hour | speed-up vs 1 worker | peak RSS per worker (MB) |")
        print("|---|---|---|---|---|---|")
        base = rows[0][1] if rows else 1.0
        for nw, wall, done, eph, rss in rows:
            print(f"| {nw} | {wall:.1f} | {done} | {eph:.1f} | {base / wall:.2f} | {rss:.0f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
