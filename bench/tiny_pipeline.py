"""A one-step pipeline: the compile suite's baseline (what compiling the smallest DAG costs)."""

# No postponed annotations here: KFP reads the component's real parameter types.
from kfp import dsl

from components.images import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def echo(text: str) -> str:
    """Return the input."""
    return text


@dsl.pipeline(name="bench-tiny", description="One step, for the compile baseline.")
def tiny_pipeline(text: str = "x"):
    echo(text=text)
