"""Compile every pipeline to its YAML (IR), with each component's image set to the configured component image."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from kfp import compiler

from components.images import COMPONENT_IMAGE
from ctloop.errors import CtloopError


def all_pipelines() -> dict[str, Callable[..., Any]]:
    """Name -> pipeline function, for every pipeline the project ships."""
    from pipelines.monitoring import monitoring_pipeline
    from pipelines.scoring import scoring_pipeline
    from pipelines.training import training_pipeline

    return {"training": training_pipeline, "monitoring": monitoring_pipeline, "scoring": scoring_pipeline}


def compile_pipeline(pipeline_func: Callable[..., Any], out_path: Path, component_image: str) -> Path:
    """Compile one pipeline; every executor's image becomes ``component_image``.

    Components are declared with a placeholder image (components/images.py) so that the compiled template names
    exactly the image a build produced, never a default ``python:3.x`` or a developer's environment.
    """
    if not component_image or component_image == COMPONENT_IMAGE:
        raise CtloopError(f"component image: expected a real image reference, found {component_image!r}")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(pipeline_func=pipeline_func, package_path=str(raw))
        docs = list(yaml.safe_load_all(raw.read_text()))
    executors = docs[0]["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        container = executor.get("container", {})
        if container.get("image") != COMPONENT_IMAGE:
            raise CtloopError(f"executor {name}: image {container.get('image')!r} is not the component image "
                              f"placeholder {COMPONENT_IMAGE!r}; declare the component with base_image=COMPONENT_IMAGE")
        container["image"] = component_image
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out_path.with_suffix(".yaml.tmp")
    tmp_out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    tmp_out.replace(out_path)
    return out_path


def compile_all(out_dir: Path, component_image: str) -> list[Path]:
    return [compile_pipeline(func, out_dir / f"{name}.yaml", component_image) for name, func in all_pipelines().items()]
