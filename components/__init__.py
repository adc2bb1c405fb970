"""KFP components of ctloop, one module per step. Each is a thin shell over plain functions in its module.

The names below are the component functions (each binding replaces the same-named submodule attribute), so
``from components import train`` gives the component, and ``components.train`` modules stay importable by path.
"""

from components.deploy import deploy
from components.evaluate import evaluate_gate
from components.extract import extract
from components.lookup import lookup_champion
from components.register import register
from components.report import report_rejection
from components.train import train
from components.transform import transform

__all__ = [
    "deploy",
    "evaluate_gate",
    "extract",
    "lookup_champion",
    "register",
    "report_rejection",
    "train",
    "transform",
]
