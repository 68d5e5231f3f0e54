"""The version of bngen (one place: the package, the banners of generated C, the wheel)."""

__version__ = "0.1.0"
