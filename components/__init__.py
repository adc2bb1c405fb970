"""KFP components of ctloop, one module per step. Each is a thin shell over plain functions in its module.

``from components import train`` works; the step modules load on first use, so importing one step does not
import every other step's dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

_STEP_MODULES = {
    "extract": "components.extract",
    "transform": "components.transform",
    "train": "components.train",
    "lookup_champion": "components.lookup",
    "evaluate_gate": "components.evaluate",
    "register": "components.register",
    "deploy": "components.deploy",
    "report_rejection": "components.report",
}

__all__ = list(_STEP_MODULES)


def __getattr__(name: str) -> Any:
    module = _STEP_MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'components' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
