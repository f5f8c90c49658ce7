"""``ctseg compare CONFIG.yaml``: several initialisations, the same data, step budget and seed, one table.

The config is a training config with a ``compare`` section::

    compare:
      threshold: 0.5          # "steps to reach" this validation mean Dice
      runs:
        - {name: scratch, model: {init: scratch}}
        - {name: inflated, model: {init: inflate, init_checkpoint: ../runs/demo_inflated/inflated.pt}}
        - {name: swin-ssl, model: {name: swin_unetr_f24, init: swin-ssl, weights: ...}, preprocess: {roi: [32, 64, 64]}}

Each run's ``model`` (and optional ``preprocess``) is merged over the base config's; everything else (data, augment,
train: steps, seed, validation schedule) is shared. Each run trains into ``<output>/<name>/`` with its exact config
written there; the table (``compare.md``, ``compare.json``) has validation Dice per class, the mean, the steps at
which the validation mean first reached the threshold, and the wall time.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from inflation.config import ConfigError, TrainConfig

log = logging.getLogger("ctseg.compare")


def _absolute(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Paths of a raw config made absolute against the compare config's folder (each run's config lives elsewhere)."""
    raw = copy.deepcopy(raw)
    data = raw.get("data", {})
    if isinstance(data, dict) and data.get("dataset") and not Path(data["dataset"]).is_absolute():
        data["dataset"] = str((base / data["dataset"]).resolve())
    model = raw.get("model", {})
    for key in ("init_checkpoint", "weights"):
        if isinstance(model, dict) and model.get(key) and not Path(model[key]).is_absolute():
            model[key] = str((base / model[key]).resolve())
    return raw


def run_configs(path: Path) -> tuple[list[tuple[str, TrainConfig]], float, Path]:
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("compare"), dict):
        raise ConfigError(f"{path}: a compare config needs a 'compare' section with 'runs'")
    comp = raw.pop("compare")
    runs = comp.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{path}: compare.runs must be a non-empty list of {{name, model}}")
    unknown = set(comp) - {"runs", "threshold"}
    if unknown:
        raise ConfigError(f"{path}: unknown compare field(s) {sorted(unknown)}")
    base_dir = path.parent
    output = Path(raw.get("output", "runs/compare"))
    output = output if output.is_absolute() else (base_dir / output).resolve()
    names, configs = set(), []
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or not run.get("name") or set(run) - {"name", "model", "preprocess"}:
            raise ConfigError(f"{path}: compare.runs[{i}] must be {{name, model, preprocess (optional)}}; got {run!r}")
        name = str(run["name"])
        if name in names or "/" in name:
            raise ConfigError(f"{path}: compare.runs[{i}]: run names must be unique folder names; got {name!r}")
        names.add(name)
        merged = copy.deepcopy(raw)
        for section in ("model", "preprocess"):
            merged[section] = {**raw.get(section, {}), **run.get(section, {})}
        merged = _absolute(merged, base_dir)
        merged["output"] = str(output / name)
        (output / name).mkdir(parents=True, exist_ok=True)
        run_path = output / name / "config.yaml"
        run_path.write_text(yaml.safe_dump(merged, sort_keys=False))
        configs.append((name, TrainConfig.load(run_path)))
    return configs, float(comp.get("threshold", 0.5)), output


def steps_to(history: list[dict[str, Any]], threshold: float) -> int | None:
    return next((h["step"] for h in history if (h.get("mean_dice") or 0) >= threshold), None)


def compare(path: str | Path) -> dict[str, Any]:
    from inflation.data import output_labels
    from inflation.train import train

    configs, threshold, output = run_configs(Path(path))
    rows = []
    for name, cfg in configs:
        log.info("compare: run %s (%s)", name, cfg.model.init or "inferred init")
        result = train(cfg)
        labels = [label.name for label in output_labels(cfg.data.labels)]
        val = result.get("validation") or {}
        per_class = dict(zip(labels, val.get("per_class") or [None] * len(labels)))
        rows.append({"name": name, "init": cfg.model.init, "model": cfg.model.name, "steps": result["steps"],
                     "seconds": result["seconds"], "mean_dice": val.get("mean_dice"), "per_class": per_class,
                     "steps_to_threshold": steps_to(result.get("history", []), threshold)})
    table = {"threshold": threshold, "seed": configs[0][1].train.seed, "steps": configs[0][1].train.steps, "runs": rows}
    (output / "compare.json").write_text(json.dumps(table, indent=2))
    (output / "compare.md").write_text(markdown(table))
    log.info("compare: table in %s", output / "compare.md")
    return table


def markdown(table: dict[str, Any]) -> str:
    rows = table["runs"]
    labels = list(rows[0]["per_class"]) if rows else []

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    head = ["run", "init", "model", *labels, "mean Dice", f"steps to {table['threshold']:g}", "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], str(r["init"] or "-"), r["model"], *(f(r["per_class"][n]) for n in labels), f(r["mean_dice"]),
                 str(r["steps_to_threshold"] or f"not in {r['steps']}"), f"{r['seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return (f"Same data, {table['steps']} steps, seed {table['seed']}; validation Dice per class.\n\n"
            + "\n".join(lines) + "\n")
