# The trigger function: cloud_functions/trigger/ deployed as is. The zip is named by its content hash, so a
# plan only redeploys the function when a file in that directory changed.

locals {
  pipeline_name = "ctloop-training" # pipelineInfo.name of the compiled training pipeline
  config_uri    = "gs://${google_storage_bucket.staging.name}/config/ctloop.yaml"
  template_uri  = "${local.kfp_repo_url}/${local.pipeline_name}/${var.template_tag}"
}

# The deployable source is cloud_functions/trigger plus the ctloop modules it imports, assembled by
# `make trigger-bundle` (cloudbuild/bundle_trigger.py): run it before `terraform plan/apply`.
data "archive_file" "trigger_source" {
  type             = "zip"
  source_dir       = "${path.module}/../build/trigger-function"
  output_path      = "${path.module}/.build/trigger-source.zip"
  output_file_mode = "0644" # the same bytes (and hash) on every machine, whatever its umask
  excludes         = ["**/__pycache__/**", "**/*.pyc", ".pytest_cache/**"]
}

resource "google_storage_bucket_object" "trigger_source" {
  name         = "functions/trigger/${data.archive_file.trigger_source.output_md5}.zip"
  bucket       = google_storage_bucket.staging.name
  source       = data.archive_file.trigger_source.output_path
  content_type = "application/zip"
}

resource "google_cloudfunctions2_function" "trigger" {
  name        = "${var.name_prefix}-trigger"
  project     = var.project_id
  location    = var.region
  description = "Launches the ctloop pipelines for new landing data and schedule ticks (${var.env})."
  labels      = merge(local.labels, { component = "trigger" })

  build_config {
    runtime     = "python311"
    entry_point = "on_object_finalized"
    # Its own build identity: newer projects' default build account often lacks the builder role.
    service_account = google_service_account.function_build.id
    source {
      storage_source {
        bucket = google_storage_bucket.staging.name
        object = google_storage_bucket_object.trigger_source.name
      }
    }
  }

  service_config {
    min_instance_count    = 0
    max_instance_count    = 3
    available_memory      = "512Mi"
    timeout_seconds       = 300
    service_account_email = google_service_account.trigger.email
    # Pub/Sub push and Eventarc count as internal traffic: nothing outside the project reaches the function.
    ingress_settings               = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision = true
    environment_variables = merge({
      CTLOOP_TRIGGER_BACKEND = "cloud"
      CTLOOP_TRIGGER_BUCKET  = google_storage_bucket.landing.name
      CTLOOP_TRIGGER_PREFIX  = local.landing_prefix
      # A batch of several files starts one run, when its marker lands, not one run per file.
      CTLOOP_TRIGGER_MARKERS  = join(",", var.batch_markers)
      CTLOOP_TRIGGER_TEMPLATE = local.template_uri
      CTLOOP_TRIGGER_CONFIG   = local.config_uri
      # New batches follow monitoring.retrain_policy of the settings file; ticks launch the monitoring pipeline.
      CTLOOP_TRIGGER_POLICY           = "config"
      CTLOOP_TRIGGER_MONITOR_TEMPLATE = local.monitoring_template_uri
      # Scoring ticks and batches landing under the score prefix launch the scoring pipeline (scoring.tf).
      CTLOOP_TRIGGER_SCORE_TEMPLATE = local.scoring_template_uri
      CTLOOP_TRIGGER_SCORE_PREFIX   = local.scoring_prefix
    }, var.function_env)
  }

  # Eventarc delivery: the function's own trigger on the notification topic, retried on failure.
  dynamic "event_trigger" {
    for_each = var.trigger_delivery == "eventarc" ? [1] : []
    content {
      trigger_region        = var.region
      event_type            = "google.cloud.pubsub.topic.v1.messagePublished"
      pubsub_topic          = google_pubsub_topic.landing_events.id
      retry_policy          = "RETRY_POLICY_RETRY"
      service_account_email = google_service_account.trigger_invoker.email
    }
  }

  depends_on = [google_project_service.required]
}
