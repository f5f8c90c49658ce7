"""Specific errors of the inflation step; each message names the key, file or value at fault."""


class InflationError(ValueError):
    """Base class: the 2D weights cannot become the requested 3D model."""


class ShapeMismatchError(InflationError):
    def __init__(self, key: str, source_shape: tuple[int, ...], target_shape: tuple[int, ...], why: str = "") -> None:
        self.key, self.source_shape, self.target_shape = key, source_shape, target_shape
        super().__init__(
            f"shape mismatch for {key!r}: 2D checkpoint has {list(source_shape)}, 3D model needs "
            f"{list(target_shape)}" + (f" ({why})" if why else "")
        )


class IncompatibleWeightsError(InflationError):
    """The checkpoint lacks encoder weights the model needs (a different architecture)."""


class UnsupportedBackboneError(InflationError):
    """The timm model uses a feature the 3D encoder does not implement."""


class WeightsFileError(InflationError):
    """A weights file is missing, of an unknown type, or unreadable."""


class ExportError(RuntimeError):
    """Export failed or the exported graphs disagree with PyTorch beyond tolerance (here, not in inflation/export.py,
    so that inflation/command.py can name it without importing torch)."""
