"""Shared fixtures: real LocalCluster, real S3-compatible server (moto), real data."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("TILEPIPE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real test images (../shared/data, see its README)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA}; set TILEPIPE_SHARED_DATA")
    return SHARED_DATA


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on loopback.

    Yields ``storage_options`` for fsspec/s3fs with dummy credentials and the
    endpoint passed explicitly (never through the environment), so Dask
    workers receive them too.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    try:
        yield opts
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; yields ``(bucket_name, storage_options)``."""
    import uuid

    import boto3

    name = f"tp-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=s3_server["client_kwargs"]["endpoint_url"],
        aws_access_key_id=s3_server["key"],
        aws_secret_access_key=s3_server["secret"],
        region_name="us-east-1",
    ).create_bucket(Bucket=name)
    yield name, s3_server


@pytest.fixture(params=["memory", "s3"])
def remote_folder(request):
    """``(folder_url, storage_options)`` of a fresh, empty folder on ``memory://`` or on the moto S3 server."""
    import uuid

    if request.param == "memory":
        return f"memory://tp-{uuid.uuid4().hex[:8]}/run", {}
    name, opts = request.getfixturevalue("s3_bucket")
    return f"s3://{name}/run", opts


def folder_keys(url, opts):
    """Every object under the folder that holds ``url`` (a fresh listing, no cache)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **opts)
    fs.invalidate_cache()
    return sorted(fs.find(path.rstrip("/").rsplit("/", 1)[0]))


@pytest.fixture
def remote_keys():
    """:func:`folder_keys`, for tests."""
    return folder_keys


@pytest.fixture(scope="session")
def local_cluster():
    """A real ``distributed.LocalCluster`` with 2 worker processes (session-wide)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    client = Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture
def client(local_cluster):
    """The session LocalCluster's client, made current for the test."""
    with local_cluster.as_current():
        yield local_cluster
