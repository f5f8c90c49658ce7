"""``ctseg predict INPUT... --out DIR``: the service's engine offline, on files or folders, with progress."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("ctseg.predict")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment NIfTI files, DICOM folders or zips offline")
    p.add_argument("inputs", type=Path, nargs="+", help=".nii/.nii.gz files, DICOM series folders, or .zip archives")
    p.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per input)")
    p.add_argument("--model", help="bundle name (default: the first bundle found)")
    p.add_argument("--bundles", type=Path, nargs="+", help="bundle directories (default: CTSEG_BUNDLE_DIRS / the demo)")
    p.add_argument("--outputs", default="nifti,dicom-seg", help="nifti, dicom-seg or both (comma separated)")
    p.add_argument("--series-uid", help="SeriesInstanceUID when a folder holds several series")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="inference device")
    p.set_defaults(func=run)


class ProgressBar:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, label: str) -> None:
        self.label, self.start = label, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.tty and done != total:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "-" * (width - filled)
        end = "\n" if done == total else ""
        sys.stderr.write(f"\r{self.label} [{bar}] {done}/{total} windows {time.perf_counter() - self.start:.1f}s{end}")
        sys.stderr.flush()


def _expand(path: Path, scratch: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if path.suffix.lower() == ".zip":
        from server.core.archives import ZipLimits, extract_zip

        target = scratch / path.stem
        target.mkdir(parents=True)
        return extract_zip(path, target, ZipLimits(max_bytes=1 << 40, max_members=10**6))
    return [path]


def run(args: argparse.Namespace) -> int:
    from models.backends import EngineUnavailable
    from models.bundle import BundleError
    from server.core.errors import InputError, PayloadTooLarge
    from server.core.settings import Settings
    from server.core.vocabulary import parse_outputs
    from server.inference.engine import engines_from_settings
    from server.core.vocabulary import DestinationChoice, OriginKind
    from server.inference.pipeline import run_pipeline
    from server.jobs.model import JobSpec, Origin, settle_outputs
    from server.jobs.staging import select_input

    overrides = {k: v for k, v in (("bundle_dirs", args.bundles), ("device", args.device)) if v}
    try:
        settings = Settings(**overrides)
        outputs = parse_outputs(args.outputs)
        engines = engines_from_settings(settings)
        engine = engines[args.model] if args.model else next(iter(engines.values()))
    except KeyError:
        log.error("unknown model %r; available: %s", args.model, ", ".join(sorted(engines)))
        return 2
    except (BundleError, EngineUnavailable, InputError, ValueError) as err:
        log.error("%s", err)
        return 2
    failures = 0
    for item in args.inputs:
        if not item.exists():
            log.error("%s: no such file or folder", item)
            failures += 1
            continue
        name = item.name.split(".")[0] or "input"
        with tempfile.TemporaryDirectory() as scratch:
            try:
                chosen = select_input(_expand(item, Path(scratch)), args.series_uid, {engine.bundle.modality},
                                      bounds=settings.dicom_bounds())
                spec = JobSpec(engine.bundle.name, outputs, chosen.series_uid, (), DestinationChoice.DEFAULT,
                               Origin(OriginKind.UPLOAD))
                fitting, _, notes = settle_outputs(chosen.kind, spec, strict=False)
                result = run_pipeline(engine, chosen.kind, chosen.files, args.out / name, fitting, chosen.series_uid,
                                      settings.seg_options(),
                                      ProgressBar(name), chosen.display_name, bounds=settings.dicom_bounds())
            except (InputError, PayloadTooLarge) as err:
                log.error("%s: %s", item, err)
                failures += 1
                continue
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
        print(f"{item} -> {args.out / name}: {', '.join(r.value for r in result.produced)} ({stages})")
        for note in notes + result.notes:
            print(f"  note: {note}")
    return 1 if failures else 0
