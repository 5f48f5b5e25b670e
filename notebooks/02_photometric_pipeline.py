# %% [markdown]
# # 02 · A photometric pipeline on real frames
#
# A raw 1024² light frame of the WASP-19 field (procastro example data: Bessell R, 25 s, uint16,
# no WCS, no gain) with the same camera's bias, dark (200 s, hot pixels) and flat (dust donuts).
# We calibrate it (bias → dark → flat), estimate the background, find peaks, measure centroids
# and second moments, run Gaussian PSF photometry and build a catalog.
#
# Everything is lazy and tile-parallel; to keep this notebook fast we work on a 512² crop of the
# calibrated frame (calibration is elementwise, so cropping after it is exact).

# %%
import os
from io import BytesIO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless rendering; figures are shown as PNG below
import matplotlib.pyplot as plt
import numpy as np
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
CAL = DATA / "wide_calib_procastro"
sorted(p.name for p in CAL.glob("*.fits"))

# %% [markdown]
# ## Calibration
#
# `out = (raw - bias - s·(dark - bias)) / (flat_c / median(flat_c))` with the dark scale
# `s = t_raw / t_dark` read from the headers (25 s / 200 s) and the flat corrected for bias and
# dark first. Pixels at 65535 ADU in any frame are masked, and so are hot pixels of the dark.

# %%
cal = tp.calibrate(CAL / "wasp19-005.fits", bias=CAL / "bias.fits", dark=CAL / "dark.fits",
                   flat=CAL / "flat.fits", saturation=65535, hot_pixel_sigma=8)
print({k: v for k, v in cal.attrs["parameters"]["calibrate"].items() if k in ("dark_scale", "flat_norm")})
raw = tp.open_image(CAL / "wasp19-005.fits")
print(f"masked pixels: {int(cal.mask.sum())}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 4.5))
flat = tp.open_image(CAL / "flat.fits").image.values
for ax, (img, title) in zip(axes, [(raw.image.values, "raw"), (flat, "flat"), (cal.image.values, "calibrated")]):
    lo, hi = np.nanpercentile(img, [2, 99])
    ax.imshow(img, origin="lower", cmap="gray", vmin=lo, vmax=hi)
    ax.set_title(title)
axes[2].add_patch(plt.Rectangle((255.5, 255.5), 512, 512, fill=False, ec="orange"))
show(fig)

# %% [markdown]
# ## Crop and background
#
# The orange box: a 512² crop (2 × 2 tiles of 256²).

# %%
ds = cal.isel(y=slice(256, 768), x=slice(256, 768))
bkg = tp.estimate_background(ds, mesh=64, filter_size=3, nx=2, ny=2)
ds = ds.assign(background=bkg.background, rms=bkg.rms)
print(f"sky {bkg.attrs['global_background']:.1f} ADU, rms {bkg.attrs['global_rms']:.2f} ADU")

# %% [markdown]
# ## Peaks, centroids, second moments
#
# `find_peaks` keeps local maxima above a threshold whose neighbours are elevated too (a hot pixel
# or a cosmic ray has none); `centroids` refines them to first moments, `second_moments` gives the
# Gaussian widths (Sheppard-corrected).

# %%
rms = float(bkg.attrs["global_rms"])
peaks = tp.find_peaks(ds, threshold=10 * rms, footprint=5, nx=2, ny=2)
cen = tp.centroids(ds, peaks, box=11, edge="skip", sky="perimeter", nx=2, ny=2)
cen = cen[np.isfinite(cen["x"]) & np.isfinite(cen["y"])]
mom = tp.second_moments(ds, cen, box=15, edge="skip", nx=2, ny=2)
print(len(peaks), "peaks,", len(cen), "centroids,", len(mom), "with moments")
print(f"median FWHM from second moments: {np.nanmedian(mom['fwhm']):.2f} px")

# %% [markdown]
# ## Gaussian PSF photometry and the catalog
#
# Each star is fitted with a pixel-integrated circular Gaussian of its own second-moment width
# (linear least squares: `flux = Σ f p / Σ p²`).

# %%
phot = tp.gaussian_psf_photometry(ds, mom, nx=2, ny=2)
good = (phot["flags"] == 0) & np.isfinite(phot["flux"]) & (phot["flux"] > 0) & np.isfinite(phot["fwhm"])
catalog = phot[good]
catalog["mag"] = -2.5 * np.log10(catalog["flux"])
catalog["snr"] = catalog["flux"] / catalog["flux_err"]
catalog["x"] += 256  # back to the full-frame pixel grid
catalog["y"] += 256
catalog["id"] = np.arange(1, len(catalog) + 1)
for c in ("x", "y", "fwhm", "flux", "flux_err", "mag", "snr"):
    catalog[c].info.format = ".3f" if c not in ("flux", "flux_err") else ".1f"
print(f"{len(catalog)} stars in the catalog (of {len(phot)} measured)")
catalog["id", "x", "y", "fwhm", "flux", "flux_err", "mag", "snr"][:10]

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
img = (ds.image - ds.background).values
axes[0].imshow(img, origin="lower", cmap="gray", vmin=-3 * rms, vmax=30 * rms)
axes[0].scatter(catalog["x"] - 256, catalog["y"] - 256, s=30, facecolors="none", edgecolors="lime", lw=0.7)
axes[0].set_title("catalog stars")
axes[1].scatter(catalog["mag"], catalog["fwhm"], s=6)
axes[1].set_xlabel("instrumental mag")
axes[1].set_ylabel("FWHM (px)")
axes[1].set_ylim(0, 3 * np.nanmedian(catalog["fwhm"]))
axes[1].set_title("size vs brightness")
axes[2].scatter(catalog["mag"], 1.0857 / catalog["snr"], s=6)
axes[2].set_yscale("log")
axes[2].set_xlabel("instrumental mag")
axes[2].set_ylabel("mag error")
axes[2].set_title("photometric error")
show(fig)
