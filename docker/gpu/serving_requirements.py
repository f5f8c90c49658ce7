"""Print ctseg's serving requirements (pyproject.toml [project] dependencies and the ``postgres`` extra, as the CPU
image installs them) less ``onnxruntime``.

Why: onnxruntime-gpu provides the same ``onnxruntime`` module as the CPU wheel. Installing both lets the second
overwrite the first, and uninstalling either removes files the other needs; so the CUDA image installs the GPU
wheels first (docker/gpu/requirements.txt), then these, then ctseg itself with ``--no-deps``.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def serving_requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    deps = [*project["dependencies"], *project["optional-dependencies"]["postgres"]]
    return [d for d in deps if re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower() != "onnxruntime"]


if __name__ == "__main__":
    sys.stdout.write("\n".join(serving_requirements(Path(sys.argv[1]))) + "\n")
