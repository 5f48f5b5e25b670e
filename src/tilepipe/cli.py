"""The ``tilepipe`` command line (click).

Global options (``--scheduler``, ``--nx/--ny/--overlap``, ``-v``) come before
the subcommand: ``tilepipe --nx 4 --overlap 64 detect image.fits -o cat.ecsv``.
Each capability adds its subcommand in its own section below.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__


class Context:
    """Options shared by every subcommand."""

    def __init__(self, scheduler: str | None, nx: int, ny: int | None, overlap: int | None, verbose: int,
                 progress: bool) -> None:
        self.scheduler = scheduler
        self.nx = nx
        self.ny = ny if ny is not None else nx
        self.overlap = overlap
        self.verbose = verbose
        self.progress = progress

    def tiles(self, default_overlap: int = 64) -> dict[str, Any]:
        """``nx, ny, overlap`` keyword arguments for library calls."""
        return {"nx": self.nx, "ny": self.ny, "overlap": self.overlap if self.overlap is not None else default_overlap}

    @contextlib.contextmanager
    def client(self):
        """A Dask client for the command (LocalCluster unless --scheduler), with a progress bar."""
        from .cluster import client_context

        with client_context(self.scheduler) as client:
            click.echo(f"dask dashboard: {client.dashboard_link}", err=True)
            yield client

    def compute(self, *collections: Any) -> tuple[Any, ...]:
        """Compute collections on the command's client, showing progress."""
        import dask

        if self.progress:
            try:
                from distributed import progress

                persisted = dask.persist(*collections)
                progress(*persisted, notebook=False)
                click.echo("", err=True)
                return dask.compute(*persisted)
            except ValueError:
                pass
        return dask.compute(*collections)


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tilepipe")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Dask scheduler address (tcp://HOST:8786). Default: a LocalCluster sized to this machine.")
@click.option("--nx", default=1, show_default=True, type=click.IntRange(min=1), help="Tiles along x.")
@click.option("--ny", default=None, type=click.IntRange(min=1), help="Tiles along y (default: --nx).")
@click.option("--overlap", default=None, type=click.IntRange(min=0),
              help="Halo width in pixels (default: each operation's own support).")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.pass_context
def main(ctx: click.Context, scheduler, nx, ny, overlap, verbose, progress) -> None:
    """tilepipe: tile-parallel astronomical image processing on Dask."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    ctx.obj = Context(scheduler, nx, ny, overlap, verbose, progress)


def fail(message: str) -> None:
    """Exit with a clean error message (no traceback)."""
    raise click.ClickException(message)


def open_or_fail(path: str, **kwargs: Any):
    """Open an image for a command, turning library errors into clean CLI errors."""
    from .image import open_image

    try:
        return open_image(path, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        fail(f"cannot open {path!r}: {exc}")


# ============================================================= foundation
@main.command()
@click.argument("path")
@click.option("--hdu", default=None, help="FITS extension number or name.")
def info(path: str, hdu: str | None) -> None:
    """Print shape, dtype, WCS and a header summary of an image (FITS or Zarr, local or URL)."""
    from .image import has_wcs, wcs

    ds = open_or_fail(path, hdu=_hdu(hdu))
    img = ds["image"]
    click.echo(f"{path}")
    click.echo(f"  shape      : {img.shape[0]} x {img.shape[1]} (y, x)")
    click.echo(f"  dtype      : {img.dtype}  chunks: {img.data.chunksize}")
    for key in ("bunit", "gain", "saturation", "fwhm"):
        if key in ds.attrs:
            click.echo(f"  {key:<11}: {ds.attrs[key]}")
    extra = [v for v in ds.data_vars if v not in ("image", "mask", "variance")]
    if extra:
        click.echo(f"  products   : {', '.join(extra)}")
    if has_wcs(ds):
        w = wcs(ds)
        c = w.pixel_to_world(img.shape[1] / 2 - 0.5, img.shape[0] / 2 - 0.5)
        scale = float(abs(w.proj_plane_pixel_scales()[0].to_value("arcsec")))
        click.echo(f"  WCS        : {'/'.join(w.wcs.ctype)}  centre {c.to_string('hmsdms')}  {scale:.3f}\"/px")
    else:
        click.echo("  WCS        : none")
    cards = ds.attrs.get("header", [])
    click.echo(f"  header     : {len(cards)} cards")
    for key in ("OBJECT", "DATE-OBS", "EXPTIME", "FILTER", "TELESCOP", "INSTRUME"):
        for c in cards:
            if c[0] == key:
                click.echo(f"    {key:<9}= {c[1]}")
                break


def _hdu(hdu: str | None) -> int | str | None:
    if hdu is None:
        return None
    return int(hdu) if hdu.lstrip("-").isdigit() else hdu


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--hdu", default=None, help="FITS extension of SRC.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--storage-option", "-s", multiple=True, metavar="KEY=VALUE",
              help="fsspec storage option for URLs (repeatable), e.g. -s anon=true.")
@pass_ctx
def convert(ctx: Context, src: str, dst: str, hdu: str | None, overwrite: bool, storage_option) -> None:
    """Convert an image between FITS and Zarr (local paths or fsspec URLs)."""
    from .io import write_fits, write_zarr

    opts = _storage_options(storage_option)
    ds = open_or_fail(src, hdu=_hdu(hdu), storage_options=opts)
    try:
        if _is_fits_name(dst):
            write_fits(ds, dst, overwrite=overwrite, storage_options=opts)
        else:
            write_zarr(ds, dst, overwrite=overwrite, storage_options=opts)
    except (OSError, ValueError, FileExistsError) as exc:
        fail(str(exc))
    click.echo(f"wrote {dst}")


def _is_fits_name(path: str) -> bool:
    p = path.lower()
    return p.endswith((".fits", ".fit", ".fts", ".fits.gz", ".fits.fz"))


def _storage_options(pairs) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in pairs:
        if "=" not in item:
            fail(f"--storage-option must be KEY=VALUE; got {item!r}")
        k, v = item.split("=", 1)
        low = v.lower()
        out[k] = True if low == "true" else False if low == "false" else v
    return out


@main.command()
@click.option("-o", "--output", default="tilepipe-demo", show_default=True, help="Output folder.")
@click.option("--size", default=1024, show_default=True, type=click.IntRange(min=128), help="Image side in pixels.")
@click.option("--seed", default=1, show_default=True, help="Random seed of the synthetic pair.")
@pass_ctx
def demo(ctx: Context, output: str, size: int, seed: int) -> None:
    """Make a seeded synthetic pair and run every stage on a LocalCluster.

    Writes Zarr, FITS, catalogs and PNG quick-looks into OUTPUT and prints
    what it wrote.
    """
    from .demo import run_demo

    with ctx.client():
        written = run_demo(output, size=size, seed=seed, nx=ctx.nx if ctx.nx > 1 else 2,
                           ny=ctx.ny if ctx.nx > 1 else 2, overlap=ctx.overlap)
    click.echo(f"tilepipe demo wrote {len(written)} files into {output}/:")
    for path, what in written:
        click.echo(f"  {path}  ({what})")


# ============================================================= capabilities
# Each capability adds its subcommand(s) in its own section, above the marker.

# === end of commands ===


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
