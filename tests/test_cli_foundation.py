"""The foundation commands: ``tilepipe --help``, ``info``, ``convert`` (click's CliRunner)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import tilepipe as tp
from tilepipe.cli import main


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def test_main_help(runner):
    res = runner.invoke(main, ["--help"])
    assert res.exit_code == 0, res.output
    for word in ("--scheduler", "--nx", "--overlap", "info", "convert", "demo"):
        assert word in res.output


def test_every_subcommand_has_help(runner):
    assert main.commands, "no subcommands registered"
    for name in sorted(main.commands):
        res = runner.invoke(main, [name, "--help"])
        assert res.exit_code == 0, f"`tilepipe {name} --help` failed:\n{res.output}"
        assert "Usage:" in res.output and name in res.output


def test_version(runner):
    res = runner.invoke(main, ["--version"])
    assert res.exit_code == 0 and tp.__version__ in res.output


def test_info_with_wcs(runner, shared_data):
    path = shared_data / "pair_decam_sfft" / "Stack-DEC-OBS04.fits"
    res = runner.invoke(main, ["info", str(path)])
    assert res.exit_code == 0, res.output
    assert "256 x 256" in res.output
    assert "RA---TPV" in res.output or "RA---TAN" in res.output
    assert "WCS        : none" not in res.output
    assert "gain" in res.output and "3.98" in res.output


def test_info_without_wcs(runner, shared_data):
    path = shared_data / "pair_pydia_microlens" / "AKB13475I0098.fits"
    res = runner.invoke(main, ["info", str(path)])
    assert res.exit_code == 0, res.output
    assert "512 x 512" in res.output and "WCS        : none" in res.output


def test_info_errors_cleanly(runner, tmp_path):
    res = runner.invoke(main, ["info", str(tmp_path / "missing.fits")])
    assert res.exit_code != 0
    assert "cannot open" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["info", "--hdu", "NOPE", str(tmp_path / "missing.fits")])
    assert res.exit_code != 0


def test_convert_fits_zarr_fits(runner, shared_data, tmp_path):
    src = shared_data / "pair_decam_sfft" / "Stack-DEC-OBS04.fits"
    z, f = tmp_path / "a.zarr", tmp_path / "b.fits"
    res = runner.invoke(main, ["convert", str(src), str(z)])
    assert res.exit_code == 0, res.output
    assert f"wrote {z}" in res.output
    res = runner.invoke(main, ["convert", str(z), str(f)])
    assert res.exit_code == 0, res.output
    orig, back = tp.open_image(src), tp.open_image(f)
    for k in ("image", "mask", "variance"):
        assert orig[k].values.tobytes() == back[k].values.tobytes()
    assert tp.wcs(back).to_header_string() == tp.wcs(orig).to_header_string()
    res = runner.invoke(main, ["info", str(z)])
    assert res.exit_code == 0 and "256 x 256" in res.output


def test_convert_refuses_overwrite(runner, shared_data, tmp_path):
    src = shared_data / "sep_regression" / "image.fits"
    dst = tmp_path / "c.zarr"
    assert runner.invoke(main, ["convert", str(src), str(dst)]).exit_code == 0
    res = runner.invoke(main, ["convert", str(src), str(dst)])
    assert res.exit_code != 0 and "already exists" in res.output and "--overwrite" in res.output
    res = runner.invoke(main, ["convert", "--overwrite", str(src), str(dst)])
    assert res.exit_code == 0, res.output


def test_convert_to_memory_url_and_storage_option(runner, shared_data):
    import uuid

    src = shared_data / "sep_regression" / "image.fits"
    url = f"memory://tp-{uuid.uuid4().hex[:8]}/img.zarr"
    res = runner.invoke(main, ["convert", str(src), url])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(tp.open_image(url)["image"].values, tp.open_image(src)["image"].values)
    res = runner.invoke(main, ["convert", "-s", "novalue", str(src), url + "2"])
    assert res.exit_code != 0 and "KEY=VALUE" in res.output
