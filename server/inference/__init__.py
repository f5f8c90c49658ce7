"""A bundle served by an inference backend (``engine``), and one segmentation from input files to durable result
files (``pipeline``)."""

from server.inference.engine import Engine, engines_from_settings
from server.inference.pipeline import PipelineResult, run_pipeline

__all__ = ["Engine", "PipelineResult", "engines_from_settings", "run_pipeline"]
