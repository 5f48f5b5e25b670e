"""Common interface of every PSF: ``at(x, y)``, FWHM maps, per-tile grids, storage."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ._stamps import half_max_fwhm

__all__ = ["BasePSF", "load_psf"]


class BasePSF:
    """Interface shared by :class:`PSFModel`, :class:`GaussianPSF` and :class:`MoffatPSF`.

    Subclasses implement ``_stamp(x, y, oversampled)`` and ``to_attrs()``.
    ``size`` is the stamp side (odd, pixels); ``oversampling`` the model's
    sampling factor; ``shape`` the ``(ny, nx)`` image shape the model is
    defined on (``None`` for constant analytic PSFs).
    """

    kind: str = "base"
    size: int = 25
    oversampling: int = 1
    shape: tuple[int, int] | None = None

    # ------------------------------------------------------------ evaluation
    def at(self, x: float, y: float, oversampled: bool = False) -> np.ndarray:
        """The PSF stamp at image position ``(x, y)`` (global 0-based pixels).

        Parameters
        ----------
        x, y : float
            Position; the source sits at the stamp's central pixel
            ``(size // 2, size // 2)``.
        oversampled : bool
            Return the model at its native oversampled resolution (side
            ``size * oversampling``, odd) instead of pixel resolution.

        Returns
        -------
        ndarray, float64, ``[y, x]``
            Normalised to sum 1 (at either resolution).
        """
        s = self._stamp(float(x), float(y), bool(oversampled))
        tot = s.sum()
        if not np.isfinite(tot) or tot == 0:
            raise ValueError(f"the PSF model evaluates to zero flux at (x={x}, y={y})")
        return s / tot

    def _stamp(self, x: float, y: float, oversampled: bool) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def fwhm(self, x: float, y: float) -> float:
        """FWHM (px) of the continuous profile at ``(x, y)``.

        ``2 sqrt(A / pi)`` of the half-maximum area of the pixel stamp,
        Fourier-upsampled with the pixel response divided out (see
        :func:`~tilepipe.psf._stamps.half_max_fwhm`): the geometric mean of the
        major- and minor-axis FWHM, comparable with a seeing value.
        """
        return half_max_fwhm(self.at(x, y))

    def fwhm_map(self, shape: tuple[int, int] | None = None, step: int = 64) -> np.ndarray:
        """FWHM (px) evaluated every ``step`` pixels and bilinearly interpolated to ``shape``.

        Returns a float32 array of ``shape`` (default: the model's image shape).
        """
        from scipy.interpolate import RegularGridInterpolator

        shape = tuple(shape) if shape is not None else self.shape
        if shape is None:
            raise ValueError("shape is required for a PSF that is not tied to an image; pass shape=(ny, nx)")
        step = max(1, int(step))
        ys = np.unique(np.r_[np.arange(0, shape[0], step), shape[0] - 1]).astype(float)
        xs = np.unique(np.r_[np.arange(0, shape[1], step), shape[1] - 1]).astype(float)
        vals = np.array([[self.fwhm(x, y) for x in xs] for y in ys])
        if len(ys) == 1 or len(xs) == 1:
            return np.full(shape, np.nanmedian(vals), np.float32)
        f = RegularGridInterpolator((ys, xs), vals)
        yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
        return f((yy, xx)).astype(np.float32)

    def grid(self, nx: int, ny: int | None = None, shape: tuple[int, int] | None = None,
             oversampled: bool = False) -> np.ndarray:
        """PSFs at the core centres of an ``ny x nx`` :class:`~tilepipe.TileGrid`.

        Returns ``(ny, nx, h, w)``: ``out[iy, ix]`` is the PSF at the centre of
        tile ``(iy, ix)`` (what a per-tile consumer such as ZOGY needs).
        """
        from ..tiling import TileGrid

        shape = tuple(shape) if shape is not None else self.shape
        if shape is None:
            raise ValueError("shape is required for a PSF that is not tied to an image; pass shape=(ny, nx)")
        g = TileGrid(shape, nx=nx, ny=ny)
        stamps = []
        for t in g.tiles:
            yc = (t.core[0].start + t.core[0].stop - 1) / 2.0
            xc = (t.core[1].start + t.core[1].stop - 1) / 2.0
            stamps.append(self.at(xc, yc, oversampled=oversampled))
        arr = np.stack(stamps)
        return arr.reshape(g.ny, g.nx, *arr.shape[1:])

    # --------------------------------------------------------------- storage
    def to_attrs(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "BasePSF":
        """Rebuild any PSF from :meth:`to_attrs` output (JSON-able dict, e.g. Zarr attrs)."""
        return load_psf(attrs)

    def to_fits(self, path: str | os.PathLike, overwrite: bool = True) -> None:
        """Write the PSF to a FITS file (written to a temporary name, then renamed).

        Primary HDU: the basis cube ``(n_basis, h, w)`` (pixel/KL models) or an
        example stamp (analytic), header keys ``PSFTYPE``, ``PSFSIZE``,
        ``OVERSAMP``...; extension ``TPPSF``: the full :meth:`to_attrs` record as
        JSON text, so :meth:`from_fits` restores the exact model.
        """
        from astropy.io import fits

        attrs = self.to_attrs()
        if "basis" in attrs:
            data = np.asarray(attrs["basis"], dtype=np.float64)
        else:
            c = self.shape or (1, 1)
            data = self.at((c[1] - 1) / 2, (c[0] - 1) / 2)
        hdr = fits.Header()
        hdr["PSFTYPE"] = (attrs["type"], "tilepipe PSF kind")
        hdr["PSFSIZE"] = (int(self.size), "stamp side (px)")
        hdr["OVERSAMP"] = (int(self.oversampling), "model oversampling factor")
        if "degree" in attrs:
            hdr["POLDEG"] = (int(attrs["degree"]), "degree of the (x, y) polynomials")
        if self.shape is not None:
            hdr["IMNY"], hdr["IMNX"] = int(self.shape[0]), int(self.shape[1])
        hdr["ORIGIN"] = "tilepipe"
        phdu = fits.PrimaryHDU(data=data, header=hdr)
        text = json.dumps(attrs)
        col = fits.Column(name="JSON", format=f"{len(text)}A", array=np.array([text]))
        ext = fits.BinTableHDU.from_columns([col], name="TPPSF")
        hdus = fits.HDUList([phdu, ext])
        path = os.fspath(path)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        tmp = path + ".tmp-tilepipe"
        hdus.writeto(tmp, overwrite=True)
        os.replace(tmp, path)

    @classmethod
    def from_fits(cls, path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> "BasePSF":
        """Read a PSF written by :meth:`to_fits` (any kind).

        Parameters
        ----------
        path : str or path
            Local path or fsspec URL (``file://``, ``memory://``, ``s3://``...);
            gzip-compressed files are read too.
        storage_options : dict, optional
            fsspec options for a URL (e.g. ``{"key": ..., "secret": ...,
            "client_kwargs": {"endpoint_url": ...}}`` for S3), as for
            :func:`tilepipe.open_image`.
        """
        from ..io import _fs
        from ..io.fits import _opened

        try:
            with _opened(_fs.as_str(path, "path"), storage_options) as hdul:  # local or URL, gzip included
                if "TPPSF" not in hdul:
                    raise ValueError(
                        f"{path} is not a tilepipe PSF file (no TPPSF extension); write it with PSFModel.to_fits"
                    )
                text = hdul["TPPSF"].data["JSON"][0]
        except FileNotFoundError as exc:
            raise FileNotFoundError(str(exc).replace("FITS file not found", "PSF file not found", 1)) from exc
        if isinstance(text, bytes):
            text = text.decode()
        return load_psf(json.loads(text))


def load_psf(src: Any, storage_options: dict[str, Any] | None = None) -> BasePSF:
    """Return a PSF from a FITS file, a :meth:`BasePSF.to_attrs` dict, or a PSF (passed through).

    Parameters
    ----------
    src : str, path, dict or BasePSF
        A file written by :meth:`BasePSF.to_fits` (``tilepipe psf``): local
        path or fsspec URL (``memory://``, ``s3://``...); an attrs dict; or a PSF.
    storage_options : dict, optional
        fsspec options for a URL (credentials, ``client_kwargs={"endpoint_url": ...}``);
        ignored for the other kinds of ``src``.
    """
    if isinstance(src, BasePSF):
        return src
    if isinstance(src, (str, os.PathLike)):
        return BasePSF.from_fits(src, storage_options=storage_options)
    if isinstance(src, dict):
        kind = src.get("type")
        if kind in ("pixel", "kl"):
            from .model import PSFModel

            return PSFModel._from_attrs(src)
        if kind == "gaussian":
            from .analytic import GaussianPSF

            return GaussianPSF._from_attrs(src)
        if kind == "moffat":
            from .analytic import MoffatPSF

            return MoffatPSF._from_attrs(src)
        raise ValueError(f"unknown PSF type {kind!r} in attrs; expected 'pixel', 'kl', 'gaussian' or 'moffat'")
    raise TypeError(f"cannot load a PSF from {type(src).__name__}; pass a FITS path or URL, an attrs dict or a PSF")
