"""Paths of the repository that tests read (never ../shared)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = REPO / "models" / "bundles" / "demo-abdomen-ct"
