"""The nightly pipeline: config validation, resumability, a real scheduler + workers, S3, faults."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import tilepipe as tp
from tilepipe import datasets
from tilepipe.cli import main
from tilepipe.pipeline import ConfigError, load_config, run_pipeline

SIZE = 320
STEPS = {"background": {"mesh": 32}, "detect": {"nsigma": 5.0}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """Three raw exposures of field F1 (FITS), one corrupt file, and a reference."""
    root = tmp_path_factory.mktemp("night")
    (root / "raw").mkdir()
    for i in range(3):
        pair = datasets.make_pair((SIZE, SIZE), seed=10 + i, n_transients=3)
        ds = pair.new
        ds.attrs["header"] = [c for c in ds.attrs["header"] if c[0] != "OBJECT"] + [["OBJECT", "F1", "field"]]
        tp.write_fits(ds, root / "raw" / f"exp{i}.fits", overwrite=True)
        if i == 0:
            tp.write_fits(pair.ref, root / "ref_F1.fits", overwrite=True)
    return root


def _config(night: Path, out, steps=None, **run) -> dict:
    return {
        "run": {"output": str(out), "nx": 2, "ny": 2, "overlap": 32, "quicklook": True, **run},
        "exposures": {"paths": [str(night / "raw" / "exp*.fits")]},
        "references": {"F1": str(night / "ref_F1.fits")},
        "steps": copy.deepcopy(steps or STEPS),
    }


# ------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda c: c.pop("run"), r"\[run\] output is required"),
        (lambda c: c["run"].update(nx=0), r"\[run\] nx must be an integer >= 1"),
        (lambda c: c["steps"].update(sharpen={}), r"unknown key\(s\) 'sharpen' in \[steps\]"),
        (lambda c: c["steps"].update(detect={"nsgima": 3}), r"unknown key\(s\) 'nsgima' in \[steps.detect\]"),
        (lambda c: c.update(references={}) or c["steps"].update(subtract={}), r"subtract needs \[references\]"),
        (lambda c: c["steps"].update(transients={}), r"transients needs the subtract step"),
        (lambda c: c.update(exposures={"paths": ["/nonexistent/*.fits"]}), r"matched no files"),
        (lambda c: c.update(colour="red"), r"unknown key\(s\) 'colour' in \[top level\]"),
    ],
)
def test_config_errors_name_the_key(night, tmp_path, mutate, match):
    cfg = _config(night, tmp_path / "out")
    mutate(cfg)
    with pytest.raises(ConfigError, match=match):
        run_pipeline(cfg, client=_NoClient())
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


class _NoClient:
    """Stands in for a client where the test fails before any computation."""

    dashboard_link = ""

    def as_current(self):
        import contextlib

        return contextlib.nullcontext()


def test_toml_file_round_trip(night, tmp_path):
    toml = tmp_path / "night.toml"
    toml.write_text(
        f"""
[run]
output = "out"
nx = 2
overlap = 32
[exposures]
paths = ["{night}/raw/exp*.fits"]
[steps]
background = {{ mesh = 32 }}
detect = {{ nsigma = 5.0 }}
"""
    )
    cfg = load_config(toml)
    assert cfg["run"]["output"] == str(tmp_path / "out")
    assert cfg["run"]["ny"] == 2
    assert list(cfg["steps"]) == ["background", "detect"]


# ------------------------------------------------------------- local runs
def test_night_resumable_and_failures_reported(night, tmp_path, client):
    out = tmp_path / "out"
    cfg = _config(night, out)
    bad = tmp_path / "corrupt.fits"
    bad.write_bytes(b"SIMPLE  =                    T" + b"\0" * 100)
    cfg["exposures"]["paths"].append(str(bad))
    s1 = run_pipeline(cfg, client=client)
    assert s1["n_done"] == 3 and s1["n_failed"] == 1
    failed = [e for e in s1["exposures"] if e["status"] == "failed"][0]
    assert failed["name"] == "corrupt" and failed["error"]
    assert not (out / "corrupt").exists()  # nothing half-written under a final name
    for i in range(3):
        d = out / f"exp{i}"
        rec = json.loads((d / "_COMPLETE.json").read_text())
        assert rec["counts"]["sources"] > 10
        assert rec["config"]["steps"] == cfg["steps"] and "tilepipe" in rec["versions"]
        assert (d / "catalog.ecsv").exists() and (d / "quicklook.png").exists()
        prod = tp.open_image(str(d / "products.zarr"))
        assert {"background", "rms"} <= set(prod.data_vars)
        assert "tilepipe_config" in prod.attrs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_failed"] == 1 and (out / "summary.html").read_text().count("<tr") == 5
    # a rerun skips the complete products; an incomplete one is redone
    (out / "exp1" / "_COMPLETE.json").unlink()
    before = (out / "exp0" / "catalog.ecsv").stat().st_mtime_ns
    s2 = run_pipeline(cfg, client=client)
    status = {e["name"]: e["status"] for e in s2["exposures"]}
    assert status == {"exp0": "skipped", "exp1": "done", "exp2": "skipped", "corrupt": "failed"}
    assert (out / "exp0" / "catalog.ecsv").stat().st_mtime_ns == before
    s3 = run_pipeline(cfg, client=client, force=True)
    assert s3["n_done"] == 3 and s3["n_skipped"] == 0


def test_missing_reference_fails_that_exposure_only(night, tmp_path, client):
    cfg = _config(night, tmp_path / "out", steps={"subtract": {"method": "zogy"}})
    cfg["references"] = {"OTHER": str(night / "ref_F1.fits")}
    s = run_pipeline(cfg, client=client)
    assert s["n_failed"] == 3
    assert all("no reference image for field 'F1'" in e["error"] for e in s["exposures"])


def test_failed_exposure_lists_no_removed_outputs(night, tmp_path, client):
    """An exposure failing in its subtraction (a reference of another shape) after its catalog was written: the
    partial products are removed, and the summary no longer lists them as outputs."""
    from astropy.io import fits

    small = tmp_path / "ref_small.fits"
    fits.writeto(small, np.zeros((64, 64), np.float32))
    cfg = _config(night, tmp_path / "out", steps={**copy.deepcopy(STEPS), "subtract": {"method": "zogy"}})
    cfg["exposures"]["paths"] = [str(night / "raw" / "exp0.fits")]
    cfg["references"] = {"F1": str(small)}
    s = run_pipeline(cfg, client=client)
    (e,) = s["exposures"]
    assert e["status"] == "failed" and "shape" in e["error"]
    assert e["outputs"] == [] and not (tmp_path / "out" / "exp0").exists()


def test_subtraction_night_with_transients(night, tmp_path, client):
    cfg = _config(night, tmp_path / "out", steps={"background": {"mesh": 32}, "subtract": {"method": "zogy"},
                                                  "transients": {"nsigma": 5.0}})
    cfg["exposures"]["paths"] = [str(night / "raw" / "exp0.fits")]
    s = run_pipeline(cfg, client=client)
    assert s["n_done"] == 1, s["exposures"]
    # overlap=32 is below ZOGY's support here: recorded in the summary, not fatal
    assert any("OverlapWarning" in w for w in s["exposures"][0]["warnings"])
    d = tmp_path / "out" / "exp0"
    prod = tp.open_image(str(d / "products.zarr"))
    assert {"diff", "scorr"} <= set(prod.data_vars)
    cand = tp.read_table(str(d / "candidates.ecsv"))
    assert len(cand) >= 1


def test_cli_run_and_unwritable_output(night, tmp_path):
    toml = tmp_path / "night.toml"
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    toml.write_text(
        f'[run]\noutput = "{blocker}/out"\n[exposures]\npaths = ["{night}/raw/exp0.fits"]\n'
        "[steps]\nbackground = {}\n"
    )
    r = CliRunner().invoke(main, ["run", str(toml)])
    assert r.exit_code != 0 and "cannot write to the output location" in r.output


def test_unreachable_scheduler_fails_fast(night, tmp_path):
    port = _free_port()
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="could not reach the Dask scheduler"):
        run_pipeline(_config(night, tmp_path / "out"), scheduler=f"tcp://127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 30


# ------------------------------------------------- real scheduler + workers
class _Cluster:
    def __init__(self, nworkers: int = 2):
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.workers = [
            subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", self.address, "--nthreads", "1",
                 "--no-dashboard", "--name", f"w{i}", "--host", "127.0.0.1"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in range(nworkers)
        ]
        from distributed import Client

        deadline = time.time() + 60
        while True:
            try:
                self.client = Client(self.address, timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        self.client.wait_for_workers(nworkers, timeout=60)

    def close(self):
        self.client.close()
        for p in self.workers + [self.scheduler]:
            if p.poll() is None:
                p.terminate()
        for p in self.workers + [self.scheduler]:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def dask_cluster():
    c = _Cluster(2)
    try:
        yield c
    finally:
        c.close()


def _products(out: Path) -> dict:
    res = {}
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        cat = tp.read_table(str(d / "catalog.ecsv"))
        prod = tp.open_image(str(d / "products.zarr"))
        res[d.name] = (cat, np.asarray(prod["background"]), np.asarray(prod["rms"]))
    return res


@pytest.mark.cluster
def test_night_on_scheduler_and_workers_survives_a_killed_worker(night, tmp_path, dask_cluster):
    """Run through `dask scheduler` + 2 `dask worker` processes; kill one mid-night; same outputs."""
    ref_out = tmp_path / "undisturbed"
    s0 = run_pipeline(_config(night, ref_out), scheduler=dask_cluster.address)
    assert s0["n_done"] == 3
    expected = _products(ref_out)

    out = tmp_path / "disturbed"
    killed = threading.Event()

    def killer():
        c = dask_cluster.client
        victim = dask_cluster.workers[1]
        deadline = time.time() + 120
        while time.time() < deadline and not killed.is_set():
            processing = c.processing()
            busy = [w for w, tasks in processing.items() if tasks]
            if len(busy) >= 1 and (out / "exp0").exists() or any(p.name.startswith(".exp1") for p in out.glob(".*")):
                victim.kill()
                killed.set()
                return
            time.sleep(0.05)

    out.mkdir()
    th = threading.Thread(target=killer, daemon=True)
    th.start()
    s1 = run_pipeline(_config(night, out), scheduler=dask_cluster.address)
    th.join(timeout=5)
    assert killed.is_set(), "the worker was not killed during the night"
    assert dask_cluster.workers[1].poll() is not None
    assert s1["n_done"] == 3, s1["exposures"]
    got = _products(out)
    assert set(got) == set(expected)
    for name in expected:
        c0, b0, r0 = expected[name]
        c1, b1, r1 = got[name]
        assert len(c0) == len(c1)
        for col in ("x", "y", "flux"):
            assert np.array_equal(np.asarray(c0[col]), np.asarray(c1[col]))
        assert np.array_equal(b0, b1) and np.array_equal(r0, r1)


# ------------------------------------------------------------ object store
def test_night_from_and_to_s3(night, s3_bucket, client):
    import s3fs

    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(**opts)
    for i in range(2):
        fs.put_file(str(night / "raw" / f"exp{i}.fits"), f"{bucket}/raw/exp{i}.fits")
    cfg = {
        "run": {"output": f"s3://{bucket}/products", "nx": 2, "overlap": 32, "storage_options": opts},
        "exposures": {"paths": [f"s3://{bucket}/raw/exp*.fits"]},
        "steps": copy.deepcopy(STEPS),
    }
    s = run_pipeline(cfg, client=client)
    assert s["n_done"] == 2, s["exposures"]
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/products/exp0/_COMPLETE.json")
    assert fs.exists(f"{bucket}/products/summary.html")
    prod = tp.open_image(f"s3://{bucket}/products/exp1/products.zarr", storage_options=opts)
    assert "background" in prod
    # rerun skips everything
    s2 = run_pipeline(cfg, client=client)
    assert s2["n_skipped"] == 2


def test_wrong_s3_credentials_fail_before_any_work(night, s3_bucket, client):
    """With IAM checks on (moto's real signature verification), unknown keys fail in preflight."""
    import s3fs
    from moto.core.authorization import enable_iam_authentication

    bucket, opts = s3_bucket
    bad = dict(opts, key="AKIAWRONGKEY0000000", secret="wrong-secret")
    cfg = {
        "run": {"output": f"s3://{bucket}/products", "storage_options": bad},
        "exposures": {"paths": [str(night / "raw" / "exp0.fits")]},
        "steps": copy.deepcopy(STEPS),
    }
    with enable_iam_authentication():
        with pytest.raises(PermissionError, match="cannot write to the output location"):
            run_pipeline(cfg, client=client)
    fs = s3fs.S3FileSystem(**opts)
    fs.invalidate_cache()
    assert fs.ls(bucket) == []  # no partial output


def test_missing_bucket_fails_before_any_work(night, s3_server, client):
    cfg = {
        "run": {"output": "s3://tilepipe-no-such-bucket/products", "storage_options": s3_server},
        "exposures": {"paths": [str(night / "raw" / "exp0.fits")]},
        "steps": copy.deepcopy(STEPS),
    }
    with pytest.raises(PermissionError, match="tilepipe-no-such-bucket"):
        run_pipeline(cfg, client=client)


@pytest.fixture
def synchronous():
    import dask

    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.mark.parametrize("remote", [False, True], ids=["local", "memory-fs"])
def test_failed_forced_rerun_keeps_the_previous_product(night, tmp_path, synchronous, remote):
    """force=True replaces a complete product only once the new one is complete."""
    import shutil
    import uuid

    import fsspec

    raw = tmp_path / "exp0.fits"
    shutil.copy(night / "raw" / "exp0.fits", raw)
    out = f"memory://tp-{uuid.uuid4().hex[:8]}/out" if remote else str(tmp_path / "out")
    fs, root = fsspec.core.url_to_fs(out)
    cfg = _config(night, out, steps={"background": {"mesh": 32}}, quicklook=False, nx=1, ny=1, overlap=0)
    cfg["exposures"]["paths"] = [str(raw)]

    def product():
        marker = json.loads(fs.cat_file(f"{root}/exp0/_COMPLETE.json"))
        files = sorted(p.split("/exp0/", 1)[1] for p in fs.find(f"{root}/exp0"))
        return marker, files

    s1 = run_pipeline(cfg, client=_NoClient())
    assert s1["n_done"] == 1, s1["exposures"]
    rec1, files1 = product()
    # the raw file becomes unreadable; a forced re-run fails
    good = raw.read_bytes()
    raw.write_bytes(b"SIMPLE  =                    T" + b"\0" * 100)
    s2 = run_pipeline(cfg, client=_NoClient(), force=True)
    assert s2["n_failed"] == 1
    rec2, files2 = product()
    assert rec2 == rec1 and files2 == files1
    img = tp.open_image(f"{out}/exp0/products.zarr")
    assert img["image"].shape == (SIZE, SIZE) and "background" in img
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == ["exp0", "summary.html", "summary.json"]
    # a successful forced re-run replaces it
    raw.write_bytes(good)
    s3 = run_pipeline(cfg, client=_NoClient(), force=True)
    assert s3["n_done"] == 1
    rec3, files3 = product()
    assert rec3["finished"] != rec1["finished"] and files3 == files1
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == ["exp0", "summary.html", "summary.json"]


def test_subtract_step_options_override_run_tiling(night, tmp_path, synchronous):
    """[steps] subtract = {nx = ...} must not collide with the [run] tiling (duplicate keyword)."""
    cfg = _config(night, tmp_path / "out", steps={"subtract": {"method": "zogy", "nx": 1, "overlap": 48}},
                  quicklook=False)
    cfg["exposures"]["paths"] = [str(night / "raw" / "exp0.fits")]
    s = run_pipeline(cfg, client=_NoClient())
    assert s["n_done"] == 1, s["exposures"][0]["error"]
    prod = tp.open_image(str(tmp_path / "out" / "exp0" / "products.zarr"))
    grid = prod.attrs["subtraction"]["grid"]
    assert grid["nx"] == 1 and grid["ny"] == 2 and list(grid["overlap"]) == [48, 48]


# ------------------------------------------------------- review fixes
def _files_containing(root: Path, needle: bytes) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes())


def test_storage_options_are_redacted_in_every_record(night, tmp_path, synchronous):
    """Credentials from [run] storage_options never reach the products or the summary; keys are kept."""
    out = tmp_path / "out"
    cfg = _config(night, out, steps={"background": {"mesh": 32}}, quicklook=False, nx=1, ny=1, overlap=0)
    cfg["exposures"]["paths"] = [str(night / "raw" / "exp0.fits")]
    cfg["run"]["storage_options"] = {"secret": "MY-SECRET-KEY", "client_kwargs": {"token": "MY-SECRET-TOKEN"}}
    s = run_pipeline(cfg, client=_NoClient())
    assert s["n_done"] == 1, s["exposures"]
    for needle in (b"MY-SECRET-KEY", b"MY-SECRET-TOKEN"):
        assert _files_containing(out, needle) == []
    assert "MY-SECRET" not in json.dumps(s, default=str)
    redacted = {"secret": "***", "client_kwargs": {"token": "***"}}
    rec = json.loads((out / "exp0" / "_COMPLETE.json").read_text())
    assert rec["config"]["run"]["storage_options"] == redacted
    assert json.loads((out / "summary.json").read_text())["config"]["run"]["storage_options"] == redacted
    prod = tp.open_image(str(out / "exp0" / "products.zarr"))
    assert json.loads(prod.attrs["tilepipe_config"])["run"]["storage_options"] == redacted
    # the caller's config is untouched
    assert cfg["run"]["storage_options"]["secret"] == "MY-SECRET-KEY"


@pytest.fixture(scope="module")
def cal_frames(night):
    from astropy.io import fits

    root = night / "cal"
    root.mkdir(exist_ok=True)
    for name, value in (("bias", 1.0), ("dark", 5.0), ("flat", 3.0)):
        fits.writeto(root / f"{name}.fits", np.full((SIZE, SIZE), value, np.float32), overwrite=True)
    return {k: str(root / f"{k}.fits") for k in ("bias", "dark", "flat")}


@pytest.mark.parametrize(
    "cal_opts,step_opts,expect",
    [
        ({"dark_scale": 2.0, "flat_norm": 4.0}, {}, {"dark_scale": 2.0, "flat_norm": 4.0}),
        ({"dark_scale": 0.0}, {}, {"dark_scale": 0.0}),
        # [steps] calibrate options take precedence over [calibration]
        ({"dark_scale": 3.0, "flat_norm": 4.0}, {"dark_scale": 0.5}, {"dark_scale": 0.5, "flat_norm": 4.0}),
    ],
    ids=["calibration", "dark_scale_0", "steps_override"],
)
def test_calibration_dark_scale_and_flat_norm_are_applied(night, tmp_path, synchronous, cal_frames, cal_opts,
                                                          step_opts, expect):
    out = tmp_path / "out"
    cfg = _config(night, out, steps={"calibrate": step_opts}, quicklook=False, nx=1, ny=1, overlap=0)
    cfg["exposures"]["paths"] = [str(night / "raw" / "exp0.fits")]
    cfg["calibration"] = {**cal_frames, **cal_opts}
    s = run_pipeline(cfg, client=_NoClient())
    assert s["n_done"] == 1, s["exposures"]
    got = tp.open_image(str(out / "exp0" / "products.zarr"))["image"].values
    frames = {k: tp.open_image(v) for k, v in cal_frames.items()}
    raw = tp.open_image(str(night / "raw" / "exp0.fits"))
    want = tp.calibrate(raw, **frames, **expect)["image"].values
    default = tp.calibrate(raw, **frames, dark_scale=1.0)["image"].values
    assert np.allclose(got, want, equal_nan=True)
    assert not np.allclose(got, default, equal_nan=True)


@pytest.mark.parametrize(
    "section,opts,match",
    [
        ("calibration", {"dark_scale": "twice"}, r"\[calibration\] dark_scale must be a number >= 0"),
        ("calibration", {"flat_norm": "mean"}, r"\[calibration\] flat_norm must be 'median', 'max' or a number > 0"),
        ("steps", {"dark_scale": -1}, r"\[steps.calibrate\] dark_scale must be a number >= 0"),
        # the dark still holds the bias: scaling it needs the bias frame (else every exposure would fail)
        ("no-bias", {"dark_scale": 2.0}, r"\[calibration\] dark_scale = 2.0 needs \[calibration\] bias"),
        ("no-bias-steps", {"dark_scale": 0}, r"\[steps.calibrate\] dark_scale = 0 needs \[calibration\] bias"),
    ],
)
def test_calibration_option_values_are_checked(night, tmp_path, cal_frames, section, opts, match):
    cfg = _config(night, tmp_path / "out", steps={"calibrate": {}})
    cfg["calibration"] = dict(cal_frames)
    if section.startswith("no-bias"):
        del cfg["calibration"]["bias"]
        section = "calibration" if section == "no-bias" else "steps"
    (cfg["calibration"] if section == "calibration" else cfg["steps"]["calibrate"]).update(opts)
    with pytest.raises(ConfigError, match=match):
        load_config(cfg)
    if section == "calibration" and "bias" not in cfg["calibration"]:
        cfg["calibration"]["dark_scale"] = 1.0
        load_config(cfg)  # a dark holding the bias, unscaled: fine without a bias frame


@pytest.mark.parametrize("fmt", ["ecsv", "csv"])
def test_manifest_ecsv_and_csv(night, tmp_path, fmt):
    from astropy.table import Table

    from tilepipe.pipeline import expand_exposures

    (tmp_path / "m").mkdir()
    rel = os.path.relpath(night / "raw" / "exp1.fits", tmp_path / "m")
    manifest = tmp_path / "m" / f"night.{fmt}"
    Table({"path": [str(night / "raw" / "exp0.fits"), rel], "field": ["F1", "F2"]}).write(
        str(manifest), format=f"ascii.{fmt}")
    if fmt == "csv":
        manifest.write_text("# a comment line\n" + manifest.read_text())
    cfg = load_config({"run": {"output": str(tmp_path / "out")}, "exposures": {"manifest": str(manifest)}})
    exps = expand_exposures(cfg)
    assert [(e["path"], e["name"], e.get("field")) for e in exps] == [
        (str(night / "raw" / "exp0.fits"), "exp0", "F1"),
        (str(night / "raw" / "exp1.fits"), "exp1", "F2"),
    ]


def test_manifest_without_path_column_or_missing(night, tmp_path):
    from tilepipe.pipeline import expand_exposures

    bad = tmp_path / "bad.csv"
    bad.write_text("file,field\na.fits,F1\n")
    cfg = load_config({"run": {"output": str(tmp_path / "out")}, "exposures": {"manifest": str(bad)}})
    with pytest.raises(ConfigError, match=r"needs a 'path' column"):
        expand_exposures(cfg)
    cfg = load_config({"run": {"output": str(tmp_path / "out")}, "exposures": {"manifest": str(tmp_path / "no.csv")}})
    with pytest.raises(ConfigError, match=r"\[exposures\] manifest .*no\.csv.* does not exist"):
        expand_exposures(cfg)


def test_tilde_in_config_paths_is_expanded(night, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    toml = tmp_path / "conf" / "night.toml"
    toml.parent.mkdir()
    toml.write_text(
        '[run]\noutput = "~/out"\n[calibration]\nbias = "~/cal/bias.fits"\n'
        '[exposures]\npaths = ["~/raw/*.fits"]\nmanifest = "~/night.csv"\n'
        '[references]\nF1 = "~/refs/F1.fits"\n'
    )
    cfg = load_config(toml)
    assert cfg["run"]["output"] == str(home / "out")
    assert cfg["calibration"]["bias"] == str(home / "cal" / "bias.fits")
    assert cfg["exposures"]["paths"] == [str(home / "raw" / "*.fits")]
    assert cfg["exposures"]["manifest"] == str(home / "night.csv")
    assert cfg["references"] == {"F1": str(home / "refs" / "F1.fits")}


def test_missing_reference_file_fails_in_preflight(night, tmp_path):
    out = tmp_path / "out"
    cfg = _config(night, out, steps={"background": {"mesh": 32}, "subtract": {"method": "zogy"}})
    cfg["references"] = {"F1": str(night / "ref_TYPO.fits")}
    with pytest.raises(FileNotFoundError, match=r"ref_TYPO\.fits"):
        run_pipeline(cfg, client=_NoClient())
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "sub,bad",
    [
        ({"method": "zogy", "scael": 1.1}, "scael"),
        ({"method": "sfft", "kernel_half_widht": 3}, "kernel_half_widht"),
        ({"scael": 1.1}, "scael"),  # zogy is the default method
        ({"method": "sfft", "feather": 4}, "feather"),  # a ZOGY-only option
    ],
)
def test_subtract_option_typos_are_config_errors(night, tmp_path, sub, bad):
    cfg = _config(night, tmp_path / "out", steps={"subtract": sub})
    with pytest.raises(ConfigError, match=rf"unknown key\(s\) '{bad}' in \[steps.subtract\].*allowed: .*overlap"):
        run_pipeline(cfg, client=_NoClient())
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "sub",
    [
        {"method": "zogy", "scale": 1.0, "feather": 4, "nx": 1, "overlap": 48, "precision": "float32"},
        {"method": "sfft", "kernel_half_width": 3, "nx": 1},
        {},
    ],
)
def test_valid_subtract_options_pass_validation(night, tmp_path, sub):
    cfg = load_config(_config(night, tmp_path / "out", steps={"subtract": sub}))
    assert cfg["steps"]["subtract"] == sub


def test_subtract_method_is_checked(night, tmp_path):
    cfg = _config(night, tmp_path / "out", steps={"subtract": {"method": "hotpants"}})
    with pytest.raises(ConfigError, match=r"\[steps.subtract\] method must be 'zogy' or 'sfft'"):
        load_config(cfg)


def test_file_url_output_is_a_local_folder(night, tmp_path, synchronous):
    out = tmp_path / "new" / "out"
    cfg = _config(night, "file://" + str(out), steps={"background": {"mesh": 32}}, quicklook=False,
                  nx=1, ny=1, overlap=0)
    cfg["exposures"]["paths"] = [str(night / "raw" / "exp0.fits")]
    s = run_pipeline(cfg, client=_NoClient())
    assert s["n_done"] == 1, s["exposures"]
    assert (out / "exp0" / "_COMPLETE.json").exists() and (out / "summary.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["exp0", "summary.html", "summary.json"]
    assert run_pipeline(cfg, client=_NoClient())["n_skipped"] == 1


def test_manifest_on_an_object_store(night, tmp_path):
    """A remote ECSV manifest: its relative paths are on the same store."""
    import uuid

    import fsspec
    from astropy.table import Table

    from tilepipe.pipeline import expand_exposures

    root = f"memory://tp-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    local = tmp_path / "night.ecsv"
    Table({"path": ["raw/exp0.fits", str(night / "raw" / "exp1.fits")]}).write(str(local), format="ascii.ecsv")
    fs.pipe_file(f"{root}/lists/night.ecsv", local.read_bytes())
    cfg = load_config({"run": {"output": str(tmp_path / "out")}, "exposures": {"manifest": f"{root}/lists/night.ecsv"}})
    assert [e["path"] for e in expand_exposures(cfg)] == [f"{root}/lists/raw/exp0.fits", str(night / "raw" / "exp1.fits")]
    cfg["exposures"]["manifest"] = f"{root}/lists/missing.ecsv"
    with pytest.raises(ConfigError, match=r"\[exposures\] manifest .*missing\.ecsv.* does not exist"):
        expand_exposures(cfg)
