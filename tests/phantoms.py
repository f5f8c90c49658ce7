"""Synthetic CT phantoms: ellipsoid organs with realistic HU and noise on grids of any spacing and orientation.

Organs are defined in physical (LPS, mm) space, so the same anatomy appears whatever grid samples it; tests
use that to check geometry (a segment must land at a known physical position).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Organ:
    label: int
    name: str
    center: tuple[float, float, float]  # LPS mm
    radii: tuple[float, float, float]  # mm along x, y, z
    hu: float


BODY = Organ(0, "body", (0.0, 0.0, 0.0), (70.0, 55.0, 200.0), 20.0)  # soft tissue and fat
ORGANS = (  # portal-venous phase enhancement
    Organ(1, "liver", (-28.0, 5.0, 0.0), (26.0, 24.0, 22.0), 60.0),  # patient's right = -x in LPS
    Organ(2, "spleen", (32.0, 12.0, 6.0), (15.0, 15.0, 18.0), 110.0),
    Organ(3, "kidney_left", (24.0, 30.0, -24.0), (12.0, 12.0, 16.0), 180.0),
)


def direction_matrix(kind: str) -> np.ndarray:
    """Columns = index axes in LPS. axial/coronal/sagittal like scanners write them; oblique rotated 20 deg."""
    if kind == "axial":
        return np.eye(3)
    if kind == "coronal":
        return np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float)
    if kind == "sagittal":
        return np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float)
    if kind == "oblique":
        a = np.radians(20)
        rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        return rot
    if kind == "ras":  # NIfTI-style (RAS) as ITK sees it: x and y flipped
        return np.diag([-1.0, -1.0, 1.0])
    raise ValueError(kind)


def make_phantom(
    shape_xyz: tuple[int, int, int] = (48, 48, 40),
    spacing_xyz: tuple[float, float, float] = (2.0, 2.0, 2.0),
    orientation: str = "axial",
    seed: int = 0,
    noise: float = 12.0,
    organs: tuple[Organ, ...] = ORGANS,
    dtype: int = sitk.sitkInt16,
) -> tuple[sitk.Image, sitk.Image]:
    """Image (HU) and label map on a grid centred on the body, with the given spacing and orientation."""
    rng = np.random.default_rng(seed)
    direction = direction_matrix(orientation)
    spacing = np.asarray(spacing_xyz, float)
    size = np.asarray(shape_xyz)
    # centre the grid on the physical origin
    origin = -direction @ ((size - 1) * spacing / 2)
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in shape_xyz), indexing="ij")
    idx = np.stack([ii, jj, kk], -1).reshape(-1, 3) * spacing
    pts = origin + idx @ direction.T
    hu = np.full(len(pts), -1000.0)
    lab = np.zeros(len(pts), dtype=np.uint8)
    inside = lambda o: (((pts - np.asarray(o.center)) / np.asarray(o.radii)) ** 2).sum(1) <= 1.0  # noqa: E731
    hu[inside(BODY)] = BODY.hu
    for organ in organs:
        m = inside(organ)
        hu[m] = organ.hu
        lab[m] = organ.label
    hu += rng.normal(0, noise, len(pts))
    arr = hu.reshape(tuple(shape_xyz)).transpose(2, 1, 0)  # -> [z, y, x]
    larr = lab.reshape(tuple(shape_xyz)).transpose(2, 1, 0)
    image = sitk.GetImageFromArray(np.round(arr).astype(np.int16 if dtype == sitk.sitkInt16 else np.float32))
    label = sitk.GetImageFromArray(np.ascontiguousarray(larr))
    for im in (image, label):
        im.SetSpacing(tuple(spacing_xyz))
        im.SetOrigin(tuple(origin))
        im.SetDirection(tuple(direction.flatten()))
    return image, label


def write_dataset(root: Path, n_cases: int, seed: int = 0, dataset_json: bool = True) -> Path:
    """MSD-style dataset of phantoms with random spacing and orientation. Returns dataset.json (or root)."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n_cases):
        spacing = tuple(float(s) for s in rng.uniform(1.6, 2.6, 3))
        orientation = ["axial", "ras", "coronal", "sagittal"][i % 4]
        extent = {"coronal": (150.0, 100.0, 130.0), "sagittal": (130.0, 100.0, 150.0)}.get(orientation, (150.0, 130.0, 100.0))
        shape = tuple(int(round(v / s)) for v, s in zip(extent, spacing))
        image, label = make_phantom(shape, spacing, orientation, seed=seed * 100 + i)
        name = f"phantom_{i:03d}"
        sitk.WriteImage(image, str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"{name}.nii.gz"))
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    if not dataset_json:
        return root
    spec = {"name": "phantoms", "labels": {"0": "background", **{str(o.label): o.name for o in ORGANS}},
            "training": training, "numTraining": n_cases}
    path = root / "dataset.json"
    import json

    path.write_text(json.dumps(spec, indent=2))
    return path
