"""ctseg models: architectures (``models.nets``, needs torch), and the torch-free bundle format and
preprocessing contract shared by training and serving.

Importing this package never imports torch; ``models.nets`` does.
"""

from models.axes import AXES, as_triple

__all__ = ["AXES", "as_triple"]
