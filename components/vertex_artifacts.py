"""The ``google.VertexModel`` / ``google.VertexEndpoint`` artifact types, declared without
google_cloud_pipeline_components.

Vertex AI Pipelines links a run to the Vertex resource named in such an artifact's ``resourceName`` metadata
(lineage: this run produced that model version, deployed to that endpoint). The schema titles and version
match google_cloud_pipeline_components' types, so its components accept these outputs as inputs. Under the
local backend the artifacts name the local registry's model version and endpoint the same way.
"""

from kfp import dsl

SCHEMA_VERSION = "0.0.1"


class VertexModel(dsl.Artifact):
    """A Vertex AI model version: ``metadata["resourceName"]`` = ``projects/.../models/ID@VERSION``."""

    schema_title = "google.VertexModel"
    schema_version = SCHEMA_VERSION


class VertexEndpoint(dsl.Artifact):
    """A Vertex AI endpoint: ``metadata["resourceName"]`` = ``projects/.../endpoints/ID``."""

    schema_title = "google.VertexEndpoint"
    schema_version = SCHEMA_VERSION


def name_resource(artifact: dsl.Artifact, resource_name: str, url: str | None) -> None:
    """Point ``artifact`` at ``resource_name`` as google_cloud_pipeline_components does: ``resourceName`` in its
    metadata and the resource's REST URL as its URI (when it has one; locally the runner's URI stays)."""
    if url:
        artifact.uri = url
    artifact.metadata["resourceName"] = resource_name
