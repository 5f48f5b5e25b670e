"""The Dask client: the current one, a scheduler address, or a LocalCluster.

The library itself never starts a cluster behind the user's back: lazy results
compute on whatever scheduler dask is configured with (the current
``distributed.Client`` if one exists).  The CLI and the pipeline call
:func:`get_client` to get a client: the current one, one connected to
``scheduler`` (``tcp://host:8786``), or a new ``LocalCluster`` with processes
sized to the machine (sep holds the GIL, so processes beat threads).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

import dask

log = logging.getLogger(__name__)

__all__ = ["get_client", "client_context", "progress", "WORKER_ENVIRON"]

#: Dask config for the worker processes tilepipe starts (use it for your own ``LocalCluster`` with
#: ``dask.config.set(tilepipe.cluster.WORKER_ENVIRON)``): glibc's allocator in the workers serves
#: arrays below 32 MB from its heap and keeps up to 32 MB of freed memory at the heap's top
#: (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), so the image-sized temporaries of one tile
#: task reuse the pages of the previous one instead of being mapped, zeroed and unmapped afresh.
#: distributed's default (``MALLOC_TRIM_THRESHOLD_=65536``, which also switches off glibc's dynamic mmap
#: threshold) maps every one afresh: 4k detection on one worker took 5.74 s with it and 3.84 s without
#: (``python benchmarks/bench_detect.py --sizes 4096 --workers 1 --peers sep [--dask-default-env]``).
#: glibc's own dynamic threshold still faulted in ~100 MB of fresh pages per 2k detection; with these
#: two settings a worker faults ~0 pages on its second image (throwaway fault counts; README, detection
#: benchmark) while a ZOGY worker's peak memory stays what it was (``benchmarks/bench_zogy.py --sizes 4096``;
#: a 256 MB trim threshold kept 15-20 % more).
WORKER_ENVIRON = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 33554432,
                  "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 33554432}


def get_client(scheduler: str | None = None, n_workers: int | None = None, threads_per_worker: int = 1,
               timeout: float = 10.0, **cluster_kwargs: Any):
    """Return a :class:`distributed.Client`.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://HOST:8786``).  Fails with a
        clear ``ConnectionError`` within ``timeout`` seconds when unreachable.
    n_workers : int, optional
        Workers of the LocalCluster (default: one per core).
    threads_per_worker : int
        Threads per LocalCluster worker (default 1).
    timeout : float
        Seconds to wait for a remote scheduler.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(
                f"could not reach the Dask scheduler at {scheduler!r} within {timeout:g} s ({exc}); "
                "check the address and that `dask scheduler` is running, or omit --scheduler to use a LocalCluster"
            ) from None
    try:
        return Client.current()
    except ValueError:
        pass
    n_workers = n_workers or max(1, os.cpu_count() or 1)
    with dask.config.set(WORKER_ENVIRON):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=cluster_kwargs.pop("dashboard_address", ":0"), **cluster_kwargs)
    client = Client(cluster)
    log.info("started a LocalCluster with %d workers; dashboard at %s", n_workers, client.dashboard_link)
    return client


@contextlib.contextmanager
def client_context(scheduler: str | None = None, **kwargs: Any) -> Iterator[Any]:
    """Context manager around :func:`get_client` that closes what it created."""
    from distributed import Client

    try:
        existing = Client.current()
    except ValueError:
        existing = None
    if existing is not None and not scheduler:
        yield existing
        return
    client = get_client(scheduler, **kwargs)
    try:
        yield client
    finally:
        cluster = client.cluster
        client.close()
        if cluster is not None and not scheduler:
            cluster.close()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress(*futures_or_collections: Any, show: bool = True, stream: Any = None) -> None:
    """Draw a text progress bar of persisted collections/futures on the current client until they finish.

    The bar goes to ``stream`` (default ``sys.stderr``, so that standard output holds results only)
    and only when that stream is a terminal: redirected to a file or a pipe it would leave ``\\r``
    frames and ANSI codes there, so nothing is drawn (and this returns at once).  A no-op with
    ``show=False`` or without a current client.
    """
    import sys

    if not show:
        return
    stream = sys.stderr if stream is None else stream
    if not _is_terminal(stream):
        return
    try:
        from distributed import Client, futures_of

        Client.current()
    except (ImportError, ValueError):
        return
    futures = futures_of(futures_or_collections)
    if futures:
        import contextlib

        from distributed.diagnostics.progressbar import TextProgressBar

        with contextlib.redirect_stdout(stream):  # distributed's text bar writes to sys.stdout
            TextProgressBar(futures, complete=True)
