"""The TorchScript engine: the bundle's ``model.ts`` on a torch device, the whole sliding window kept there.

Why a torch engine beside the ONNX Runtime ones: a GPU machine that has PyTorch but not onnxruntime-gpu (the
measurement machine here, many research workstations) can serve the bundle, and on a GPU the per-window host round
trips of a numpy sliding window (copy each batch in, each batch of logits out, accumulate on the CPU) cost more than
the network. So here the volume goes to the device once (from a pinned host buffer, asynchronously), windows are
sliced from it on the device, logits are weighted by the Gaussian importance and accumulated on the device, and only
the labels come back: one host-to-device copy of the volume and one device-to-host copy of a uint8 label map.

The window plan, the Gaussian importance, the padding and the skipping of windows outside the body are the numpy
``SlidingWindow``'s own (models/sliding_window.py), so both engines cover the same voxels with the same weights and
the test compares them window for window. Lower precision runs the network under ``torch.autocast`` (bf16, fp16) and
is gated by a parity record of this engine, as for every engine (models/precision.py); accumulation stays float32
unless the service asks for float16.

Imports torch: the default server never imports this module (``CTSEG_ENGINE=torchscript`` does).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.backends import Backend, Choice
from models.body_mask import WindowOccupancy
from models.bundle import Bundle, BundleError
from models.precision import Precision
from models.sliding_window import ProgressFn, SlidingWindow, argmax_classes

log = logging.getLogger(__name__)

AUTOCAST = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def torch_device(preference: str) -> torch.device:
    """``cuda`` where torch sees a GPU and the preference allows it, else the CPU."""
    if preference != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class TorchScriptBackend(Backend):
    """Batches of windows through ``model.ts``; and :meth:`sliding_window`, the whole volume on the device."""

    def __init__(self, bundle: Bundle | Path, choice: Choice, threads: int, batch_size: int,
                 device: str = "auto") -> None:
        """``bundle``: a bundle, or a TorchScript file itself (the benchmarks' models that no bundle holds)."""
        self.choice = choice
        self.device = torch_device(device)
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        path, name = (bundle, bundle.name) if isinstance(bundle, Path) else (bundle.torchscript_path, bundle.name)
        if not path.is_file():
            raise BundleError(f"bundle {name!r} has no model.ts: the torchscript engine serves TorchScript")
        try:
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as err:
            raise BundleError(f"bundle {name!r}: model.ts could not be loaded by torch ({type(err).__name__})") from None
        self.batch_size = batch_size
        self.autocast = AUTOCAST.get(choice.precision)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.runtime = f"torch {torch.__version__} {name} {choice.precision.value}"

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self.autocast is not None:
                with torch.autocast(self.device.type, dtype=self.autocast):
                    return self.model(batch).float()
            return self.model(batch)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        return self._forward(x).cpu().numpy()

    def sliding_window(self, window: SlidingWindow, volume: np.ndarray, progress: ProgressFn | None = None,
                       body: np.ndarray | None = None) -> np.ndarray:
        """What ``window(volume, self, progress, body)`` returns, computed on the device."""
        if volume.ndim != 3:
            raise ValueError(f"expected a [D, H, W] volume; got shape {volume.shape}")
        if body is not None and body.shape != volume.shape:
            raise ValueError(f"body mask {body.shape} does not match the volume {volume.shape}")
        if any(s < o for s, o in zip(volume.shape, window.out_size)):
            raise ValueError(f"volume {volume.shape} is smaller than the output window {window.out_size}; pad it first")
        pads = [(off, r - o - off) for off, r, o in zip(window.out_offset, window.roi, window.out_size)]
        occupancy = None
        if body is not None:
            occupancy = WindowOccupancy(np.pad(body, pads, mode="edge") if any(sum(p) for p in pads) else body)
        shape = tuple(volume.shape)
        starts = window.plan(shape)  # type: ignore[arg-type]
        dev = self.device
        host = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
        if dev.type == "cuda":
            host = host.pin_memory()
        x = host.to(dev, non_blocking=True)[None, None]
        if any(sum(p) for p in pads):
            # F.pad's order is last axis first; "replicate" is numpy's "edge"
            x = F.pad(x, [n for pair in reversed(pads) for n in pair], mode="replicate")
        x = x[0, 0]
        acc_dtype = torch.float16 if window.accumulate_dtype == np.float16 else torch.float32
        acc = torch.zeros((window.num_classes, *shape), dtype=acc_dtype, device=dev)
        weight = torch.zeros(shape, dtype=torch.float32, device=dev)
        imp = torch.from_numpy(window.importance).to(dev)
        roi, (od, oh, ow) = window.roi, window.out_size
        batch = torch.empty((self.batch_size, 1, *roi), dtype=torch.float32, device=dev)
        pending: list[tuple[int, int, int]] = []
        done = skipped = 0

        def flush() -> None:
            nonlocal done
            logits = self._forward(batch[: len(pending)])
            for k, (d, h, w) in enumerate(pending):
                acc[:, d:d + od, h:h + oh, w:w + ow] += (logits[k] * imp).to(acc_dtype)
                weight[d:d + od, h:h + oh, w:w + ow] += imp
            done += len(pending)
            pending.clear()
            if progress:
                progress(done, len(starts))

        with torch.inference_mode():
            for d, h, w in starts:
                if occupancy is not None and not occupancy.any((d, h, w), roi):
                    skipped += 1
                    done += 1
                    continue
                batch[len(pending), 0] = x[d:d + roi[0], h:h + roi[1], w:w + roi[2]]
                pending.append((d, h, w))
                if len(pending) == self.batch_size:
                    flush()
            if pending:
                flush()
            elif progress:
                progress(done, len(starts))
            window.last_stats = {"windows": len(starts), "skipped": skipped}
            if window.num_classes <= 256:
                labels = torch.argmax(acc, dim=0).to(torch.uint8)
                labels[weight == 0] = 0  # covered only by skipped windows (outside the body): background
                return labels.cpu().numpy()
        # more than 256 classes: numpy's uint16 path (torch has no uint16 arithmetic on every device)
        out = argmax_classes(acc.float().cpu().numpy(), np.uint16)
        out[(weight == 0).cpu().numpy()] = 0
        return out
