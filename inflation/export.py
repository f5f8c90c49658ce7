"""``ctseg export``: a trained checkpoint -> a model bundle (ONNX + TorchScript + ctseg.json).

After writing both graphs, fresh random windows run through PyTorch, ONNX Runtime and TorchScript; the
largest logit difference and the argmax agreement are printed and stored in the manifest.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inflation.checkpoint import load_checkpoint
from inflation.errors import ExportError
from models.bundle import load_bundle, write_manifest
from models.nets import ViTSegmenter

log = logging.getLogger("ctseg.export")
OPSET = 17


def export_onnx(model: ViTSegmenter, path: Path, opset: int = OPSET) -> None:
    dummy = torch.zeros(1, model.config.in_chans, *model.config.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), str(path), dynamo=False, opset_version=opset, input_names=["image"],
            output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )


def export_torchscript(model: ViTSegmenter, path: Path) -> None:
    dummy = torch.zeros(1, model.config.in_chans, *model.config.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, dummy, check_trace=False)
    traced.save(str(path))


def parity(model: ViTSegmenter, bundle_dir: Path, windows: int = 2, seed: int | None = None) -> dict[str, Any]:
    """Compare PyTorch, ONNX Runtime and TorchScript on fresh random windows (a batch > 1: dynamic batch)."""
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(seed if seed is not None else int(dt.datetime.now().timestamp()))
    x = torch.rand(windows, model.config.in_chans, *model.config.img_size, generator=gen)
    with torch.no_grad():
        ref = model(x).numpy()
        ts = torch.jit.load(str(bundle_dir / "model.ts"))(x).numpy()
    sess = ort.InferenceSession(str(bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(["logits"], {"image": x.numpy()})[0]
    arg = ref.argmax(1)

    def figures(other: np.ndarray) -> dict[str, float]:
        return {"max_abs_logit_diff": float(np.abs(other - ref).max()),
                "argmax_agreement": float((other.argmax(1) == arg).mean())}

    return {"windows": windows, "onnxruntime": figures(onnx_out), "torchscript": figures(ts)}


def export_bundle(checkpoint: str | Path, out: str | Path, name: str | None = None, version: str | None = None,
                  tolerance: float = 1e-3, parity_ct: str | Path | None = None) -> dict[str, Any]:
    model, payload = load_checkpoint(checkpoint)
    model.eval()
    meta = payload.get("meta", {})
    for required in ("preprocess", "labels"):
        if required not in meta:
            raise ExportError(f"{checkpoint}: checkpoint has no {required!r}; export a checkpoint written by 'ctseg train'")
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_onnx(model, tmp / "model.onnx")
    export_torchscript(model, tmp / "model.ts")
    checks = parity(model, tmp)
    print(
        "parity on {w} random windows: ONNX Runtime max |dlogit| {o[max_abs_logit_diff]:.2e}, argmax agreement "
        "{o[argmax_agreement]:.4%}; TorchScript max |dlogit| {t[max_abs_logit_diff]:.2e}, argmax agreement "
        "{t[argmax_agreement]:.4%}".format(w=checks["windows"], o=checks["onnxruntime"], t=checks["torchscript"])
    )
    worst = max(checks["onnxruntime"]["max_abs_logit_diff"], checks["torchscript"]["max_abs_logit_diff"])
    if worst > tolerance:
        raise ExportError(f"exported graphs differ from PyTorch by {worst:.3e} (> {tolerance}); bundle not written")
    config = model.config
    manifest = {
        "name": name or meta.get("name") or config.name,
        "version": version or meta.get("version") or "0.0.0",
        "description": meta.get("description", ""),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "modality": "CT",
        "intended_use": "research and demonstration only; not a medical device",
        "model": config.to_dict(),
        "inputs": {"name": "image", "shape": ["batch", config.in_chans, *config.img_size], "dtype": "float32"},
        "outputs": {"name": "logits", "shape": ["batch", config.num_classes, *config.out_size], "dtype": "float32"},
        "inflation": meta.get("inflation"),
        "init": meta.get("init"),
        "preprocess": meta["preprocess"],
        "labels": meta["labels"],
        "training": meta.get("training"),
        "metrics": meta.get("metrics"),
        "parity": checks,
        "opset": OPSET,
        "files": {"model.onnx": "", "model.ts": ""},
    }
    write_manifest(tmp, manifest)
    load_bundle(tmp)  # the loader the service uses must accept it
    if parity_ct is not None:
        from inflation.precision_check import record_precision_checks

        record_precision_checks(tmp, Path(parity_ct))
        manifest = load_bundle(tmp).manifest
    else:
        log.warning("no real CT given (--parity-ct): lower precisions are not checked, and the service will serve "
                    "this bundle in fp32 unless told otherwise")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("bundle written to %s", out)
    return manifest
