"""Real model bundles for the service tests, built without torch.

``write_intensity_bundle`` writes an ONNX graph that labels each voxel by the nearest of a few intensity
centres (after the bundle's own preprocessing): exact and predictable, so geometry can be checked voxel by
voxel through the whole service. The manifest is the same format ``ctseg export`` writes.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from models.bundle import Bundle, write_manifest
from models.config import EncoderConfig, ModelConfig
from models.labels import KNOWN_STRUCTURES, label_for
from models.preprocess import PreprocessSpec

ROI = (16, 32, 32)


def write_intensity_bundle(
    directory: Path,
    centres: tuple[float, ...] = (0.05, 0.45, 0.95),
    names: tuple[str, ...] = ("liver", "aorta"),
    roi: tuple[int, int, int] = ROI,
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    name: str = "intensity-test",
    version: str = "1.0.0",
    window: tuple[float, float] = (-175.0, 250.0),
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, *roi])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(centres), *roi])
    nodes, inits, outs = [], [], []
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    inits.append(two)
    for k, c in enumerate(centres):
        inits.append(helper.make_tensor(f"c{k}", TensorProto.FLOAT, [], [float(c)]))
        nodes += [
            helper.make_node("Sub", ["image", f"c{k}"], [f"d{k}"]),
            helper.make_node("Pow", [f"d{k}", "two"], [f"p{k}"]),
            helper.make_node("Neg", [f"p{k}"], [f"l{k}"]),
        ]
        outs.append(f"l{k}")
    nodes.append(helper.make_node("Concat", outs, ["logits"], axis=1))
    graph = helper.make_graph(nodes, "nearest_intensity", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / "model.onnx"))
    labels = [label_for(v, n).to_dict() for v, n in enumerate(names, start=1)]
    manifest = {
        "name": name, "version": version, "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        "modality": "CT", "description": "test bundle: nearest intensity centre",
        "model": {
            "name": "intensity", "img_size": list(roi), "patch_size": [8, 16, 16],  # a valid 3D-mode config
            "encoder": {"embed_dim": 8, "depth": 1, "num_heads": 1}, "num_classes": len(centres),
        },
        "preprocess": {"spacing": list(spacing), "roi": list(roi), "window": list(window), "orientation": "LPS"},
        "labels": labels,
        "files": {"model.onnx": ""},
    }
    write_manifest(directory, manifest)
    return directory


def nearest_centre_labels(normalised: np.ndarray, centres: tuple[float, ...]) -> np.ndarray:
    return np.argmin(np.abs(normalised[..., None] - np.asarray(centres)), axis=-1)


def labels_only_bundle(n_labels: int, name: str = "labels-only") -> Bundle:
    """A Bundle object with ``n_labels`` coded labels and no model files: for output writers (SEG) alone."""
    names = list(KNOWN_STRUCTURES)
    labels = tuple(label_for(v, names[(v - 1) % len(names)]) for v in range(1, n_labels + 1))
    model = ModelConfig(name=name, img_size=(32, 96, 96), patch_size=(16, 16, 16),
                        encoder=EncoderConfig(embed_dim=8, depth=1, num_heads=1), num_classes=n_labels + 1)
    return Bundle(path=None, name=name, version="1", modality="CT", model=model,  # type: ignore[arg-type]
                  preprocess=PreprocessSpec(spacing=(1, 1, 1), roi=(32, 96, 96)), labels=labels, files={}, manifest={})
