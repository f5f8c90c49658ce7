"""Make ``import timm`` work where torchvision's compiled ops cannot load.

timm imports torchvision at import time. The PyPI torchvision wheel is linked against the CUDA build of torch;
next to the CPU build of torch its ``_C`` extension cannot load, and torchvision then fails on import while
registering fake kernels for two ops (``nms``, ``qnms``) whose schemas only ``_C`` defines. ctseg uses none
of torchvision's ops, so when (and only when) that exact failure happens we define the two schemas and import
again; torchvision's pure-Python parts (which timm needs) then work, and its detection ops stay unavailable.
"""

from __future__ import annotations

import logging
import sys

import torch

log = logging.getLogger(__name__)
_fragment: torch.library.Library | None = None


def ensure_torchvision_importable() -> None:
    global _fragment
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "transforms"):
        return
    try:
        import torchvision  # noqa: F401

        return
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    _fragment.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _fragment.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811

    log.debug("torchvision's compiled ops are unavailable (CUDA wheel beside CPU torch); ctseg does not use them")


ensure_torchvision_importable()
