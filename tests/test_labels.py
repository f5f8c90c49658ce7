"""Every built-in label's codes are the standard's (pydicom's coded concepts), not numbers typed by hand."""

from __future__ import annotations

import pytest
from pydicom.sr._concepts_dict import concepts
from pydicom.sr._cid_dict import cid_concepts

from models.bundle import load_bundle
from models.labels import KNOWN_STRUCTURES, label_for
from common import DEMO_BUNDLE


def in_cid(cid: int, value: str) -> bool:
    return any(value in concepts[scheme][keyword] for scheme, keywords in cid_concepts[cid].items()
               for keyword in keywords)


def meaning_of(scheme: str, value: str) -> set[str]:
    return {meaning for entry in concepts[scheme].values() for v, (meaning, _) in entry.items() if v == value}


@pytest.mark.parametrize("name", sorted(KNOWN_STRUCTURES))
def test_builtin_label_codes_are_the_standards(name):
    label = label_for(1, name)
    assert in_cid(7150, label.category.value), f"{name}: category {label.category} is not in CID 7150"
    assert label.category.meaning in meaning_of("SCT", label.category.value)
    assert label.type.scheme == "SCT" and label.type.meaning in meaning_of("SCT", label.type.value), label.type
    if label.modifier is not None:
        assert in_cid(244, label.modifier.value), f"{name}: laterality {label.modifier} is not in CID 244"


def test_retired_and_wrong_codes_are_gone():
    assert label_for(1, "liver").category.value == "91723000"  # CID 7150 Anatomical Structure (not 123037004)
    assert label_for(1, "vertebrae").type.value == "421060004"  # the spine, not 51282000 "Vertebra"
    assert label_for(1, "tumor").category.meaning == "Morphologically Abnormal Structure"


def test_the_demo_bundle_carries_standard_codes():
    for label in load_bundle(DEMO_BUNDLE).labels:
        assert in_cid(7150, label.category.value) and label.type.meaning in meaning_of("SCT", label.type.value)


def test_abdominal_labels_have_distinct_colours():
    from itertools import combinations

    import numpy as np

    from server.imaging.seg import _rgb_to_lab

    demo = load_bundle(DEMO_BUNDLE).labels
    lab = {label.name: np.array(_rgb_to_lab(label.color).value, dtype=float) for label in demo}
    # CIELab as DICOM stores it (0..65535): back to L* 0-100, a*/b* -128..127 before measuring distance
    as_lab = {n: np.array([v[0] * 100 / 65535, v[1] * 255 / 65535 - 128, v[2] * 255 / 65535 - 128]) for n, v in lab.items()}
    closest = min((float(np.linalg.norm(as_lab[a] - as_lab[b])), a, b) for a, b in combinations(as_lab, 2))
    assert closest[0] >= 30, closest
