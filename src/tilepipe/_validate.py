"""Small argument validators shared by every public function.

Errors name the argument and say how to fix it (photutils' ``as_pair`` style).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def as_pair(name: str, value: Any, *, lower: int | None = None, allow_none: bool = False) -> tuple[int, int] | None:
    """Return ``value`` as an ``(ny, nx)`` pair of ints.

    Parameters
    ----------
    name : str
        Argument name, used in error messages.
    value : int or (int, int)
        A scalar (used for both axes) or a pair ``(ny, nx)``.
    lower : int, optional
        Smallest allowed value (inclusive).
    allow_none : bool
        Return ``None`` for ``None`` instead of raising.
    """
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be an int or a (ny, nx) pair of ints, not None")
    arr = np.atleast_1d(np.asarray(value))
    if arr.ndim != 1 or arr.size not in (1, 2):
        raise ValueError(f"{name} must be an int or a (ny, nx) pair of ints; got {value!r}")
    out = []
    for v in arr.tolist():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            if isinstance(v, float) and float(v).is_integer():
                v = int(v)
            else:
                raise TypeError(f"{name} must contain integers; got {value!r}")
        out.append(int(v))
    if len(out) == 1:
        out = out * 2
    if lower is not None and min(out) < lower:
        raise ValueError(f"{name} must be >= {lower}; got {value!r}")
    return out[0], out[1]


def check_int(name: str, value: Any, *, lower: int | None = None) -> int:
    """Validate a scalar integer argument and return it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and float(value).is_integer():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an integer; got {value!r}")
    value = int(value)
    if lower is not None and value < lower:
        raise ValueError(f"{name} must be >= {lower}; got {value}")
    return value


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Validate a finite positive float argument and return it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number; got {value!r}") from None
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite {'non-negative' if allow_zero else 'positive'} number; got {value!r}")
    return v


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Validate that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value
