"""Shared bits of the benchmarks: paths, peak RSS, medians, and the eager PyTorch twin of a bundle."""

from __future__ import annotations

import resource
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
DEMO_BUNDLE = ROOT / "models" / "bundles" / "demo-abdomen-ct"
EXAMPLE_CT = ROOT.parent / "shared" / "data" / "example_ct.nii.gz"


def peak_rss_mb(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


def median(values: list[float]) -> float:
    return statistics.median(values)


def agreement_and_dice(a, b, num_classes: int) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    """Fraction of voxels with the same label, and Dice per foreground class present in either map."""
    dices = []
    for c in range(1, num_classes):
        p, q = a == c, b == c
        if p.sum() + q.sum():
            dices.append(float(2 * (p & q).sum() / (p.sum() + q.sum())))
    return float((a == b).mean()), dices


def eager_model(bundle):  # type: ignore[no-untyped-def]
    """The bundle's network as an eager torch module, weights taken from its TorchScript file."""
    import torch

    from models.nets import create_model

    model = create_model(bundle.model)
    scripted = torch.jit.load(str(bundle.torchscript_path), map_location="cpu")
    model.load_state_dict(scripted.state_dict())
    return model.eval()


class Server:
    """``ctseg serve`` in a subprocess on a free 127.0.0.1 port, with its own storage; stopped on exit."""

    def __init__(self, bundle: Path, storage: Path, **env: str) -> None:
        import os
        import socket
        import subprocess

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "CTSEG_BUNDLE_DIRS": str(bundle), "CTSEG_STORAGE_DIR": str(storage),
                       "CTSEG_HOST": "127.0.0.1", "CTSEG_PORT": str(self.port), "CTSEG_LOG_LEVEL": "WARNING", **env}
        self.started = __import__("time").perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "ctseg", "serve"], env=environment, cwd=ROOT)

    def wait_ready(self, timeout: float = 60.0) -> float:
        import time

        import httpx

        while time.perf_counter() - self.started < timeout:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become ready")

    def pids(self) -> list[int]:
        """The server and its worker processes (all descendants)."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                todo += [int(c) for c in task.read_text().split()]
        return found

    def peak_rss_mb(self, api_only: bool = False) -> float:
        """Sum of each process's own peak (VmHWM): server plus workers (an upper bound of their joint peak), or
        the API process alone."""
        total = 0.0
        for pid in [self.proc.pid] if api_only else self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024.0
        return total

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def dicom_series_files(image, description: str = "bench"):  # type: ignore[no-untyped-def]
    from dicom_factory import series_from_image, to_bytes

    return [(f"IM{i:05d}.dcm", to_bytes(ds)) for i, ds in enumerate(series_from_image(image, description=description))]


def resampled_ct(source: Path, size_xyz: tuple[int, int, int]):  # type: ignore[no-untyped-def]
    """The real example CT resampled (linear) onto a size_xyz grid over the same field of view."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(source))
    spacing = [sp * (sz - 1) / (n - 1) for sp, sz, n in zip(img.GetSpacing(), img.GetSize(), size_xyz)]
    out = sitk.Resample(img, list(size_xyz), sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), spacing,
                        img.GetDirection(), -1024, sitk.sitkInt16)
    return out
