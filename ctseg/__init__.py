"""ctseg: CT segmentation with inflated 2D Vision Transformers. The command lives in ``ctseg.cli``."""

__version__ = "0.1.0"
