"""Star selection, empirical spatially varying PSF models, analytic PSFs and PSF photometry.

* :func:`select_stars`: documented selection chain with a ``reason`` per rejection;
* :func:`build_psf` -> :class:`PSFModel` (pixel basis, PSFEx-like, or
  Karhunen-Loeve basis), ``psf.at(x, y)`` anywhere in the field;
* :class:`GaussianPSF`, :class:`MoffatPSF` with the same interface;
* :func:`psf_photometry`: per-tile, grouped PSF-fit photometry;
* :func:`load_psf`: read any PSF from FITS or attrs.
"""

from __future__ import annotations

from .analytic import GaussianPSF, MoffatPSF
from .base import BasePSF, load_psf
from .model import PSFModel, build_psf
from .photometry import psf_photometry
from .select import REASONS, select_stars

__all__ = ["select_stars", "build_psf", "PSFModel", "GaussianPSF", "MoffatPSF", "psf_photometry", "BasePSF",
           "load_psf", "REASONS"]
