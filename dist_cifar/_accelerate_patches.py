"""Speed fix for Accelerate's per-step path: cache `is_lomo_available()`.

Accelerate (checked on 1.15) calls `is_lomo_available()` in every `backward()` and optimizer
`step()`, and each call searches the import path for the `lomo_optim` package: measured here at
about 0.3 ms a call, a quarter of a whole tutorial-sized training step on one CPU. Whether a
package is installed cannot change during a run, so the answer is computed once.
"""

import functools

import accelerate.accelerator
import accelerate.optimizer
import accelerate.utils.imports


def apply() -> None:
    cached = functools.cache(accelerate.utils.imports.is_lomo_available)
    for module in (accelerate.utils.imports, accelerate.accelerator, accelerate.optimizer):
        if hasattr(module, "is_lomo_available"):
            module.is_lomo_available = cached
