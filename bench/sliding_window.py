"""Sliding-window inference: MONAI's sliding_window_inference on the eager PyTorch model vs the ctseg engine, for
every backend and precision that runs here.

Same model, same preprocessed volume, same ROI, overlap and Gaussian weighting; runs alternate (MONAI, then each
backend), several repeats, median ratios against MONAI eager fp32 measured in the same run, with argmax agreement
and per-class Dice between each backend's output and MONAI's. Window skipping is off for the comparison (MONAI
runs every window). Then the encoder alone: achieved GFLOP/s per backend against this machine's measured matmul
rate (fp32 and bf16 on CPU; fp16 on GPU).

    .venv/bin/python bench/sliding_window.py [--model demo|base] [--repeats 3] [--device cpu|cuda]

``--model base``: a base-width full-3D ViT (vit3d_base_patch16, 96^3 ROI, 3 mm, random weights; random weights give
near-tied logits, so its agreement figures are a lower bound of a trained model's).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from _common import DEMO_BUNDLE, EXAMPLE_CT, agreement_and_dice, eager_model, median


def base_bundle(directory: Path, batch: int) -> Path:
    """A bundle of a randomly initialised vit3d_base_patch16 (96^3, 14 classes) written the way export writes one."""
    import torch

    from inflation.export import export_onnx, export_torchscript
    from models.bundle import write_manifest
    from models.labels import label_for
    from models.nets import create_model
    from models.preprocess import PreprocessSpec
    from models.registry import model_config

    torch.manual_seed(0)
    config = model_config("vit3d_base_patch16", num_classes=14)
    model = create_model(config).eval()
    export_onnx(model, directory / "model.onnx")
    export_torchscript(model, directory / "model.ts")
    names = ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas", "aorta",
             "inferior_vena_cava", "portal_vein_and_splenic_vein", "esophagus", "duodenum", "urinary_bladder"]
    write_manifest(directory, {
        "name": "bench-vit3d-base", "version": "0", "created": "bench", "modality": "CT", "model": config.to_dict(),
        "preprocess": PreprocessSpec(spacing=(3.0, 3.0, 3.0), roi=config.img_size).to_dict(),
        "labels": [label_for(i + 1, n).to_dict() for i, n in enumerate(names)],
        "files": {"model.onnx": "", "model.ts": ""},
    })
    return directory


def encoder_flops(model, roi) -> float:  # type: ignore[no-untyped-def]
    """Multiply-adds x 2 of the encoder for one window: its linear layers, patch embedding and attention products."""
    import torch
    from torch import nn

    total = [0.0]

    def hook(module, inputs, output) -> None:  # type: ignore[no-untyped-def]
        if isinstance(module, nn.Conv3d):
            total[0] += 2.0 * output.numel() * int(np.prod(module.kernel_size)) * module.in_channels
        else:
            total[0] += 2.0 * output.numel() * module.in_features

    enc = model.encoder
    handles = [m.register_forward_hook(hook) for m in enc.modules() if isinstance(m, (nn.Conv3d, nn.Linear))]
    with torch.no_grad():
        tokens = enc.forward_tokens(torch.zeros(1, 1, *roi))
    for h in handles:
        h.remove()
    n, d = tokens[-1].shape[1], tokens[-1].shape[2]
    total[0] += len(enc.blocks) * 2 * (2.0 * n * n * d)  # q @ k^T and attn @ v
    return total[0]


class EncoderOnly:
    """The encoder's last token grid as its own ONNX graph, for timing the encoder alone."""

    @staticmethod
    def export(model, roi, path: Path) -> None:  # type: ignore[no-untyped-def]
        import warnings

        import torch

        class Wrap(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.encoder = model.encoder

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.encoder.forward_tokens(x)[-1]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Wrap().eval(), (torch.zeros(1, 1, *roi),), str(path), dynamo=False, opset_version=17,
                              input_names=["image"], output_names=["tokens"],
                              dynamic_axes={"image": {0: "batch"}, "tokens": {0: "batch"}})


def matmul_rate(device: str, dtype_name: str, threads: int) -> tuple[float, str]:
    """GFLOP/s of a 4096^2 matmul at that dtype, best of 5, through every library that runs it here (PyTorch's BLAS
    can be far from the hardware on a given CPU; the best one is the machine's measured rate), and who reached it."""
    import torch

    n = 4096
    rates: dict[str, float] = {}
    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def best_of(fn) -> float:  # type: ignore[no-untyped-def]
        fn()
        best = float("inf")
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return 2 * n**3 / best / 1e9

    rates["torch"] = best_of(lambda: a @ b)
    if device == "cpu":
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
             helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        x = np.random.default_rng(0).random((n, n), dtype=np.float32)
        if dtype_name == "fp32":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            rates["onnxruntime"] = best_of(lambda: sess.run(None, {"a": x, "b": x}))
        try:
            import openvino as ov

            core = ov.Core()
            compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU", {
                "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[dtype_name],
                "INFERENCE_NUM_THREADS": str(threads)})
            request = compiled.create_infer_request()
            rates["openvino"] = best_of(lambda: request.infer({0: x, 1: x}))
        except ImportError:
            pass
    who = max(rates, key=rates.get)  # type: ignore[arg-type]
    return rates[who], who


def combinations(device: str) -> list[tuple[str, str]]:
    from models.backends import EngineKind, Hardware, supported_precisions

    hw = Hardware.probe()
    if device == "cuda":
        kinds = [EngineKind.CUDA] + ([EngineKind.TENSORRT] if "TensorrtExecutionProvider" in hw.ort_providers else [])
    else:
        kinds = [EngineKind.ONNXRUNTIME] + ([EngineKind.OPENVINO] if hw.openvino_version else [])
    return [(k.value, p.value) for k in kinds for p in supported_precisions(k, hw)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["demo", "base"], default="demo")
    ap.add_argument("--bundle", help="a bundle to use instead of --model's")
    ap.add_argument("--input", default=str(EXAMPLE_CT))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--batch", type=int, help="windows per call (default: 4 demo, 2 base)")
    ap.add_argument("--threads", type=int, default=0, help="threads for all (0: all cores)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    batch = args.batch or (2 if args.model == "base" else 4)

    import torch
    from monai.inferers import sliding_window_inference

    from models.backends import Choice, EngineKind, OpenVinoBackend, OrtBackend
    from models.bundle import load_bundle
    from models.precision import Precision
    from server.inference.engine import Engine

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    scratch = tempfile.TemporaryDirectory()
    path = Path(args.bundle) if args.bundle else DEMO_BUNDLE if args.model == "demo" else base_bundle(Path(scratch.name), batch)
    bundle = load_bundle(path)
    cfg = bundle.model
    device = torch.device(args.device)
    model = eager_model(bundle).to(device)
    reference_engine = Engine(bundle, device=args.device, threads=threads, overlap=args.overlap, batch_size=batch,
                              engine="onnxruntime" if args.device == "cpu" else "cuda", precision="fp32")
    volume = reference_engine.preprocessor.forward(sitk.ReadImage(args.input)).array
    print(f"model {bundle.name} ({cfg.name}), input {Path(args.input).name}: model grid {volume.shape}, ROI {cfg.img_size}, "
          f"overlap {args.overlap}, batch {batch}, threads {threads}, device {args.device}")

    def run_monai() -> np.ndarray:
        if cfg.mode == "2.5d":
            return run_monai_25d()
        x = torch.from_numpy(volume)[None, None].to(device)
        with torch.no_grad():
            logits = sliding_window_inference(x, cfg.img_size, batch, model, overlap=args.overlap, mode="gaussian",
                                              sigma_scale=0.125)
        return logits.argmax(1)[0].cpu().numpy().astype(np.uint8)

    def run_monai_25d() -> np.ndarray:
        """A 2.5D model predicts the centre slice of its slab: MONAI slides in-plane over every slice, each slice
        carrying its neighbours as channels (edge-padded at the ends, as ctseg does): the same windows."""
        k = cfg.img_size[0]
        padded = np.pad(volume, ((k // 2, k // 2), (0, 0), (0, 0)), mode="edge")
        slabs = torch.from_numpy(np.stack([padded[i:i + k] for i in range(volume.shape[0])])).to(device)

        def centre_slice(x: torch.Tensor) -> torch.Tensor:
            return model(x[:, None])[:, :, 0]

        with torch.no_grad():
            logits = sliding_window_inference(slabs, cfg.img_size[1:], batch, centre_slice, overlap=args.overlap,
                                              mode="gaussian", sigma_scale=0.125)
        return logits.argmax(1).cpu().numpy().astype(np.uint8)

    engines = {}
    for kind, precision in combinations(args.device):
        engine = Engine(bundle, device=args.device, threads=threads, overlap=args.overlap, batch_size=batch,
                        engine=kind, precision=precision)
        engine.warm_up()
        engines[f"{kind}-{precision}"] = engine
    with torch.no_grad():
        model(torch.zeros(1, 1, *cfg.img_size, device=device))  # warm-up
    times: dict[str, list[float]] = {"monai": [], **{k: [] for k in engines}}
    outs: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        t = time.perf_counter()
        outs["monai"] = run_monai()
        times["monai"].append(time.perf_counter() - t)
        for name, engine in engines.items():
            t = time.perf_counter()
            outs[name] = engine.window(volume, engine.predict_windows)
            times[name].append(time.perf_counter() - t)
    monai_s = median(times["monai"])
    print(f"MONAI eager fp32: {', '.join(f'{t:.2f}' for t in times['monai'])} s")
    rows = {}
    print("| engine | time (runs) | vs MONAI eager | argmax agreement | min class Dice |")
    print("|---|---|---|---|---|")
    for name in engines:
        agreement, dices = agreement_and_dice(outs["monai"], outs[name], cfg.num_classes)
        ratio = monai_s / median(times[name])
        rows[name] = (ratio, agreement, min(dices) if dices else float("nan"))
        print(f"| {name} | {' / '.join(f'{t:.2f}' for t in times[name])} s | {ratio:.2f}x | {agreement:.4%} | "
              f"{rows[name][2]:.4f} |")

    # ---- the encoder alone: achieved GFLOP/s against the matmul rate
    flops = encoder_flops(model.cpu(), cfg.img_size)
    enc_dir = Path(scratch.name) / "encoder"
    enc_dir.mkdir()
    EncoderOnly.export(model.cpu(), cfg.img_size, enc_dir / "model.onnx")
    enc_bundle = dataclasses.replace(bundle, path=enc_dir)
    measured = {p: matmul_rate(args.device, p, threads) for p in (["fp32", "bf16"] if args.device == "cpu" else ["fp16", "fp32"])}
    rates = {p: r for p, (r, _) in measured.items()}
    print(f"encoder: {flops / 1e9:.2f} GFLOP a window; matmul 4096^2 (best library): "
          + ", ".join(f"{p} {r:.0f} GFLOP/s ({who})" for p, (r, who) in measured.items()))
    x = np.random.default_rng(0).random((batch, 1, *cfg.img_size), dtype=np.float32)
    for name in engines:
        kind, precision = name.split("-")
        choice = Choice(EngineKind(kind), Precision(precision), "bench")
        backend = (OpenVinoBackend(enc_bundle, choice, threads, batch) if choice.engine == EngineKind.OPENVINO
                   else OrtBackend(enc_bundle, choice, threads, io_binding=False))
        backend(x)
        best = float("inf")
        for _ in range(max(3, args.repeats)):
            t = time.perf_counter()
            backend(x)
            best = min(best, time.perf_counter() - t)
        achieved = batch * flops / best / 1e9
        ref = rates.get(precision, rates.get("fp32"))
        print(f"encoder {name}: {best * 1000:.0f} ms a batch of {batch}: {achieved:.0f} GFLOP/s = "
              f"{achieved / ref:.0%} of the {precision if precision in rates else 'fp32'} matmul rate")
    best_name = max(rows, key=lambda k: rows[k][0] if rows[k][1] >= 0.995 and rows[k][2] >= 0.99 else 0)
    ratio, agreement, min_dice = rows[best_name]
    print(f"SUMMARY sliding_window device={args.device} model={args.model} best={best_name} "
          f"speedup_vs_monai_eager={ratio:.2f}x monai_s={monai_s:.2f} ctseg_s={median(times[best_name]):.2f} "
          f"argmax_agreement={agreement:.4%} min_class_dice={min_dice:.4f}")


if __name__ == "__main__":
    main()
