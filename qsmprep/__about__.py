"""Version and citation information for qsmprep."""

__version__ = "0.1.0.dev0"
__packagename__ = "qsmprep"
__url__ = "https://github.com/qsmprep/qsmprep"
__description__ = (
    "qsmprep turns multi-echo gradient-echo MRI in BIDS into quantitative "
    "susceptibility maps (ppm) with BIDS derivatives and visual QC reports."
)
