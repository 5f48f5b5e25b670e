"""Image Datasets (tilepipe.image.make_dataset): input validation messages."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from tilepipe.image import make_dataset


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("name", ["mask", "variance"])
def test_wrong_shape_mask_or_variance_names_both_shapes(name, lazy):
    """A mask / variance of another shape than the image is reported as such (not as a dask chunking error)."""
    img = np.zeros((128, 128), np.float32)
    other = np.zeros((100, 100), bool if name == "mask" else np.float32)
    if lazy:
        other = da.from_array(other, chunks=50)
    with pytest.raises(ValueError, match=rf"^{name} has shape \(100, 100\) but image has shape \(128, 128\); they must match$"):
        make_dataset(img, chunks=64, **{name: other})
    with pytest.raises(ValueError, match=rf"^{name} has shape \(100, 100\) but image has shape \(128, 128\)"):
        make_dataset(img, **{name: other})  # default chunks


@pytest.mark.parametrize("name", ["mask", "variance"])
def test_not_2d_mask_or_variance(name):
    img = np.zeros((128, 128), np.float32)
    with pytest.raises(ValueError, match=rf"^{name} must be 2-D \(y, x\); got shape \(128, 128, 1\)\. Select one plane"):
        make_dataset(img, **{name: np.zeros((128, 128, 1), np.float32)})


def test_wrong_shape_extra_variable():
    img = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match=r"^background has shape \(32, 64\) but image has shape \(64, 64\)"):
        make_dataset(img, extra={"background": np.zeros((32, 64), np.float32)})


def test_right_shapes_still_accepted():
    img = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    mask = np.zeros((64, 64), bool)
    mask[3, 4] = True
    var = da.from_array(np.full((64, 64), 2.0, np.float32), chunks=16)
    ds = make_dataset(img, mask=mask, variance=var, chunks=32, extra={"background": np.ones((64, 64))})
    assert ds["mask"].data.chunks == ds["image"].data.chunks == ds["variance"].data.chunks
    assert ds["mask"].values[3, 4] and ds["mask"].values.sum() == 1
    np.testing.assert_array_equal(ds["variance"].values, 2.0)
    np.testing.assert_array_equal(ds["background"].values, 1.0)
