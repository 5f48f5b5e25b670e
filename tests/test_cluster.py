"""tilepipe.cluster: the LocalCluster tilepipe starts."""

from __future__ import annotations

import os

import pytest

from tilepipe.cluster import WORKER_ENVIRON, get_client

_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _allocator_env() -> dict:
    return {k: os.environ.get(k) for k in _KEYS}


@pytest.mark.cluster
def test_get_client_starts_workers_with_tilepipes_allocator_settings():
    """The workers of tilepipe's LocalCluster get WORKER_ENVIRON's glibc settings, not distributed's
    MALLOC_TRIM_THRESHOLD_=65536.  (distributed copies these settings into the starting process's own
    environment, where any value already set wins: the test starts from an environment without them, as a
    fresh process does, and puts the environment back.)"""
    saved = dict(os.environ)
    for k in _KEYS:
        os.environ.pop(k, None)
    try:
        client = get_client(n_workers=1, dashboard_address=None)
        try:
            assert client.cluster is not None  # a cluster started here, not some current client
            (env,) = client.run(_allocator_env).values()
        finally:
            cluster = client.cluster
            client.close()
            cluster.close()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    want = {k.rsplit(".", 1)[1]: str(v) for k, v in WORKER_ENVIRON.items()}
    assert env == want == {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "33554432"}
