"""CLI options shared by commands: --nx/--ny for the demo, --overwrite and --storage-option with URL outputs."""

from __future__ import annotations

import contextlib
import io
import uuid

import numpy as np
import pytest
from astropy.table import Table
from click.testing import CliRunner

import tilepipe as tp
from tilepipe import io as tio
from tilepipe.cli import main


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def _context(args):
    """The command's :class:`tilepipe.cli.Context` as click builds it from the global options ``args``."""
    with main.make_context("tilepipe", [*args, "demo"]) as cctx:
        main.callback(**cctx.params)
        return cctx.obj


@pytest.mark.parametrize("args, expected", [
    ([], (2, 2)),
    (["--ny", "3"], (2, 3)),
    (["--nx", "3"], (3, 3)),
    (["--nx", "3", "--ny", "1"], (3, 1)),
    (["--nx", "1", "--ny", "1"], (1, 1)),
    (["--nx", "1"], (1, 1)),
])
def test_demo_tiles_follow_nx_and_ny(args, expected):
    # the demo defaults to 2 x 2 tiles; each of --nx, --ny given on the command line is used as given
    assert _context(args).tile_counts(2) == expected


def test_other_commands_default_to_one_tile():
    ctx = _context([])
    assert (ctx.nx, ctx.ny) == (1, 1)
    ctx = _context(["--ny", "4"])
    assert (ctx.nx, ctx.ny) == (1, 4)
    ctx = _context(["--nx", "3"])
    assert (ctx.nx, ctx.ny) == (3, 3)


@pytest.fixture
def image_file(tmp_path):
    p = tmp_path / "img.fits"
    tio.write_fits(tp.open_image(np.random.default_rng(0).normal(100, 5, (64, 64)).astype(np.float32)), p)
    return str(p)


@pytest.mark.parametrize("command", ["photometry", "detect", "psf"])
def test_existing_remote_output_is_refused_without_overwrite(runner, tmp_path, image_file, command):
    """An existing remote output is refused up front (before any computation), and left as it was."""
    url = f"memory://tp-{uuid.uuid4().hex[:8]}/out." + ("fits" if command == "psf" else "ecsv")
    if command == "psf":
        tio.write_fits(tp.open_image(np.zeros((8, 8), np.float32)), url)
    else:
        tio.write_table(Table({"keep": [1, 2, 3]}), url)
    args = {"photometry": ["photometry", image_file, "--psf", str(tmp_path / "psf.fits"), "-o", url],
            "detect": ["detect", image_file, "-o", url],
            "psf": ["psf", image_file, "-o", url]}[command]
    res = runner.invoke(main, ["--no-progress", *args])
    assert res.exit_code == 1, res.output
    assert f"{url} exists; pass --overwrite to replace it" in res.output
    assert "Traceback" not in res.output
    if command == "psf":
        assert tp.open_image(url)["image"].shape == (8, 8)
    else:
        assert tio.read_table(url).colnames == ["keep"]


@pytest.mark.parametrize("command", ["info", "detect", "psf", "photometry"])
def test_commands_take_storage_options(runner, command):
    res = runner.invoke(main, [command, "--help"])
    assert res.exit_code == 0 and "--storage-option" in res.output
    # a malformed option is reported cleanly, before anything is opened
    args = {"info": ["info", "x.fits"], "detect": ["detect", "x.fits", "-o", "c.ecsv"],
            "psf": ["psf", "x.fits", "-o", "p.fits"],
            "photometry": ["photometry", "x.fits", "--psf", "p.fits", "-o", "c.ecsv"]}[command]
    res = runner.invoke(main, ["--no-progress", *args, "-s", "novalue"])
    assert res.exit_code == 1 and "--storage-option must be KEY=VALUE" in res.output


def test_info_reads_a_url_with_storage_options(runner, s3_bucket):
    name, opts = s3_bucket
    url = f"s3://{name}/img.zarr"
    tio.write_zarr(tp.open_image(np.ones((48, 32), np.float32)), url, storage_options=opts)
    ep = opts["client_kwargs"]["endpoint_url"]
    res = runner.invoke(main, ["info", url, "-s", "key=testing", "-s", "secret=testing", "-s", f"endpoint_url={ep}"])
    assert res.exit_code == 0, res.output
    assert "48 x 32" in res.output


def test_demo_uses_ny_without_nx(runner, tmp_path):
    # --ny alone reaches the library: at 128 px the background mesh allows at most 2 tiles per axis, so
    # --ny 3 is reported (cleanly); before, --ny was ignored unless --nx > 1 and the demo ran 2 x 2
    res = runner.invoke(main, ["--no-progress", "--ny", "3", "demo", "--size", "128", "-o", str(tmp_path / "d")])
    assert res.exit_code == 1, res.output
    assert "ny=3" in res.output and "Traceback" not in res.output


def test_photometry_overwrite_replaces_a_remote_catalog(runner, tmp_path, image_file):
    psf = tmp_path / "psf.fits"
    tp.GaussianPSF(fwhm=3.0).to_fits(psf)
    Table({"x": [20.0, 40.0], "y": [25.0, 45.0]}).write(tmp_path / "cat.ecsv")
    url = f"memory://tp-{uuid.uuid4().hex[:8]}/phot.ecsv"
    tio.write_table(Table({"keep": [1, 2, 3]}), url)
    args = ["--no-progress", "photometry", image_file, "--psf", str(psf), "--catalog", str(tmp_path / "cat.ecsv"),
            "--fixed-position", "-o", url]
    res = runner.invoke(main, args)
    assert res.exit_code == 1 and "pass --overwrite" in res.output
    assert tio.read_table(url).colnames == ["keep"]
    res = runner.invoke(main, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    back = tio.read_table(url)
    assert len(back) == 2 and "keep" not in back.colnames


@pytest.mark.parametrize("where", ["memory", "s3"])
def test_photometry_reads_the_psf_from_a_url(runner, tmp_path, image_file, request, where):
    """--psf takes an fsspec URL, read with the command's --storage-option (S3: credentials + endpoint)."""
    import fsspec

    psf = tmp_path / "psf.fits"
    tp.GaussianPSF(fwhm=3.0).to_fits(psf)
    Table({"x": [20.0, 40.0], "y": [25.0, 45.0]}).write(tmp_path / "cat.ecsv")
    opts, sopts = {}, []
    if where == "s3":
        name, opts = request.getfixturevalue("s3_bucket")
        url = f"s3://{name}/psf.fits"
        ep = opts["client_kwargs"]["endpoint_url"]
        sopts = ["-s", "key=testing", "-s", "secret=testing", "-s", f"endpoint_url={ep}"]
    else:
        url = f"memory://tp-{uuid.uuid4().hex[:8]}/psf.fits"
    fs, path = fsspec.core.url_to_fs(url, **opts)
    fs.put_file(str(psf), path)
    out = tmp_path / "phot.ecsv"
    res = runner.invoke(main, ["--no-progress", "photometry", image_file, "--psf", url, "--catalog",
                               str(tmp_path / "cat.ecsv"), "--fixed-position", "-o", str(out), *sopts])
    assert res.exit_code == 0, res.output
    local = tmp_path / "phot_local.ecsv"
    res = runner.invoke(main, ["--no-progress", "photometry", image_file, "--psf", str(psf), "--catalog",
                               str(tmp_path / "cat.ecsv"), "--fixed-position", "-o", str(local)])
    assert res.exit_code == 0, res.output
    a, b = Table.read(out), Table.read(local)
    assert len(a) == 2
    np.testing.assert_array_equal(np.asarray(a["flux"]), np.asarray(b["flux"]))
    # a missing PSF URL is a clean error naming it
    res = runner.invoke(main, ["--no-progress", "photometry", image_file, "--psf", url + ".missing", "--catalog",
                               str(tmp_path / "cat.ecsv"), "-o", str(tmp_path / "x.ecsv"), *sopts])
    assert res.exit_code == 1 and "PSF file not found" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------- progress off stdout
class _Terminal:
    """A text stream that says it is a terminal (what a user watching the command sees)."""

    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s.decode() if isinstance(s, bytes) else s)
        return len(s)

    def flush(self):
        pass

    def isatty(self):
        return True

    def getvalue(self):
        return "".join(self.parts)


def _frames(tmp_path):
    raw, flat = tmp_path / "raw.fits", tmp_path / "flat.fits"
    tio.write_fits(tp.open_image(np.random.default_rng(1).normal(1000, 5, (64, 64)).astype(np.float32)), raw)
    tio.write_fits(tp.open_image(np.full((64, 64), 2.0, np.float32)), flat)
    return str(raw), str(flat)


def test_calibrate_progress_stays_off_stdout_when_not_a_terminal(runner, tmp_path, client):
    # CliRunner's streams are not terminals: stdout holds the result only, no \r frames or ANSI codes
    raw, flat = _frames(tmp_path)
    res = runner.invoke(main, ["calibrate", raw, "--flat", flat, "--flat-corrected", "-o", str(tmp_path / "c.fits")])
    assert res.exit_code == 0, res.output
    assert "\r" not in res.stdout and "\x1b" not in res.stdout, repr(res.stdout)
    assert res.stdout.startswith("wrote ") and str(tmp_path / "c.fits") in res.stdout
    # and no bar drawn on a stderr that is not a terminal either
    assert "\r" not in res.stderr and "\x1b" not in res.stderr and "Completed" not in res.stderr, repr(res.stderr)


def test_compute_draws_the_bar_on_a_terminal_stderr_only(tmp_path, client, monkeypatch, capsys):
    import dask.array as da

    from tilepipe.cli import Context

    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    x = da.ones((64, 64), chunks=16).sum()
    assert Context(None, None, None, None, 0, True).compute(x) == (4096.0,)
    assert "100% Completed" in term.getvalue()
    assert capsys.readouterr().out == ""
    # --no-progress: nothing drawn even on a terminal
    term.parts.clear()
    assert Context(None, None, None, None, 0, False).compute(x) == (4096.0,)
    assert term.getvalue() == ""


def test_cluster_progress_draws_on_the_given_terminal_only(client, capsys):
    import dask
    import dask.array as da

    from tilepipe.cluster import progress

    term = _Terminal()
    (x,) = dask.persist(da.ones((32, 32), chunks=8) * 2)
    progress(x, stream=term)
    assert "100% Completed" in term.getvalue()
    assert capsys.readouterr().out == ""
    plain = io.StringIO()
    progress(x, stream=plain)  # not a terminal: no frames
    assert plain.getvalue() == ""
    progress(x)  # default: stderr (not a terminal under pytest), never stdout
    out = capsys.readouterr()
    assert out.out == "" and "\r" not in out.err


def test_run_and_demo_progress_lines_go_to_stderr(runner, tmp_path, monkeypatch):
    import tilepipe.demo
    import tilepipe.pipeline

    def fake_run(config, force=False, scheduler=None, progress=False):
        print("[1/1] exp0: running detect", flush=True)  # printed whatever `progress`: the CLI routes it
        return {"n_done": 1, "n_skipped": 0, "n_failed": 0, "seconds": 1.0, "config": {"run": {"output": "out"}}}

    def fake_demo(output, **kw):
        print("  synthetic pair: 0.1 s", flush=True)
        return [(f"{output}/new.fits", "new")]

    monkeypatch.setattr(tilepipe.pipeline, "run_pipeline", fake_run)
    monkeypatch.setattr(tilepipe.demo, "run_demo", fake_demo)
    cfg = tmp_path / "night.toml"
    cfg.write_text("")
    res = runner.invoke(main, ["run", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "[1/1]" not in res.stdout and "[1/1] exp0: running detect" in res.stderr
    assert res.stdout.startswith("1 done, 0 skipped, 0 failed")
    res = runner.invoke(main, ["--no-progress", "run", str(cfg)])
    assert res.exit_code == 0 and "[1/1]" not in res.stdout and "[1/1]" not in res.stderr
    monkeypatch.setattr("tilepipe.cli.Context.client", lambda self: contextlib.nullcontext())
    res = runner.invoke(main, ["demo", "-o", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert "synthetic pair" not in res.stdout and "synthetic pair" in res.stderr
    assert res.stdout.startswith("tilepipe demo wrote 1 files")
    res = runner.invoke(main, ["--no-progress", "demo", "-o", str(tmp_path / "d2")])
    assert res.exit_code == 0 and "synthetic pair" not in res.stdout and "synthetic pair" not in res.stderr


# ----------------------------------------------------------------- cutout failures
@pytest.fixture
def cutout_inputs(tmp_path, image_file):
    # a 64 x 64 image without WCS or FWHM; targets in pixels: two inside, one outside, one on the corner
    cat = tmp_path / "targets.ecsv"
    Table({"x": [32.0, 30.0, 200.0, 1.0], "y": [32.0, 20.0, 5.0, 1.0], "id": ["a", "b", "c", "d"]}).write(cat)
    return image_file, str(cat)


def test_cutout_fails_when_no_cutout_is_written(runner, tmp_path, cutout_inputs, client):
    img, cat = cutout_inputs
    out = tmp_path / "cuts"
    res = runner.invoke(main, ["--no-progress", "cutout", img, "--catalog", cat, "--size", "10", "--unit", "pix",
                               "--mask-sources", "-o", str(out)])
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output
    assert "no cutout written" in res.output
    # the per-target reasons, each once with its count, in the CLI's words
    assert "3 targets: --mask-sources needs the PSF FWHM" in res.output and "--fwhm" in res.output
    assert "1 target: outside the image" in res.output
    assert res.output.count("needs the PSF FWHM") == 1
    assert not out.exists() or not list(out.glob("*.fits"))


def test_cutout_reports_why_some_targets_were_skipped(runner, tmp_path, cutout_inputs, client):
    img, cat = cutout_inputs
    out = tmp_path / "cuts"
    res = runner.invoke(main, ["--no-progress", "cutout", img, "--catalog", cat, "--size", "10", "--unit", "pix",
                               "--partial", "error", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("wrote 2 cutouts")
    assert "1 target: outside the image" in res.output
    assert "1 target: the cutout box" in res.output and "crosses the image edge" in res.output
    assert "--partial pad" in res.output
    assert sorted(p.name for p in out.glob("*.fits")) == ["a.fits", "b.fits"]


# ----------------------------------------------------------------- background refuses an existing output first
@pytest.mark.parametrize("name", ["bkg.fits", "bkg.zarr"])
def test_background_refuses_an_existing_output_before_any_work(runner, tmp_path, image_file, monkeypatch, name):
    import tilepipe.background

    out = tmp_path / name
    if name.endswith(".fits"):
        tio.write_fits(tp.open_image(np.zeros((8, 8), np.float32)), out)
    else:
        tio.write_zarr(tp.open_image(np.zeros((8, 8), np.float32)), out)

    def must_not_run(*a, **k):
        raise AssertionError("computed before checking the output")

    monkeypatch.setattr(tilepipe.background, "estimate_background", must_not_run)
    monkeypatch.setattr("tilepipe.cli.Context.client", must_not_run)
    res = runner.invoke(main, ["--no-progress", "background", image_file, "-o", str(out)])
    assert res.exit_code == 1, res.output
    assert f"{out} exists; pass --overwrite to replace it" in res.output
    assert tp.open_image(str(out))["image"].shape == (8, 8)


def test_cutout_skip_reasons_are_grouped_and_capped():
    from tilepipe.cli import _skip_reasons

    table = Table({"status": ["ok", "outside", "outside", "error", "error", "error", "error", "error", "partial"],
                   "message": ["", "position (x=1) lies outside", "position (x=2) lies outside", "A", "A", "B", "C",
                               "D", ""]})
    lines = _skip_reasons(table, most=3).splitlines()
    assert lines[:2] == ["  2 targets: outside the image", "  2 targets: A"]
    assert len(lines) == 4 and lines[3].startswith("  2 more targets for 2 other reasons")
    assert _skip_reasons(table[:1]) == ""
