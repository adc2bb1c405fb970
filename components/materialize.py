"""materialize_features: each entity's latest history state, from the transform's splits, into the online store.

Its own step rather than part of the transform: the transform runs as a Spark job on Dataproc, which would then
need the Feature Store's client and permissions, and a failed sync would cost a rerun of the whole job. Here the
splits (the transform's kept rows, one per entity and instant: exactly the rows the job's history features are
computed from) are folded with ``ctloop.history``, the definition serving derives the features with.

- local: the SQLite store under ``local.workdir`` (ctloop/online_store.py), replaced in one transaction;
- cloud: the BigQuery table, replaced by one load job, then the Vertex AI Feature Store view synced from it
  (ctloop/online_store_vertex.py).

A rerun over the same splits writes the same rows (the states' ``as_of`` is the latest event time in the
splits, not the clock) and never adds any. The deploy step runs after this one, so the smoke test's server
reads the states of the data the candidate was trained on.
"""

import json
from typing import Any

from kfp.dsl import Dataset, Input

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from ctloop.config import Settings
from ctloop.features import FeatureSpec
from ctloop.history import iso, states_from_splits
from ctloop.online_store import OnlineStore
from ctloop.online_stores import open_online_store


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def materialize_features(
    config: dict,
    run_id: str,
    train: Input[Dataset],
    valid: Input[Dataset],
    test: Input[Dataset],
) -> str:
    """Write each entity's latest history state to the online store; returns the store's description."""
    from components.materialize import run_materialize_step
    from ctloop.steps import run_step

    return run_step(run_materialize_step, config, run_id, train, valid, test)


def run_materialize_step(config: dict, run_id: str, train: Any, valid: Any, test: Any) -> str:
    settings = Settings.from_param(config)
    store = open_online_store(settings)
    entities, as_of = materialize(store, [train.path, valid.path, test.path])
    print(json.dumps({"materialize_features": {"run_id": run_id, "store": store.description,
                                               "entities": entities, "as_of": as_of}}), flush=True)
    return store.description


def materialize(store: OnlineStore, split_dirs: list[str]) -> tuple[int, str]:
    """Fold the splits into states and replace the store's contents; returns (entities, as_of)."""
    spec = FeatureSpec.read(split_dirs[0])
    states = states_from_splits(split_dirs, spec)
    as_of = iso(max((s.last_us for s in states.values()), default=0))
    return store.write(states, as_of), as_of
