"""tilepipe: tile-parallel wide-field astronomical image processing on Dask.

An image becomes an :class:`xarray.Dataset` (``image``, ``mask``, ``variance``)
backed by dask arrays, cut into an ``nx x ny`` grid of tiles read with a halo of
``overlap`` pixels (:class:`TileGrid`).  Every stage (background, detection,
PSF, photometry, ZOGY/SFFT subtraction, coaddition) runs tile by tile and the
results are stitched exactly.

Public names are imported lazily (``tilepipe.subtract`` imports
``tilepipe.subtract`` only when first used), so ``import tilepipe`` is cheap.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    # tiling engine
    "TileGrid": "tiling",
    "Tile": "tiling",
    "map_tiles": "tiling",
    "map_tiles_table": "tiling",
    # data model
    "open_image": "image",
    "as_dataset": "image",
    "wcs": "image",
    "header_to_cards": "image",
    "cards_to_header": "image",
    # I/O
    "write_zarr": "io",
    "write_fits": "io",
    "read_table": "io",
    "write_table": "io",
    # calibration, background, detection, photometry
    "calibrate": "calibrate",
    "estimate_background": "background",
    "subtract_background": "background",
    "mesh_statistics": "background",
    "detect_sources": "detect",
    "find_peaks": "detect",
    "centroids": "detect",
    "second_moments": "detect",
    "remove_close": "detect",
    "aperture_photometry": "photometry",
    "gaussian_psf_photometry": "photometry",
    "psf_photometry": "psf",
    # PSF
    "select_stars": "psf",
    "build_psf": "psf",
    "PSFModel": "psf",
    "GaussianPSF": "psf",
    "MoffatPSF": "psf",
    "load_psf": "psf",
    # subtraction
    "subtract": "subtract",
    "find_transients": "subtract",
    "sfft_subtract": "subtract.sfft",
    # cutouts, coadds, mosaics
    "cutout": "cutout",
    "cutouts": "cutout",
    "sigma_image": "cutout",
    "source_mask": "cutout",
    "write_cutout": "cutout",
    "coadd": "coadd",
    "mosaic": "mosaic",
    # pipeline, cluster
    "run_pipeline": "pipeline",
    "get_client": "cluster",
    "datasets": None,  # submodule
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tilepipe' has no attribute {name!r}")
    modname = _LAZY[name]
    if modname is None:
        return importlib.import_module(f"tilepipe.{name}")
    module = importlib.import_module(f"tilepipe.{modname}")
    value = getattr(module, name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Keep ``tilepipe.calibrate`` (and other functions named like their module) a function.

    Importing a submodule makes Python set it as an attribute of the package,
    which would shadow the public function of the same name.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return __all__
