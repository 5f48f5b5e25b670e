"""The ``tilepipe`` command line (click).

Global options (``--scheduler``, ``--nx/--ny/--overlap``, ``-v``) come before
the subcommand: ``tilepipe --nx 4 --overlap 64 detect image.fits -o cat.ecsv``.
Each capability adds its subcommand in its own section below.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

import click

from . import __version__


class Context:
    """Options shared by every subcommand."""

    def __init__(self, scheduler: str | None, nx: int | None, ny: int | None, overlap: int | None, verbose: int,
                 progress: bool) -> None:
        self.scheduler = scheduler
        self.given_nx, self.given_ny = nx, ny  # None: not given on the command line
        self.nx, self.ny = self.tile_counts(1)
        self.overlap = overlap
        self.verbose = verbose
        self.progress = progress

    def tile_counts(self, default: int) -> tuple[int, int]:
        """``(nx, ny)``: each as given, else ``default`` for nx and the resulting nx for ny.

        Parameters
        ----------
        default : int
            Tiles along x when ``--nx`` was not given (1 for most commands, 2 for ``demo``).
        """
        nx = self.given_nx if self.given_nx is not None else default
        return nx, self.given_ny if self.given_ny is not None else nx

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
        """Compute collections on the command's client, with a progress bar on stderr when it is a terminal.

        Standard output is for results only: the bar (``\\r`` frames) is never drawn there, nor on a
        stderr redirected to a file or pipe; ``--no-progress`` turns it off everywhere.
        """
        import dask

        from .cluster import _is_terminal, progress

        if self.progress and _is_terminal(sys.stderr):
            collections = dask.persist(*collections)
            progress(*collections)  # on stderr; nothing drawn without a client
        return dask.compute(*collections)

    @contextlib.contextmanager
    def progress_lines(self):
        """Route what a library call prints as progress (``print`` to stdout) to stderr, or nowhere with
        ``--no-progress``: standard output is for the command's results only."""
        import io

        with contextlib.redirect_stdout(sys.stderr if self.progress else io.StringIO()):
            yield


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tilepipe")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Dask scheduler address (tcp://HOST:8786). Default: a LocalCluster sized to this machine.")
@click.option("--nx", default=None, type=click.IntRange(min=1), help="Tiles along x (default: 1; demo: 2).")
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
    # distributed logs every worker start/stop at INFO (and connection resets at shutdown):
    # keep the terminal for our own messages unless -vv.  The environment variable reaches
    # the LocalCluster's worker processes too.
    import os

    dist_level = "info" if verbose >= 2 else "error"
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", dist_level)
    logging.getLogger("distributed").setLevel(dist_level.upper())
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


def refuse_existing(output: str, overwrite: bool, storage_options: dict[str, Any] | None = None) -> None:
    """Fail before any work when OUTPUT (local path or fsspec URL) exists and --overwrite was not given."""
    if overwrite:
        return
    from .io import _fs

    try:
        fs, path = _fs.get_fs(_fs.as_str(output, "output"), storage_options)
        exists = fs.exists(path)
    except (OSError, ValueError, TypeError) as exc:
        fail(f"cannot check whether {output!r} exists ({exc}); check the path or URL and --storage-option")
    if exists:
        fail(f"{output} exists; pass --overwrite to replace it")


STORAGE_OPTION = click.option("--storage-option", "-s", multiple=True, metavar="KEY=VALUE",
                              help="fsspec storage option for URLs (repeatable), e.g. -s anon=true.")


# ============================================================= foundation
@main.command()
@click.argument("path")
@click.option("--hdu", default=None, help="FITS extension number or name.")
@STORAGE_OPTION
def info(path: str, hdu: str | None, storage_option) -> None:
    """Print shape, dtype, WCS and a header summary of an image (FITS or Zarr, local or URL)."""
    from .image import has_wcs, wcs

    opts = _storage_options(storage_option)
    ds = open_or_fail(path, hdu=_hdu(hdu), storage_options=opts)
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
@STORAGE_OPTION
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
    what it wrote.  Tiles: 2 x 2 unless --nx / --ny are given.
    """
    from .demo import run_demo

    with ctx.client():
        nx, ny = ctx.tile_counts(2)  # the demo tiles 2 x 2 unless --nx / --ny say otherwise
        try:
            with ctx.progress_lines():  # its per-stage timings are progress: stderr, not stdout
                written = run_demo(output, size=size, seed=seed, nx=nx, ny=ny, overlap=ctx.overlap)
        except ValueError as exc:
            fail(str(exc))
    click.echo(f"tilepipe demo wrote {len(written)} files into {output}/:")
    for path, what in written:
        click.echo(f"  {path}  ({what})")


# ============================================================= capabilities
# Each capability adds its subcommand(s) in its own section, above the marker.

# ===== pipeline =====
@main.command("run")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Redo complete products too.")
@pass_ctx
def run_cmd(ctx: Context, config: str, force: bool) -> None:
    """Reduce a night from a TOML CONFIG (see tilepipe.pipeline): resumable, one summary per run."""
    from .pipeline import ConfigError, run_pipeline

    try:
        with ctx.progress_lines():  # its per-exposure lines are progress: stderr, not stdout
            summary = run_pipeline(config, force=force, scheduler=ctx.scheduler, progress=ctx.progress)
    except (ConfigError, FileNotFoundError, PermissionError, ConnectionError) as exc:
        fail(str(exc))
    click.echo(
        f"{summary['n_done']} done, {summary['n_skipped']} skipped, {summary['n_failed']} failed "
        f"in {summary['seconds']:.1f} s; summary in {summary['config']['run']['output']}/summary.html"
    )
    if summary["n_failed"]:
        sys.exit(1)


# ===== background =====
@main.command("background")
@click.argument("image")
@click.option("-o", "--output", required=True, help="Output .zarr (directory/URL) or .fits file: background and rms.")
@click.option("--mesh", default=64, show_default=True, type=click.IntRange(min=1), help="Mesh size (pixels).")
@click.option("--filter-size", default=3, show_default=True, type=click.IntRange(min=1),
              help="Median filter over the mesh grid (meshes).")
@click.option("--method", default="mesh", show_default=True, type=click.Choice(["mesh", "poly"]),
              help="SExtractor mesh background or a polynomial sky.")
@click.option("--order", default=3, show_default=True, type=click.IntRange(min=0), help="Polynomial degree (poly).")
@click.option("--grow", default=4, show_default=True, type=click.IntRange(min=0),
              help="Grow detected sources by this many pixels before the poly fit.")
@click.option("--subtracted", is_flag=True, help="Also write the background-subtracted image (as 'image').")
@click.option("--hdu", default=None, help="FITS extension of IMAGE.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@STORAGE_OPTION
@pass_ctx
def background_cmd(ctx: Context, image: str, output: str, mesh: int, filter_size: int, method: str, order: int,
                   grow: int, subtracted: bool, hdu: str | None, overwrite: bool, storage_option) -> None:
    """Estimate the sky background and rms of IMAGE (tile-parallel, equal to the whole-image result)."""
    from .background import estimate_background, subtract_background
    from .io import write_fits, write_zarr

    opts = _storage_options(storage_option)
    ds = open_or_fail(image, hdu=_hdu(hdu), storage_options=opts)
    refuse_existing(output, overwrite, opts)  # before any computation
    with ctx.client():
        try:
            bkg = estimate_background(ds, mesh=mesh, filter_size=filter_size, method=method, order=order, grow=grow,
                                      nx=ctx.nx, ny=ctx.ny, overlap=ctx.overlap)
        except ValueError as exc:
            fail(str(exc))
        out = subtract_background(ds, bkg) if subtracted else bkg
        try:
            if _is_fits_name(output):
                write_fits(out, output, overwrite=overwrite, storage_options=opts)
            else:
                write_zarr(out, output, overwrite=overwrite, storage_options=opts)
        except (OSError, ValueError, FileExistsError) as exc:
            fail(str(exc))
    click.echo(f"wrote {output} (global background {bkg.attrs['global_background']:.6g}, "
               f"rms {bkg.attrs['global_rms']:.6g}, {bkg.attrs['n_bad_meshes']} bad meshes)")


# ===== cutout / coadd / mosaic =====
@main.command("cutout")
@click.argument("image")
@click.option("--catalog", required=True, help="Targets table (ECSV, FITS, Parquet): ra/dec in degrees, or x/y with --unit pix.")
@click.option("--size", required=True, help="Full cutout width, e.g. 10arcsec, 1.5arcmin, 64pix.")
@click.option("-o", "--output", required=True, help="Folder (local or URL) for <name>.fits files, or a .zarr group.")
@click.option("--unit", default="arcsec", show_default=True, type=click.Choice(["arcsec", "pix"]),
              help="Unit of a bare --size number; 'pix' also reads x/y columns instead of ra/dec.")
@click.option("--partial", default="pad", show_default=True, type=click.Choice(["pad", "trim", "error"]),
              help="Cutouts crossing the image edge: pad+mask, trim, or report an error.")
@click.option("--sky", default=None, help="Subtract 'auto' (clipped median of the cutout) or a number.")
@click.option("--gain", default=None, type=float, help="e-/ADU for the sigma image (default: header GAIN).")
@click.option("--mask-sources/--no-mask-sources", default=False, show_default=True,
              help="Mask neighbours (needs a FWHM: --fwhm or the header).")
@click.option("--fwhm", default=None, type=float, help="PSF FWHM in pixels for --mask-sources.")
@click.option("--name-col", default=None, help="Catalog column naming the files (default: id, else row number).")
@click.option("--hdu", default=None, help="FITS extension of IMAGE.")
@click.option("--overwrite", is_flag=True, help="Replace existing cutouts.")
@STORAGE_OPTION
@pass_ctx
def cutout_cmd(ctx: Context, image: str, catalog: str, size: str, output: str, unit: str, partial: str, sky: str | None,
               gain: float | None, mask_sources: bool, fwhm: float | None, name_col: str | None, hdu: str | None,
               overwrite: bool, storage_option) -> None:
    """Cut IMAGE around every target of CATALOG into multi-extension FITS files (IMAGE, MASK, SIGMA)."""
    from .cutout import cutouts
    from .io import read_table

    opts = _storage_options(storage_option)
    try:
        cat = read_table(catalog, storage_options=opts)
    except (OSError, ValueError) as exc:
        fail(f"cannot read the catalog {catalog!r}: {exc}")
    sky_value: Any = None
    if sky is not None:
        try:
            sky_value = float(sky)
        except ValueError:
            sky_value = sky
    ms: Any = False
    if mask_sources:
        ms = {"fwhm": fwhm} if fwhm is not None else True
    # the library's warning points at the table's 'status' and 'message' columns, which a command-line user
    # never sees: the reasons are printed below instead
    cut_log = logging.getLogger("tilepipe.cutout")
    drop = _DropMessage("cutouts: %d of %d targets could not be cut")
    cut_log.addFilter(drop)
    try:
        with ctx.client():
            try:
                table = cutouts(image, cat, size, output=output, unit=unit, partial=partial, storage_options=opts,
                                sky=sky_value, gain=gain, mask_sources=ms, name_col=name_col, hdu=_hdu(hdu),
                                overwrite=overwrite)
            except (OSError, ValueError, TypeError, FileExistsError) as exc:
                fail(str(exc))
    finally:
        cut_log.removeFilter(drop)
    n_ok = int(sum(s in ("ok", "partial") for s in table["status"]))
    reasons = _skip_reasons(table)
    if n_ok == 0:
        if not len(table):
            fail(f"no cutout written: the catalog {catalog!r} has no targets")
        fail(f"no cutout written into {output}: all {len(table)} targets were skipped:\n{reasons}")
    click.echo(f"wrote {n_ok} cutouts of {table.meta['size'][0]} x {table.meta['size'][1]} px into {output} "
               f"({len(table) - n_ok} skipped: outside the image or failed)")
    if reasons:
        click.echo(f"skipped targets:\n{reasons}", err=True)


class _DropMessage(logging.Filter):
    """Drop the log records whose (unformatted) message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


#: the library's words for its keyword arguments, and the options that set them on the command line
_CUTOUT_HINTS = (
    ("mask_sources needs the PSF FWHM: pass mask_sources={'fwhm': ...} or an image with a 'fwhm' attribute",
     "--mask-sources needs the PSF FWHM: pass --fwhm PIXELS, or an image whose header gives it "
     "(FWHM, SEEING_PIX or PSF_FWHM)"),
    ("use partial='pad' (padded and masked) or partial='trim'",
     "use --partial pad (padded and masked) or --partial trim"),
)


def _skip_reasons(table: Any, most: int = 4) -> str:
    """The distinct reasons why targets of a ``cutouts`` table were skipped, with counts (most common first)."""
    from collections import Counter

    counts: Counter[str] = Counter()
    for status, message in zip(table["status"], table["message"]):
        if status in ("ok", "partial"):
            continue
        if status == "outside":  # the message names each position: one reason for all of them
            reason = "outside the image"
        else:
            reason = str(message) or str(status)
            for lib, cli in _CUTOUT_HINTS:
                reason = reason.replace(lib, cli)
        counts[reason] += 1
    lines = [f"  {n} target{'s' if n != 1 else ''}: {reason}" for reason, n in counts.most_common(most)]
    rest = sum(n for _, n in counts.most_common()[most:])
    if rest:
        k = len(counts) - most
        lines.append(f"  {rest} more target{'s' if rest != 1 else ''} for {k} other reason{'s' if k != 1 else ''} "
                     "(see the 'status' and 'message' columns of tilepipe.cutouts)")
    return "\n".join(lines)


def _write_product(ds: Any, output: str, overwrite: bool, opts: dict[str, Any]) -> None:
    from .io import write_fits, write_zarr

    try:
        if _is_fits_name(output):
            write_fits(ds, output, overwrite=overwrite, storage_options=opts)
        else:
            write_zarr(ds, output, overwrite=overwrite, storage_options=opts)
    except (OSError, ValueError, TypeError, FileExistsError) as exc:
        fail(str(exc))


@main.command("coadd")
@click.argument("images", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Output .zarr (directory/URL) or .fits file.")
@click.option("--method", default="proper", show_default=True, type=click.Choice(["proper", "weighted", "median"]),
              help="Zackay & Ofek proper coadd, inverse-variance weighted mean, or median.")
@click.option("--fwhm", default=None, type=float, multiple=True,
              help="Gaussian PSF FWHM (px) per image (repeat once per image); default: header or measured on stars.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@STORAGE_OPTION
@pass_ctx
def coadd_cmd(ctx: Context, images: tuple[str, ...], output: str, method: str, fwhm: tuple[float, ...],
              overwrite: bool, storage_option) -> None:
    """Coadd aligned IMAGES (same shape) into OUTPUT: coadd (as 'image'), variance, mask, nexp."""
    from .coadd import coadd

    opts = _storage_options(storage_option)
    dss = [open_or_fail(p, storage_options=opts) for p in images]
    with ctx.client():
        try:
            res = coadd(dss, method=method, fwhm=list(fwhm) if fwhm else None, **ctx.tiles(default_overlap=None))
        except (ValueError, TypeError) as exc:
            fail(str(exc))
        out = res.drop_vars(["psf", "tile_x", "tile_y"]).rename({"coadd": "image"})
        out.attrs = {k: v for k, v in res.attrs.items()}
        _write_product(out, output, overwrite, opts)
    click.echo(f"wrote {output} ({method} coadd of {len(images)} images, flux scales "
               f"{', '.join(f'{f:.4g}' for f in res.attrs['fluxes'])}, coadd FWHM {res.attrs['fwhm']:.2f} px)")


@main.command("mosaic")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Output Zarr store (local path or URL, e.g. s3://bucket/m.zarr).")
@click.option("--combine", default="mean", show_default=True, type=click.Choice(["mean", "median", "proper"]))
@click.option("--resolution", default=None, type=float, help="Output pixel scale in arcsec (default: finest input).")
@click.option("--tile-size", default=1024, show_default=True, type=click.IntRange(min=16),
              help="Output tile = Zarr chunk side (pixels).")
@click.option("--match-background/--no-match-background", default=True, show_default=True,
              help="Solve and subtract additive offsets between overlapping inputs.")
@click.option("--reference", default=None, type=int, help="Input index whose background level is kept.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@STORAGE_OPTION
@pass_ctx
def mosaic_cmd(ctx: Context, inputs: tuple[str, ...], output: str, combine: str, resolution: float | None,
               tile_size: int, match_background: bool, reference: int | None, overwrite: bool, storage_option) -> None:
    """Reproject INPUTS (with WCS) onto one grid and combine them into a Zarr mosaic with a coverage map."""
    from .mosaic import mosaic

    opts = _storage_options(storage_option)
    with ctx.client():
        try:
            res = mosaic(list(inputs), resolution=resolution, combine=combine, match_background=match_background,
                         output=output, storage_options=opts, tile_size=tile_size, reference=reference,
                         overwrite=overwrite)
        except (OSError, ValueError, TypeError, FileExistsError) as exc:
            fail(str(exc))
    ny, nx = res["image"].shape
    click.echo(f"wrote {output}: {ny} x {nx} px mosaic of {len(inputs)} inputs, background offsets "
               f"{', '.join(f'{b:.4g}' for b in res.attrs['background_offsets'])}")


# ===== detect =====
@main.command("detect")
@click.argument("image")
@click.option("-o", "--output", required=True, help="Output catalog: .ecsv, .fits or .parquet.")
@click.option("--nsigma", default=1.5, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Detection threshold in units of the background rms.")
@click.option("--minarea", default=5, show_default=True, type=click.IntRange(min=1), help="Minimum pixels per source.")
@click.option("--filter-fwhm", default=None, type=click.FloatRange(min=0),
              help="FWHM (px) of the Gaussian detection filter (default: sep's 3x3 kernel; 0: none).")
@click.option("--deblend-cont", default=0.005, show_default=True, type=click.FloatRange(min=0),
              help="Deblending contrast (1 disables deblending).")
@click.option("--plot", default=None, metavar="PNG", help="Also write a zscale quick-look with the detections circled.")
@click.option("--hdu", default=None, help="FITS extension of IMAGE.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@STORAGE_OPTION
@pass_ctx
def detect_cmd(ctx: Context, image: str, output: str, nsigma: float, minarea: int, filter_fwhm: float | None,
               deblend_cont: float, plot: str | None, hdu: str | None, overwrite: bool, storage_option) -> None:
    """Detect sources in IMAGE (sep per tile, merged by ownership) and write a catalog."""
    from .detect import detect_sources, plot_detections

    opts = _storage_options(storage_option)
    ds = open_or_fail(image, hdu=_hdu(hdu), storage_options=opts)
    refuse_existing(output, overwrite, opts)  # before any computation
    tiles = {"nx": ctx.nx, "ny": ctx.ny, "overlap": ctx.overlap}
    with ctx.client():
        try:
            cat = detect_sources(ds, nsigma=nsigma, minarea=minarea, filter_fwhm=filter_fwhm,
                                 deblend_cont=deblend_cont, **tiles)
        except ValueError as exc:
            fail(str(exc))
    from .io import write_table

    try:
        write_table(cat, output, overwrite=overwrite, storage_options=opts)
    except (OSError, ValueError) as exc:
        fail(f"cannot write {output!r}: {exc}")
    click.echo(f"wrote {output} ({len(cat)} sources)")
    if plot:
        plot_detections(ds, cat, plot)
        click.echo(f"wrote {plot}")


# ===== psf =====
def _read_catalog_or_fail(path: str, storage_options: dict[str, Any] | None = None):
    from .io import read_table

    try:
        return read_table(path, storage_options=storage_options)
    except (OSError, ValueError) as exc:
        fail(f"cannot read catalog {path!r}: {exc}")


@main.command("psf")
@click.argument("image")
@click.option("-o", "--output", required=True, help="Output PSF file (FITS).")
@click.option("--catalog", default=None, help="Source catalog (x, y columns) to select stars from (default: detect).")
@click.option("--size", default=25, show_default=True, type=click.IntRange(min=5), help="PSF stamp side (px, odd).")
@click.option("--degree", default=2, show_default=True, type=click.IntRange(min=0),
              help="Degree of the polynomial spatial variation.")
@click.option("--model", "model", default="pixel", show_default=True, type=click.Choice(["pixel", "kl"]),
              help="Pixel basis (PSFEx-like) or Karhunen-Loeve basis.")
@click.option("--oversampling", default=1, show_default=True, type=click.IntRange(min=1), help="Model samples per pixel.")
@click.option("--plot", default=None, metavar="PNG", help="Write a grid of PSFs across the field and the FWHM map.")
@click.option("--hdu", default=None, help="FITS extension of IMAGE.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@STORAGE_OPTION
@pass_ctx
def psf_cmd(ctx: Context, image: str, output: str, catalog: str | None, size: int, degree: int, model: str,
            oversampling: int, plot: str | None, hdu: str | None, overwrite: bool, storage_option) -> None:
    """Build a spatially varying PSF model of IMAGE and write it to a FITS file (local path or URL)."""
    from .io import _fs
    from .psf import build_psf
    from .psf.plots import plot_psf

    opts = _storage_options(storage_option)
    ds = open_or_fail(image, hdu=_hdu(hdu), storage_options=opts)
    refuse_existing(output, overwrite, opts)  # before any computation
    cat = _read_catalog_or_fail(catalog, opts) if catalog else None
    with ctx.client():
        try:
            psf = build_psf(ds, cat, size=size, degree=degree, model=model, oversampling=oversampling,
                            nx=ctx.nx, ny=ctx.ny, overlap=ctx.overlap)
        except ValueError as exc:
            fail(str(exc))
    try:
        # written locally, then published atomically (renamed, or uploaded in one PUT), never over an
        # existing OUTPUT without --overwrite
        with _fs.atomic_file(output, overwrite=overwrite, storage_options=opts, suffix=".fits") as tmp:
            psf.to_fits(tmp, overwrite=True)
    except (OSError, ValueError) as exc:
        fail(f"cannot write {output!r}: {exc}")
    click.echo(f"wrote {output} ({psf.kind} PSF, {psf.meta.get('n_stars')} stars, degree {psf.degree}, "
               f"FWHM at centre {psf.meta.get('fwhm_centre', float('nan')):.2f} px)")
    if plot:
        plot_psf(psf, plot)
        click.echo(f"wrote {plot}")


@main.command("photometry")
@click.argument("image")
@click.option("--psf", "psf_path", required=True,
              help="PSF file written by `tilepipe psf` (local path or URL; --storage-option applies).")
@click.option("-o", "--output", required=True, help="Output catalog (.ecsv, .fits, .parquet).")
@click.option("--catalog", default=None, help="Source catalog with x, y (default: detect sources).")
@click.option("--fixed-position", is_flag=True, help="Hold positions at the catalog's x, y (fit fluxes only).")
@click.option("--box", default=None, type=click.IntRange(min=3), help="Fitting box side (px, default ~4 FWHM).")
@click.option("--hdu", default=None, help="FITS extension of IMAGE.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@STORAGE_OPTION
@pass_ctx
def photometry_cmd(ctx: Context, image: str, psf_path: str, output: str, catalog: str | None, fixed_position: bool,
                   box: int | None, hdu: str | None, overwrite: bool, storage_option) -> None:
    """PSF-fit photometry of the sources of IMAGE with a PSF model (per tile, grouped fits)."""
    from .psf import load_psf, psf_photometry
    from .psf.model import detect_for_psf

    opts = _storage_options(storage_option)
    ds = open_or_fail(image, hdu=_hdu(hdu), storage_options=opts)
    refuse_existing(output, overwrite, opts)  # before any computation
    try:
        psf = load_psf(psf_path, storage_options=opts)
    except (OSError, ValueError, TypeError) as exc:
        fail(f"cannot read PSF {psf_path!r}: {exc}")
    with ctx.client():
        cat = _read_catalog_or_fail(catalog, opts) if catalog else detect_for_psf(ds, nx=ctx.nx, ny=ctx.ny)
        try:
            tab = psf_photometry(ds, cat, psf, fit_position=not fixed_position, nx=ctx.nx, ny=ctx.ny,
                                 overlap=ctx.overlap, box=box)
        except (ValueError, TypeError) as exc:
            fail(str(exc))
    from .io import write_table

    try:
        write_table(tab, output, overwrite=overwrite, storage_options=opts)
    except (OSError, ValueError) as exc:
        fail(f"cannot write {output!r}: {exc}")
    click.echo(f"wrote {output} ({len(tab)} sources)")


# ===== calibrate =====
@main.command("calibrate")
@click.argument("raw")
@click.option("-o", "--output", required=True, help="Output .fits file or .zarr store (path or URL).")
@click.option("--bias", default=None, help="Master bias frame.")
@click.option("--dark", default=None, help="Master dark frame.")
@click.option("--flat", default=None, help="Master flat frame.")
@click.option("--dark-scale", default=None, type=float,
              help="Dark scale factor (default: t_raw/t_dark from DARKTIME/EXPTIME headers).")
@click.option("--flat-norm", default="median", show_default=True, type=click.Choice(["median", "max"]),
              help="Normalise the flat by the median or max of its good pixels.")
@click.option("--dark-has-bias/--dark-bias-subtracted", default=True, show_default=True,
              help="Whether the dark still contains the bias.")
@click.option("--flat-has-bias/--flat-corrected", default=True, show_default=True,
              help="Whether the flat still contains bias and dark current (removed before normalising).")
@click.option("--saturation", default=None, type=float,
              help="Raw-count level masked in every frame (e.g. 65535); default from the raw header.")
@click.option("--hot-pixel-sigma", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Also mask dark-current outliers above this many robust sigma.")
@click.option("--calib-variance", is_flag=True, help="Propagate the calibration frames' variance too.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@STORAGE_OPTION
@pass_ctx
def calibrate_cmd(ctx: Context, raw: str, output: str, bias: str | None, dark: str | None, flat: str | None,
                  dark_scale: float | None, flat_norm: str, dark_has_bias: bool, flat_has_bias: bool,
                  saturation: float | None, hot_pixel_sigma: float | None, calib_variance: bool, overwrite: bool,
                  storage_option) -> None:
    """Calibrate RAW: subtract BIAS and the scaled DARK, divide by the normalised FLAT (lazy, per tile)."""
    import warnings

    from .calibrate import calibrate
    from .io import write_fits, write_zarr

    opts = _storage_options(storage_option)
    if bias is None and dark is None and flat is None:
        fail("give at least one of --bias, --dark, --flat")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kw = dict(dark_scale=dark_scale, dark_has_bias=dark_has_bias, flat_has_bias=flat_has_bias,
                  saturation=saturation, hot_pixel_sigma=hot_pixel_sigma, calib_variance=calib_variance,
                  storage_options=opts)
        try:
            out, norm = calibrate(raw, bias, dark, flat, flat_norm=flat_norm, return_norm=True, **kw)
        except (OSError, ValueError, TypeError) as exc:
            fail(str(exc))
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    with ctx.client():
        try:
            if norm is not None:
                # one pass over the flat, then the number: a band-by-band writer must not redo it per band
                value = float(ctx.compute(norm)[0])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # already reported above
                    out = calibrate(raw, bias, dark, flat, flat_norm=value, **kw)
                out.attrs["parameters"]["calibrate"]["flat_norm"] = f"{flat_norm} = {value:.8g}"
                click.echo(f"flat {flat_norm}: {value:.8g} ADU", err=True)
            if _is_fits_name(output):
                write_fits(out, output, overwrite=overwrite, storage_options=opts)
            else:
                write_zarr(out, output, overwrite=overwrite, storage_options=opts)
        except (OSError, ValueError, TypeError, FileExistsError) as exc:
            fail(str(exc))
    p = out.attrs["parameters"]["calibrate"]
    done = [f"bias {p['bias']}" if p["bias"] else "", f"dark {p['dark']} x {p['dark_scale']:.4g}" if p["dark"] else "",
            f"flat {p['flat']} ({p['flat_norm']})" if p["flat"] else ""]
    click.echo(f"wrote {output} ({', '.join(d for d in done if d)})")


# ===== subtract =====
@main.command("subtract")
@click.argument("new")
@click.argument("ref")
@click.option("-o", "--output", required=True, help="Output .zarr (directory/URL): diff, scorr, s, fpsf, fpsf_err, mask, diff_psf.")
@click.option("--method", default="zogy", show_default=True, type=click.Choice(["zogy", "sfft"]), help="Subtraction method.")
@click.option("--fits", "fits_out", default=None, help="Also write a multi-extension FITS (DIFF primary, SCORR, FPSF, ...).")
@click.option("--candidates", default=None, help="Also write transient candidates (ECSV/FITS/Parquet by extension).")
@click.option("--plot", default=None, help="Also write a PNG of (new, ref, diff) cutouts of the candidates.")
@click.option("--nsigma", default=5.0, show_default=True, type=float, help="Candidate threshold on |S_corr|.")
@click.option("--new-gain", default=None, type=float, help="Gain of NEW in e-/ADU (default: header GAIN).")
@click.option("--ref-gain", default=None, type=float, help="Gain of REF in e-/ADU (default: header GAIN).")
@click.option("--scale", default=None, type=float, help="Flux ratio new/ref (default: fitted on stars).")
@click.option("--align", is_flag=True, help="Reproject REF onto the WCS of NEW first.")
@click.option("--psf-method", default="auto", show_default=True, type=click.Choice(["auto", "model", "empirical"]),
              help="PSF estimate when no PSF is given (ZOGY).")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist.")
@click.option("--no-cluster", is_flag=True, help="Run on the local threaded scheduler instead of a LocalCluster.")
@STORAGE_OPTION
@pass_ctx
def subtract_cmd(ctx: Context, new: str, ref: str, output: str, method: str, fits_out: str | None,
                 candidates: str | None, plot: str | None, nsigma: float, new_gain: float | None,
                 ref_gain: float | None, scale: float | None, align: bool, psf_method: str, overwrite: bool,
                 no_cluster: bool, storage_option) -> None:
    """Subtract REF from NEW (aligned images) with ZOGY or SFFT, tile-parallel; optionally find transients."""
    from .io import read_zarr, write_fits, write_table, write_zarr
    from .subtract import find_transients, subtract

    opts = _storage_options(storage_option)
    if method == "sfft" and (scale is not None or align):
        fail("--scale and --align are options of --method zogy; SFFT fits the flux ratio itself and needs "
             "images already on the same pixel grid")
    # the gains go into the default variance maps (SFFT uses them as they are; ZOGY builds its own from them)
    new_ds = open_or_fail(new, storage_options=opts, gain=new_gain)
    ref_ds = open_or_fail(ref, storage_options=opts, gain=ref_gain)
    for path in (output, fits_out, candidates):  # every output, before any computation
        if path:
            refuse_existing(path, overwrite, opts)
    kw: dict[str, Any] = {"nx": ctx.nx, "ny": ctx.ny, "overlap": ctx.overlap}
    if method == "zogy":
        kw.update(new_gain=new_gain, ref_gain=ref_gain, scale=scale, align=align, psf_method=psf_method)
    cm = contextlib.nullcontext() if no_cluster else ctx.client()
    with cm:
        try:
            res = subtract(new_ds, ref_ds, method=method, **kw)
            write_zarr(res, output, overwrite=overwrite, storage_options=opts)
            # later products read the written store: the subtraction is computed once, out of core
            res = read_zarr(output, storage_options=opts)
            if fits_out:
                planes = res.rename({"diff": "image"})
                write_fits(planes, fits_out, overwrite=overwrite, storage_options=opts,
                           variables=[v for v in ("image", "scorr", "s", "fpsf", "fpsf_err", "scaled", "noise", "mask")
                                      if v in planes])
            cand = None
            if candidates or plot:
                cand = find_transients(res, nsigma=nsigma, plot=plot)
                if candidates:
                    write_table(cand, candidates, overwrite=overwrite, storage_options=opts)
        except (ValueError, TypeError, OSError, FileExistsError) as exc:
            fail(str(exc))
    msg = f"wrote {output}"
    if method == "zogy":
        msg += f" (flux scale {res.attrs['flux_scale']:.4f}, shift {res.attrs['shift'][0]:+.3f} {res.attrs['shift'][1]:+.3f} px)"
    if cand is not None:
        msg += f"; {len(cand)} candidates at {nsigma:g} sigma"
    click.echo(msg)


# === end of commands ===


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
