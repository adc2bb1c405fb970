"""lookup_champion: the model version the registry's ``champion`` alias points at, for the gate to compare.

Cloud: the Vertex AI model with the configured display name, version ``@champion``. Local: the SQLite
registry. Outputs the champion's artifact URI and version, both ``''`` when there is no champion yet.
"""

from dataclasses import dataclass
from typing import NamedTuple

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from ctloop.config import Settings

CHAMPION_ALIAS = "champion"
PREVIOUS_CHAMPION_ALIAS = "previous-champion"


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def lookup_champion(
    config: dict,
    run_id: str,
) -> NamedTuple("Outputs", champion_uri=str, champion_version=str):
    """The current champion's artifact URI and version ('' and '' when there is none)."""
    from components.lookup import run_lookup_step
    from ctloop.steps import run_step

    return run_step(run_lookup_step, config, run_id)


@dataclass(frozen=True)
class Champion:
    model_name: str  # cloud: projects/.../models/ID; local: the model's display name
    version: str
    artifact_uri: str


def run_lookup_step(config: dict, run_id: str) -> tuple[str, str]:
    champion = find_champion(Settings.from_param(config))
    return (champion.artifact_uri, champion.version) if champion else ("", "")


def find_champion(settings: Settings) -> Champion | None:
    """The version carrying the ``champion`` alias, or None."""
    name = settings.model.display_name
    if settings.backend == "cloud":
        from ctloop.vertex import Where, find_parent_model, get_model_version

        where = Where(settings.gcp.project, settings.gcp.region)
        parent = find_parent_model(name, where)
        if parent is None:
            return None
        model = get_model_version(parent.resource_name, CHAMPION_ALIAS, where)
        if model is None:
            return None
        return Champion(parent.resource_name, str(model.version_id), model.uri or "")

    from ctloop.registry import LocalRegistry

    version = LocalRegistry(settings.local.registry_db).get_alias(name, CHAMPION_ALIAS)
    if version is None:
        return None
    return Champion(name, str(version.version_id), version.artifact_uri)
