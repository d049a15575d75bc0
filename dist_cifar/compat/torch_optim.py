"""torch's optimizers without their torch.compile wrappers while torch's compiler is not loaded.

torch 2.14 wraps `Optimizer.step` of every optimizer in `_use_grad` (torch/optim/optimizer.py: sets grad
mode, then `import torch._dynamo` and two `graph_break()` calls) and `add_param_group`, `zero_grad`,
`state_dict`, `load_state_dict` in `_disable_dynamo`'s `inner` (torch/_compile.py: imports torch._dynamo on
first call). Importing torch._dynamo costs 2-3 s of CPU at start-up, about as much as `import torch`; outside
a compiled region the wrappers do nothing else, and while torch._dynamo is not in sys.modules no region can
be compiled. So the mixin calls the function behind exactly those wrappers, with grad mode set as
`_use_grad` sets it, and goes through torch's wrappers as soon as anything has loaded torch._dynamo
(model.compile=true, torchvision, DDP in a gloo group).

Limited twice: to torch releases up to NEWEST_CHECKED, and to methods whose wrapper is one of KNOWN_WRAPPERS
(by its code's name and file); any other decorator, which might do real work, is never skipped.
tests/unit/test_optim_units.py checks both facts and fails when torch no longer wraps these methods.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch

COMPILER = "torch._dynamo"
NEWEST_CHECKED = (2, 14)  # raise after checking a newer torch with tests/unit/test_optim_units.py
KNOWN_WRAPPERS = {("_use_grad", "torch/optim/optimizer.py"), ("inner", "torch/_compile.py")}


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def wrapper_of(function) -> tuple[str, str] | None:
    """(code name, path from the torch/ folder) of the decorator around `function`, or None without one."""
    if not hasattr(function, "__wrapped__"):
        return None
    code = function.__code__
    path = code.co_filename.replace("\\", "/")
    return code.co_name, "torch/" + path.rsplit("/torch/", 1)[-1]


@functools.cache
def bare_function(function):
    """The function behind one known wrapper of torch's, or None where this workaround must not apply."""
    if torch_version() > NEWEST_CHECKED or wrapper_of(function) not in KNOWN_WRAPPERS:
        return None
    inner = function.__wrapped__
    return None if hasattr(inner, "__wrapped__") else inner  # more than one layer: leave it to torch


def _skippable(optimizer, name: str):
    """The bare function of torch's method `name` for this optimizer, when it may be called directly."""
    if COMPILER in sys.modules:
        return None
    mro = type(optimizer).__mro__
    return bare_function(inspect.getattr_static(mro[mro.index(EagerStart) + 1], name))


class EagerStart:
    """Mixin for a torch optimizer class (first in the bases): torch's own methods, minus the wrappers above."""

    def step(self, closure=None):
        bare = _skippable(self, "step")
        if bare is None:
            return super().step(closure)
        with torch.set_grad_enabled(self.defaults.get("differentiable", False)):  # what _use_grad also does
            return bare(self, closure)

    def _torch_method(self, name: str, *args):
        bare = _skippable(self, name)
        return getattr(super(), name)(*args) if bare is None else bare(self, *args)

    def add_param_group(self, param_group):
        return self._torch_method("add_param_group", param_group)

    def zero_grad(self, set_to_none: bool = True):
        return self._torch_method("zero_grad", set_to_none)

    def state_dict(self):
        return self._torch_method("state_dict")

    def load_state_dict(self, state_dict):
        return self._torch_method("load_state_dict", state_dict)
