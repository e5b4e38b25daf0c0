"""Layer-wise collapse probe.

The package is also callable: ``nc_finetune.probe(backbone, split, num_classes, ...)`` runs
:func:`nc_finetune.probe.runner.probe`. ``nc_finetune.probe`` names both this package and the top-level function,
and importing any submodule binds the package to that name, so the package itself has to be the function.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    """This package's module type: calling it runs the probe."""

    def __call__(self, *args: Any, **kwargs: Any):
        from nc_finetune.probe.runner import probe

        return probe(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "__wrapped__":  # inspect.signature / help() of the callable package show the runner's function
        from nc_finetune.probe.runner import probe

        return probe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


sys.modules[__name__].__class__ = _CallableModule
