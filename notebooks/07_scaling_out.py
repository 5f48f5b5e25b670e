# %% [markdown]
# # 07 · Scaling out: LocalCluster, a remote scheduler, Zarr on S3
#
# The same ZOGY subtraction as notebook 05, run three ways:
#
# 1. on a `distributed.LocalCluster` (worker processes: sep holds the GIL), with the dashboard link
#    and a performance report;
# 2. on a "remote" scheduler: here `dask scheduler` and `dask worker` started as subprocesses on
#    127.0.0.1, exactly what you would run on a cluster's nodes (`tilepipe --scheduler ADDRESS`);
# 3. writing the result as a Zarr store on an S3-compatible object store (a local moto server),
#    with the credentials and endpoint passed through `storage_options` so the workers get them.
#
# tilepipe never starts a cluster behind your back: lazy results compute on the current client.

# %%
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from distributed import Client, LocalCluster, performance_report

import tilepipe as tp

# the real test images: ../shared/data next to the repository, or $TILEPIPE_SHARED_DATA
DATA = Path(os.environ.get("TILEPIPE_SHARED_DATA", Path("..").resolve().parent / "shared" / "data"))
NEW = DATA / "pair_decam_sfft" / "Stack-DEC-OBS04.fits"
REF = DATA / "pair_decam_sfft" / "Stack-DEC-OBS18.fits"
workdir = Path(tempfile.mkdtemp(prefix="tilepipe-scaling-"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transient_found(res) -> str:
    cand = tp.find_transients(res, nsigma=5.0)
    d = np.hypot(cand["x"] - 129, cand["y"] - 128)
    best = cand[np.argmin(d)]
    assert d.min() < 2.0, "the nuclear transient near [128, 129] was not recovered"
    return f"transient at x={best['x']:.1f}, y={best['y']:.1f}, S/N {best['snr']:.1f}"


# %% [markdown]
# ## 1. LocalCluster, dashboard and performance report

# %%
cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0")
client = Client(cluster)
print("dashboard:", client.dashboard_link)

report = workdir / "subtract-report.html"
t0 = time.perf_counter()
with performance_report(filename=str(report)):
    res = tp.subtract(NEW, REF, method="zogy", nx=2, ny=2)
    res = res[["diff", "scorr", "fpsf", "fpsf_err", "mask"]].persist()
    print(transient_found(res))
scorr_local = res["scorr"].values  # kept on the client for the comparison below
print(f"LocalCluster: {time.perf_counter() - t0:.1f} s; performance report: {report.name} "
      f"({report.stat().st_size / 1e3:.0f} kB)")

# %% [markdown]
# ## 2. A Zarr store on an S3-compatible server
#
# A moto server on 127.0.0.1 stands in for S3 (or MinIO, Ceph...). The endpoint and dummy
# credentials travel in `storage_options`, never through environment variables, so every worker
# can write its own chunks.

# %%
import logging

import s3fs
from moto.server import ThreadedMotoServer

logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines from the test server

port = free_port()
s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
s3.start()
storage_options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
import boto3

boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
             **storage_options["client_kwargs"]).create_bucket(Bucket="tilepipe-demo")

url = tp.write_zarr(res, "s3://tilepipe-demo/decam/diff.zarr", storage_options=storage_options)
back = tp.io.read_zarr(url, storage_options=storage_options)
print(url, list(back.data_vars), "chunks:", back["diff"].data.chunks)
print("S_corr identical after the round trip:",
      np.array_equal(back["scorr"].values, scorr_local, equal_nan=True))
sorted(s3fs.S3FileSystem(**storage_options).ls("tilepipe-demo/decam/diff.zarr"))

# %%
client.close()
cluster.close()

# %% [markdown]
# ## 3. A remote scheduler
#
# On a real cluster you would run `dask scheduler` on one node and `dask worker ADDRESS` on the
# others (see `deploy/` for docker compose, Kubernetes and SLURM recipes). Here both run as
# subprocesses on 127.0.0.1; `tp.get_client(scheduler=ADDRESS)` connects to them. The input is
# read by the workers straight from the object store.

# %%
sched_port = free_port()
address = f"tcp://127.0.0.1:{sched_port}"
scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                              "--port", str(sched_port), "--dashboard-address", "127.0.0.1:0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "2",
                           "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                           "--local-directory", str(workdir / "worker-space")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
remote = tp.get_client(scheduler=address, timeout=60)
remote.wait_for_workers(2, timeout=120)
print("connected to", address, "with", len(remote.scheduler_info()["workers"]), "workers; dashboard:",
      remote.dashboard_link)

# %%
# upload the inputs to the object store; the workers read them from there
fs = s3fs.S3FileSystem(**storage_options)
fs.put(str(NEW), "tilepipe-demo/inputs/new.fits")
fs.put(str(REF), "tilepipe-demo/inputs/ref.fits")

t0 = time.perf_counter()
new = tp.open_image("s3://tilepipe-demo/inputs/new.fits", storage_options=storage_options)
ref = tp.open_image("s3://tilepipe-demo/inputs/ref.fits", storage_options=storage_options)
res2 = tp.subtract(new, ref, method="zogy", nx=2, ny=2)[["diff", "scorr", "fpsf", "fpsf_err", "mask"]].persist()
print(transient_found(res2))
print(f"remote scheduler: {time.perf_counter() - t0:.1f} s")
print("same S_corr as on the LocalCluster:",
      np.allclose(res2["scorr"].values, scorr_local, equal_nan=True, rtol=1e-5, atol=1e-5))

# %% [markdown]
# ## Clean up: stop the client, the scheduler and the worker, and the S3 server

# %%
remote.close()
for proc in (worker, scheduler):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
s3.stop()
print("worker exit code:", worker.returncode, " scheduler exit code:", scheduler.returncode)

# %%
import shutil

shutil.rmtree(workdir, ignore_errors=True)
