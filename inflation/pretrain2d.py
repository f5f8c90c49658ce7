"""``ctseg pretrain-2d CONFIG.yaml``: pre-train a 2D timm ViT on the axial slices of labelled CT, then save it as
an ordinary timm checkpoint that ``ctseg inflate --weights`` turns into a 3D encoder.

Why supervised 2D segmentation and not masked-image modelling: with one labelled CT and a CPU, the labels are the
strongest signal available, and a segmentation objective trains the patch tokens to carry what the 3D model's
decoder needs (where an organ is, at token resolution); MIM needs far more images and steps to learn anything
useful. This is the paper's pipeline (2D pre-training, inflation, 3D fine-tuning) with in-domain 2D pre-training
in place of ImageNet, which this machine cannot reach; a hub or ImageNet checkpoint goes through the same inflation.

The ViT is the named timm architecture itself (``timm.create_model(backbone, img_size=...)``) taking the slice
replicated to three channels (so the checkpoint has the standard RGB patch kernel, which inflation sums to one
channel); only the position embedding's grid differs from the hub's, which inflation resamples anyway. A light
convolutional decoder (discarded after pre-training) upsamples the patch tokens to the slice.

Slices are resampled to ``spacing`` in-plane: 1.5 mm with timm's 16 px patches gives 24 mm tokens, the same
physical token as an 8 px 3D patch at 3 mm, so the kernel resize at inflation keeps what a token sees.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import models.nets._torchvision_compat  # noqa: F401  (before timm)
import timm
from inflation.config import ConfigError, DataConfig, OptimSection, load_config
from inflation.data import discover, load_case, output_labels, split_cases
from inflation.train import dice_per_class, lr_lambda, make_loss, seed_everything
from models.preprocess import PreprocessSpec, Preprocessor

log = logging.getLogger("ctseg.pretrain2d")


@dataclass(kw_only=True)  # kw_only: name and data (required) follow OptimSection's defaulted fields
class Pretrain2DConfig(OptimSection):
    name: str
    data: DataConfig
    backbone: str = "vit_tiny_patch16_224"  # a timm ViT name: the architecture of the saved checkpoint
    img_size: int = 128  # in-plane pixels of a training crop
    spacing: list[float] = field(default_factory=lambda: [3.0, 1.5, 1.5])  # (D, H, W) mm
    window: list[float] = field(default_factory=lambda: [-175.0, 250.0])
    # differ from OptimSection (1000, 2, 1e-5, 50, 10): this recipe's own defaults, as before. No grad_clip, amp or
    # ckpt_every keys (LoopSection): this loop clips at 1.0, runs in fp32 and saves once
    steps: int = 1500
    batch_size: int = 16
    weight_decay: float = 0.05
    warmup_steps: int = 100
    log_every: int = 50
    drop_path_rate: float = 0.05
    intensity_jitter: float = 0.1  # random scale and shift of the normalised intensities
    loss: str = "dicece"
    output: str = "runs/pretrain2d"

    @classmethod
    def load(cls, path: str | Path) -> "Pretrain2DConfig":
        cfg = load_config(cls, path)
        if cfg.img_size % 16:
            raise ConfigError(f"img_size must be a multiple of 16 (the decoder upsamples by powers of 2); got {cfg.img_size}")
        return cfg


class SliceSegmenter(nn.Module):
    """timm ViT on a slice (three identical channels) + a convolutional decoder back to the slice."""

    def __init__(self, backbone: str, img_size: int, num_classes: int, drop_path_rate: float) -> None:
        super().__init__()
        self.vit = timm.create_model(backbone, pretrained=False, img_size=img_size, num_classes=0,
                                     drop_path_rate=drop_path_rate)
        patch = self.vit.patch_embed.patch_size[0]
        self.grid = img_size // patch
        dim = self.vit.embed_dim
        stages = int(round(math.log2(patch)))
        width = [max(16, 64 >> i) for i in range(stages + 1)]
        layers: list[nn.Module] = [nn.Conv2d(dim, width[0], 3, padding=1), nn.GroupNorm(8, width[0]), nn.GELU()]
        for i in range(stages):
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(width[i], width[i + 1], 3, padding=1), nn.GroupNorm(8, width[i + 1]), nn.GELU()]
        layers.append(nn.Conv2d(width[-1], num_classes, 1))
        self.decoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x.expand(-1, 3, -1, -1))[:, self.vit.num_prefix_tokens:]
        b, n, c = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, c, self.grid, self.grid)
        return self.decoder(grid)


def _slices(cases: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    images = np.concatenate([c.image[0] for c in cases], axis=0)  # [slices, H, W]
    labels = np.concatenate([c.label[0] for c in cases], axis=0)
    return images, labels


def _batch(images: np.ndarray, labels: np.ndarray, size: int, count: int, rng: np.random.Generator,
           jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random slices, random crops (half centred on foreground), a little intensity jitter. No flips: left and
    right organs are told apart by where they are."""
    xs, ys = [], []
    for _ in range(count):
        k = int(rng.integers(len(images)))
        img, lab = images[k], labels[k]
        ph, pw = max(0, size - img.shape[0]), max(0, size - img.shape[1])
        if ph or pw:
            img = np.pad(img, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
            lab = np.pad(lab, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
        fg = np.argwhere(lab > 0)
        if len(fg) and rng.random() < 0.5:
            cy, cx = fg[int(rng.integers(len(fg)))]
            y0 = int(np.clip(cy - size // 2, 0, img.shape[0] - size))
            x0 = int(np.clip(cx - size // 2, 0, img.shape[1] - size))
        else:
            y0 = int(rng.integers(img.shape[0] - size + 1))
            x0 = int(rng.integers(img.shape[1] - size + 1))
        crop = img[y0:y0 + size, x0:x0 + size] * (1 + jitter * rng.uniform(-1, 1)) + jitter * rng.uniform(-1, 1)
        xs.append(crop)
        ys.append(lab[y0:y0 + size, x0:x0 + size])
    return (torch.from_numpy(np.stack(xs)[:, None].astype(np.float32)),
            torch.from_numpy(np.stack(ys)[:, None].astype(np.int64)))


@torch.no_grad()
def _evaluate(model: SliceSegmenter, images: np.ndarray, labels: np.ndarray, num_classes: int, size: int) -> list:
    """Dice per class over whole held-out slices (padded to a multiple of the crop, tiled)."""
    model.eval()
    preds = []
    for img in images:
        h, w = img.shape
        ph, pw = -h % size, -w % size
        padded = np.pad(img, ((0, ph), (0, pw)))
        out = np.zeros(padded.shape, np.uint8)
        for y in range(0, padded.shape[0], size):
            for x in range(0, padded.shape[1], size):
                tile = torch.from_numpy(padded[None, None, y:y + size, x:x + size].astype(np.float32))
                out[y:y + size, x:x + size] = model(tile).argmax(1)[0].numpy()
        preds.append(out[:h, :w])
    model.train()
    return dice_per_class(np.stack(preds), labels, num_classes, None)


def pretrain_2d(cfg: Pretrain2DConfig) -> dict[str, Any]:
    seed_everything(cfg.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    spec = PreprocessSpec(spacing=tuple(cfg.spacing), roi=(1, cfg.img_size, cfg.img_size), window=tuple(cfg.window))
    pre = Preprocessor(spec)
    labels = output_labels(cfg.data.labels)
    num_classes = len(labels) + 1
    cases = [load_case(p, pre, cfg.data.labels) for p in discover(cfg.data.dataset)]
    train_parts, val_parts = split_cases(cases, cfg.data, 1)
    images, masks = _slices(train_parts)
    log.info("%d training slices of %dx%d at %s mm", len(images), images.shape[1], images.shape[2], cfg.spacing[1:])
    model = SliceSegmenter(cfg.backbone, cfg.img_size, num_classes, cfg.drop_path_rate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps))
    criterion = make_loss(cfg.loss)
    rng = np.random.default_rng(cfg.seed)
    start, losses = time.perf_counter(), []
    for step in range(1, cfg.steps + 1):
        x, y = _batch(images, masks, cfg.img_size, cfg.batch_size, rng, cfg.intensity_jitter)
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.info("step %d/%d: loss %.4f (mean of the last %d), %.2f steps/s", step, cfg.steps,
                     float(np.mean(losses[-cfg.log_every:])), cfg.log_every, step / (time.perf_counter() - start))
    seconds = time.perf_counter() - start
    holdout = None
    if val_parts:
        part = val_parts[0]
        keep = part.eval_mask.any(axis=(1, 2)) if part.eval_mask is not None else slice(None)
        holdout = _evaluate(model, part.image[0][keep], part.label[0][keep], num_classes, cfg.img_size)
    weights = out / "vit2d.pth"
    torch.save(model.vit.state_dict(), weights)  # an ordinary timm state dict of cfg.backbone
    summary = {
        "backbone": cfg.backbone, "weights": weights.name, "objective": "supervised 2D segmentation of axial slices",
        "steps": cfg.steps, "seconds": round(seconds, 1), "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])),
        "labels": [label.name for label in labels], "holdout_slice_dice": holdout,
        "config": asdict(cfg),
    }
    (out / "pretrain2d.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info("wrote %s (%.0f s); held-out slice Dice %s", weights, seconds,
             None if holdout is None else [None if v is None else round(v, 3) for v in holdout])
    return summary
