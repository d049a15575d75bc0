"""dist_cifar/compat/accelerate.py: both fixes still needed by this Accelerate, applied by
apply_accelerate_workarounds() (which build_accelerator calls) and never by importing a module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# In a fresh interpreter, the import-path searches for lomo_optim during one optimizer step (after a
# warm-up step) with Accelerate as installed, then again after importing every dist_cifar module (still unpatched) and
# after apply_accelerate_workarounds(); then whether
# prepare() of a model loads torch.distributed.tensor (patched), and whether Accelerate's own check does.
SCRIPT = """
import importlib.util
import torch
from accelerate import Accelerator
from dist_cifar.optim import SGD  # torch's SGD would import torch._dynamo, which imports DTensor
searches = []
real_find_spec = importlib.util.find_spec
def find_spec(name, *args, **kwargs):
    if name == "lomo_optim":
        searches.append(name)
    return real_find_spec(name, *args, **kwargs)
importlib.util.find_spec = find_spec
accelerator = Accelerator(cpu=True)
net = torch.nn.Linear(2, 2)
optimizer = accelerator.prepare(SGD(net.parameters(), lr=0.1))
def step():
    accelerator.backward(net(torch.ones(1, 2)).sum())
    optimizer.step()
    optimizer.zero_grad()
def searches_in_one_step():
    before = len(searches)
    step()
    return len(searches) - before
step()
plain = searches_in_one_step()
import sys
import accelerate.accelerator
import dist_cifar.dist.accelerator, dist_cifar.engine.job, dist_cifar.evaluate_cli
step()
after_imports = searches_in_one_step()
from dist_cifar.compat.accelerate import apply_accelerate_workarounds
assert apply_accelerate_workarounds()
step()
patched = searches_in_one_step()
# prepare() on a fresh model asks model_has_dtensor; patched, that loads no torch.distributed.tensor;
# Accelerate's own function does load it
calls = []
patched_check = accelerate.accelerator.model_has_dtensor
accelerate.accelerator.model_has_dtensor = lambda model: calls.append(1) or patched_check(model)
model = accelerator.prepare(torch.nn.Linear(2, 2))
dtensor_patched = "torch.distributed.tensor" in sys.modules
from accelerate.utils.other import model_has_dtensor
model_has_dtensor(model)
dtensor_plain = len(calls) > 0 and "torch.distributed.tensor" in sys.modules
print(dtensor_plain, dtensor_patched, plain, after_imports, patched)
"""


def test_the_patch_is_still_needed_and_applied_only_on_purpose():
    """One fresh interpreter for both facts (it imports torch and Accelerate: about 5 s of CPU here, and
    the unit tier hands its tests out one by one, so two tests sharing a module fixture paid it twice)."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    dtensor_plain, dtensor_patched, plain, after_imports, patched = out.stdout.split()[-5:]
    assert dtensor_plain == "True", (
        "Accelerate's prepare() no longer imports torch.distributed.tensor: remove model_has_dtensor's patch "
        "from dist_cifar/compat/accelerate.py")
    assert dtensor_patched == "False"
    plain, patched = int(plain), int(patched)
    assert plain > 0, (
        "Accelerate no longer looks for lomo_optim on every optimizer step: dist_cifar/compat/accelerate.py "
        "is not needed any more; remove it and its call in dist_cifar/dist/accelerator.py")
    assert int(after_imports) == plain, "importing dist_cifar patched Accelerate: workarounds are applied on purpose"
    assert patched == 0
