"""CLI options shared by commands: --nx/--ny for the demo, --overwrite and --storage-option with URL outputs."""

from __future__ import annotations

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
