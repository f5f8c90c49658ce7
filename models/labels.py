"""Segment labels with the coded concepts DICOM-SEG needs (SNOMED CT via DICOM's CID 7150/7151 vocabularies).

Codes come from pydicom's coded concepts (``pydicom.sr.codedict.codes``, generated from the DICOM standard), never
typed by hand: a typo or a retired code cannot reach a SEG. tests/test_labels.py checks every built-in label.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pydicom.sr.codedict import codes


@dataclass(frozen=True)
class Code:
    """A coded concept: (value, scheme designator, meaning), e.g. ('10200004', 'SCT', 'Liver')."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        if not (self.value and self.scheme and self.meaning):
            raise ValueError(f"a code needs value, scheme and meaning; got {self}")


def _code(concept: Any) -> Code:
    return Code(concept.value, concept.scheme_designator, concept.meaning)


# CID 7150 (Segmentation Property Categories)
ANATOMICAL_STRUCTURE = _code(codes.cid7150.AnatomicalStructure)
ALTERED_STRUCTURE = _code(codes.cid7150.MorphologicallyAbnormalStructure)
# CID 244 (Laterality)
RIGHT = _code(codes.cid244.Right)
LEFT = _code(codes.cid244.Left)


@dataclass(frozen=True)
class Label:
    """One output class: its value in the label map, name, display colour and codes."""

    value: int
    name: str
    color: tuple[int, int, int]
    category: Code = ANATOMICAL_STRUCTURE
    type: Code | None = None
    modifier: Code | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.value <= 65535:
            raise ValueError(f"label value must be in 1..65535 (0 is background); got {self.value} for {self.name!r}")
        if len(self.color) != 3 or any(not 0 <= c <= 255 for c in self.color):
            raise ValueError(f"colour must be three 0..255 integers; got {self.color} for {self.name!r}")
        if self.type is None:
            raise ValueError(f"label {self.name!r} has no type code; add one to the config (see models/labels.py)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Label":
        def code(v: Any) -> Code | None:
            return Code(**v) if isinstance(v, dict) else None

        return cls(
            value=int(data["value"]), name=str(data["name"]), color=tuple(int(c) for c in data["color"]),  # type: ignore[arg-type]
            category=code(data.get("category")) or ANATOMICAL_STRUCTURE, type=code(data.get("type")),
            modifier=code(data.get("modifier")),
        )


# name -> (type code from CID 7151, modifier, colour). Colours: 3D Slicer's GenericAnatomyColors where its hues
# tell abdominal neighbours apart (liver, spleen, IVC; arterial red, venous blue), others moved so that every two
# abdominal labels differ by at least 30 CIELab units (Slicer gives liver, stomach, kidneys and aorta near-identical
# reds): kidneys yellow (right) and orange (left), gallbladder green, stomach pink, pancreas cream, portal/splenic
# vein cyan, adrenals violet (right) and olive (left). tests/test_labels.py checks the separation.
KNOWN_STRUCTURES: dict[str, tuple[Code, Code | None, tuple[int, int, int]]] = {
    "spleen": (_code(codes.SCT.Spleen), None, (157, 108, 162)),
    "kidney_right": (_code(codes.SCT.Kidney), RIGHT, (255, 225, 25)),
    "kidney_left": (_code(codes.SCT.Kidney), LEFT, (245, 130, 48)),
    "gallbladder": (_code(codes.SCT.Gallbladder), None, (60, 180, 75)),
    "liver": (_code(codes.SCT.Liver), None, (221, 130, 101)),
    "stomach": (_code(codes.SCT.Stomach), None, (255, 170, 200)),
    "pancreas": (_code(codes.SCT.Pancreas), None, (255, 250, 200)),
    "adrenal_gland_right": (_code(codes.SCT.AdrenalGland), RIGHT, (145, 30, 180)),
    "adrenal_gland_left": (_code(codes.SCT.AdrenalGland), LEFT, (128, 128, 0)),
    "aorta": (_code(codes.SCT.Aorta), None, (220, 30, 40)),
    "inferior_vena_cava": (_code(codes.SCT.InferiorVenaCava), None, (0, 151, 206)),
    "portal_vein_and_splenic_vein": (_code(codes.SCT.PortalVein), None, (0, 205, 190)),
    "esophagus": (_code(codes.SCT.Esophagus), None, (211, 171, 143)),
    "duodenum": (_code(codes.SCT.Duodenum), None, (255, 253, 229)),
    "small_bowel": (_code(codes.SCT.SmallIntestine), None, (205, 167, 142)),
    "colon": (_code(codes.SCT.Colon), None, (204, 168, 143)),
    "urinary_bladder": (_code(codes.SCT.Bladder), None, (222, 154, 132)),
    "heart": (_code(codes.SCT.Heart), None, (206, 110, 84)),
    "lung": (_code(codes.SCT.Lung), None, (197, 165, 145)),
    "vertebrae": (_code(codes.SCT.Spine), None, (241, 214, 145)),  # all vertebrae as one label: the spine
    "tumor": (_code(codes.SCT.Neoplasm), None, (255, 0, 0)),
}
# Structures that are not normal anatomy take CID 7150's "Morphologically Abnormal Structure".
ALTERED = {"tumor"}


def label_for(value: int, name: str, overrides: dict[str, Any] | None = None) -> Label:
    """A Label for ``name`` from the built-in table, with config overrides (colour, codes) applied."""
    overrides = overrides or {}
    known = KNOWN_STRUCTURES.get(name)
    type_code = Code(**overrides["type"]) if "type" in overrides else (known[0] if known else None)
    modifier = Code(**overrides["modifier"]) if "modifier" in overrides else (known[1] if known else None)
    color = tuple(overrides.get("color", known[2] if known else _fallback_color(value)))
    category = (Code(**overrides["category"]) if "category" in overrides
                else ALTERED_STRUCTURE if name in ALTERED else ANATOMICAL_STRUCTURE)
    if type_code is None:
        raise ValueError(
            f"no SNOMED CT type code is known for {name!r}; give one in the config as "
            "type: {value: ..., scheme: SCT, meaning: ...}"
        )
    return Label(value, name, color, category, type_code, modifier)  # type: ignore[arg-type]


def _fallback_color(value: int) -> tuple[int, int, int]:
    rng = (value * 2654435761) & 0xFFFFFF
    return ((rng >> 16) & 255, (rng >> 8) & 255, rng & 255)
