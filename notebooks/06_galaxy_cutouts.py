# %% [markdown]
# # 06 · Galaxy cutouts: sky, cut, mask, sigma, multi-extension FITS
#
# Cutouts for galaxy fitting (GALFIT-style): a stamp around a sky position with the cutout's own
# WCS, the sky subtracted, the neighbours masked, a per-pixel sigma image, all in one
# multi-extension FITS file (`IMAGE`, `MASK`, `SIGMA`, `PSF`). Only the cutout's region of the
# parent image is read.
#
# Data: the DECam i-band stack of `pair_decam_sfft` (256², TPV WCS, GAIN ≈ 4); the target is the
# galaxy at the centre.

# %%
import os
import tempfile
from io import BytesIO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless rendering; figures are shown as PNG below
import matplotlib.pyplot as plt
import numpy as np
from astropy.io import fits
from astropy.table import Table
from IPython.display import Image, display

import tilepipe as tp


def show(fig):
    """Display a matplotlib figure as a PNG and close it."""
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    display(Image(data=buf.getvalue()))


# the real test images: ../shared/data next to the repository, or $TILEPIPE_SHARED_DATA
DATA = Path(os.environ.get("TILEPIPE_SHARED_DATA", Path("..").resolve().parent / "shared" / "data"))
parent_path = DATA / "pair_decam_sfft" / "Stack-DEC-OBS18.fits"
workdir = Path(tempfile.mkdtemp(prefix="tilepipe-cutouts-"))

ds = tp.open_image(parent_path)
w = tp.wcs(ds)
sky = w.pixel_to_world(129.0, 128.0)  # the galaxy at [y, x] = [128, 129]
ra, dec = sky.ra.deg, sky.dec.deg
print(f"target: RA {ra:.5f}, Dec {dec:.5f}; pixel scale {w.proj_plane_pixel_scales()[0].to('arcsec'):.3f}")

# %% [markdown]
# ## Cut, subtract the sky, mask the neighbours, build sigma
#
# * `size="30arcsec"` is converted with the WCS pixel scale;
# * `sky="auto"`: the 3σ-clipped median of the unmasked, source-free cutout pixels (`SKYSUB`);
# * `mask_sources`: neighbours detected on the smoothed cutout and grown; the target's own
#   segment stays unmasked;
# * `sigma="model"`: GALFIT's noise model, `σ² = max(I − S, 0)/g + σ_sky²` (+ read noise).

# %%
cut = tp.cutout(ds, ra, dec, size="30arcsec", sky="auto",
                mask_sources={"fwhm": 3.9, "deblend": True, "grow": 2})
print(cut.image.shape, "origin (y0, x0):", cut.attrs["origin"])
hdr = tp.cards_to_header(cut.attrs["header"])
print("SKYSUB =", hdr.get("SKYSUB"), " CUTX0/CUTY0 =", hdr.get("CUTX0"), hdr.get("CUTY0"))
print(f"masked pixels: {int(cut['mask'].sum())} of {cut['mask'].size}")

# %%
fig, axes = plt.subplots(1, 4, figsize=(15, 4))
img = cut.image.values
axes[0].imshow(img, origin="lower", cmap="gray", vmin=np.percentile(img, 2), vmax=np.percentile(img, 99.5))
axes[0].set_title("image (sky subtracted)")
axes[1].imshow(cut["mask"].values, origin="lower", cmap="Reds")
axes[1].set_title("mask (True = bad / neighbour)")
axes[2].imshow(np.where(cut["mask"].values, np.nan, img), origin="lower", cmap="gray",
               vmin=np.percentile(img, 2), vmax=np.percentile(img, 99.5))
axes[2].set_title("image, masked")
im = axes[3].imshow(cut["sigma"].values, origin="lower")
plt.colorbar(im, ax=axes[3], shrink=0.8)
axes[3].set_title("sigma (ADU)")
show(fig)

# %% [markdown]
# ## Write the multi-extension FITS, with a PSF
#
# The PSF is an empirical model of the parent image evaluated at the target's position.

# %%
psf = tp.build_psf(ds, size=25, degree=0)
path = tp.write_cutout(cut, workdir / "galaxy.fits", psf=psf)
with fits.open(path) as hdul:
    hdul.info()
    print("PSF sum:", round(float(hdul["PSF"].data.sum()), 6))
    print("WCS of the IMAGE extension at the target:",
          tp.wcs(hdul["IMAGE"].header).world_to_pixel(sky))

# %% [markdown]
# ## Many targets at once
#
# `tp.cutouts` groups targets by the tile that owns them and cuts each group in one Dask task;
# a target outside the image is reported with its status, not raised.

# %%
targets = Table({"id": ["galaxy", "star", "outside"],
                 "ra": [ra, *w.pixel_to_world(58.0, 182.0).ra.deg.reshape(1), ra + 1.0],
                 "dec": [dec, *w.pixel_to_world(58.0, 182.0).dec.deg.reshape(1), dec]})
table = tp.cutouts(parent_path, targets, "20arcsec", output=str(workdir / "many"), sky="auto", gain=4.0)
table

# %%
sorted(p.name for p in (workdir / "many").iterdir())

# %%
import shutil

shutil.rmtree(workdir)
