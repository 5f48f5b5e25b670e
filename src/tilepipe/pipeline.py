"""A night's reduction from a TOML config: steps, products, resumability.

``tilepipe run night.toml`` / :func:`run_pipeline` reads a config like::

    [run]
    output = "s3://survey/night-2026-11-21"   # or a local folder (a path, "~/...", or a file:// URL)
    nx = 2
    ny = 2
    overlap = 64
    storage_options = { key = "...", secret = "...", client_kwargs = { endpoint_url = "http://..." } }

    [calibration]            # optional; paths or URLs
    bias = "cal/bias.fits"
    dark = "cal/dark.fits"
    flat = "cal/flat.fits"
    # dark_scale = 1.0       # optional, passed to tilepipe.calibrate (default: the exposure-time ratio)
    # flat_norm = "median"   # optional: "median", "max" or a number (ADU)

    [exposures]              # globs, URLs or a manifest (CSV/ECSV with columns path[, field])
    paths = ["raw/*.fits"]
    # manifest = "night.csv" # ".ecsv": ECSV as astropy writes it; else comma-separated with a header line
    field_key = "OBJECT"     # header keyword naming the field (default OBJECT)

    [references]             # one reference image per field ("*" = any field)
    M31 = "refs/M31.fits"

    [steps]                  # run in this order; a missing table means "skip that step"
    calibrate = {}
    background = { mesh = 64, filter_size = 3 }
    detect = { nsigma = 5.0, minarea = 5 }
    psf = { degree = 1 }
    subtract = { method = "zogy" }
    transients = { nsigma = 5.0 }

Relative paths are relative to the config file's folder (a mapping: the
current folder), ``~`` is expanded, and a ``file://`` URL is a local path;
paths in a manifest are relative to the manifest.  ``dark_scale`` and
``flat_norm`` of ``[calibration]`` are passed to :func:`tilepipe.calibrate`;
the same options in ``[steps] calibrate`` take precedence.  Before any work
the output is checked writable and every input (exposures, calibration
frames, and the ``[references]`` when the subtract step runs) to exist.

Products per exposure ``<output>/<exposure-name>/``: ``products.zarr`` (image,
mask, variance, background, rms, diff, scorr, ...), ``catalog.ecsv``,
``psf.fits``, ``candidates.ecsv``, ``candidates.png``, ``quicklook.png`` and
``_COMPLETE.json`` (timings, counts, resolved config, package versions),
written **last**: a product without it is incomplete and is redone on the next
run; complete ones are skipped unless ``force=True``.  Local products are
written in a temporary folder and renamed into place; a forced re-run replaces
a complete product only once the new one is complete (remote ones too, through
a temporary prefix), so a failing re-run loses nothing.  Options of ``[steps]
subtract`` are passed to :func:`tilepipe.subtract` (checked, when the config
is read, against the keywords it and the chosen ``method``'s function take:
:func:`~tilepipe.subtract.zogy.zogy_subtract` or
:func:`~tilepipe.subtract.sfft.sfft_subtract`) and override the ``[run]``
tiling (``nx``, ``ny``, ``overlap``).  The recorded configs
(``_COMPLETE.json``, ``summary.json``, the zarr attribute
``tilepipe_config``) have every ``storage_options`` value replaced by
``"***"`` (credentials are never written).  A failing exposure is
recorded in the run summary (``summary.json``, ``summary.html``) and the night
goes on.
"""

from __future__ import annotations

import copy
import datetime as _dt
import glob as _glob
import html
import json
import logging
import os
import posixpath
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

__all__ = ["run_pipeline", "load_config", "validate_config", "ConfigError", "STEPS"]

#: the steps a night can run, in execution order
STEPS = ("calibrate", "background", "detect", "psf", "subtract", "transients")

_RUN_KEYS = {"output", "nx", "ny", "overlap", "storage_options", "scheduler", "quicklook", "catalog_format", "name"}
_CAL_KEYS = {"bias", "dark", "flat", "dark_scale", "flat_norm"}
_EXP_KEYS = {"paths", "manifest", "field_key", "field"}
_TOP_KEYS = {"run", "calibration", "exposures", "references", "steps"}
_STEP_KEYS: dict[str, set[str] | None] = {
    "calibrate": {"dark_scale", "flat_norm"},
    "background": {"mesh", "filter_size", "method", "order"},
    "detect": {"nsigma", "minarea", "filter_fwhm", "deblend_nthresh", "deblend_cont"},
    "psf": {"size", "degree", "model", "oversampling"},
    "subtract": None,  # passed through to tilepipe.subtract: checked against its signature (_subtract_keys)
    "transients": {"nsigma", "cutouts"},
}
COMPLETE = "_COMPLETE.json"


class ConfigError(ValueError):
    """The pipeline configuration is invalid (the message names the key and the fix)."""


# ----------------------------------------------------------------- config
def load_config(src: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read a TOML file (or take a mapping) and return the validated, resolved config."""
    if isinstance(src, Mapping):
        cfg = copy.deepcopy(dict(src))
        base = Path.cwd()
    else:
        path = Path(src)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            import tomllib
        except ModuleNotFoundError:  # pragma: no cover - python < 3.11
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            cfg = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        base = path.resolve().parent
    return validate_config(cfg, base=base)


def _is_url(p: str) -> bool:
    return "://" in p


def _resolve(p: str, base: Path) -> str:
    """A URL as given; a local path (``file://`` URLs included) with ``~`` expanded, absolute against ``base``."""
    if p.startswith("file://"):
        p = p[len("file://"):]  # a local path: written locally (temporary folder + rename), folders created
    elif _is_url(p):
        return p
    p = os.path.expanduser(p)
    if os.path.isabs(p):
        return p
    return str((base / p).resolve())


def _unknown(section: str, keys: set[str], allowed: set[str]) -> None:
    bad = sorted(set(keys) - allowed)
    if bad:
        raise ConfigError(
            f"unknown key(s) {', '.join(repr(b) for b in bad)} in [{section}]; allowed: {', '.join(sorted(allowed))}"
        )


def _check_calib_options(section: str, opts: Mapping[str, Any]) -> None:
    """``dark_scale`` / ``flat_norm`` values, as :func:`tilepipe.calibrate` takes them."""
    if "dark_scale" in opts:
        v = opts["dark_scale"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < float("inf")):
            raise ConfigError(
                f"[{section}] dark_scale must be a number >= 0 (the factor applied to the dark current; leave it "
                f"out to scale by the exposure times); got {v!r}"
            )
    if "flat_norm" in opts:
        v = opts["flat_norm"]
        ok = v in ("median", "max") if isinstance(v, str) else (
            not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v < float("inf"))
        if not ok:
            raise ConfigError(f"[{section}] flat_norm must be 'median', 'max' or a number > 0; got {v!r}")


def _subtract_keys(method: str) -> set[str] | None:
    """The options ``[steps] subtract`` may give for ``method`` (None: the function takes any keyword)."""
    import inspect

    from .subtract import subtract as _subtract_fn
    from .subtract.sfft import sfft_subtract
    from .subtract.zogy import zogy_subtract

    def named(fn) -> set[str] | None:
        params = inspect.signature(fn).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return {p.name for p in params if p.kind is not p.VAR_POSITIONAL} - {"new", "ref"}

    if method == "sfft":
        impl = named(sfft_subtract)  # tilepipe.subtract passes only what sfft_subtract declares
        return None if impl is None else impl | {"method"}
    impl = named(zogy_subtract)
    if impl is None:
        return None
    front = {p.name for p in inspect.signature(_subtract_fn).parameters.values()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"new", "ref"}
    return front | impl


def validate_config(cfg: Mapping[str, Any], base: Path | None = None) -> dict[str, Any]:
    """Check a config mapping and return it resolved (paths absolute, defaults filled).

    Raises
    ------
    ConfigError
        Naming the offending key and the fix.
    """
    base = base or Path.cwd()
    cfg = copy.deepcopy(dict(cfg))
    _unknown("top level", set(cfg), _TOP_KEYS)
    run = dict(cfg.get("run") or {})
    _unknown("run", set(run), _RUN_KEYS)
    if not run.get("output"):
        raise ConfigError("[run] output is required: a local folder or a URL (s3://bucket/prefix) for the products")
    run["output"] = _resolve(str(run["output"]), base)
    for key, default, lo in (("nx", 1, 1), ("ny", None, 1), ("overlap", 64, 0)):
        val = run.get(key, default)
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < lo):
            raise ConfigError(f"[run] {key} must be an integer >= {lo}; got {val!r}")
        run[key] = val
    if run["ny"] is None:
        run["ny"] = run["nx"]
    run.setdefault("storage_options", {})
    if not isinstance(run["storage_options"], dict):
        raise ConfigError("[run] storage_options must be a table (e.g. { anon = false })")
    run.setdefault("quicklook", True)
    run.setdefault("catalog_format", "ecsv")
    if run["catalog_format"] not in ("ecsv", "fits", "parquet"):
        raise ConfigError(f"[run] catalog_format must be 'ecsv', 'fits' or 'parquet'; got {run['catalog_format']!r}")
    cfg["run"] = run

    cal = dict(cfg.get("calibration") or {})
    _unknown("calibration", set(cal), _CAL_KEYS)
    for k in ("bias", "dark", "flat"):
        if cal.get(k):
            cal[k] = _resolve(str(cal[k]), base)
    _check_calib_options("calibration", cal)
    cfg["calibration"] = cal

    exp = cfg.get("exposures")
    if exp is None:
        raise ConfigError("[exposures] is required: give paths = [globs or URLs] or manifest = 'file.csv'")
    if isinstance(exp, list):
        exp = {"paths": exp}
    exp = dict(exp)
    _unknown("exposures", set(exp), _EXP_KEYS)
    if not exp.get("paths") and not exp.get("manifest"):
        raise ConfigError("[exposures] needs paths = [...] (globs or URLs) or manifest = 'file.csv'")
    if isinstance(exp.get("paths"), str):
        exp["paths"] = [exp["paths"]]
    exp["paths"] = [_resolve(str(p), base) for p in exp.get("paths") or []]
    if exp.get("manifest"):
        exp["manifest"] = _resolve(str(exp["manifest"]), base)
    exp.setdefault("field_key", "OBJECT")
    cfg["exposures"] = exp

    refs = {str(k): _resolve(str(v), base) for k, v in dict(cfg.get("references") or {}).items()}
    cfg["references"] = refs

    steps = cfg.get("steps")
    if steps is None:
        steps = {s: {} for s in ("background", "detect")}
    if not isinstance(steps, dict):
        raise ConfigError("[steps] must be a table of step = { parameters }")
    _unknown("steps", set(steps), set(STEPS))
    for name, params in steps.items():
        if params is True:
            steps[name] = params = {}
        if not isinstance(params, dict):
            raise ConfigError(f"[steps] {name} must be a table of parameters (use {name} = {{}} for defaults)")
        allowed = _STEP_KEYS[name]
        if name == "subtract":
            method = params.get("method", "zogy")
            if method not in ("zogy", "sfft"):
                raise ConfigError(f"[steps.subtract] method must be 'zogy' or 'sfft'; got {method!r}")
            allowed = _subtract_keys(method)
        if allowed is not None:
            _unknown(f"steps.{name}", set(params), allowed)
    if "calibrate" in steps:
        _check_calib_options("steps.calibrate", steps["calibrate"])
        where = "steps.calibrate" if "dark_scale" in steps["calibrate"] else "calibration"
        scale = steps["calibrate"].get("dark_scale", cal.get("dark_scale"))
        if cal.get("dark") and not cal.get("bias") and scale is not None and abs(scale - 1.0) > 1e-12:
            # tilepipe.calibrate: a dark that still holds the bias can only be scaled with the bias frame
            raise ConfigError(
                f"[{where}] dark_scale = {scale!r} needs [calibration] bias: the dark still contains the bias, "
                "so scaling it needs the bias frame; add bias = 'master_bias.fits' or set dark_scale = 1"
            )
    if "subtract" in steps and not refs:
        raise ConfigError("[steps] subtract needs [references]: give a reference image per field (or '*' for all)")
    if "transients" in steps and "subtract" not in steps:
        raise ConfigError("[steps] transients needs the subtract step: add subtract = {} to [steps]")
    if "calibrate" in steps and not any(cal.get(k) for k in ("bias", "dark", "flat")):
        raise ConfigError("[steps] calibrate needs at least one of bias, dark, flat in [calibration]")
    cfg["steps"] = {s: steps[s] for s in STEPS if s in steps}
    return cfg


REDACTED = "***"


def _redact(opts: Any) -> Any:
    """``storage_options`` with every value (nested tables too) replaced by ``"***"``; keys kept."""
    if isinstance(opts, Mapping):
        return {k: _redact(v) for k, v in opts.items()}
    return REDACTED


def redacted_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` safe to record: the ``[run] storage_options`` values (credentials) replaced by ``"***"``."""
    out = dict(cfg)
    run = dict(out.get("run") or {})
    if "storage_options" in run:
        run["storage_options"] = _redact(run["storage_options"])
    out["run"] = run
    return copy.deepcopy(out)


# ------------------------------------------------------------- filesystem
def _fs(url: str, storage_options: Mapping[str, Any]):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options))
    return fs, path


def _join(root: str, *parts: str) -> str:
    if _is_url(root):
        return posixpath.join(root, *parts)
    return os.path.join(root, *parts)


def expand_exposures(cfg: Mapping[str, Any]) -> list[dict[str, str]]:
    """List the night's exposures as ``{"path", "name", "field"}`` dicts (fields filled later)."""
    exp = cfg["exposures"]
    opts = cfg["run"]["storage_options"]
    out: list[dict[str, str]] = []
    for pattern in exp.get("paths", []):
        if _is_url(pattern):
            fs, path = _fs(pattern, opts)
            proto = pattern.split("://", 1)[0]
            matches = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
            out += [{"path": f"{proto}://{m}" if proto != "file" else m} for m in matches]
        else:
            matches = sorted(_glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
            out += [{"path": m} for m in matches]
    if exp.get("manifest"):
        man = exp["manifest"]
        tab = _read_manifest(man, opts)
        if "path" not in tab.colnames:
            raise ConfigError(
                f"[exposures] manifest {man!r} needs a 'path' column (and optionally 'field'); "
                f"its columns: {', '.join(tab.colnames) or 'none'}"
            )
        base = Path(man).parent
        for r in tab:
            p = _cell(r["path"])
            if not p:
                continue
            if _is_url(man) and not _is_url(p):  # relative to a remote manifest: the same store
                d = {"path": posixpath.join(posixpath.dirname(man), p)}
            else:
                d = {"path": _resolve(p, base)}
            if "field" in tab.colnames and _cell(r["field"]):
                d["field"] = _cell(r["field"])
            out.append(d)
    if not out:
        raise ConfigError(f"[exposures] matched no files: {exp.get('paths') or exp.get('manifest')}")
    seen: set[str] = set()
    for d in out:
        name = os.path.basename(d["path"].rstrip("/"))
        for suffix in (".fits.fz", ".fits.gz", ".fits", ".fit", ".fts", ".zarr"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        base_name, k = name, 1
        while name in seen:
            k += 1
            name = f"{base_name}-{k}"
        seen.add(name)
        d["name"] = name
        if exp.get("field"):
            d.setdefault("field", exp["field"])
    return out


def _cell(v: Any) -> str:
    """A manifest cell as a stripped string ('' when empty or masked)."""
    import numpy as np

    if v is None or v is np.ma.masked:
        return ""
    return str(v).strip()


def _read_manifest(man: str, opts: Mapping[str, Any]):
    """The manifest as an astropy Table: ECSV (``.ecsv``) or comma-separated CSV (any other name)."""
    from astropy.table import Table

    fmt = "ascii.ecsv" if man.lower().endswith(".ecsv") else "ascii.csv"
    kw = {} if fmt == "ascii.ecsv" else {"comment": r"\s*#"}  # CSV: '#' lines are comments
    try:
        if _is_url(man):
            fs, path = _fs(man, opts)
            return Table.read(fs.cat_file(path).decode().splitlines(), format=fmt, **kw)  # missing: FileNotFoundError
        if not os.path.isfile(man):
            raise FileNotFoundError(man)
        return Table.read(man, format=fmt, **kw)
    except FileNotFoundError:
        raise ConfigError(f"[exposures] manifest {man!r} does not exist; check the path") from None
    except Exception as exc:  # noqa: BLE001 - any parse error: name the file and the expected format
        raise ConfigError(
            f"[exposures] manifest {man!r} could not be read as {fmt[6:].upper()} ({type(exc).__name__}: {exc}); "
            "give a .ecsv file (as astropy writes it) or a comma-separated .csv with a header line 'path[,field]'"
        ) from None


def preflight(cfg: Mapping[str, Any], exposures: list[dict[str, str]]) -> None:
    """Fail fast, before any work: inputs readable, output writable (credentials checked)."""
    opts = cfg["run"]["storage_options"]
    out = cfg["run"]["output"]
    try:
        fs, root = _fs(out, opts)
        if not _is_url(out):
            fs.makedirs(root, exist_ok=True)  # object stores have no folders; never create buckets
        probe = posixpath.join(root, f".tilepipe-write-test-{uuid.uuid4().hex[:8]}")
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as exc:  # noqa: BLE001 - any backend error means "cannot write"
        raise PermissionError(
            f"cannot write to the output location {out!r} ({type(exc).__name__}: {exc}); check the path, "
            "the bucket and the credentials in [run] storage_options"
        ) from None
    missing = []
    cal = cfg["calibration"]
    inputs = exposures + [{"path": cal[k], "key": f"[calibration] {k}"} for k in ("bias", "dark", "flat") if cal.get(k)]
    if "subtract" in cfg["steps"]:  # the references are read by the subtract step only
        inputs += [{"path": p, "key": f"[references] {k}"} for k, p in cfg["references"].items()]
    for d in inputs:
        p = d["path"]
        if not isinstance(p, str) or not (os.sep in p or _is_url(p)):
            continue
        try:
            fs, path = _fs(p, opts) if _is_url(p) else _fs("file://" + p, {})
            if not fs.exists(path):
                missing.append(f"{p} ({d['key']})" if d.get("key") else p)
        except Exception as exc:  # noqa: BLE001
            raise PermissionError(f"cannot read input {p!r} ({type(exc).__name__}: {exc}); check storage_options") from None
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


# ----------------------------------------------------------------- running
@dataclass
class ExposureResult:
    name: str
    path: str
    field: str = ""
    status: str = "pending"  # done | skipped | failed
    seconds: float = 0.0
    timings: dict[str, float] = dc_field(default_factory=dict)
    counts: dict[str, int] = dc_field(default_factory=dict)
    error: str = ""
    outputs: list[str] = dc_field(default_factory=list)
    warnings: list[str] = dc_field(default_factory=list)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("tilepipe", "numpy", "scipy", "astropy", "dask", "distributed", "xarray", "zarr", "sep", "photutils", "fsspec"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _field_of(ds, exp: dict[str, str], key: str) -> str:
    if exp.get("field"):
        return exp["field"]
    for c in ds.attrs.get("header", []):
        if c[0] == key and c[1] not in (None, ""):
            return str(c[1]).strip()
    return ""


def _reference_for(cfg: Mapping[str, Any], field_name: str) -> str:
    refs = cfg["references"]
    if field_name in refs:
        return refs[field_name]
    if "*" in refs:
        return refs["*"]
    raise KeyError(
        f"no reference image for field {field_name!r}; add it under [references] "
        f"(known: {', '.join(sorted(refs)) or 'none'}) or a '*' entry"
    )


def _process_exposure(cfg: Mapping[str, Any], exp: dict[str, str], workdir: str, res: ExposureResult,
                      recorded: Mapping[str, Any]) -> None:
    """Run the configured steps on one exposure, writing into ``workdir``; ``recorded``: the config to record."""
    import tilepipe as tp
    from .io import write_table, write_zarr

    run = cfg["run"]
    opts = run["storage_options"]
    steps = cfg["steps"]
    tiles = {"nx": run["nx"], "ny": run["ny"], "overlap": run["overlap"]}

    def timed(step: str):
        class _T:
            def __enter__(self_inner):
                self_inner.t0 = time.perf_counter()

            def __exit__(self_inner, *a):
                res.timings[step] = round(time.perf_counter() - self_inner.t0, 3)

        return _T()

    with timed("open"):
        ds = tp.open_image(exp["path"], storage_options=opts)
    res.field = _field_of(ds, exp, cfg["exposures"]["field_key"])
    if "calibrate" in steps:
        cal = cfg["calibration"]
        # [calibration] dark_scale / flat_norm, overridden by the same options of [steps] calibrate
        ckw = {**{k: cal[k] for k in ("dark_scale", "flat_norm") if k in cal}, **steps["calibrate"]}
        with timed("calibrate"):
            ds = tp.calibrate(ds, bias=_open_cal(cal.get("bias"), opts), dark=_open_cal(cal.get("dark"), opts),
                              flat=_open_cal(cal.get("flat"), opts), **ckw)
    products = ds
    bkg = None
    if "background" in steps:
        with timed("background"):
            bkg = tp.estimate_background(ds, **steps["background"], **tiles)
            products = products.assign(background=bkg["background"], rms=bkg["rms"])
    cat = None
    if "detect" in steps:
        with timed("detect"):
            cat = tp.detect_sources(ds, background=bkg, **steps["detect"], **tiles)
            res.counts["sources"] = len(cat)
            path = _join(workdir, f"catalog.{run['catalog_format']}")
            write_table(cat, path, overwrite=True, storage_options=opts)
            res.outputs.append(f"catalog.{run['catalog_format']}")
    psf = None
    if "psf" in steps:
        with timed("psf"):
            stars = tp.select_stars(ds, cat) if cat is not None else None
            if stars is not None and "keep" in stars.colnames:
                stars = stars[stars["keep"]]
            psf = tp.build_psf(ds, stars, **steps["psf"], **tiles)
            local = _local_target(workdir, "psf.fits")
            psf.to_fits(local.path)
            local.commit()
            res.outputs.append("psf.fits")
    if "subtract" in steps:
        with timed("subtract"):
            ref_path = _reference_for(cfg, res.field)
            ref = tp.open_image(ref_path, storage_options=opts)
            # [steps] subtract options (passed through) override the global [run] tiling
            kw = {**tiles, **dict(steps["subtract"])}
            if psf is not None and kw.get("method", "zogy") == "zogy":
                kw.setdefault("new_psf", psf)
            diff = tp.subtract(ds, ref, **kw)
            for v in diff.data_vars:
                if diff[v].dims == ("y", "x") and v not in ("mask",):
                    products = products.assign({v: diff[v]})
            products.attrs["subtraction"] = {k: v for k, v in diff.attrs.items() if _jsonable(v)}
        if "transients" in steps:
            with timed("transients"):
                tkw = dict(steps["transients"])
                want_png = tkw.pop("cutouts", True)
                png = _local_target(workdir, "candidates.png") if want_png else None
                cand = tp.find_transients(diff, **tkw, plot=png.path if png else None)
                if png is not None and os.path.exists(png.path):
                    png.commit()
                    res.outputs.append("candidates.png")
                res.counts["candidates"] = len(cand)
                write_table(cand, _join(workdir, "candidates.ecsv"), overwrite=True, storage_options=opts)
                res.outputs.append("candidates.ecsv")
    products.attrs["tilepipe_config"] = json.dumps(recorded, default=str)
    products.attrs["tilepipe_versions"] = _versions()
    with timed("write"):
        write_zarr(products, _join(workdir, "products.zarr"), overwrite=True, storage_options=opts)
        res.outputs.append("products.zarr")
    if run.get("quicklook", True):
        with timed("quicklook"):
            q = _local_target(workdir, "quicklook.png")
            quicklook(products["image"].data, q.path, title=exp["name"], catalog=cat)
            q.commit()
            res.outputs.append("quicklook.png")


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _open_cal(path: str | None, opts: Mapping[str, Any]):
    if not path:
        return None
    import tilepipe as tp

    return tp.open_image(path, storage_options=opts)


class _LocalTarget:
    """A local file path for libraries that only write local files; uploaded on commit if remote."""

    def __init__(self, dest: str, opts: Mapping[str, Any]):
        self.dest = dest
        self.opts = opts
        if _is_url(dest):
            import tempfile

            self._tmpdir = tempfile.mkdtemp(prefix="tilepipe-")
            self.path = os.path.join(self._tmpdir, os.path.basename(dest))
        else:
            self.path = dest

    def commit(self) -> None:
        if _is_url(self.dest):
            fs, path = _fs(self.dest, self.opts)
            fs.put_file(self.path, path)


_CURRENT_OPTS: dict[str, Any] = {}


def _local_target(workdir: str, name: str) -> _LocalTarget:
    return _LocalTarget(_join(workdir, name), _CURRENT_OPTS)


def quicklook(image: Any, path: str, title: str = "", catalog: Any = None, max_side: int = 1024) -> str:
    """Write a zscale PNG quick-look of an image (downsampled to ``max_side``), circling catalog sources."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from astropy.visualization import ZScaleInterval

    h, w = image.shape
    step = max(1, int(np.ceil(max(h, w) / max_side)))
    small = np.asarray(image[::step, ::step], dtype=np.float32)
    finite = small[np.isfinite(small)]
    vmin, vmax = ZScaleInterval().get_limits(finite) if finite.size else (0, 1)
    fig, ax = plt.subplots(figsize=(6, 6 * h / w), dpi=110)
    ax.imshow(small, origin="lower", cmap="gray", vmin=vmin, vmax=vmax, extent=(-0.5, w - 0.5, -0.5, h - 0.5))
    if catalog is not None and len(catalog):
        ax.scatter(catalog["x"], catalog["y"], s=30, facecolors="none", edgecolors="tab:orange", linewidths=0.6)
    ax.set_title(title)
    ax.set_xlabel("x [px]")
    ax.set_ylabel("y [px]")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _write_json(url: str, obj: Any, opts: Mapping[str, Any]) -> None:
    data = json.dumps(obj, indent=2, default=str).encode()
    if _is_url(url):
        fs, path = _fs(url, opts)
        fs.pipe_file(path, data)
    else:
        tmp = f"{url}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, url)


def _summary_html(summary: Mapping[str, Any]) -> str:
    rows = []
    for e in summary["exposures"]:
        counts = ", ".join(f"{k}={v}" for k, v in e["counts"].items())
        timings = ", ".join(f"{k} {v:.1f}s" for k, v in e["timings"].items())
        color = {"done": "#dfd", "skipped": "#eee", "failed": "#fdd"}.get(e["status"], "#fff")
        rows.append(
            f"<tr style='background:{color}'><td>{html.escape(e['name'])}</td><td>{html.escape(e['field'])}</td>"
            f"<td>{e['status']}</td><td>{e['seconds']:.1f}</td><td>{html.escape(counts)}</td>"
            f"<td>{html.escape(timings)}</td><td><pre>{html.escape(e['error'][-600:])}</pre></td>"
            f"<td><pre>{html.escape(chr(10).join(e.get('warnings', []))[-600:])}</pre></td></tr>"
        )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>tilepipe night summary</title>"
        "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
        "table{border-collapse:collapse}pre{margin:0;white-space:pre-wrap;max-width:40em}</style></head><body>"
        f"<h1>tilepipe night summary</h1><p>{summary['started']} &rarr; {summary['finished']} "
        f"({summary['seconds']:.1f} s): {summary['n_done']} done, {summary['n_skipped']} skipped, "
        f"{summary['n_failed']} failed; {summary['exposures_per_hour']:.1f} exposures/hour</p>"
        "<table><tr><th>exposure</th><th>field</th><th>status</th><th>s</th><th>counts</th><th>timings</th>"
        f"<th>error</th><th>warnings</th></tr>{''.join(rows)}</table></body></html>"
    )


def _publish(fs: Any, wpath: str, fpath: str, local: bool) -> None:
    """Move the finished product at ``wpath`` to ``fpath`` (paths on ``fs``), replacing a previous product only now.

    Local: :func:`tilepipe.io._fs.commit_local` (the old folder is renamed
    aside, the new one renamed into place, then the old one removed).
    Remote: the same with moves (copies) of the prefixes; if moving the new
    product in fails, the old one is moved back.
    """
    if local:
        from .io._fs import commit_local

        commit_local(wpath, fpath, overwrite=True)
        return
    old = None
    if fs.exists(fpath):
        old = posixpath.join(posixpath.dirname(fpath), f".{posixpath.basename(fpath)}.old-{uuid.uuid4().hex[:8]}")
        fs.mv(fpath, old, recursive=True)
    try:
        fs.mv(wpath, fpath, recursive=True)
    except BaseException:
        if old is not None:
            if fs.exists(fpath):
                fs.rm(fpath, recursive=True)
            fs.mv(old, fpath, recursive=True)
        raise
    if old is not None:
        fs.rm(old, recursive=True)


def run_pipeline(
    config: str | os.PathLike | Mapping[str, Any],
    *,
    force: bool = False,
    scheduler: str | None = None,
    client: Any = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Reduce a night: run the configured steps on every exposure and write the products.

    Parameters
    ----------
    config : path or mapping
        TOML file or an equivalent dict (see the module docstring).
    force : bool
        Redo complete products too (default: skip exposures whose
        ``_COMPLETE.json`` exists).  The new product is written under a
        temporary name and replaces the previous one only once complete, so
        a failing forced re-run leaves the previous product intact.
    scheduler : str, optional
        Dask scheduler address; default: the ``client`` given, the current
        client, or a new LocalCluster.
    client : distributed.Client, optional
        Use this client.
    progress : bool
        Print per-exposure progress lines.

    Returns
    -------
    dict
        The run summary (also written as ``summary.json`` and ``summary.html``
        under the output location).
    """
    from .cluster import client_context

    cfg = load_config(config)
    if scheduler is None:
        scheduler = cfg["run"].get("scheduler") or None
    exposures = expand_exposures(cfg)
    preflight(cfg, exposures)
    opts = cfg["run"]["storage_options"]
    _CURRENT_OPTS.clear()
    _CURRENT_OPTS.update(opts)
    out = cfg["run"]["output"]
    fs, root = _fs(out, opts)
    local = not _is_url(out)
    recorded = redacted_config(cfg)  # the config as written into every record (credentials redacted)
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    results: list[ExposureResult] = []

    import contextlib

    ctx = contextlib.nullcontext(client) if client is not None else client_context(scheduler)
    with ctx as cl:
        if progress and cl is not None:
            print(f"dask dashboard: {cl.dashboard_link}", flush=True)
        as_current = cl.as_current() if cl is not None else contextlib.nullcontext()
        with as_current:
            for i, exp in enumerate(exposures, 1):
                res = ExposureResult(name=exp["name"], path=exp["path"])
                results.append(res)
                final_path = posixpath.join(root, exp["name"])
                marker = posixpath.join(final_path, COMPLETE)
                complete = fs.exists(marker)  # one request per exposure (object stores)
                if complete and not force:
                    res.status = "skipped"
                    with fs.open(marker, "rb") as fh:
                        prev = json.loads(fh.read())
                    res.field = prev.get("field", "")
                    res.counts = prev.get("counts", {})
                    if progress:
                        print(f"[{i}/{len(exposures)}] {exp['name']}: complete, skipped", flush=True)
                    continue
                if progress:
                    print(f"[{i}/{len(exposures)}] {exp['name']}: running {', '.join(cfg['steps'])}", flush=True)
                t1 = time.perf_counter()
                # a complete previous product (force=True) is replaced only once the new one is complete: the
                # new one is written under a temporary name (always for local outputs, which are renamed into
                # place; for remote ones when there is a complete product to keep)
                tmpname = f".{exp['name']}.tmp-{uuid.uuid4().hex[:8]}"
                in_place = not (local or complete)
                workdir = _join(out, exp["name"] if in_place else tmpname)
                wpath = final_path if in_place else posixpath.join(root, tmpname)  # workdir's path on fs
                try:
                    if in_place and fs.exists(final_path):
                        fs.rm(final_path, recursive=True)  # an incomplete product: nothing to keep
                    fs.makedirs(wpath, exist_ok=True)
                    # warnings (small overlap, fallbacks...) are recorded in the summary, not raised
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        _process_exposure(cfg, exp, workdir, res, recorded)
                    res.warnings = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
                    res.seconds = round(time.perf_counter() - t1, 3)
                    res.status = "done"
                    record = {
                        "name": res.name, "path": res.path, "field": res.field, "status": "done",
                        "seconds": res.seconds, "timings": res.timings, "counts": res.counts,
                        "outputs": res.outputs, "warnings": res.warnings, "config": recorded,
                        "versions": _versions(),
                        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                    }
                    _write_json(_join(workdir, COMPLETE), record, opts)
                    if not in_place:
                        _publish(fs, wpath, final_path, local)
                except Exception as exc:  # noqa: BLE001 - one bad exposure must not stop the night
                    res.status = "failed"
                    res.seconds = round(time.perf_counter() - t1, 3)
                    res.error = f"{type(exc).__name__}: {exc}"
                    res.outputs = []  # the partial products are removed below (a complete old product stays)
                    log.warning("exposure %s failed: %s", exp["name"], res.error)
                    log.debug("%s", traceback.format_exc())
                    try:
                        if fs.exists(wpath):
                            fs.rm(wpath, recursive=True)
                    except Exception:  # noqa: BLE001
                        pass
                if progress:
                    msg = res.status if res.status != "failed" else f"FAILED ({res.error})"
                    print(f"[{i}/{len(exposures)}] {exp['name']}: {msg} in {res.seconds:.1f} s {res.counts}", flush=True)

    seconds = time.perf_counter() - t0
    n_done = sum(r.status == "done" for r in results)
    summary = {
        "started": started.isoformat(),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "seconds": round(seconds, 3),
        "n_exposures": len(results),
        "n_done": n_done,
        "n_skipped": sum(r.status == "skipped" for r in results),
        "n_failed": sum(r.status == "failed" for r in results),
        "exposures_per_hour": (n_done / seconds * 3600.0) if n_done and seconds > 0 else 0.0,
        "exposures": [r.__dict__ for r in results],
        "config": recorded,
        "versions": _versions(),
    }
    _write_json(_join(out, "summary.json"), summary, opts)
    page = _summary_html(summary).encode()
    if _is_url(out):
        fs.pipe_file(posixpath.join(root, "summary.html"), page)
    else:
        with open(_join(out, "summary.html"), "wb") as fh:
            fh.write(page)
    return summary
