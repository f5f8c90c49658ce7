"""``ctseg pretrain-vdt``: supervised 3D pre-training on 2D images through the variable dimension transform (VDT,
Zhang et al. 2022, "Advancing 3D Medical Image Analysis with Variable Dimension Transform based Supervised 3D
Pre-training").

Each image of an image-classification folder (``class_name/xxx.png``, any size, RGB or grey) becomes a one-channel
volume whose slices are its colour channels (three for RGB, one for grey), in an order shuffled anew for every
sample, resized in-plane to ``image_size``. The encoder is ctseg's full-3D / 2.5D ViT encoder, **depth-padded**: the
slices sit at the centre of one depth patch of the fine-tuning model's own depth (zeros around them), so the volume
is exactly one depth token. Why padded rather than a depth patch of at most 3: the patch embedding is then trained
with exactly the kernel shape fine-tuning uses, and the position grid (1 x h x w) carries over to any ROI the way a
2D grid does (inflation's position-embedding rule); nothing has to be re-shaped at transfer. The head is a
LayerNorm and a linear classifier on the mean of the patch tokens; loss cross-entropy.

The checkpoint (``vdt.pt``) is a ctseg checkpoint (kind ``vdt``): ``init: vdt`` loads its encoder.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from inflation.checkpoint import save_checkpoint
from inflation.config import ConfigError, LoopSection, read_yaml_config
from inflation.train import Dist, PretrainRun, optimizer_step, seed_everything
from models.nets.encoder import ViTEncoder3d
from models.registry import model_config

log = logging.getLogger("ctseg.pretrain_vdt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class VdtSection(LoopSection):
    # differ from LoopSection (2, 1e-5): this recipe's own defaults, as before
    batch_size: int = 16
    weight_decay: float = 0.05


@dataclass
class VdtConfig:
    name: str
    data: str  # class_name/xxx.png folders
    model: str = "vit3d_tiny_patch16"  # the architecture fine-tuning will use (its patch size decides the depth)
    overrides: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224  # in-plane size every image is resized to (a multiple of the in-plane patch)
    train: VdtSection = field(default_factory=VdtSection)
    output: str = "runs/pretrain_vdt"

    @classmethod
    def load(cls, path: str | Path) -> "VdtConfig":
        return read_yaml_config(cls, path, relative=("data", "output"))


def image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data: {root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if len(classes) < 2 or not items:
        raise ConfigError(f"data: {root} needs at least two class folders of images (class_name/xxx.png); "
                          f"found {len(classes)} class(es), {len(items)} image(s)")
    return classes, items


def vdt_volume(path: Path, size: int, depth: int, gen: torch.Generator) -> torch.Tensor:
    """An image as a (1, depth, size, size) volume: its channels as slices in shuffled order, centred in depth."""
    try:
        with Image.open(path) as im:
            im = im.convert("L") if im.mode in ("L", "I", "I;16", "F", "1", "LA") else im.convert("RGB")
            im = im.resize((size, size), Image.BILINEAR)
            array = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError) as err:
        raise ConfigError(f"data: {path} is not a readable image ({type(err).__name__}: {err})") from None
    slices = torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())
    slices = slices[torch.randperm(len(slices), generator=gen)]
    volume = torch.zeros(1, depth, size, size)
    start = (depth - len(slices)) // 2
    volume[0, start:start + len(slices)] = slices
    return volume


class VdtClassifier(nn.Module):
    def __init__(self, config, num_classes: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.config = config
        self.encoder = ViTEncoder3d(config)
        dim = config.encoder.embed_dim
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_tokens(x)[-1][:, self.encoder.num_prefix_tokens:]
        return self.head(tokens.mean(1))


def pretrain_vdt(cfg: VdtConfig, resume: str | Path | None = None) -> dict[str, Any]:
    env = Dist()
    out = Path(cfg.output)
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed + env.rank)
    base = model_config(cfg.model, **cfg.overrides)
    if base.is_swin:
        raise ConfigError("model: VDT pre-training here trains a ViT encoder (Swin UNETR takes pretrain-ssl)")
    depth = base.patch_size[0]
    if depth < 3:
        raise ConfigError(f"model: the depth patch ({depth}) must hold the 3 slices of an RGB image; use a depth "
                          "patch of at least 3 (e.g. a 2.5D model) or a larger one")
    config = base.with_updates(img_size=(depth, cfg.image_size, cfg.image_size))
    classes, items = image_folder(cfg.data)
    log.info("%d images in %d classes; volumes 1 x %d x %d x %d", len(items), len(classes), depth, cfg.image_size,
             cfg.image_size)
    model = VdtClassifier(config, len(classes)).to(env.device)
    t = cfg.train
    run = PretrainRun(model, env, out, t.lr, t.weight_decay, t.warmup_steps, t.steps, t.amp, resume)
    ddp, optimizer, scheduler, scaler, writer = run.ddp, run.optimizer, run.scheduler, run.scaler, run.writer
    use_amp, step, history = run.use_amp, run.step, run.history
    gen = torch.Generator().manual_seed(t.seed * 1000 + env.rank + step)

    def meta() -> dict[str, Any]:
        return {"kind": "vdt", "name": cfg.name, "history": history,
                "vdt": {"classes": classes, "images": len(items), "image_size": cfg.image_size, "depth": depth,
                        "depth_rule": "image channels as slices, shuffled per sample, centred in one depth patch",
                        "recipe": asdict(t), "steps": step}}

    def save(name: str) -> Path:
        return save_checkpoint(out / name, model, meta(), optimizer=optimizer.state_dict(),
                               scheduler=scheduler.state_dict(), step=step)

    model.train()
    while step < t.steps:
        picks = torch.randint(0, len(items), (t.batch_size,), generator=gen)
        x = torch.stack([vdt_volume(items[i][0], cfg.image_size, depth, gen) for i in picks]).to(env.device)
        y = torch.tensor([items[i][1] for i in picks], device=env.device)
        with torch.autocast("cuda", enabled=use_amp):
            logits = ddp(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer_step(loss, model, optimizer, scheduler, scaler, t.grad_clip)
        step += 1
        accuracy = float((logits.argmax(1) == y).float().mean())
        history.append({"step": step, "loss": loss.item(), "accuracy": accuracy})
        if env.main:
            writer.add_scalar("vdt/loss", loss.item(), step)  # type: ignore[union-attr]
            writer.add_scalar("vdt/accuracy", accuracy, step)  # type: ignore[union-attr]
            if step % t.log_every == 0 or step == t.steps:
                log.info("step %d/%d: loss %.4f, batch accuracy %.2f", step, t.steps, loss.item(), accuracy)
            if step % t.ckpt_every == 0:
                save("last.pt")
    return run.finish(env, step, history, save, "vdt.pt")
