"""Why the CPU sliding window is not 3x MONAI eager: where the time goes and what the levers give.

1. ONNX Runtime's time per operator type on the demo bundle (batch of windows, profiling on).
2. The network's FLOPs per window (convolutions, transposed convolutions, linear layers) and the rate PyTorch
   eager and ONNX Runtime reach, against this machine's float32 matrix-multiply rate (torch.mm, 4096^2): the
   ceiling for any fp32 engine on the same work.
3. int8: ONNX Runtime static quantisation of the convolutions (QOperator, per channel, calibrated on 8 windows
   of the input) over the whole volume: time and agreement with the float32 engine.
4. The decoder's largest convolution (16 -> 8 channels, 3x3x3, at the ROI) in ONNX Runtime as a 3D convolution and
   as a 2D convolution over depth-stacked channels (the form MLAS's NCHWc 2D kernels take).

    .venv/bin/python bench/sliding_window_levers.py [--input CT.nii.gz] [--threads 0]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import SimpleITK as sitk
from _common import DEMO_BUNDLE, EXAMPLE_CT, agreement_and_dice, eager_model, median


def timed(fn, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times)


def _options(threads: int, profile: bool = False) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.enable_profiling = profile
    return opts


def session(path: str, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(path, _options(threads), providers=["CPUExecutionProvider"])


def operator_shares(path: str, batch: np.ndarray, threads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        opts = _options(threads, profile=True)
        opts.profile_file_prefix = f"{tmp}/ort_profile"  # not in the working directory
        s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        for _ in range(3):
            s.run(None, {name: batch})
        events = json.loads(Path(s.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values())
    return {op: us / total for op, us in per_op.most_common()}


def flops_per_window(model, roi) -> float:  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    total = [0.0]

    def hook(module, inputs, output) -> None:  # type: ignore[no-untyped-def]
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            k = int(np.prod(module.kernel_size)) * module.in_channels // module.groups
            n = output.numel() if isinstance(module, nn.Conv3d) else inputs[0].numel() // module.in_channels * module.out_channels
            total[0] += 2.0 * n * k
        elif isinstance(module, nn.Linear):
            total[0] += 2.0 * output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 1, *roi))
    for h in handles:
        h.remove()
    return total[0]


def conv_forms(roi, threads: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Seconds for a 16->8 3x3x3 convolution on a batch of 4 windows: 3D form, 2D depth-stacked form (ORT)."""
    import io

    import torch
    from torch import nn

    class Conv3(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(16, 8, 3, padding=1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    class Conv2Stacked(nn.Module):
        def __init__(self, c3: Conv3) -> None:
            super().__init__()
            w = c3.conv.weight  # (out, in, kd, kh, kw) -> (out, kd * in, kh, kw)
            self.conv = nn.Conv2d(48, 8, 3, padding=1, bias=False)
            self.conv.weight.data = w.permute(0, 2, 1, 3, 4).reshape(8, 48, 3, 3).contiguous()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, c, d, h, w = x.shape
            xp = nn.functional.pad(x, (0, 0, 0, 0, 1, 1))
            stacked = torch.stack([xp[:, :, k:k + d] for k in range(3)], dim=1).permute(0, 3, 1, 2, 4, 5)
            y = self.conv(stacked.reshape(n * d, 3 * c, h, w))
            return y.reshape(n, d, -1, h, w).permute(0, 2, 1, 3, 4)

    x = torch.randn(4, 16, *roi)
    c3 = Conv3().eval()
    c2 = Conv2Stacked(c3).eval()
    with torch.no_grad():
        assert torch.allclose(c3(x), c2(x), atol=1e-4)
    seconds = []
    for module in (c3, c2):
        buf = io.BytesIO()
        torch.onnx.export(module, (x,), buf, opset_version=17, dynamo=False)
        s = ort.InferenceSession(buf.getvalue(), _options(threads), providers=["CPUExecutionProvider"])
        feed = {s.get_inputs()[0].name: x.numpy()}
        seconds.append(timed(lambda: s.run(None, feed)))
    return seconds[0], seconds[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(DEMO_BUNDLE))
    ap.add_argument("--input", default=str(EXAMPLE_CT))
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from server.inference.engine import Engine

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    engine = Engine.from_dir(args.bundle, threads=threads)
    engine.warm_up()
    cfg = engine.bundle.model
    onnx_path = str(engine.bundle.onnx_path)
    volume = engine.preprocessor.forward(sitk.ReadImage(args.input)).array
    starts = engine.window.plan(volume.shape)
    rng = np.random.default_rng(0)
    picks = [starts[i] for i in rng.choice(len(starts), min(8, len(starts)), replace=False)]
    windows = [volume[d:d + cfg.img_size[0], h:h + cfg.img_size[1], w:w + cfg.img_size[2]][None, None].copy()
               for d, h, w in picks]
    batch = np.concatenate(windows[:4])

    shares = operator_shares(onnx_path, batch, threads)
    print("ONNX Runtime time by operator: " + ", ".join(f"{op} {100 * f:.1f}%" for op, f in list(shares.items())[:6]))

    model = eager_model(engine.bundle)
    flops = flops_per_window(model, cfg.img_size)
    x = torch.from_numpy(batch)
    with torch.no_grad():
        t_torch = timed(lambda: model(x))
    t_ort = timed(lambda: engine.predict_windows(batch))
    a = torch.randn(4096, 4096)
    t_mm = timed(lambda: torch.mm(a, a))
    mm_rate = 2 * 4096**3 / t_mm
    torch_rate, ort_rate = len(batch) * flops / t_torch, len(batch) * flops / t_ort
    print(f"{flops / 1e9:.2f} GFLOP per window; batch of {len(batch)}: PyTorch eager {t_torch:.3f} s "
          f"({torch_rate / 1e9:.1f} GFLOP/s), ONNX Runtime {t_ort:.3f} s ({ort_rate / 1e9:.1f} GFLOP/s); "
          f"this machine's fp32 matmul {mm_rate / 1e9:.1f} GFLOP/s ({threads} threads)")
    ceiling = mm_rate / torch_rate
    print(f"ceiling for an fp32 engine that ran every layer at the matmul rate: {ceiling:.2f}x PyTorch eager")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{engine.input_name: w} for w in windows])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre, q8 = f"{tmp}/pre.onnx", f"{tmp}/int8.onnx"
        quant_pre_process(onnx_path, pre)
        quantize_static(pre, q8, Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"])
        s8 = session(q8, threads)
        name = s8.get_inputs()[0].name
        t = time.perf_counter()
        reference = engine.window(volume, engine.predict_windows)
        t_fp32 = time.perf_counter() - t
        t = time.perf_counter()
        quantised = engine.window(volume, lambda b: s8.run(None, {name: b})[0])
        t_int8 = time.perf_counter() - t
    agreement, dices = agreement_and_dice(reference, quantised, cfg.num_classes)
    print(f"int8 (static, per channel): whole volume {t_int8:.2f} s vs float32 {t_fp32:.2f} s "
          f"({t_fp32 / t_int8:.2f}x); argmax agreement {100 * agreement:.3f}%, min class Dice {min(dices):.3f}")
    t3, t2 = conv_forms(cfg.img_size, threads)
    print(f"16->8 3x3x3 convolution, batch 4 at {cfg.img_size}: 3D form {1e3 * t3:.0f} ms, "
          f"2D depth-stacked form {1e3 * t2:.0f} ms")
    conv_share = shares.get("Conv", 0.0)
    print(f"SUMMARY sliding_window_levers conv_share={100 * conv_share:.0f}% gflop_per_window={flops / 1e9:.2f} "
          f"torch_gflops={torch_rate / 1e9:.1f} ort_gflops={ort_rate / 1e9:.1f} matmul_gflops={mm_rate / 1e9:.1f} "
          f"fp32_ceiling_vs_torch={ceiling:.2f}x int8_speedup={t_fp32 / t_int8:.2f}x int8_agreement={100 * agreement:.3f}% "
          f"int8_min_dice={min(dices):.3f} conv3d_ms={1e3 * t3:.0f} conv2d_stacked_ms={1e3 * t2:.0f}")


if __name__ == "__main__":
    main()
