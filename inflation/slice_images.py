"""``ctseg slices-to-images CONFIG.yaml --out DIR``: a 2D image-classification folder cut from the training part of
a labelled CT dataset, for VDT pre-training (``ctseg pretrain-vdt``) where no 2D classification data is at hand.

Each axial slice of a training part (never the held-out slab or validation cases) becomes an RGB image whose three
channels are the slice and its two neighbours (3 adjacent slices: VDT turns them back into a 3-slice volume and
shuffles their order), windowed like the model's input, labelled with the organ that covers most of the slice (of
the config's labels; ``none`` below ``min_pixels``). This is supervised 2D pre-training on the same scan fine-tuning
uses, in place of the 2D datasets of the VDT paper, which this machine cannot reach.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from inflation.config import TrainConfig
from inflation.data import discover, load_case, output_labels, split_cases
from models.preprocess import Preprocessor, PreprocessSpec

log = logging.getLogger("ctseg.slices")


def slices_to_images(cfg: TrainConfig, out: Path, min_pixels: int = 200) -> Counter:
    spec = PreprocessSpec(spacing=tuple(cfg.preprocess.spacing), roi=tuple(cfg.preprocess.roi),
                          window=tuple(cfg.preprocess.window))
    labels = output_labels(cfg.data.labels)
    cases = [load_case(p, Preprocessor(spec), cfg.data.labels) for p in discover(cfg.data.dataset)]
    train_parts, _ = split_cases(cases, cfg.data, spec.roi[0])
    counts: Counter = Counter()
    for part in train_parts:
        image, label = part.image[0], part.label[0]
        for z in range(1, image.shape[0] - 1):
            areas = np.bincount(label[z].ravel(), minlength=len(labels) + 1)[1:]
            name = labels[int(areas.argmax())].name if areas.max() >= min_pixels else "none"
            rgb = (np.clip(image[z - 1:z + 2], 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(folder / f"{part.case_id}_{z:04d}.png")
            counts[name] += 1
    log.info("wrote %d images in %d classes to %s: %s", sum(counts.values()), len(counts), out, dict(counts))
    return counts
