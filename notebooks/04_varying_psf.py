# %% [markdown]
# # 04 · A spatially varying PSF on a Karhunen–Loève basis
#
# `build_psf(..., model="kl")` describes the PSF as a mean stamp plus a few eigen-images
# (Karhunen–Loève / principal components of the star stamps, Lauer 2002):
#
# `PSF(x, y) = mean + Σ_k a_k(u, v) · e_k`, with the coefficients `a_k` polynomials of the
# normalised position `(u, v) ∈ [-1, 1]²`.
#
# The number of components is the smallest that leaves out at most `inf_loss` of the stamps'
# variance. Here we look at the basis and at the coefficient maps across the field of a synthetic
# 512² image whose PSF broadens and turns elliptical towards the corners.

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


field = make_field((512, 512), seed=4, n_stars=600, fwhm=3.0, psf_variation=0.5, ellipticity=0.2,
                   saturation=60000.0)
ds = field.image
truth = true_psf(ds)

# %% [markdown]
# ## Build the KL model
#
# With no catalog, `build_psf` detects and selects the stars itself (same chain as notebook 03).

# %%
kl = tp.build_psf(ds, size=21, degree=2, model="kl", inf_loss=0.05, nx=2, ny=2)
print(kl)
print("components:", kl.meta["n_components"], " variance left out:", round(kl.meta["variance_left_out"], 4))

# %% [markdown]
# ## The basis: mean PSF and eigen-images

# %%
basis = kl.basis
fig, axes = plt.subplots(1, len(basis), figsize=(2.3 * len(basis), 2.6))
axes = np.atleast_1d(axes)
for k, (ax, b) in enumerate(zip(axes, basis)):
    v = np.abs(b).max()
    ax.imshow(b, origin="lower", cmap="viridis" if k == 0 else "RdBu_r", vmin=None if k == 0 else -v,
              vmax=None if k == 0 else v)
    ax.set_title("mean" if k == 0 else f"e{k}")
    ax.set_xticks([])
    ax.set_yticks([])
show(fig)

# %% [markdown]
# ## Coefficient maps
#
# `kl.weights(x, y)` returns the basis weights at any position (vectorised); the mean's weight is 1.

# %%
yy, xx = np.mgrid[0:512:16, 0:512:16] + 8.0
w = kl.weights(xx.ravel(), yy.ravel()).reshape(*xx.shape, -1)
ncomp = w.shape[-1] - 1
fig, axes = plt.subplots(1, ncomp, figsize=(3.3 * ncomp, 3), squeeze=False)
for k in range(1, ncomp + 1):
    ax = axes[0, k - 1]
    im = ax.imshow(w[..., k], origin="lower", cmap="RdBu_r", extent=(0, 512, 0, 512))
    plt.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(f"a{k}(x, y)")
show(fig)

# %% [markdown]
# ## Check against the truth and the pixel-basis model
#
# Σ|model − truth| at nine positions, for the KL model and the PSFEx-like pixel model.

# %%
pix = tp.build_psf(ds, size=21, degree=2, model="pixel", nx=2, ny=2)
rows = []
for y in (60.0, 256.0, 450.0):
    for x in (60.0, 256.0, 450.0):
        t = truth.at(x, y, size=21)
        rows.append((x, y, np.abs(kl.at(x, y) - t).sum(), np.abs(pix.at(x, y) - t).sum(),
                     kl.fwhm(x, y), truth.fwhm(x, y)))
from astropy.table import Table

tab = Table(rows=rows, names=("x", "y", "sum|kl - truth|", "sum|pixel - truth|", "fwhm_kl", "fwhm_true"))
for c in tab.colnames[2:]:
    tab[c].info.format = ".3f"
tab

# %%
fig, axes = plt.subplots(2, 3, figsize=(9, 6))
for ax, (x, y) in zip(axes.T, [(60.0, 60.0), (256.0, 256.0), (450.0, 450.0)]):
    ax[0].imshow(kl.at(x, y), origin="lower")
    ax[0].set_title(f"KL model at ({x:.0f}, {y:.0f})", fontsize=9)
    ax[1].imshow(kl.at(x, y) - truth.at(x, y, size=21), origin="lower", cmap="RdBu_r", vmin=-0.005, vmax=0.005)
    ax[1].set_title("model - truth", fontsize=9)
for a in axes.flat:
    a.set_xticks([])
    a.set_yticks([])
show(fig)
