"""``ctseg pretrain-ssl``: self-supervised pre-training of Swin UNETR's encoder on unlabelled CT, as in Tang et al.
2022 ("Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image Analysis").

Each step takes random sub-volumes and makes two views of each: a random in-plane rotation by 0/90/180/270 degrees
and random cut-out boxes filled with noise. Three proxy tasks share the encoder's bottleneck, with the paper's
heads (named as in the released checkpoint): rotation prediction (cross-entropy over the four angles), contrastive
coding (the two views of a sub-volume against the others in the batch, NT-Xent at temperature 0.5) and masked volume
inpainting (L1 between the reconstruction and the rotated view before cut-out). Loss = inpainting + contrastive +
rotation, weights in the config. AMP on CUDA, DDP under torchrun, resume and TensorBoard as ``ctseg train``.

The checkpoint (``ssl.pt``) is a ctseg checkpoint of the Swin encoder (keys ``net.swinViT.*``) and the heads
(``ssl.*``), whose model config records the patch-merging layout: ``init: swin-ssl`` reads it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from inflation.checkpoint import save_checkpoint
from inflation.config import (
    ConfigError,
    LoopSection,
    PreprocessSection,
    read_yaml_config,
)
from inflation.train import Dist, PretrainRun, optimizer_step, seed_everything
from models.config import ModelConfig
from models.nets.swin import SwinSegmenter
from models.preprocess import Preprocessor, PreprocessSpec
from models.registry import model_config

log = logging.getLogger("ctseg.pretrain_ssl")
ROTATIONS = 4


@dataclass
class SslSection(LoopSection):
    # batch_size: sub-volumes per step (each gives two views); optimiser defaults as in LoopSection
    mask_ratio: float = 0.3  # fraction of the sub-volume cut out for inpainting (in boxes)
    mask_box: int = 16  # cut-out box edge, voxels
    temperature: float = 0.5
    weight_inpaint: float = 1.0
    weight_contrast: float = 1.0
    weight_rotation: float = 1.0


@dataclass
class SslConfig:
    name: str
    data: str  # unlabelled CT: a folder of NIfTI files and/or DICOM series (one folder each), one file, or a glob
    model: str = "swin_unetr_f48"
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. feature_size, merging
    preprocess: PreprocessSection = field(default_factory=PreprocessSection)
    train: SslSection = field(default_factory=SslSection)
    output: str = "runs/pretrain_ssl"

    @classmethod
    def load(cls, path: str | Path) -> "SslConfig":
        return read_yaml_config(cls, path, relative=("data", "output"))


def unlabelled_volumes(source: str | Path, spec: PreprocessSpec) -> list[np.ndarray]:
    """Every CT of ``source`` (a folder of NIfTI files and DICOM series, one per sub-folder; a file; or a glob),
    preprocessed to the model grid."""
    import glob

    source = Path(source)
    if any(c in str(source) for c in "*?["):
        items = [Path(p) for p in sorted(glob.glob(str(source)))]
    elif source.is_file():
        items = [source]
    elif source.is_dir():
        items = sorted(source.iterdir())
    else:
        raise ConfigError(f"data: {source} is neither a folder, a file nor a glob that matches")
    pre = Preprocessor(spec)
    volumes = []
    for item in items:
        try:
            if item.is_file() and item.name.endswith((".nii", ".nii.gz")):
                image = sitk.ReadImage(str(item))
            elif item.is_dir():
                reader = sitk.ImageSeriesReader()
                ids = reader.GetGDCMSeriesIDs(str(item))
                if not ids:
                    continue
                reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(item), ids[0]))
                image = reader.Execute()
            else:
                continue
        except RuntimeError as err:  # SimpleITK's one exception type
            reason = str(err).strip().splitlines()[-1][:200]
            raise ConfigError(f"data: {item} could not be read as a CT ({reason})") from None
        volumes.append(pre.forward(image).array)
    if not volumes:
        raise ConfigError(f"data: no NIfTI file or DICOM series found in {source}")
    return volumes


class SslHeads(nn.Module):
    """The release's pre-training heads on the encoder's bottleneck (``dim`` = 16 x feature size channels)."""

    def __init__(self, dim: int, in_chans: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.rotation_head = nn.Linear(dim, ROTATIONS)
        self.contrastive_head = nn.Linear(dim, 512)
        self.convTrans3d = nn.ConvTranspose3d(dim, in_chans, kernel_size=32, stride=32)


class SwinSsl(nn.Module):
    """Swin encoder (as in SwinSegmenter: ``net.swinViT``) + the three heads (``ssl``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.net = nn.Module()
        self.net.swinViT = SwinSegmenter(config).net.swinViT
        self.ssl = SslHeads(16 * config.encoder.feature_size, config.in_chans)  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bottleneck = self.net.swinViT(x, True)[4]
        tokens = self.ssl.norm(bottleneck.flatten(2).transpose(1, 2)).mean(1)
        return self.ssl.rotation_head(tokens), self.ssl.contrastive_head(tokens), self.ssl.convTrans3d(bottleneck)


def random_crops(volumes: list[np.ndarray], roi: tuple[int, int, int], n: int, rng: np.random.Generator) -> torch.Tensor:
    out = np.zeros((n, 1, *roi), dtype=np.float32)
    for i in range(n):
        v = volumes[rng.integers(len(volumes))]
        starts = [rng.integers(0, max(1, s - r + 1)) for s, r in zip(v.shape, roi)]
        crop = v[tuple(slice(a, a + r) for a, r in zip(starts, roi))]
        out[i, 0, :crop.shape[0], :crop.shape[1], :crop.shape[2]] = crop
    return torch.from_numpy(out)


def make_view(x: torch.Tensor, cfg: SslSection, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cut-out view, rotation label, rotated target) for a batch of sub-volumes."""
    rot = torch.randint(0, ROTATIONS, (len(x),), generator=gen)
    target = torch.stack([torch.rot90(v, int(k), dims=(2, 3)) for v, k in zip(x, rot)])
    view = target.clone()
    _, _, d, h, w = view.shape
    box = [min(cfg.mask_box, s) for s in (d, h, w)]
    boxes = int(round(cfg.mask_ratio * d * h * w / np.prod(box)))
    for i in range(len(view)):
        for _ in range(boxes):
            a, b, c = (int(torch.randint(0, s - e + 1, (1,), generator=gen)) for s, e in zip((d, h, w), box))
            view[i, :, a:a + box[0], b:b + box[1], c:c + box[2]] = torch.rand(box, generator=gen)
    return view, rot, target


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Contrastive loss of SimCLR: each view's positive is the other view of its sub-volume."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.t() / temperature
    n = len(a)
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(sim.device)
    return F.cross_entropy(sim, targets)


def pretrain_ssl(cfg: SslConfig, resume: str | Path | None = None) -> dict[str, Any]:
    env = Dist()
    out = Path(cfg.output)
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed + env.rank)
    roi = tuple(cfg.preprocess.roi)
    if roi[1] != roi[2]:
        raise ConfigError(f"preprocess.roi: the rotation task turns sub-volumes in-plane, so H and W must be equal; got {list(roi)}")
    spec = PreprocessSpec(spacing=tuple(cfg.preprocess.spacing), roi=roi, window=tuple(cfg.preprocess.window))
    config = model_config(cfg.model, img_size=roi, num_classes=2, **cfg.overrides)
    if not config.is_swin:
        raise ConfigError(f"model: self-supervised pre-training here trains a Swin UNETR encoder; {cfg.model!r} is not one")
    volumes = unlabelled_volumes(cfg.data, spec)
    log.info("%d unlabelled volume(s)", len(volumes))
    model = SwinSsl(config).to(env.device)
    t = cfg.train
    run = PretrainRun(model, env, out, t.lr, t.weight_decay, t.warmup_steps, t.steps, t.amp, resume)
    ddp, optimizer, scheduler, scaler, writer = run.ddp, run.optimizer, run.scheduler, run.scaler, run.writer
    use_amp, step, history = run.use_amp, run.step, run.history
    rng = np.random.default_rng(cfg.train.seed * 1000 + env.rank * 7919 + step)
    gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + env.rank + step)

    def meta() -> dict[str, Any]:
        return {"kind": "swin-ssl", "name": cfg.name, "history": history, "volumes": len(volumes),
                "preprocess": spec.to_dict(), "recipe": asdict(cfg.train), "steps": step}

    def save(name: str) -> Path:
        return save_checkpoint(out / name, model, meta(), optimizer=optimizer.state_dict(),
                               scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), step=step)

    model.train()
    while step < t.steps:
        x = random_crops(volumes, roi, t.batch_size, rng)
        v1, r1, y1 = make_view(x, t, gen)
        v2, r2, y2 = make_view(x, t, gen)
        views, rots, targets = (torch.cat(p).to(env.device) for p in ((v1, v2), (r1, r2), (y1, y2)))
        with torch.autocast("cuda", enabled=use_amp):
            rot_logits, embedding, recon = ddp(views)
        n = len(x)
        losses = {
            "rotation": F.cross_entropy(rot_logits.float(), rots),
            "contrastive": nt_xent(embedding[:n].float(), embedding[n:].float(), t.temperature),
            "inpainting": F.l1_loss(recon.float(), targets),
        }
        loss = (t.weight_rotation * losses["rotation"] + t.weight_contrast * losses["contrastive"]
                + t.weight_inpaint * losses["inpainting"])
        optimizer_step(loss, model, optimizer, scheduler, scaler, t.grad_clip)
        step += 1
        record = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in losses.items()}}
        history.append(record)
        if env.main:
            for k, v in record.items():
                if k != "step":
                    writer.add_scalar(f"ssl/{k}", v, step)  # type: ignore[union-attr]
            if step % t.log_every == 0 or step == t.steps:
                log.info("step %d/%d: loss %.4f (rotation %.3f, contrastive %.3f, inpainting %.4f)", step, t.steps,
                         record["loss"], record["rotation"], record["contrastive"], record["inpainting"])
            if step % t.ckpt_every == 0:
                save("last.pt")
    return run.finish(env, step, history, save, "ssl.pt")
