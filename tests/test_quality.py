"""Quality flags (server/imaging/quality.py) on real pipeline runs and on label maps built to trip each one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import series_from_image, write_files
from test_api import phantom

from models.bundle import BundleError, load_bundle, write_manifest
from models.sliding_window import SlidingWindow
from server.core.metrics import Metrics
from server.core.vocabulary import InputKind, Output, QualityFlag
from server.imaging.label_stats import label_statistics
from server.imaging.quality import LOW_MARGIN_SHARE, assess, hu_check, read_flags
from server.inference.engine import Engine
from server.inference.pipeline import run_pipeline


def _run(bundle: Path, tmp: Path, image, **series_kw) -> dict:  # type: ignore[no-untyped-def]
    files = write_files(series_from_image(image), tmp / "in")
    if series_kw:
        import pydicom

        for f in files:
            ds = pydicom.dcmread(f)
            for k, v in series_kw.items():
                setattr(ds, k, v)
            ds.save_as(f)
    result = run_pipeline(Engine.from_dir(bundle, overlap=0.25), InputKind.DICOM, files, tmp / "out",
                          (Output.NIFTI,), result_id="quality-test")
    doc = json.loads((tmp / "out" / "volumes.json").read_text())
    doc["_notes"], doc["_flags"] = result.notes, result.quality_flags
    return doc


def test_an_organ_cut_by_the_scan_range_is_flagged_incomplete_and_one_inside_is_not(intensity_bundle, tmp_path):
    # the phantom's body (label 1 of the intensity bundle) runs through every slice; the bright block (2) is inside
    doc = _run(intensity_bundle, tmp_path, phantom("axial")[0])
    body, block = doc["labels"]["liver"], doc["labels"]["aorta"]
    assert QualityFlag.TOUCHES_SCAN_END.value in body["flags"]
    assert block["voxels"] > 0 and QualityFlag.TOUCHES_SCAN_END.value not in block["flags"]
    assert QualityFlag.TOUCHES_FOV_EDGE.value not in block["flags"]
    assert block["components"] == 1 and block["hu_mean"] > 250  # the block is 400 HU, partial-volume edges less
    assert QualityFlag.TOUCHES_SCAN_END.value in doc["_flags"]
    assert read_flags(tmp_path / "out" / "volumes.json").labels["liver"][0] is QualityFlag.TOUCHES_SCAN_END


def test_a_missing_rescale_flags_hu_and_a_right_one_does_not(intensity_bundle, tmp_path):
    image, _ = phantom("axial", shape=(48, 48, 12))  # a body inside air: air reads -1000
    good = _run(intensity_bundle, tmp_path / "good", image)
    assert good["quality"]["flags"] == [] and -1100 < good["quality"]["air_hu"] < -900
    # stored values are HU + 1024: without the intercept every value reads 1024 too high
    shifted = _run(intensity_bundle, tmp_path / "shifted", image, RescaleIntercept="0")
    assert shifted["quality"]["flags"] == [QualityFlag.HU_IMPLAUSIBLE.value]
    assert shifted["quality"]["air_hu"] > 0
    assert any("rescale" in n for n in shifted["_notes"])


def test_hu_check_on_arrays():
    rng = np.random.default_rng(0)
    ct = np.full((20, 40, 40), -1000.0, dtype=np.float32)
    ct[:, 10:30, 10:30] = 40 + rng.normal(0, 10, (20, 20, 20))
    ct[:, :2, :] = -3024  # padding outside the reconstruction circle is not air
    air, soft, problems = hu_check(ct)
    assert problems == [] and abs(air + 1000) < 5 and 20 < soft < 60
    assert hu_check(ct * 2.0)[2]  # a wrong slope: air -2000, tissue 80
    assert hu_check(ct + 1024)[2]


def test_fragments_no_structure_reference_volumes_and_edges(intensity_bundle, tmp_path):
    manifest = json.loads((intensity_bundle / "ctseg.json").read_text())
    manifest["labels"][0]["reference_volume_ml"] = [1.0, 2.0]
    manifest["labels"][1]["reference_volume_ml"] = [0.5, 100.0]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.onnx").write_bytes((intensity_bundle / "model.onnx").read_bytes())
    write_manifest(tmp_path / "b", manifest)
    bundle = load_bundle(tmp_path / "b")
    assert bundle.reference_volumes == {1: (1.0, 2.0), 2: (0.5, 100.0)}
    ct = np.full((10, 20, 20), -1000.0, dtype=np.float32)
    ct[:, 2:18, 2:18] = 30.0
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[2:8, 0:6, 5:10] = 1  # on the image's first row: the field-of-view edge; 180 voxels = 1.44 mL at 2 mm
    labels[3:5, 12:14, 12:14] = 2  # two pieces of equal size: fragmented
    labels[6:8, 16:18, 16:18] = 2
    stats = label_statistics(ct, labels, (2.0, 2.0, 2.0), bundle.label_names())
    assert (stats[1].voxels, stats[1].ml, stats[2].components) == (180, 1.44, 2)
    assert stats[1].hu_mean == pytest.approx((120 * 30 - 60 * 1000) / 180)
    report = assess(ct, stats, bundle)
    assert report.labels[1].flags == (QualityFlag.TOUCHES_FOV_EDGE,)  # 1.44 mL is inside [1, 2]
    assert report.labels[2].flags == (QualityFlag.VOLUME_BELOW_REFERENCE, QualityFlag.FRAGMENTED)  # 0.128 mL
    labels[labels == 2] = 0
    labels[3:7, 10:15, 10:15] = 2  # 100 voxels = 0.8 mL, one piece, above nothing
    report = assess(ct, label_statistics(ct, labels, (2.0, 2.0, 2.0), bundle.label_names()), bundle)
    assert report.labels[2].flags == ()
    labels[labels == 2] = 0
    labels[4:6, 10:12, 10:12] = 2  # 0.064 mL: under the range
    report = assess(ct, label_statistics(ct, labels, (2.0, 2.0, 2.0), bundle.label_names()), bundle)
    assert report.labels[2].flags == (QualityFlag.VOLUME_BELOW_REFERENCE,)
    empty = assess(ct, label_statistics(ct, np.zeros_like(labels), (2.0,) * 3, bundle.label_names()), bundle)
    assert empty.flags == (QualityFlag.NO_STRUCTURE_FOUND,) and empty.reasons


@pytest.mark.parametrize("bad, words", [([5, 1], "0 <= lo < hi"), ([1], "a list [lo, hi]"),
                                        (["a", 2], "two numbers"), ([-1, 3], "0 <= lo < hi")])
def test_a_bad_reference_range_is_refused_with_a_sentence(intensity_bundle, tmp_path, bad, words):
    manifest = json.loads((intensity_bundle / "ctseg.json").read_text())
    manifest["labels"][0]["reference_volume_ml"] = bad
    (tmp_path / "model.onnx").write_bytes((intensity_bundle / "model.onnx").read_bytes())
    write_manifest(tmp_path, manifest)
    with pytest.raises(BundleError, match="reference_volume_ml of 'liver'") as err:
        load_bundle(tmp_path)
    assert words in str(err.value)


def test_an_old_manifest_loads_unchanged(intensity_bundle):
    assert load_bundle(intensity_bundle).reference_volumes == {}


def _noisy_logits(scale: float):  # type: ignore[no-untyped-def]
    """Three classes by nearest intensity centre, logits scaled so a clean voxel has a wide margin."""
    centres = np.array([0.0, 0.5, 1.0], dtype=np.float32)

    def predict(batch: np.ndarray) -> np.ndarray:
        return -scale * (batch - centres[None, :, None, None, None]) ** 2

    return predict


def test_noise_raises_the_low_margin_share_and_labels_do_not_change():
    rng = np.random.default_rng(1)
    clean = np.zeros((16, 32, 32), dtype=np.float32)
    clean[4:12, 8:24, 8:24] = 0.5
    noisy = clean + rng.normal(0, 0.3, clean.shape).astype(np.float32)
    window = SlidingWindow((8, 16, 16), (8, 16, 16), 3, overlap=0.5, batch_size=2)
    shares = []
    for volume in (clean, noisy):
        labels, margins = window.run(volume, _noisy_logits(10.0), low_margin=1.0)
        assert np.array_equal(labels, window(volume, _noisy_logits(10.0)))  # the default path: same labels
        assert margins.voxels.sum() == volume.size
        shares.append(margins.share(1))
    assert shares[0] == 0.0 and shares[1] > LOW_MARGIN_SHARE


def test_the_margin_is_the_gap_of_the_two_best_mean_logits():
    rng = np.random.default_rng(2)
    volume = rng.uniform(0, 1, (8, 16, 16)).astype(np.float32)
    window = SlidingWindow((8, 16, 16), (8, 16, 16), 3)  # one window: the mean logits are its logits
    _, margins = window.run(volume, _noisy_logits(10.0), low_margin=0.5)
    logits = _noisy_logits(10.0)(volume[None, None])[0]
    top = np.sort(logits, axis=0)
    low = (top[-1] - top[-2]) < 0.5
    expect = np.bincount(np.argmax(logits, axis=0)[low], minlength=3)
    assert np.array_equal(margins.low, expect) and 0 < margins.low.sum() < volume.size


def test_the_engine_returns_margins_on_request(intensity_bundle):
    from models.volume import Volume

    image, _ = phantom("axial")

    engine = Engine.from_dir(intensity_bundle, overlap=0.25)
    volume = Volume.from_sitk(image)
    labels, margins = engine.segment_scored(volume, low_margin=1.0)
    assert np.array_equal(labels.array, engine.segment(volume).array)
    assert margins is not None and margins.voxels[1:].sum() > 0


def test_flags_are_counted_in_metrics_with_a_fixed_label_set():
    metrics = Metrics()
    text = metrics.render({}, ({}, None)).decode()
    assert all(f'ctseg_quality_flags_total{{flag="{f.value}"}} 0.0' in text for f in QualityFlag)
    metrics.count_quality_flags([QualityFlag.HU_IMPLAUSIBLE, "hu-implausible", QualityFlag.FRAGMENTED])
    text = metrics.render({}, ({}, None)).decode()
    assert 'ctseg_quality_flags_total{flag="hu-implausible"} 1.0' in text
    with pytest.raises(ValueError):
        metrics.count_quality_flags(["made-up"])
