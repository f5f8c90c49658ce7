"""The service and the shared model contract must import without torch."""

from __future__ import annotations

import subprocess
import sys

BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name in ('torch', 'timm', 'monai', 'torchvision') or name.split('.')[0] in ('torch', 'timm', 'monai', 'torchvision'):
            raise ImportError(f'{name} is blocked in this test')
        return None
sys.meta_path.insert(0, _NoTorch())
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit('torch was importable')
"""


def test_server_and_serving_dependencies_import_without_torch():
    code = BLOCK_TORCH + """
import server, models, models.config, models.registry, models.axes
import server.app, server.service, server.inference.engine, server.cli, server.predict_cli, server.imaging.seg
import models.bundle, models.preprocess, models.sliding_window, models.labels, models.volume
from ctseg.cli import build_parser
build_parser(['serve'])
import numpy, SimpleITK, pydicom, highdicom, onnxruntime, fastapi, uvicorn, pydantic_settings, multipart
assert 'torch' not in sys.modules
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_the_block_really_blocks_torch():
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import models.nets"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "blocked in this test" in proc.stderr
