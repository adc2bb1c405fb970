provider "google" {
  project = var.project_id
  region  = var.region
}

data "google_project" "this" {
  project_id = var.project_id
}

locals {
  # Every labelable resource gets these plus its own `component`.
  labels = {
    app = "ctloop"
    env = var.env
  }

  prefix = "${var.name_prefix}-${var.env}"

  # The landing layout ctloop reads (docs/architecture.md): gs://<landing>/<dataset>/<table>/...
  landing_prefix = "${var.bq_dataset}/${var.bq_table}/"

  pubsub_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
  # Vertex AI's service agent: syncs the Feature Store view from its BigQuery table (terraform/feature_store.tf).
  vertex_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-aiplatform.iam.gserviceaccount.com"

  docker_repo_url = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.docker.repository_id}"
  kfp_repo_url    = "https://${var.region}-kfp.pkg.dev/${var.project_id}/${google_artifact_registry_repository.kfp.repository_id}"
}
