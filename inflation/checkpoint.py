"""The checkpoint format shared by ``ctseg inflate``, ``ctseg train`` and ``ctseg export``.

A torch file holding the model config (so the network can be rebuilt by name-free factory), the weights and
free-form metadata (inflation report, training state). Loaded with ``weights_only=True``: no pickled code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from inflation.errors import WeightsFileError
from models.config import ModelConfig
from models.nets import ViTSegmenter, create_model

FORMAT = "ctseg-checkpoint/1"


def save_checkpoint(path: str | Path, model: ViTSegmenter, meta: dict[str, Any] | None = None, **extra: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "model_config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
        **extra,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crash never leaves half a checkpoint under the real name
    return path


def load_torch_file(path: str | Path, what: str) -> Any:
    """A torch file's contents (tensors and plain containers only: ``weights_only``); a missing or unreadable file
    is a :class:`WeightsFileError` naming ``what`` was expected."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsFileError(f"{path}: not a readable {what} ({type(err).__name__}: {err})") from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    payload = load_torch_file(path, "ctseg checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WeightsFileError(f"{path}: not a ctseg checkpoint (format {payload.get('format') if isinstance(payload, dict) else None!r}, expected {FORMAT!r})")
    return payload


def load_checkpoint(path: str | Path) -> tuple[ViTSegmenter, dict[str, Any]]:
    payload = read_checkpoint(path)
    model = create_model(ModelConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    return model, payload
