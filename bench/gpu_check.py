"""Every GPU measurement of issue 22 in one run, with only what the GPU machine has (python3 with torch, timm,
einops, numpy; MONAI carried as a wheel): ``bench/gpu_check.sh`` calls this.

    python3 bench/gpu_check.py --out DIR            # on a GPU (refuses to run without one)
    python3 bench/gpu_check.py --out DIR --dry-run  # the same code on the CPU at tiny sizes (CI runs this)

Tables, written to DIR/gpu_check.json and printed:

1. ``matmul``: the device's measured bf16 matrix-product rate (TFLOP/s): the roof the encoder is judged against.
2. ``inference``: on the demo bundle (2.5D, its TorchScript file) and on a base-width full-3D ViT at 96^3 (random
   weights): MONAI's ``sliding_window_inference`` on the eager model in fp32 (the baseline) against ctseg's
   TorchScript engine (models/torch_engine.py) in fp32, bf16 and fp16 on the same volume, ROI, overlap and Gaussian
   weighting; seconds (median), speed-up over the baseline, argmax agreement and the lowest per-class Dice against it.
   Random weights give near-tied logits, so the base model's agreement is a lower bound of a trained one's.
3. ``encoder``: the base ViT encoder's achieved TFLOP/s in bf16 (analytic FLOPs / measured time), and its share of
   the matmul rate.
4. ``training``: optimizer steps per second of the base ViT at 96^3 with the loss, optimizer and AMP of ``ctseg
   train`` (inflation/train.py: MONAI DiceCE, AdamW, autocast) on synthetic batches; ``ctseg train`` itself reads
   CT through SimpleITK, which that machine lacks. Then a few DDP steps under ``torchrun`` on the one GPU.

The volume is a CT-like phantom (tests/phantoms.py, numpy only) at the model's spacing: the machine holds no CT.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO_BUNDLE = ROOT / "models" / "bundles" / "demo-abdomen-ct"

FULL = {"matmul_n": 8192, "demo_volume": (96, 384, 384), "base_volume": (160, 256, 256), "base_roi": 96,
        "repeats": 3, "batch": 4, "train_batch": 2, "train_steps": 20, "ddp_steps": 5, "width": "base",
        "demo_precisions": ("fp32", "bf16", "fp16"), "base_precisions": ("fp32", "bf16", "fp16")}
# the dry run: every code path once, in about a minute on two cores (bf16 is emulated on CPUs without it: one window)
DRY = {"matmul_n": 256, "demo_volume": (5, 128, 128), "base_volume": (32, 32, 32), "base_roi": 32,
       "repeats": 1, "batch": 2, "train_batch": 1, "train_steps": 2, "ddp_steps": 2, "width": "tiny",
       "demo_precisions": ("fp32",), "base_precisions": ("fp32", "bf16")}


def synchronize(torch, device) -> None:  # noqa: ANN001
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(torch, device, fn, repeats: int) -> tuple[float, object]:  # noqa: ANN001
    fn()  # warm-up (kernels chosen, memory pools grown)
    synchronize(torch, device)
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        synchronize(torch, device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def matmul_rate(torch, device, n: int) -> float:  # noqa: ANN001
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds, _ = timed(torch, device, lambda: a @ b, 10)
    return 2 * n ** 3 / seconds / 1e12


def phantom_volume(shape: tuple[int, int, int]):  # noqa: ANN201
    """A CT-like volume normalised as the bundles' preprocessing does (window -175..250 HU to 0..1)."""
    import numpy as np

    rng = np.random.default_rng(0)
    d, h, w = shape
    z, y, x = np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    hu = np.full(shape, -1000.0)
    hu[(y / 0.8) ** 2 + (x / 0.9) ** 2 < 1] = 40.0  # body
    hu[((y + 0.1) / 0.35) ** 2 + ((x + 0.35) / 0.3) ** 2 + (z / 1.5) ** 2 < 1] = 60.0  # liver-like
    hu[((y + 0.2) / 0.06) ** 2 + (x / 0.06) ** 2 < 1] = 180.0  # aorta-like
    hu += rng.normal(0, 12, shape)
    return np.clip((hu + 175.0) / 425.0, 0, 1).astype(np.float32)


def compare(labels, reference, classes: int) -> dict[str, float | None]:  # noqa: ANN001
    agree = float((labels == reference).mean())
    dices = []
    for c in range(1, classes):
        p, q = labels == c, reference == c
        if p.sum() + q.sum() >= 200:
            dices.append(float(2 * (p & q).sum() / (p.sum() + q.sum())))
    return {"argmax_agreement": agree, "min_class_dice": min(dices) if dices else None}


def inference_rows(torch, device, name: str, model_ts_path: Path, eager, cfg, volume, sizes,  # noqa: ANN001
                   precisions: tuple[str, ...]) -> list[dict]:
    """MONAI eager fp32 vs the TorchScript engine at each precision, on one model and volume."""
    import numpy as np
    from monai.inferers import sliding_window_inference

    from models.backends import Choice, EngineKind
    from models.precision import Precision
    from models.sliding_window import SlidingWindow
    from models.torch_engine import TorchScriptBackend

    window = SlidingWindow(cfg.img_size, cfg.out_size, cfg.num_classes, overlap=0.25, batch_size=sizes["batch"])
    eager = eager.to(device).eval()
    x = torch.from_numpy(volume)[None, None].to(device)
    two_and_half = cfg.img_size[0] != cfg.out_size[0]

    def monai() -> object:
        with torch.inference_mode():
            out = sliding_window_inference(x, cfg.img_size, sizes["batch"], eager, overlap=0.25, mode="gaussian",
                                           sigma_scale=0.125)
            return torch.argmax(out[0], dim=0).to(torch.uint8).cpu().numpy()

    def per_batch() -> object:  # 2.5D, which MONAI has no mode for: ctseg's numpy window, eager torch per batch
        def predict(batch):  # noqa: ANN001, ANN202
            with torch.inference_mode():
                return eager(torch.from_numpy(batch).to(device)).float().cpu().numpy()
        return window(volume, predict)

    baseline = ("numpy sliding window, eager torch per batch (MONAI has no 2.5D mode)" if two_and_half
                else "monai sliding_window_inference, eager")
    base_s, reference = timed(torch, device, per_batch if two_and_half else monai, sizes["repeats"])
    rows = [{"model": name, "engine": baseline, "precision": "fp32", "seconds": base_s, "speedup_vs_baseline": 1.0,
             "argmax_agreement": 1.0, "min_class_dice": 1.0}]
    for precision in map(Precision, precisions):
        engine = TorchScriptBackend(model_ts_path, Choice(EngineKind.AUTO, precision, "gpu_check"), threads=0,
                                    batch_size=sizes["batch"], device=device.type)
        seconds, labels = timed(torch, device, lambda: engine.sliding_window(window, volume), sizes["repeats"])
        row = {"model": name, "engine": "ctseg torchscript", "precision": precision.value, "seconds": seconds,
               "speedup_vs_baseline": base_s / seconds, **compare(np.asarray(labels), reference, cfg.num_classes)}
        rows.append(row)
    return rows


def base_model(torch, sizes):  # noqa: ANN001, ANN201
    from models.nets import create_model
    from models.registry import model_config

    roi = sizes["base_roi"]
    cfg = model_config(f"vit3d_{sizes['width']}_patch16", img_size=(roi, roi, roi), num_classes=14)
    torch.manual_seed(0)
    return cfg, create_model(cfg).eval()


def encoder_flops(cfg, batch: int) -> float:  # noqa: ANN001
    """Multiply-adds x2 of the ViT encoder: patch embedding, attention (QKV, scores, values, projection), MLP."""
    d = cfg.encoder.embed_dim
    tokens = 1
    for size, patch in zip(cfg.img_size, cfg.patch_size):
        tokens *= size // patch
    patch_voxels = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    mlp = int(d * getattr(cfg.encoder, "mlp_ratio", 4.0))
    per_block = 4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * mlp
    return 2.0 * batch * (tokens * patch_voxels * cfg.in_chans * d + cfg.encoder.depth * per_block)


def encoder_row(torch, device, cfg, model, sizes, roof: float) -> dict:  # noqa: ANN001
    batch = sizes["batch"]
    x = torch.randn(batch, 1, *cfg.img_size, device=device)
    encoder = model.to(device).encoder

    def run() -> object:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            return encoder.forward_features(x)
    seconds, _ = timed(torch, device, run, max(3, sizes["repeats"]))
    rate = encoder_flops(cfg, batch) / seconds / 1e12
    return {"model": f"vit3d_{sizes['width']} encoder at {cfg.img_size[0]}^3, batch {batch}, bf16",
            "seconds": seconds, "tflops": rate, "share_of_matmul_rate": rate / roof}


def training_row(torch, device, cfg, model, sizes, distributed: bool = False) -> dict:  # noqa: ANN001
    from monai.losses import DiceCELoss

    model = model.to(device).train()
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    b = sizes["train_batch"]
    image = torch.randn(b, 1, *cfg.img_size, device=device)
    label = torch.randint(0, cfg.num_classes, (b, 1, *cfg.out_size), device=device)

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            logits = model(image)
        loss = loss_fn(logits.float(), label)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss
    steps = sizes["ddp_steps"] if distributed else sizes["train_steps"]
    step()
    synchronize(torch, device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(torch, device)
    seconds = time.perf_counter() - start
    return {"model": f"vit3d_{sizes['width']} at {cfg.img_size[0]}^3, batch {b}, AMP {'on' if amp else 'off'}"
            + (" (DDP under torchrun)" if distributed else ""), "steps": steps, "steps_per_s": steps / seconds,
            "last_loss": float(loss.item())}


def ddp_worker(args: argparse.Namespace) -> int:
    """Run under torchrun: a few DDP steps on this rank's GPU (the CPU with gloo in a dry run)."""
    import torch
    import torch.distributed as dist

    sizes = DRY if args.dry_run else FULL
    rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and not args.dry_run
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    cfg, model = base_model(torch, sizes)
    row = training_row(torch, device, cfg, model, sizes, distributed=True)
    row["world_size"] = dist.get_world_size()
    dist.destroy_process_group()
    if rank == 0:
        Path(args.out, "ddp.json").write_text(json.dumps(row))
    return 0


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    lines += [" | ".join(cell(r.get(k, "")) for k in keys) for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (CI)")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.ddp_worker:
        return ddp_worker(args)
    import torch

    sizes = DRY if args.dry_run else FULL
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    started = time.perf_counter()
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "dry_run": args.dry_run}
    roof = matmul_rate(torch, device, sizes["matmul_n"])
    report["matmul"] = [{"what": f"bf16 {sizes['matmul_n']}^3 matrix product", "tflops": roof}]
    print(f"matmul: {roof:.1f} TFLOP/s bf16", flush=True)

    from models.bundle import load_bundle
    from models.nets import create_model

    demo = load_bundle(DEMO_BUNDLE)
    demo_eager = create_model(demo.model)
    demo_eager.load_state_dict(torch.jit.load(str(demo.torchscript_path), map_location="cpu").state_dict())
    rows = inference_rows(torch, device, "demo-abdomen-ct (2.5D)", demo.torchscript_path, demo_eager, demo.model,
                          phantom_volume(sizes["demo_volume"]), sizes, sizes["demo_precisions"])
    cfg, model = base_model(torch, sizes)
    with tempfile.TemporaryDirectory() as tmp:
        ts_path = Path(tmp) / "model.ts"
        example = torch.zeros(1, 1, *cfg.img_size)
        with torch.inference_mode():
            torch.jit.save(torch.jit.trace(model, example, check_trace=False), str(ts_path))
        rows += inference_rows(torch, device, f"vit3d_{sizes['width']} at {cfg.img_size[0]}^3 (random weights)",
                               ts_path, model, cfg, phantom_volume(sizes["base_volume"]), sizes,
                               sizes["base_precisions"])
    report["inference"] = rows
    print(table(rows), flush=True)
    report["encoder"] = [encoder_row(torch, device, cfg, model, sizes, roof)]
    print(table(report["encoder"]), flush=True)  # type: ignore[arg-type]
    training = [training_row(torch, device, cfg, model, sizes)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          str(Path(__file__).resolve()), "--ddp-worker", "--out", str(args.out)]
                         + (["--dry-run"] if args.dry_run else []), env=env, capture_output=True, text=True,
                         timeout=600)
    if ddp.returncode == 0:
        training.append(json.loads((args.out / "ddp.json").read_text()))
    else:
        training.append({"model": "DDP under torchrun", "error": ddp.stderr.strip().splitlines()[-1:]})
    report["training"] = training
    print(table(training), flush=True)
    report["seconds"] = time.perf_counter() - started
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"gpu_check: done in {report['seconds']:.0f} s; {args.out / 'gpu_check.json'}")
    return 0 if ddp.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
