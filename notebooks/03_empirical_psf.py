# %% [markdown]
# # 03 · Empirical PSF: star selection, PSF grid, FWHM map
#
# On a wide field the PSF changes across the image. tilepipe selects PSF stars with a documented
# chain of cuts (every rejected source gets a `reason`), builds **one global** spatially varying
# model from the stamps cut in every tile (map → reduce → solve, no seams), and evaluates it
# anywhere with `psf.at(x, y)`.
#
# We use a synthetic 512² field whose PSF FWHM and ellipticity vary across the field, so the
# model can be checked against the truth (`tilepipe.datasets.true_psf`).

# %%
from io import BytesIO

import matplotlib

matplotlib.use("Agg")  # headless rendering; figures are shown as PNG below
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

import tilepipe as tp
from tilepipe.datasets import make_field, true_psf


def show(fig):
    """Display a matplotlib figure as a PNG and close it."""
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    display(Image(data=buf.getvalue()))


field = make_field((512, 512), seed=3, n_stars=400, fwhm=3.0, psf_variation=0.35, ellipticity=0.15,
                   saturation=60000.0)
ds = field.image
truth = true_psf(ds)

# %% [markdown]
# ## Detection and the star-selection chain
#
# The chain (first failing test = the `reason`): `edge`, `flags`, `saturated`, `bad_pixels`,
# `faint`, `elongated`, `fwhm`, `crowded`, `no_refcat`.

# %%
cat = tp.detect_sources(ds, nsigma=5.0, nx=2, ny=2, overlap=32)
sel = tp.select_stars(ds, cat, size=21, nx=2, ny=2)
print(f"{len(cat)} detections, {int(sel['keep'].sum())} kept as PSF stars")
reasons, counts = np.unique(np.asarray(sel["reason"][~sel["keep"]]), return_counts=True)
dict(zip(reasons.tolist(), counts.tolist()))

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 6))
img = ds.image.values
axes[0].imshow(img, origin="lower", cmap="gray", vmin=np.percentile(img, 5), vmax=np.percentile(img, 99.5))
kept = sel[sel["keep"]]
axes[0].scatter(kept["x"], kept["y"], s=60, facecolors="none", edgecolors="lime", lw=1.0, label="kept")
colors = ["tab:red", "tab:orange", "tab:blue", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
for i, r in enumerate(reasons):
    rej = sel[np.asarray(sel["reason"]) == r]
    axes[0].scatter(rej["x"], rej["y"], s=40, marker="x", color=colors[i % len(colors)], lw=1.0, label=f"{r} ({len(rej)})")
axes[0].legend(loc="upper right", fontsize=8, framealpha=0.8)
axes[0].set_title("kept and rejected stars")
flux = np.asarray(sel["flux"], dtype=float)
fw = np.asarray(sel["fwhm"], dtype=float)
axes[1].scatter(flux[sel["keep"]], fw[sel["keep"]], s=14, color="lime", edgecolor="k", lw=0.3, label="kept")
for i, r in enumerate(reasons):
    m = np.asarray(sel["reason"]) == r
    axes[1].scatter(flux[m], fw[m], s=18, marker="x", color=colors[i % len(colors)], label=r)
axes[1].set_xscale("log")
axes[1].set_xlabel("flux (ADU)")
axes[1].set_ylabel("FWHM (px)")
axes[1].set_ylim(0, 3 * np.nanmedian(fw))
axes[1].set_title("why: FWHM vs flux, by reason")
axes[1].legend(fontsize=8)
show(fig)

# %% [markdown]
# ## The spatially varying PSF model
#
# A PSFEx-like pixel basis: every PSF pixel is a degree-2 polynomial of the position. Stamps are
# cut per tile (each tile reads its outer box) and the model is solved once on the client.

# %%
psf = tp.build_psf(ds, sel, size=21, degree=2, nx=2, ny=2)
psf

# %%
grid = psf.grid(3, 3)  # (ny, nx, h, w): the PSF at the centres of a 3 x 3 tile grid
tg = tp.TileGrid(ds.image.shape, nx=3)
fig, axes = plt.subplots(3, 6, figsize=(13, 6.5))
for t in tg.tiles:
    yc = (t.core[0].start + t.core[0].stop - 1) / 2
    xc = (t.core[1].start + t.core[1].stop - 1) / 2
    model = grid[t.iy, t.ix]
    true = truth.at(xc, yc, size=model.shape[0])
    row = 2 - t.iy  # north up
    axes[row, 2 * t.ix].imshow(np.log10(np.clip(model, 1e-4, None)), origin="lower", vmin=-4, vmax=-0.8)
    axes[row, 2 * t.ix].set_title(f"model ({xc:.0f}, {yc:.0f})", fontsize=8)
    axes[row, 2 * t.ix + 1].imshow(model - true, origin="lower", cmap="RdBu_r", vmin=-0.005, vmax=0.005)
    axes[row, 2 * t.ix + 1].set_title(f"model - truth, Σ|Δ|={np.abs(model - true).sum():.3f}", fontsize=8)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
show(fig)

# %% [markdown]
# ## FWHM map
#
# `psf.fwhm_map(step=)` evaluates the FWHM of the model every `step` pixels and interpolates;
# compare with the true PSF's FWHM.

# %%
fmap = psf.fwhm_map(step=64)
yy, xx = np.mgrid[0:512:64, 0:512:64]
tmap = np.vectorize(truth.fwhm)(xx + 0.0, yy + 0.0)
rel = fmap[0:512:64, 0:512:64] / tmap - 1
print(f"FWHM model / truth - 1: median {np.median(rel):+.3f}, max |.| {np.abs(rel).max():.3f}")

fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
im = axes[0].imshow(fmap, origin="lower", cmap="viridis")
axes[0].scatter(kept["x"], kept["y"], s=4, c="w")
plt.colorbar(im, ax=axes[0], label="FWHM (px)")
axes[0].set_title("model FWHM map (dots: PSF stars)")
im = axes[1].imshow(rel, origin="lower", cmap="RdBu_r", vmin=-0.05, vmax=0.05, extent=(-32, 480, -32, 480))
plt.colorbar(im, ax=axes[1], label="model / truth - 1")
axes[1].set_title("FWHM error")
show(fig)
