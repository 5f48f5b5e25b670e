"""Warning and exception classes of tilepipe (photutils style)."""

from __future__ import annotations


class TilepipeWarning(UserWarning):
    """Base class of tilepipe's warnings."""


class OverlapWarning(TilepipeWarning):
    """The tile overlap is smaller than an operation's support radius."""


class NoDetectionsWarning(TilepipeWarning):
    """A tile or image yielded no sources."""


class FallbackWarning(TilepipeWarning):
    """A documented fallback was used (lower polynomial degree, flagged tile, ...)."""
