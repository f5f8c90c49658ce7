"""Fine-tuning on CT: ``ctseg train CONFIG.yaml``.

CPU for tiny configs, CUDA with AMP when present, several GPUs / nodes through ``torchrun`` (DDP; rank 0 logs
and saves). Checkpoints every N steps are atomic and carry optimizer, scheduler and RNG state for ``--resume``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import models.nets._torchvision_compat  # noqa: F401
from inflation.checkpoint import read_checkpoint, save_checkpoint
from inflation.config import ConfigError, TrainConfig
from inflation.data import Case, discover, load_case, output_labels, split_cases
from inflation.init import build_model
from models.labels import Label
from models.nets import ViTSegmenter
from models.preprocess import PreprocessSpec, Preprocessor
from models.sliding_window import SlidingWindow

log = logging.getLogger("ctseg.train")
INDICES_KEY = "label_cls_indices"


# ----------------------------------------------------------------------------------------------- distributed
class Dist:
    """Process-group facts; a single process when not launched by torchrun."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- data
def per_class(values: dict[str, float], labels: list[Label], what: str) -> list[float]:
    """A {label name: value} mapping as one value per foreground class (1.0 where not named)."""
    names = [label.name for label in labels]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"train.{what} names {unknown}, which are not among the labels {names}")
    bad = {k: v for k, v in values.items() if not isinstance(v, (int, float)) or v <= 0}
    if bad:
        raise ConfigError(f"train.{what} values must be positive numbers; got {bad}")
    return [float(values.get(name, 1.0)) for name in names]


def build_transforms(cfg: TrainConfig, labels: list[Label]):
    from monai import transforms as T

    num_classes = len(labels) + 1

    roi = list(cfg.preprocess.roi)
    a = cfg.augment
    keys = ["image", "label"]
    crop_roi = list(roi)
    chain: list[Any] = [
        # Crops centred on each class in turn (background included), so small organs are seen as often as
        # the liver; classes absent from a case are skipped by MONAI with a warning.
        T.RandCropByLabelClassesd(
            keys, label_key="label", spatial_size=crop_roi, num_classes=num_classes,
            ratios=[cfg.train.background_ratio if cfg.train.background_ratio is not None else num_classes - 1.0]
            + per_class(cfg.train.class_ratios, labels, "class_ratios"),
            num_samples=cfg.train.crops_per_case, allow_smaller=False, warn=False, indices_key=INDICES_KEY,
        ),
    ]
    for axis in a.flip_axes:
        chain.append(T.RandFlipd(keys, prob=a.flip_prob, spatial_axis=axis))
    if a.rotate_deg > 0:
        rad = math.radians(a.rotate_deg)
        chain.append(T.RandRotated(keys, range_x=rad, prob=a.rotate_prob, mode=("bilinear", "nearest"),
                                   padding_mode="border", keep_size=True))  # in-plane (about the D axis)
    if a.zoom > 0:
        chain.append(T.RandZoomd(keys, prob=a.zoom_prob, min_zoom=1 - a.zoom, max_zoom=1 + a.zoom,
                                 mode=("trilinear", "nearest"), keep_size=True))
    if a.intensity_shift > 0:
        chain.append(T.RandShiftIntensityd("image", offsets=a.intensity_shift, prob=a.intensity_prob))
    if a.intensity_scale > 0:
        chain.append(T.RandScaleIntensityd("image", factors=a.intensity_scale, prob=a.intensity_prob))
    if a.noise_std > 0:
        chain.append(T.RandGaussianNoised("image", std=a.noise_std, prob=a.noise_prob))
    chain.append(T.EnsureTyped(keys, track_meta=False))
    return T.Compose(chain)


class CropDataset(torch.utils.data.Dataset):
    """Each item is one case's list of random crops; the case list is repeated to fill an epoch."""

    def __init__(self, cases: list[Case], transform: Any, length: int, num_classes: int, roi: list[int]) -> None:
        self.transform, self.length = transform, length
        # Voxel indices of every class, computed once per case rather than at every crop.
        from monai.transforms import ClassesToIndices, SpatialPad

        self.items = []
        for case in cases:
            image = SpatialPad(roi)(case.image)
            label = SpatialPad(roi)(case.label)
            indices = ClassesToIndices(num_classes=num_classes)(label)
            self.items.append({"image": image, "label": label, INDICES_KEY: indices})

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.transform(dict(self.items[index % len(self.items)]))


def infinite_batches(loader: torch.utils.data.DataLoader, sampler: Any) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


# ----------------------------------------------------------------------------------------------- validation
def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int, mask: np.ndarray | None) -> list[float | None]:
    """Dice per foreground class; None where the class is absent from both (undefined)."""
    if mask is not None:
        pred, truth = pred[mask], truth[mask]
    out: list[float | None] = []
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        denom = p.sum() + t.sum()
        out.append(None if denom == 0 else float(2 * np.logical_and(p, t).sum() / denom))
    return out


def validate(model: ViTSegmenter, cases: list[Case], cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    config = model.config
    engine = SlidingWindow(config.img_size, config.out_size, config.num_classes, overlap=cfg.train.sw_overlap,
                           batch_size=cfg.train.sw_batch)
    model.eval()

    @torch.no_grad()
    def predict(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(device)
        with torch.autocast(device.type, enabled=device.type == "cuda" and cfg.train.amp):
            return model(x).float().cpu().numpy()

    per_case = {}
    for case in cases:
        pred = engine(case.image[0], predict)
        per_case[case.case_id] = dice_per_class(pred, case.label[0], config.num_classes, case.eval_mask)
    model.train()
    columns = list(zip(*per_case.values())) if per_case else []
    mean_per_class = [
        float(np.mean([v for v in col if v is not None])) if any(v is not None for v in col) else None for col in columns
    ]
    defined = [v for v in mean_per_class if v is not None]
    return {"per_case": per_case, "per_class": mean_per_class, "mean_dice": float(np.mean(defined)) if defined else None}


# ----------------------------------------------------------------------------------------------- training
def optimizer_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                   grad_clip: float) -> torch.Tensor:
    """One update: backward through the (AMP) scaler, gradient clipping, optimizer and schedule; the grad norm."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return grad_norm


def restore(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None) -> tuple[int, list]:
    """Weights, optimizer, schedule (and AMP scaler) from a checkpoint; the step and the history to continue."""
    payload = read_checkpoint(path)
    model.load_state_dict(payload["state_dict"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and "scaler" in payload:
        scaler.load_state_dict(payload["scaler"])
    log.info("resumed from %s at step %d", path, int(payload["step"]))
    return int(payload["step"]), list(payload.get("meta", {}).get("history", []))


class PretrainRun:
    """What a pre-training loop (pretrain-ssl, pretrain-vdt) sets up like ``ctseg train``: DDP under torchrun,
    AdamW with warm-up and cosine decay, the AMP scaler (CUDA only), resume, and TensorBoard on rank 0."""

    def __init__(self, model: nn.Module, env: Dist, out: Path, lr: float, weight_decay: float, warmup: int,
                 steps: int, amp: bool, resume: str | Path | None) -> None:
        self.ddp: nn.Module = model
        if env.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(warmup, steps))
        self.use_amp = env.device.type == "cuda" and amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.step, self.history = 0, []
        if resume:
            self.step, self.history = restore(resume, model, self.optimizer, self.scheduler,
                                              self.scaler if self.use_amp else None)
        self.writer = None
        if env.main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        self.started = time.time()

    def finish(self, env: Dist, step: int, history: list[dict[str, Any]], save: Any, final: str) -> dict[str, Any]:
        """Rank 0 writes ``last.pt`` and the ``final`` checkpoint; every rank leaves the process group."""
        result = {"steps": step, "seconds": round(time.time() - self.started, 1),
                  "first_loss": history[0]["loss"] if history else None,
                  "last_loss": history[-1]["loss"] if history else None}
        if env.main:
            save("last.pt")
            path = save(final)
            self.writer.close()  # type: ignore[union-attr]
            log.info("pre-trained encoder written to %s", path)
        env.close()
        return result


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_loss(kind: str, class_weights: list[float] | None = None) -> nn.Module:
    """``class_weights``: one per class, background first (None: all 1)."""
    from monai.losses import DiceCELoss, DiceFocalLoss

    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    if kind == "dicece":
        return DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)
    if kind == "dicefocal":
        return DiceFocalLoss(to_onehot_y=True, softmax=True, weight=weight)
    raise ConfigError(f"train.loss must be 'dicece' or 'dicefocal'; got {kind!r}")


def train(cfg: TrainConfig, resume: str | Path | None = None, max_steps: int | None = None) -> dict[str, Any]:
    """Run (or continue) training. Returns the final metrics; writes checkpoints under ``cfg.output``."""
    from monai.data import DataLoader, list_data_collate
    from monai.utils import set_determinism

    env = Dist()
    out = Path(cfg.output)
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed + env.rank)
    set_determinism(seed=cfg.train.seed + env.rank)
    spec = PreprocessSpec(spacing=tuple(cfg.preprocess.spacing), roi=tuple(cfg.preprocess.roi),
                          window=tuple(cfg.preprocess.window))
    pre = Preprocessor(spec)
    labels = output_labels(cfg.data.labels)
    num_classes = len(labels) + 1

    t0 = time.time()
    cases = [load_case(p, pre, cfg.data.labels) for p in discover(cfg.data.dataset)]
    train_cases, val_cases = split_cases(cases, cfg.data, spec.roi[0])
    log.info("%d training part(s), %d validation part(s), preprocessed in %.1f s", len(train_cases), len(val_cases), time.time() - t0)

    model, init_meta = build_model(cfg, num_classes)
    two_half_d = model.config.mode == "2.5d"
    model.to(env.device)
    ddp_model: nn.Module = model
    if env.world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)

    transform = build_transforms(cfg, labels)
    transform.set_random_state(seed=cfg.train.seed + env.rank)
    steps_total = cfg.train.steps
    epoch_len = max(len(train_cases), cfg.train.batch_size * env.world * 4)
    dataset = CropDataset(train_cases, transform, epoch_len, num_classes, list(spec.roi))
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, env.world, env.rank, seed=cfg.train.seed) if env.world > 1 else None
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=cfg.train.num_workers, collate_fn=list_data_collate, drop_last=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train.warmup_steps, steps_total))
    weights = per_class(cfg.train.class_weights, labels, "class_weights")
    loss_fn = make_loss(cfg.train.loss, [1.0, *weights] if cfg.train.class_weights else None).to(env.device)
    use_amp = env.device.type == "cuda" and cfg.train.amp
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    step = 0
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}

    if resume:
        step, history = restore(resume, model, optimizer, scheduler, scaler if use_amp else None)
        transform.set_random_state(seed=cfg.train.seed + env.rank + step)
        torch.manual_seed(cfg.train.seed + env.rank + step)

    writer = None
    if env.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))

    def named(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
        if not metrics or metrics.get("per_class") is None:
            return metrics
        where = (f"the held-out depth slab {cfg.data.holdout_slab} of each case" if cfg.data.holdout_slab
                 else f"{len(val_cases)} validation case(s)")
        return {**metrics, "per_class_named": {l.name: v for l, v in zip(labels, metrics["per_class"])},
                "measured": f"Dice per class on {where} (held-out, never trained on), sliding window at overlap "
                            f"{cfg.train.sw_overlap} on the model grid ({spec.spacing} mm)"}

    def meta(metrics: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "name": cfg.name, "version": cfg.version, "description": cfg.description,
            "preprocess": spec.to_dict(), "labels": [l.to_dict() for l in labels],
            "training": {
                "dataset": Path(cfg.data.dataset).name, "data_description": cfg.data.description,
                "cases": [c.case_id for c in train_cases], "validation": [c.case_id for c in val_cases],
                "holdout_slab": cfg.data.holdout_slab, "steps": step, "batch_size": cfg.train.batch_size,
                "world_size": env.world, "loss": cfg.train.loss, "lr": cfg.train.lr, "seed": cfg.train.seed,
                "augment": asdict(cfg.augment), "device": env.device.type,
                "seconds": round(time.time() - t0, 1),  # since data loading began (this run)
                "recipe": {"model": asdict(cfg.model), "preprocess": asdict(cfg.preprocess), "train": asdict(cfg.train)},
            },
            "metrics": named(metrics), "history": history, **init_meta,
        }

    def save(name: str, metrics: dict[str, Any] | None) -> Path:
        return save_checkpoint(
            out / name, model, meta(metrics), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(), step=step,
        )

    progress = None
    if env.main:
        from tqdm import tqdm

        progress = tqdm(total=steps_total, initial=step, desc="train", dynamic_ncols=True, disable=None)
    last_val: dict[str, Any] | None = None
    end = min(steps_total, max_steps) if max_steps else steps_total
    batches = infinite_batches(loader, sampler)
    model.train()
    t_start = time.time()
    first_step = step
    while step < end:
        batch = next(batches)
        image = batch["image"].to(env.device, non_blocking=True)
        label = batch["label"].to(env.device, non_blocking=True)
        if two_half_d:
            c = image.shape[2] // 2
            label = label[:, :, c:c + 1]
        with torch.autocast(env.device.type, enabled=use_amp):
            logits = ddp_model(image)
            loss = loss_fn(logits.float(), label)
        grad_norm = optimizer_step(loss, model, optimizer, scheduler, scaler, cfg.train.grad_clip)
        step += 1
        if env.main:
            if step % cfg.train.log_every == 0 or step == end:
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
            if progress is not None and progress.disable and (step % (cfg.train.log_every * 5) == 0 or step == end):
                rate = (step - first_step) / max(1e-9, time.time() - t_start)
                log.info("step %d/%d: loss %.4f, %.2f steps/s, eta %.0f s", step, steps_total, loss.item(), rate,
                         (end - step) / max(rate, 1e-9))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}", dice=f"{last_val['mean_dice']:.3f}" if last_val and last_val["mean_dice"] is not None else "-")
            if val_cases and (step % cfg.train.val_every == 0 or step == steps_total):
                last_val = validate(model, val_cases, cfg, env.device)
                history.append({"step": step, "mean_dice": last_val["mean_dice"], "loss": loss.item()})
                writer.add_scalar("val/mean_dice", last_val["mean_dice"] or 0.0, step)
                log.info("step %d: loss %.4f, validation mean Dice %s", step, loss.item(), last_val["mean_dice"])
                if last_val["mean_dice"] is not None and last_val["mean_dice"] >= best.get("mean_dice", -1):
                    best = {**last_val, "step": step}
            if step % cfg.train.ckpt_every == 0 or step == end:
                save("last.pt", last_val)
    elapsed = time.time() - t_start
    if progress is not None:
        progress.close()

    agree = True
    if env.world > 1:
        digest = weights_digest(model)
        gathered: list[str | None] = [None] * env.world
        dist.all_gather_object(gathered, digest)
        agree = len(set(gathered)) == 1
        if not agree:
            raise RuntimeError(f"DDP ranks disagree on the weights after training: {gathered}")
        # Release DDP's reducer while the group is alive and leave together: a reducer torn down after
        # destroy_process_group sometimes hung one rank at exit with gloo (about 1 run in 8 here).
        del ddp_model
        dist.barrier()
    result: dict[str, Any] = {}
    if env.main:
        result = {
            "steps": step, "seconds": round(elapsed, 1), "world_size": env.world, "ddp_weights_agree": agree,
            "weights_sha256": weights_digest(model), "validation": last_val, "best": best or None,
            "history": history,
        }
        if step >= steps_total:
            save("final.pt", last_val)
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        writer.close()
    env.close()
    return result
