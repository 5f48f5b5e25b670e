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


def _masked_input():
    rng = np.random.default_rng(1)
    values = rng.normal(100.0, 5.0, (64, 48)).astype(np.float32)
    img_mask = np.zeros(values.shape, bool)
    img_mask[10:14, 20] = True
    img_mask[50, 3:9] = True
    return values, img_mask


@pytest.mark.parametrize("lazy", [False, True])
def test_masked_array_image_keeps_its_mask(lazy):
    """A numpy.ma.MaskedArray image: its masked pixels are bad in ds['mask'], OR-ed with mask=."""
    from tilepipe import open_image

    values, img_mask = _masked_input()
    src = np.ma.MaskedArray(values, mask=img_mask)
    if lazy:
        src = da.from_array(src, chunks=16, asarray=False)
    user = np.zeros(values.shape, bool)
    user[0, 0] = user[20, 20] = True
    ds = open_image(src, chunks=16)
    np.testing.assert_array_equal(ds["mask"].values, img_mask)
    np.testing.assert_array_equal(ds["image"].values, values)  # the stored values are kept
    assert ds["mask"].data.chunks == ds["image"].data.chunks
    ds = make_dataset(src, mask=user, variance=np.ones(values.shape, np.float32), chunks=16)
    np.testing.assert_array_equal(ds["mask"].values, img_mask | user)
    # an unmasked MaskedArray (mask=nomask) is a plain image
    ds = make_dataset(np.ma.MaskedArray(values), variance=np.ones(values.shape, np.float32))
    assert not ds["mask"].values.any()


def test_masked_array_variance_masks_its_pixels():
    values, img_mask = _masked_input()
    var_mask = np.zeros(values.shape, bool)
    var_mask[30:33, 40:42] = True
    var = np.ma.MaskedArray(np.full(values.shape, 4.0, np.float32), mask=var_mask)
    ds = make_dataset(np.ma.MaskedArray(values, mask=img_mask), variance=var, chunks=16)
    np.testing.assert_array_equal(ds["mask"].values, img_mask | var_mask)
    np.testing.assert_array_equal(ds["variance"].values, 4.0)
    # a Dataset re-opened with a masked variance keeps its own mask too
    from tilepipe import open_image

    again = open_image(make_dataset(values, mask=img_mask), variance=var)
    np.testing.assert_array_equal(again["mask"].values, img_mask | var_mask)
    # a masked array of the wrong shape is reported like any other
    with pytest.raises(ValueError, match=r"^variance has shape \(10, 10\) but image has shape \(64, 48\)"):
        make_dataset(values, variance=np.ma.MaskedArray(np.ones((10, 10)), mask=np.eye(10, dtype=bool)))


def test_masked_array_fill_values_stay_out_of_the_default_variance():
    """Masked pixels holding a fill value (here 1e20 on 40 % of the image) do not enter the sky noise."""
    rng = np.random.default_rng(2)
    values = rng.normal(100.0, 5.0, (256, 256)).astype(np.float32)
    hidden = np.zeros(values.shape, bool)
    hidden[:, ::5] = hidden[:, 1::5] = True
    values[hidden] = 1e20
    ds = make_dataset(np.ma.MaskedArray(values, mask=hidden))
    var = ds["variance"].values
    assert np.all(np.isfinite(var))
    np.testing.assert_allclose(np.median(var[~hidden]), 25.0, rtol=0.03)  # sigma 5: measured 24.96
