"""lookup_champion: the model version the registry's ``champion`` alias points at, for the gate to compare.

Outputs the champion's artifact URI and version, both ``''`` when there is no champion yet. The version flows on
to deploy, which promotes the candidate only if the champion is still that version.
"""

from typing import NamedTuple

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from ctloop.config import Settings
from ctloop.registry import CHAMPION_ALIAS, Version, open_registry


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def lookup_champion(
    config: dict,
    run_id: str,
) -> NamedTuple("Outputs", champion_uri=str, champion_version=str):
    """The current champion's artifact URI and version ('' and '' when there is none)."""
    from components.lookup import run_lookup_step

    return run_lookup_step(config, run_id)


def run_lookup_step(config: dict, run_id: str) -> tuple[str, str]:
    champion = find_champion(Settings.from_param(config))
    return (champion.artifact_uri, champion.version) if champion else ("", "")


def find_champion(settings: Settings) -> Version | None:
    """The version carrying the ``champion`` alias, or None."""
    return open_registry(settings).find_version(CHAMPION_ALIAS)
