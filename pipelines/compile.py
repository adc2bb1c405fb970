"""Compile every pipeline to its YAML (IR), with each component's image set to the configured component image."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from kfp import compiler

from components.images import COMPONENT_IMAGE
from ctloop.config import Settings, StepResources
from ctloop.errors import CtloopError


def all_pipelines() -> dict[str, Callable[..., Any]]:
    """Name -> pipeline function, for every pipeline the project ships."""
    from pipelines.monitoring import monitoring_pipeline
    from pipelines.scoring import scoring_pipeline
    from pipelines.training import training_pipeline

    return {"training": training_pipeline, "monitoring": monitoring_pipeline, "scoring": scoring_pipeline}


def compile_pipeline(pipeline_func: Callable[..., Any], out_path: Path, component_image: str,
                     resources: dict[str, StepResources] | None = None) -> Path:
    """Compile one pipeline; every executor's image becomes ``component_image`` and its CPU and memory limits
    those of ``resources`` (default: the settings' defaults).

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
        container["resources"] = step_resources(name, resources or Settings().resources)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out_path.with_suffix(".yaml.tmp")
    tmp_out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    tmp_out.replace(out_path)
    return out_path


def step_resources(executor: str, resources: dict[str, StepResources]) -> dict[str, Any]:
    """The container resources kfp's ``set_cpu_limit``/``set_memory_limit`` compile to, for one executor.

    Set here rather than in the pipeline functions because the limits come from the settings, which the
    pipeline definitions (built at import) do not see.
    """
    from kfp.compiler import compiler_utils

    step = executor.removeprefix("exec-").replace("-", "_")
    limits = resources.get(step)
    if limits is None:
        raise CtloopError(f"executor {executor}: no resources.{step} in the settings; add its CPU and memory to "
                          f"DEFAULT_RESOURCES (ctloop/config.py)")
    return {"cpuLimit": compiler_utils._cpu_to_float(limits.cpu),
            "memoryLimit": compiler_utils._memory_to_float(limits.memory),
            "resourceCpuLimit": limits.cpu, "resourceMemoryLimit": limits.memory}


def compile_all(out_dir: Path, component_image: str, resources: dict[str, StepResources] | None = None) -> list[Path]:
    return [compile_pipeline(func, out_dir / f"{name}.yaml", component_image, resources)
            for name, func in all_pipelines().items()]
