"""Image subtraction on halo tiles: ZOGY (and SFFT), plus transient candidates.

``tilepipe.subtract(new, ref, method="zogy"|"sfft", ...)`` is the public entry
point; ``tilepipe.find_transients(res, nsigma=5.0)`` turns its result into a
candidate catalog.  Shared noise models and global fits live in
:mod:`tilepipe.subtract.noise`.

Note: the package ``tilepipe.subtract`` and the function
``tilepipe.subtract`` share a name.  Once the package has been imported,
Python binds the *module* to the attribute ``tilepipe.subtract``; the module
is therefore made callable (it forwards to :func:`subtract`), so
``tilepipe.subtract(new, ref)`` always works.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import xarray as xr

from .._validate import check_choice
from ..image import open_image
from .transients import find_transients

__all__ = ["subtract", "find_transients"]


def subtract(
    new: Any,
    ref: Any,
    method: str = "zogy",
    *,
    nx: int = 1,
    ny: int | None = None,
    overlap: int | None = None,
    new_psf: Any = None,
    ref_psf: Any = None,
    new_var: Any = None,
    ref_var: Any = None,
    new_gain: float | None = None,
    ref_gain: float | None = None,
    scale: float | None = None,
    fit_scale: bool = True,
    fit_shift: bool = True,
    dx: float = 0.25,
    dy: float = 0.25,
    **kwargs: Any,
) -> xr.Dataset:
    """Subtract an aligned reference from a new image, tile-parallel.

    Parameters
    ----------
    new, ref : path, URL, array or Dataset
        The new (science) and reference images, already aligned on the same
        pixel grid (same shape).  Anything :func:`tilepipe.open_image`
        accepts.  Images in ADU (or e-); mask True = bad.
    method : {"zogy", "sfft"}
        ``"zogy"``: proper image subtraction of Zackay, Ofek & Gal-Yam
        (2016, ApJ 830, 27), see :mod:`tilepipe.subtract.zogy`.
        ``"sfft"``: saccadic fast Fourier transform (Hu et al. 2022), see
        :mod:`tilepipe.subtract.sfft`; its keyword arguments pass through.
    nx, ny : int
        Tiles along x and y (``ny`` defaults to ``nx``).
    overlap : int or (int, int), optional
        Halo of each tile in pixels.  ZOGY default: 3 x the PSF stamp
        half-size (the support of its kernels), plus the ``feather`` width
        when the PSF varies across tiles (so each tile's result is exact where
        it is blended); a PSF larger than the halo is an error, a halo below
        the support warns (``OverlapWarning``), and one too small for the
        feather shrinks the feather (``OverlapWarning``).
    new_psf, ref_psf : array, callable or PSF model, optional
        A 2-D stamp (constant PSF, centred, any sum), a callable
        ``(x, y) -> stamp`` or an object with ``.at(x, y)`` (e.g.
        :class:`tilepipe.PSFModel`), in global 0-based pixels.  Evaluated at
        every tile centre.  Default: :func:`tilepipe.build_psf` when it is
        available, else an empirical polynomial PSF fitted to bright isolated
        stars of the whole image (``psf_method="empirical"`` forces it).
    new_var, ref_var : array or "dataset", optional
        Per-pixel variance maps (image units squared).  Default: background
        rms squared plus source Poisson noise ``max(image - bkg, 0) / gain``.
        ``"dataset"`` uses the Dataset's own ``variance`` variable.
    new_gain, ref_gain : float, optional
        Gain in e-/ADU (default: the Dataset/header ``GAIN``).  Without a
        gain the variance has no source term (``FallbackWarning``).
    scale : float, optional
        Flux ratio ``new / ref`` (ZOGY: ``F_n = 1, F_r = 1 / scale``).  When
        not given it is fitted robustly on bright unsaturated isolated stars of
        all tiles together (``fit_scale=True``) or taken as 1.
    fit_shift : bool
        Fit a global sub-pixel shift ``new - ref`` from the stars' windowed
        centroids and apply it to the reference PSF (a Fourier phase ramp).
        ``shift=(sx, sy)`` gives it instead.
    dx, dy : float
        Astrometric noise (px, 1-sigma) of the registration, for the
        astrometric variance terms of S_corr (ZOGY Eqs. 30-33).
    **kwargs
        ZOGY: ``subtract_background`` (True), ``psf_method`` ("auto",
        "model", "empirical"), ``feather`` (half-width of the linear blend
        across tile borders, px; default half the kernel support when the PSF
        varies, 0 otherwise; given explicitly it also applies to a constant
        PSF), ``precision`` ("float64" default; "float32" is faster but
        misses the 1e-4 tile-invariance bar near bright stars),
        ``align`` (reproject the reference onto the new WCS), ``mesh``
        (background mesh, px), ``shift``.  SFFT: see its docs.

    Returns
    -------
    xarray.Dataset
        ZOGY: ``diff`` (D / F_D, new image units), ``scorr``, ``s``,
        ``fpsf``, ``fpsf_err`` (new image units), ``mask`` (True = bad: the
        PSF footprint of any bad pixel), ``diff_psf`` (P_D per tile on dims
        ``(tile, py, px)`` with the tile core bounds as coordinates), ``new``
        and ``ref`` (background-subtracted inputs, for cutouts); attrs hold
        the fitted ``flux_scale``, ``shift``, per-tile noise and provenance.
        All image variables are lazy dask arrays with chunks = tile cores.
        SFFT: ``diff``, ``convolved``, ``noise``, ``scaled``, ``mask``.

    Raises
    ------
    ValueError
        Different shapes, disagreeing WCS (use ``align=True``), no valid
        overlap, an entirely masked tile, a PSF larger than the halo.
    """
    check_choice("method", method, ("zogy", "sfft"))
    if method == "sfft":
        from .sfft import sfft_subtract

        # the inputs as given: sfft_subtract opens them itself, building a default variance with the gains
        return sfft_subtract(
            new, ref, nx=nx, ny=ny, overlap=overlap, new_psf=new_psf, ref_psf=ref_psf, new_var=new_var,
            ref_var=ref_var, new_gain=new_gain, ref_gain=ref_gain, scale=scale, fit_scale=fit_scale,
            fit_shift=fit_shift, **kwargs,
        ) if _sfft_takes_all() else sfft_subtract(new, ref, **_sfft_kwargs(locals(), kwargs))
    from .zogy import zogy_subtract

    return zogy_subtract(
        open_image(new), open_image(ref), nx=nx, ny=ny, overlap=overlap, new_psf=new_psf, ref_psf=ref_psf, new_var=new_var,
        ref_var=ref_var, new_gain=new_gain, ref_gain=ref_gain, scale=scale, fit_scale=fit_scale,
        fit_shift=fit_shift, dx=dx, dy=dy, **kwargs,
    )


def _sfft_takes_all() -> bool:
    """Whether ``sfft_subtract`` accepts arbitrary keywords (``**kwargs``)."""
    import inspect

    from .sfft import sfft_subtract

    params = inspect.signature(sfft_subtract).parameters.values()
    return any(p.kind is p.VAR_KEYWORD for p in params)


def _is_set(value: Any, default: Any) -> bool:
    """Whether an option differs from its default (``None``, a bool or an int); arrays are never compared."""
    if value is default:
        return False
    if default is None or not isinstance(value, (bool, int, float)):  # arrays, objects: set unless None
        return value is not None
    return bool(value != default)


def _sfft_kwargs(local: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The common options that ``sfft_subtract`` declares and that were set, plus ``extra``."""
    import inspect

    from .sfft import sfft_subtract

    names = set(inspect.signature(sfft_subtract).parameters)
    defaults = {"nx": 1, "ny": None, "overlap": None, "new_psf": None, "ref_psf": None, "new_var": None,
                "ref_var": None, "new_gain": None, "ref_gain": None, "scale": None, "fit_scale": True,
                "fit_shift": True}
    unsupported = [k for k in defaults if k not in names and _is_set(local[k], defaults[k])]
    if unsupported:
        raise TypeError(f"method='sfft' does not take {', '.join(unsupported)}; see tilepipe.subtract.sfft.sfft_subtract")
    out = {k: local[k] for k in defaults if k in names and _is_set(local[k], defaults[k])}
    out.update({k: local[k] for k in ("nx", "ny", "overlap") if k in names})
    out.update(extra)
    return out


class _CallableModule(types.ModuleType):
    """The ``tilepipe.subtract`` package, callable as the ``subtract`` function."""

    def __call__(self, *args: Any, **kwargs: Any) -> xr.Dataset:
        return subtract(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
