"""What reproduces a result: the Python, torch, torchvision and Accelerate versions and the git revision."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch


def versions() -> dict:
    import importlib.metadata  # torchvision's version without importing it: ~0.4 s and ~170 MB a process

    import accelerate

    rev = None
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        rev = out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": importlib.metadata.version("torchvision"),
            "accelerate": accelerate.__version__, "git_revision": rev, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
