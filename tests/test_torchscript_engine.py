"""The TorchScript engine (models/torch_engine.py) against ONNX Runtime fp32 on the CPU: the shipped demo bundle
(2.5D: a 5-slice window predicting its centre slice) on the real CT fixture, whole volume, with and without the body
mask; the same windows skipped, the same labels."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch")  # the 'train' extra; CI installs it

from common import DEMO_BUNDLE  # noqa: E402
from models.backends import Choice, EngineKind, OrtBackend  # noqa: E402
from models.bundle import BundleError, load_bundle  # noqa: E402
from models.precision import Precision  # noqa: E402
from models.sliding_window import SlidingWindow  # noqa: E402
from models.torch_engine import TorchScriptBackend  # noqa: E402
from models.volume import Volume  # noqa: E402
from server.inference.engine import Engine  # noqa: E402
from test_engines import FIXTURE_CT  # noqa: E402


@pytest.fixture(scope="module")
def prepared():
    engine = Engine(load_bundle(DEMO_BUNDLE), engine="onnxruntime", precision="fp32", threads=2)
    volume = Volume.from_sitk(sitk.ReadImage(str(FIXTURE_CT)))
    out = engine.preprocessor.forward(volume.to_sitk(), with_body=True)
    d, h, w = out.array.shape
    crop = (slice(0, 6), slice((h - 128) // 2, (h - 128) // 2 + 128), slice((w - 160) // 2, (w - 160) // 2 + 160))
    body = out.body[crop].copy()
    body[:4] = False  # the first slices' windows hold no patient: skipped
    return engine, np.ascontiguousarray(out.array[crop]), body  # 6 slices x 2 windows: each 2.5D edge, in seconds


def _backends(engine, batch_size):
    bundle = engine.bundle
    ort = OrtBackend(bundle, Choice(EngineKind.ONNXRUNTIME, Precision.FP32, "test"), threads=2)
    ts = TorchScriptBackend(bundle, Choice(EngineKind.ONNXRUNTIME, Precision.FP32, "test"), threads=2,
                            batch_size=batch_size, device="cpu")
    return ort, ts


@pytest.mark.parametrize("with_body", [False, True])
def test_the_device_sliding_window_gives_onnxruntimes_labels(prepared, with_body):
    engine, array, body = prepared
    cfg = engine.bundle.model
    window = SlidingWindow(cfg.img_size, cfg.out_size, cfg.num_classes, overlap=0.25, batch_size=3)  # a remainder
    ort, ts = _backends(engine, 3)
    mask = body if with_body else None
    reference = window(array, ort, body=mask)
    ref_stats = dict(window.last_stats)
    seen: list[tuple[int, int]] = []
    labels = ts.sliding_window(window, array, progress=lambda d, t: seen.append((d, t)), body=mask)
    assert window.last_stats == ref_stats
    if with_body:
        assert ref_stats["skipped"] > 0  # the mask path is exercised
    assert labels.dtype == reference.dtype and labels.shape == reference.shape == array.shape
    assert seen[-1] == (ref_stats["windows"], ref_stats["windows"])
    agreement = float((labels == reference).mean())
    assert agreement >= 0.995, agreement
    present = [k for k in np.unique(reference) if k and (reference == k).sum() >= 200]
    assert present, "the fixture should hold organs the demo model finds"
    for k in present:
        a, b = labels == k, reference == k
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice >= 0.99, (k, dice)


def test_a_batch_of_windows_gives_onnxruntimes_logits(prepared):
    engine, _, _ = prepared
    ort, ts = _backends(engine, 2)
    rng = np.random.default_rng(0)
    batch = rng.random((2, 1, *engine.bundle.model.img_size), dtype=np.float32)
    np.testing.assert_allclose(ts(batch), ort(batch), atol=2e-3, rtol=1e-3)


def test_a_bundle_without_torchscript_is_refused_by_name(tmp_path, intensity_bundle):
    bundle = load_bundle(intensity_bundle)
    with pytest.raises(BundleError, match="no model.ts"):
        TorchScriptBackend(bundle, Choice(EngineKind.ONNXRUNTIME, Precision.FP32, "test"), 1, 2, device="cpu")


def test_ctseg_engine_torchscript_serves_the_bundle_through_the_engine(prepared):
    """``CTSEG_ENGINE=torchscript``: chosen by name, fp32 on a CPU (its lower precisions need a GPU and a record of
    this engine), the same label map as ONNX Runtime through the whole Engine (preprocess, window, inverse)."""
    reference_engine, _, _ = prepared
    image = sitk.ReadImage(str(FIXTURE_CT))
    x, y = image.GetSize()[0] // 2, image.GetSize()[1] // 2
    volume = Volume.from_sitk(image[x - 70:x + 70, y - 60:y + 60, 0:6])
    engine = Engine(reference_engine.bundle, engine="torchscript", device="cpu", precision="auto", threads=2)
    assert engine.choice.engine == EngineKind.TORCHSCRIPT and engine.choice.precision == Precision.FP32
    assert engine.device == "cpu" and "torch" in engine.backend.runtime
    ours = engine.segment(volume).array
    theirs = reference_engine.segment(volume).array
    assert ours.shape == theirs.shape
    assert float((ours == theirs).mean()) >= 0.995
