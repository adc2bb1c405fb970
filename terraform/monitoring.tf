# The scheduled drift check. Cloud Scheduler publishes a tick (attribute ctloopSchedule=monitoring) to the landing
# events topic; the trigger function, which already receives that topic with retries and dead-lettering, launches
# the monitoring pipeline for it with the settings file it reads at launch time (docs/monitoring.md). The
# function also follows monitoring.retrain_policy of those settings for new batches (CTLOOP_TRIGGER_POLICY=config).

variable "monitoring_schedule" {
  description = "Cron (UTC) of the scheduled drift check; empty = monitoring.schedule of ../ctloop.yaml."
  type        = string
  default     = ""
}

variable "monitoring_paused" {
  description = "Keep the scheduled drift check paused (the job exists, no ticks are published)."
  type        = bool
  default     = false
}

locals {
  monitoring_pipeline_name = "ctloop-monitoring" # pipelineInfo.name of the compiled monitoring pipeline
  monitoring_template_uri  = "${local.kfp_repo_url}/${local.monitoring_pipeline_name}/${var.template_tag}"
  monitoring_schedule = (
    var.monitoring_schedule != "" ? var.monitoring_schedule :
    try(yamldecode(file("${path.module}/../ctloop.yaml")).monitoring.schedule, "0 6 * * *")
  )
  scheduler_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-cloudscheduler.iam.gserviceaccount.com"
}

resource "google_project_service" "scheduler" {
  project            = var.project_id
  service            = "cloudscheduler.googleapis.com"
  disable_on_destroy = false
}

# Cloud Scheduler publishes as its service agent.
resource "google_pubsub_topic_iam_member" "scheduler_publishes_ticks" {
  project = var.project_id
  topic   = google_pubsub_topic.landing_events.name
  role    = "roles/pubsub.publisher"
  member  = local.scheduler_agent

  depends_on = [google_project_service.scheduler]
}

resource "google_cloud_scheduler_job" "monitoring" {
  name        = "${local.prefix}-monitoring"
  project     = var.project_id
  region      = var.region
  description = "Launches the ctloop monitoring pipeline (drift check, retrain on drift) (${var.env})."
  schedule    = local.monitoring_schedule
  time_zone   = "Etc/UTC"
  paused      = var.monitoring_paused

  pubsub_target {
    topic_name = google_pubsub_topic.landing_events.id
    # The trigger function tells ticks from storage notifications by this attribute (ctloop_trigger/schedule.py).
    attributes = {
      ctloopSchedule = "monitoring"
    }
    data = base64encode(jsonencode({ schedule = "monitoring" }))
  }

  retry_config {
    retry_count          = 3
    min_backoff_duration = "30s"
  }

  depends_on = [google_pubsub_topic_iam_member.scheduler_publishes_ticks]
}

output "monitoring_schedule" {
  description = "Cron (UTC) of the scheduled drift check and the job that publishes its ticks."
  value       = "${google_cloud_scheduler_job.monitoring.id} (${local.monitoring_schedule})"
}
