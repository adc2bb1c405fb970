output "landing_bucket" {
  description = "ctloop.yaml gcp.landing_bucket"
  value       = google_storage_bucket.landing.name
}

output "landing_prefix" {
  description = "Where new data lands (and what the notification watches): gs://<landing_bucket>/<this>"
  value       = local.landing_prefix
}

output "pipeline_root" {
  description = "ctloop.yaml gcp.pipeline_root"
  value       = "gs://${google_storage_bucket.pipeline_root.name}/runs"
}

output "staging_bucket" {
  description = "ctloop.yaml gcp.staging_bucket"
  value       = google_storage_bucket.staging.name
}

output "bq_dataset" {
  description = "ctloop.yaml data.bq_dataset"
  value       = google_bigquery_dataset.ctloop.dataset_id
}

output "bq_table" {
  description = "ctloop.yaml data.bq_table"
  value       = google_bigquery_table.events.table_id
}

output "images_repository" {
  description = "Docker repository; ctloop.yaml gcp.component_image / gcp.serving_image / gcp.scoring_image are <this>/component:<sha>, <this>/serving:<sha> and <this>/scoring:<sha>"
  value       = local.docker_repo_url
}

output "templates_repository" {
  description = "Artifact Registry KFP host for `ctloop run --target vertex --template <this>/ctloop-training/<tag>`"
  value       = local.kfp_repo_url
}

output "pipeline_service_account" {
  description = "ctloop.yaml gcp.service_account"
  value       = google_service_account.pipeline.email
}

output "serving_service_account" {
  description = "ctloop.yaml gcp.serving_service_account"
  value       = google_service_account.serving.email
}

output "trigger_service_account" {
  description = "Runtime service account of the trigger function."
  value       = google_service_account.trigger.email
}

output "build_service_account" {
  description = "Service account of the Cloud Build triggers."
  value       = google_service_account.build.email
}

output "notification_topic" {
  description = "Topic receiving the landing bucket's OBJECT_FINALIZE notifications."
  value       = google_pubsub_topic.landing_events.id
}

output "dead_letter_subscription" {
  description = "Undeliverable notifications (push delivery), kept for inspection and replay."
  value       = google_pubsub_subscription.dead_letter.id
}

output "trigger_function" {
  description = "The trigger function's name."
  value       = google_cloudfunctions2_function.trigger.name
}

output "ctloop_config_uri" {
  description = "The settings file triggered runs use (written by each release build)."
  value       = local.config_uri
}

# Paste into a ctloop settings file to work against this environment. The image keys are left out: each
# release names its own commit-tagged images (see config/ctloop.yaml in the staging bucket).
output "ctloop_settings" {
  description = "The ctloop.yaml keys this environment defines, as YAML."
  value = yamlencode({
    backend = "cloud"
    labels  = local.labels
    gcp = {
      project         = var.project_id
      region          = var.region
      landing_bucket  = google_storage_bucket.landing.name
      pipeline_root   = "gs://${google_storage_bucket.pipeline_root.name}/runs"
      staging_bucket  = google_storage_bucket.staging.name
      service_account = google_service_account.pipeline.email
      # The serving containers run as this account (deployModel's serviceAccount).
      serving_service_account = google_service_account.serving.email
      # Dataproc Serverless batches run here (network.tf), not on the region's default subnetwork.
      dataproc_subnetwork = google_compute_subnetwork.dataproc.id
    }
    data = {
      bq_dataset = google_bigquery_dataset.ctloop.dataset_id
      bq_table   = google_bigquery_table.events.table_id
    }
  })
}

output "dataproc_subnetwork" {
  description = "Subnetwork of the Dataproc Serverless batches (gcp.dataproc_subnetwork)."
  value       = google_compute_subnetwork.dataproc.id
}

output "function_build_service_account" {
  description = "Service account that builds the trigger function's container."
  value       = google_service_account.function_build.email
}
