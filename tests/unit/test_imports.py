"""Importing dist_cifar changes nothing outside it: no environment variable, no other library's attribute;
and the trainer's entry module loads no benchmark module and no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import os, pkgutil, importlib, sys
import torch, accelerate, accelerate.accelerator, accelerate.optimizer
watched = [torch.optim.Optimizer, torch.optim.SGD, accelerate.accelerator, accelerate.optimizer, accelerate.Accelerator]
before_env = dict(os.environ)
before = [dict(vars(m)) for m in watched]
import dist_cifar
names = [m.name for m in pkgutil.walk_packages(dist_cifar.__path__, "dist_cifar.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
changed = [k for k in set(os.environ) | set(before_env) if os.environ.get(k) != before_env.get(k)]
for m, old in zip(watched, before):
    new = vars(m)
    changed += [f"{getattr(m, '__name__', m)}.{k}" for k in set(old) | set(new) if old.get(k) is not new.get(k)]
print(len(names), sorted(changed))
'''


def test_importing_every_module_changes_no_environment_and_no_other_library():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    count, changed = out.stdout.split(" ", 1)
    assert int(count) >= 25 and changed.strip() == "[]", out.stdout


def test_the_trainer_entry_imports_no_benchmark_and_no_torch():
    code = "import sys, dist_cifar.train; print(sorted(m for m in sys.modules if 'bench' in m or m == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
