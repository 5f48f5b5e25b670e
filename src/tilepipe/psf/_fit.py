"""Rendering a PSF model at a sub-pixel position, and batched single-star fits."""

from __future__ import annotations

import numpy as np

from ._stamps import fourier_shift


def fine_centre(n: int, os: int) -> tuple[int, int]:
    """Side and central index of the fine grid of an ``n``-pixel stamp at oversampling ``os``.

    The fine side is ``os * n`` (``+ 1`` for even ``os``, to keep it odd) and
    the fine sample ``cf + os * k`` is the pixel ``c + k`` (``c = n // 2``).
    """
    hf = os * n + (1 if os % 2 == 0 else 0)
    return hf, (hf - 1) // 2


def decimate(fine: np.ndarray, os: int, n: int) -> np.ndarray:
    """Pixel-resolution samples (phase 0) of ``(..., hf, hf)`` fine stamps."""
    if os == 1:
        return fine
    hf, cf = fine_centre(n, os)
    c = n // 2
    sl = slice(cf - os * c, cf + os * c + 1, os)
    return fine[..., sl, sl]


def render(fine: np.ndarray, dx, dy, os: int, n: int, derivatives: bool = True):
    """Pixel stamps of ePSF models ``fine`` ``(N, hf, hf)`` whose centre is moved by ``(dx, dy)`` px.

    The fine models hold pixel-integrated values at sub-pixel offsets (an
    effective PSF, Anderson & King 2000), so a shifted model is sampled by a
    Fourier shift of the fine grid followed by decimation; derivatives with
    respect to ``dx, dy`` come from the same Fourier transform.
    """
    dx = np.asarray(dx, np.float64)
    dy = np.asarray(dy, np.float64)
    if derivatives:
        s, gx, gy = fourier_shift(fine, dx * os, dy * os, derivatives=True)
        return decimate(s, os, n), decimate(gx, os, n) * os, decimate(gy, os, n) * os
    return decimate(fourier_shift(fine, dx * os, dy * os), os, n)


def fit_single(data, weight, fine, os, n, *, fit_position=True, niter=8, max_shift=2.0,
               dx0=None, dy0=None):
    """Batched Gauss-Newton fit of ``flux * P(shifted by dx, dy) + sky`` to ``N`` isolated stamps.

    Parameters
    ----------
    data, weight : (N, n, n)
        Background-subtracted data and fit weights (0 = ignore the pixel).
    fine : (N, hf, hf)
        The PSF model at each star (fine grid, pixel-sampled sum 1).
    dx0, dy0 : (N,)
        Initial offsets (px) of the star centre from the stamp's central pixel.

    Returns
    -------
    dict with ``flux, sky, dx, dy, model`` (rendered best fit), ``ok``.
    """
    N = len(data)
    dx = np.zeros(N) if dx0 is None else np.asarray(dx0, np.float64).copy()
    dy = np.zeros(N) if dy0 is None else np.asarray(dy0, np.float64).copy()
    dx_init, dy_init = dx.copy(), dy.copy()
    d = data.reshape(N, -1).astype(np.float64)
    w = weight.reshape(N, -1).astype(np.float64)
    ok = np.ones(N, bool)
    flux = np.zeros(N)
    sky = np.zeros(N)
    for it in range(niter if fit_position else 1):
        P, gx, gy = render(fine, dx, dy, os, n, derivatives=True)
        P = P.reshape(N, -1)
        if it == 0 or not fit_position:
            # linear solve for flux and sky
            J = np.stack([P, np.ones_like(P)], axis=-1)
            A = np.einsum("np,npi,npj->nij", w, J, J)
            b = np.einsum("np,npi,np->ni", w, J, d)
            try:
                sol = np.linalg.solve(A + 1e-12 * np.eye(2), b[..., None])[..., 0]
            except np.linalg.LinAlgError:
                sol = np.zeros((N, 2))
                ok[:] = False
            flux, sky = sol[:, 0], sol[:, 1]
            if not fit_position:
                break
        J = np.stack([P, np.ones_like(P), flux[:, None] * gx.reshape(N, -1), flux[:, None] * gy.reshape(N, -1)], axis=-1)
        r = d - flux[:, None] * P - sky[:, None]
        A = np.einsum("np,npi,npj->nij", w, J, J)
        b = np.einsum("np,npi,np->ni", w, J, r)
        A = A + 1e-9 * np.einsum("nii->n", A)[:, None, None] * np.eye(4)
        try:
            step = np.linalg.solve(A, b[..., None])[..., 0]
        except np.linalg.LinAlgError:
            ok[:] = False
            break
        step[:, 2:] = np.clip(step[:, 2:], -0.5, 0.5)
        flux += step[:, 0]
        sky += step[:, 1]
        dx += step[:, 2]
        dy += step[:, 3]
        far = np.hypot(dx - dx_init, dy - dy_init) > max_shift
        dx[far], dy[far] = dx_init[far], dy_init[far]
        ok &= ~far
        if np.max(np.abs(step[:, 2:]), initial=0) < 1e-4:
            break
    P = render(fine, dx, dy, os, n, derivatives=False).reshape(N, -1)
    # final linear flux/sky at the converged positions
    J = np.stack([P, np.ones_like(P)], axis=-1)
    A = np.einsum("np,npi,npj->nij", w, J, J)
    b = np.einsum("np,npi,np->ni", w, J, d)
    sol = np.linalg.solve(A + 1e-12 * np.eye(2), b[..., None])[..., 0]
    flux, sky = sol[:, 0], sol[:, 1]
    ok &= np.isfinite(flux) & (flux > 0)
    model = (flux[:, None] * P + sky[:, None]).reshape(data.shape)
    return {"flux": flux, "sky": sky, "dx": dx, "dy": dy, "model": model, "psf": P.reshape(data.shape), "ok": ok}


_CIRC: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _circ(m: int) -> tuple[np.ndarray, np.ndarray]:
    if m not in _CIRC:  # benign race: every thread computes the same arrays
        f = np.fft.fftfreq(m)
        if m % 2 == 0:
            f[m // 2] = 0.0
        _CIRC[m] = (f, (np.arange(m)[:, None] - np.arange(m)[None, :]) % m)
    return _CIRC[m]


def _shift_matrices(m: int, d: float):
    """Circulant ``m x m`` matrices applying a Fourier shift by ``d`` samples (and its derivative)."""
    f, idx = _circ(m)
    ph = np.exp(-2j * np.pi * f * d)
    h = np.fft.ifft(ph).real
    dh = np.fft.ifft(-2j * np.pi * f * ph).real
    return h[idx], dh[idx]


def render_one(fine: np.ndarray, dx: float, dy: float, os: int, n: int):
    """One fine model shifted by ``(dx, dy)`` px, decimated to pixels, with derivatives.

    Separable form of :func:`render` (``S_y @ fine @ S_x^T``): a few small
    matrix products instead of 2-D FFTs.
    """
    m = fine.shape[-1]
    Sx, dSx = _shift_matrices(m, dx * os)
    Sy, dSy = _shift_matrices(m, dy * os)
    if os > 1:
        hf, cf = fine_centre(n, os)
        c = n // 2
        rows = np.arange(cf - os * c, cf + os * c + 1, os)
        Sx, dSx, Sy, dSy = Sx[rows], dSx[rows], Sy[rows], dSy[rows]
    A = fine @ Sx.T
    P = Sy @ A
    gx = Sy @ (fine @ dSx.T) * os
    gy = dSy @ A * os
    return P, gx, gy
