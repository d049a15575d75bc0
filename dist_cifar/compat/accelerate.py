"""Two speed fixes for Accelerate (checked up to 1.15), applied by the function that builds the Accelerator.

- `AcceleratedOptimizer.step()` calls `is_lomo_available()` twice on every step, and each call searches
  the import path for the `lomo_optim` package (importlib.util.find_spec): 0.15-0.3 ms a call on one CPU,
  a large share of a tutorial-sized step (batch 4). Whether a package is installed cannot change during a
  run, so the answer is computed once.
- `prepare()` asks `model_has_dtensor(model)`, which imports `torch.distributed.tensor` to get the DTensor
  class: 1.2-1.6 s of a single-process start on 2 CPU cores (2026-11-29), for a module nothing else here
  uses. A parameter can only be a DTensor once that module is loaded, so while it is not, the answer is
  False without the import.

tests/unit/test_accelerate_patch.py fails when Accelerate no longer does either: then delete that part.
"""

import functools
import sys

import accelerate
import accelerate.accelerator
import accelerate.optimizer

NEWEST_CHECKED = (1, 15)  # raise after checking a newer Accelerate with tests/unit/test_accelerate_patch.py

_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")


def _dtensor_check(original):
    @functools.wraps(original)
    def model_has_dtensor(model) -> bool:
        if not any(name in sys.modules for name in _DTENSOR_MODULES):
            return False  # no DTensor can exist before its module is imported
        return original(model)

    model_has_dtensor.dist_cifar_patch = True
    return model_has_dtensor


def accelerate_version() -> tuple[int, int]:
    major, minor = accelerate.__version__.split(".")[:2]
    return int(major), int(minor)


def apply_accelerate_workarounds() -> bool:
    """Replace the two names Accelerate's optimizer and accelerator modules call, on the Accelerate
    releases checked to need it; idempotent. True when they are in place."""
    if accelerate_version() > NEWEST_CHECKED:
        return False
    check = accelerate.optimizer.is_lomo_available
    if not hasattr(check, "cache_info"):
        accelerate.optimizer.is_lomo_available = functools.cache(check)
    dtensor = getattr(accelerate.accelerator, "model_has_dtensor", None)
    if dtensor is not None and not hasattr(dtensor, "dist_cifar_patch"):
        accelerate.accelerator.model_has_dtensor = _dtensor_check(dtensor)
    return True
