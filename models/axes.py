"""The one axis order of ctseg, written down once.

Every volume, tensor and spatial tuple in ctseg uses the same order:

* numpy volumes are indexed ``[D, H, W]`` = ``[z, y, x]`` = slice, row, column. This is the order of
  ``SimpleITK.GetArrayFromImage``; physical (x, y, z) order appears only at the SimpleITK boundary.
* torch tensors are ``(B, C, D, H, W)``.
* spatial tuples (ROI, patch size, token grid, spacing in array order) are ``(D, H, W)``.
* transformer tokens are the ``(D', H', W')`` grid flattened with D' slowest and W' fastest (``Conv3d`` output
  ``.flatten(2)``), after the prefix tokens (class token, then register tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

AXES: tuple[str, str, str] = ("D", "H", "W")

Triple = tuple[int, int, int]


def _parse_three(value: object, name: str, cast: type, example: str) -> list:
    if isinstance(value, str):
        try:
            items = [cast(p) for p in value.replace("x", ",").split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"{name} must be numbers like '{example}' (D,H,W); got {value!r}") from None
    elif isinstance(value, (int, float)):
        items = [cast(value)] * 3
    else:
        items = [cast(v) for v in value]  # type: ignore[union-attr]
    if len(items) == 1:
        items = items * 3
    if len(items) != 3 or any(v <= 0 for v in items):
        raise ValueError(f"{name} must be three positive numbers in (D, H, W) order; got {value!r}")
    return items


def as_triple(value: int | str | Sequence[int], name: str = "value") -> Triple:
    """Parse ``16``, ``"16,16,16"`` or ``(5, 16, 16)`` into a ``(D, H, W)`` tuple of positive ints."""
    d, h, w = _parse_three(value, name, int, "16,16,16")
    return (d, h, w)


def as_float_triple(value: float | str | Sequence[float], name: str = "value") -> tuple[float, float, float]:
    """Parse a spacing-like value into a ``(D, H, W)`` tuple of positive floats."""
    d, h, w = _parse_three(value, name, float, "1.5,1.5,1.5")
    return (d, h, w)
