"""Speed fix for Accelerate's per-step path: cache `is_lomo_available()` where the optimizer step calls it.

Accelerate 1.15's `AcceleratedOptimizer.step()` calls `is_lomo_available()` twice on every step, and
each call searches the import path for the `lomo_optim` package (importlib.util.find_spec): measured
here at 0.15-0.3 ms a call on one CPU, a large share of a tutorial-sized step (batch 4). Whether a
package is installed cannot change during a run, so the answer is computed once. Applied once, when
dist_cifar.runtime is imported. tests/unit/test_accelerate_patch.py fails when Accelerate no longer
searches on every step: then delete this module and its one call.
"""

import functools

import accelerate.optimizer


def apply() -> None:
    """Idempotent: replaces accelerate.optimizer's name for the check with a cached one."""
    check = accelerate.optimizer.is_lomo_available
    if not hasattr(check, "cache_info"):
        accelerate.optimizer.is_lomo_available = functools.cache(check)
