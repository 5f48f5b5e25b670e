"""Shared by the benchmark scripts: one table row from a method's repeated fresh-process runs; the peak
resident memory of a process."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (``VmHWM``: unlike ``ru_maxrss`` it is reset by exec, so a
    child process does not inherit its parent's peak)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


def summarize(runs: Sequence[dict], peak_keys: Sequence[str]) -> dict:
    """The run with the median wall time (its other metrics: quality is the same in every run), with
    ``wall`` = the median wall time, ``wall_range`` = (min, max), ``runs`` = how many succeeded, and each of
    ``peak_keys`` (peak memories) = its largest value over the runs.  Runs with an ``"error"`` are left out;
    when every run failed, the first one is returned."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["wall"])
    if not ok:
        return dict(runs[0])
    out = dict(ok[(len(ok) - 1) // 2])
    out["wall"] = float(np.median([r["wall"] for r in ok]))
    out["wall_range"] = (ok[0]["wall"], ok[-1]["wall"])
    out["runs"] = len(ok)
    for k in peak_keys:
        if k in out:
            out[k] = max(r[k] for r in ok if k in r)
    return out
