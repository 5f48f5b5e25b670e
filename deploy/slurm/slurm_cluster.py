"""Run a tilepipe night on a SLURM cluster with dask-jobqueue.

    pip install dask-jobqueue
    python deploy/slurm/slurm_cluster.py night.toml --jobs 8 --queue normal --account myproj

Each SLURM job is one Dask worker process with one thread (sep holds the GIL, so
processes, not threads, give parallelism).
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="night TOML config")
    p.add_argument("--jobs", type=int, default=4, help="number of SLURM jobs (workers)")
    p.add_argument("--queue", default=None, help="SLURM partition")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--memory", default="8GB", help="memory per job")
    p.add_argument("--walltime", default="04:00:00", help="wall time per job")
    p.add_argument("--force", action="store_true", help="redo complete products")
    args = p.parse_args(argv)

    from dask_jobqueue import SLURMCluster
    from distributed import Client

    import tilepipe as tp

    cluster = SLURMCluster(cores=1, processes=1, memory=args.memory, walltime=args.walltime,
                           queue=args.queue, account=args.account, job_name="tilepipe")
    cluster.scale(jobs=args.jobs)
    with Client(cluster) as client:
        print("dashboard:", client.dashboard_link)
        summary = tp.run_pipeline(args.config, client=client, force=args.force, progress=True)
    print(f"{summary['n_done']} done, {summary['n_skipped']} skipped, {summary['n_failed']} failed")
    return 1 if summary["n_failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
