"""Quick-look figure of a PSF model: a grid of PSFs across the field and the FWHM map."""

from __future__ import annotations

import os

import numpy as np


def plot_psf(psf, path: str | os.PathLike, n: int = 3, step: int | None = None) -> None:
    """Write a PNG: ``n x n`` PSF stamps at the centres of an ``n x n`` tiling
    (log scale) and the FWHM map (px) of :meth:`~tilepipe.psf.base.BasePSF.fwhm_map`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shape = psf.shape or (512, 512)
    stamps = psf.grid(n, n, shape=shape)
    if step is None:
        step = max(16, min(shape) // 16)
    fmap = psf.fwhm_map(shape, step=step)
    fig = Figure(figsize=(4 + 3.2, 4))
    FigureCanvasAgg(fig)
    vmax = np.log10(stamps.max())
    for iy in range(n):
        for ix in range(n):
            ax = fig.add_axes([0.02 + ix * 0.16, 0.08 + iy * 0.28, 0.15, 0.27])
            ax.imshow(np.log10(np.clip(stamps[iy, ix], 10 ** (vmax - 4), None)), origin="lower", cmap="magma",
                      vmin=vmax - 4, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
    ax = fig.add_axes([0.55, 0.1, 0.36, 0.8])
    im = ax.imshow(fmap, origin="lower", cmap="viridis")
    ax.set_title("FWHM (px)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{psf!r}"[:110], fontsize=6)
    fig.savefig(os.fspath(path), dpi=100)
