"""The inference engine: a bundle, an inference backend, sliding-window inference; torch-free.

Loaded once at start-up and warmed up; ``segment`` takes a volume on any grid and returns labels on exactly
that grid (shape, spacing, origin, direction), through the bundle's own preprocessing contract.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.backends import Backend, choose, open_backend
from models.bundle import Bundle, BundleError, load_bundle
from models.preprocess import Preprocessor
from models.sliding_window import MarginCounts, SlidingWindow
from models.volume import Volume
from server.core.settings import Settings

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int], None]


@dataclass
class Timings:
    stages: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = round(self.stages.get(stage, 0.0) + seconds, 4)


class Engine:
    """One bundle served by one inference backend (models/backends.py).

    The engine and precision are chosen at construction (a named one that cannot run here is an error at start-up);
    the backend is opened on first use (``warm_up``): a service whose jobs run in worker processes keeps its
    engines in the API process for the bundle's facts only, and each worker process opens its own backend.
    """

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int = 0, overlap: float = 0.25,
                 batch_size: int = 4, float16_accumulation: bool = False, engine: str = "auto",
                 precision: str = "auto", trt_cache_dir: Path | None = None, skip_outside_body: bool = True) -> None:
        self.bundle = bundle
        self.threads = threads or (os.cpu_count() or 1)
        self.choice = choose(engine, precision, device, bundle.precisions)
        self.trt_cache_dir = trt_cache_dir
        self.skip_outside_body = skip_outside_body
        self._backend: Backend | None = None
        self._lock = threading.Lock()
        self.preprocessor = Preprocessor(bundle.preprocess)
        cfg = bundle.model
        self.window = SlidingWindow(cfg.img_size, cfg.out_size, cfg.num_classes, overlap=overlap, batch_size=batch_size,
                                    accumulate_dtype=np.float16 if float16_accumulation else np.float32)
        self.ready = False

    @classmethod
    def from_dir(cls, path: str | Path, **kwargs: object) -> Engine:
        return cls(load_bundle(path), **kwargs)  # type: ignore[arg-type]

    @property
    def device(self) -> str:
        return self.choice.device

    @property
    def backend(self) -> Backend:
        with self._lock:
            if self._backend is None:
                log.info("model %s: %s (%s)", self.bundle.name, self.choice.describe(), self.choice.reason)
                self._backend = open_backend(self.bundle, self.choice, self.threads, self.window.batch_size,
                                             self.trt_cache_dir)
            return self._backend

    def predict_windows(self, batch: np.ndarray) -> np.ndarray:
        return self.backend(batch)

    def warm_up(self) -> float:
        start = time.perf_counter()
        cfg = self.bundle.model
        self.predict_windows(np.zeros((self.window.batch_size, cfg.in_chans, *cfg.img_size), dtype=np.float32))
        self.ready = True
        return time.perf_counter() - start

    def segment(self, volume: Volume, progress: ProgressFn | None = None, timings: Timings | None = None) -> Volume:
        return self.segment_scored(volume, progress, timings)[0]

    def segment_scored(self, volume: Volume, progress: ProgressFn | None = None, timings: Timings | None = None,
                       low_margin: float | None = None) -> tuple[Volume, MarginCounts | None]:
        """``segment``; with ``low_margin``, also the per-label count of voxels whose two best logits were closer
        than it (on the model's grid). The torchscript engine runs its own window on the device and gives none."""
        timings = timings or Timings()
        t = time.perf_counter()
        prepared = self.preprocessor.forward(volume.to_sitk(), with_body=self.skip_outside_body)
        timings.add("preprocess", time.perf_counter() - t)
        t = time.perf_counter()
        backend = self.backend
        margins = None
        if hasattr(backend, "sliding_window"):  # the torchscript engine keeps the whole window on its device
            labels = backend.sliding_window(self.window, prepared.array, progress, body=prepared.body)
        else:
            labels, margins = self.window.run(prepared.array, self.predict_windows, progress, body=prepared.body,
                                              low_margin=low_margin)
        timings.add("inference", time.perf_counter() - t)
        t = time.perf_counter()
        out = self.preprocessor.inverse(labels, prepared)
        timings.add("postprocess", time.perf_counter() - t)
        return out, margins


def discover_bundles(dirs: list[Path]) -> list[Path]:
    """Each entry is a bundle itself or a folder of bundles."""
    found: list[Path] = []
    for d in dirs:
        if (d / "ctseg.json").is_file():
            found.append(d)
        elif d.is_dir():
            found += sorted(p for p in d.iterdir() if (p / "ctseg.json").is_file())
    return found


def load_engines(dirs: list[Path], **kwargs: object) -> dict[str, Engine]:
    engines: dict[str, Engine] = {}
    for path in discover_bundles(dirs):
        engine = Engine.from_dir(path, **kwargs)
        if engine.bundle.name in engines:
            raise BundleError(f"two bundles are named {engine.bundle.name!r}: {engines[engine.bundle.name].bundle.path} and {path}")
        engines[engine.bundle.name] = engine
    if not engines:
        raise BundleError(f"no model bundle found in {', '.join(map(str, dirs))}")
    return engines


def engines_from_settings(settings: Settings) -> dict[str, Engine]:
    """The service's, the workers' and ``ctseg predict``'s engines: one reading of the settings."""
    return load_engines(settings.bundle_dirs, device=settings.device, threads=settings.ort_threads,
                        overlap=settings.sw_overlap, batch_size=settings.sw_batch,
                        float16_accumulation=settings.accumulate_float16, engine=settings.engine,
                        precision=settings.precision,
                        trt_cache_dir=settings.trt_cache_dir or settings.storage_dir / "tensorrt")
