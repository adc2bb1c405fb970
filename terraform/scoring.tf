# Scheduled and triggered batch scoring. Cloud Scheduler publishes a tick (attribute ctloopSchedule=scoring) to the
# landing events topic on scoring.schedule; the trigger function launches the scoring pipeline for it, one run per
# tick (the tick's message id keys the job). A batch landing under scoring.landing_prefix of the landing bucket
# ("score this") notifies the same topic; the function launches one scoring run over that batch folder when its
# marker lands. Both launches go through ctloop.launching, like training's (docs/trigger.md).

variable "scoring_schedule" {
  description = "Cron (UTC) of the scheduled scoring run; empty = scoring.schedule of ../ctloop.yaml."
  type        = string
  default     = ""
}

variable "scoring_paused" {
  description = "Keep the scheduled scoring run paused (the job exists, no ticks are published)."
  type        = bool
  default     = false
}

variable "scoring_landing_prefix" {
  description = <<-EOT
    Prefix of the landing bucket under which a landed batch is scored ("score this"); empty = the
    scoring.landing_prefix of ../ctloop.yaml; "-" = off (no notification, the function scores nothing that lands).
  EOT
  type        = string
  default     = ""
}

locals {
  scoring_pipeline_name = "ctloop-scoring" # pipelineInfo.name of the compiled scoring pipeline
  scoring_template_uri  = "${local.kfp_repo_url}/${local.scoring_pipeline_name}/${var.template_tag}"
  scoring_schedule = (
    var.scoring_schedule != "" ? var.scoring_schedule :
    try(yamldecode(file("${path.module}/../ctloop.yaml")).scoring.schedule, "0 7 * * *")
  )
  scoring_prefix = (
    var.scoring_landing_prefix == "-" ? "" :
    var.scoring_landing_prefix != "" ? var.scoring_landing_prefix :
    try(yamldecode(file("${path.module}/../ctloop.yaml")).scoring.landing_prefix, "")
  )
}

resource "google_cloud_scheduler_job" "scoring" {
  name        = "${local.prefix}-scoring"
  project     = var.project_id
  region      = var.region
  description = "Launches the ctloop scoring pipeline (the champion scores every entity) (${var.env})."
  schedule    = local.scoring_schedule
  time_zone   = "Etc/UTC"
  paused      = var.scoring_paused

  pubsub_target {
    topic_name = google_pubsub_topic.landing_events.id
    # The trigger function tells ticks from storage notifications, and the pipeline to launch, by this attribute.
    attributes = {
      ctloopSchedule = "scoring"
    }
    data = base64encode(jsonencode({ schedule = "scoring" }))
  }

  retry_config {
    retry_count          = 3
    min_backoff_duration = "30s"
  }

  # Cloud Scheduler's agent publishes to the topic under monitoring.tf's grant.
  depends_on = [google_pubsub_topic_iam_member.scheduler_publishes_ticks]
}

# "Score this": the landing bucket's notifications for the scoring prefix, to the topic the function receives.
resource "google_storage_notification" "scoring" {
  count              = local.scoring_prefix != "" ? 1 : 0
  bucket             = google_storage_bucket.landing.name
  topic              = google_pubsub_topic.landing_events.id
  payload_format     = "JSON_API_V1"
  event_types        = ["OBJECT_FINALIZE"]
  object_name_prefix = local.scoring_prefix

  depends_on = [google_pubsub_topic_iam_member.gcs_publishes_landing_events]
}

# The scoring batch runs in gcp.scoring_image (components/spark/Dockerfile), a custom container Dataproc
# Serverless pulls from this repository for the batch, which runs as the pipeline SA.
resource "google_artifact_registry_repository_iam_member" "pipeline_pulls_scoring_image" {
  project    = var.project_id
  location   = google_artifact_registry_repository.docker.location
  repository = google_artifact_registry_repository.docker.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.pipeline.email}"
}

output "scoring_schedule" {
  description = "Cron (UTC) of the scheduled scoring run and the job that publishes its ticks."
  value       = "${google_cloud_scheduler_job.scoring.id} (${local.scoring_schedule})"
}

output "scoring_landing_prefix" {
  description = "Where a landed batch is scored as it lands (\"score this\"); empty = off."
  value       = local.scoring_prefix != "" ? "gs://${google_storage_bucket.landing.name}/${local.scoring_prefix}" : ""
}
