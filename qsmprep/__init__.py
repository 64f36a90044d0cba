"""qsmprep: quantitative susceptibility mapping as a BIDS App."""

from .__about__ import __version__

__all__ = ["__version__"]
