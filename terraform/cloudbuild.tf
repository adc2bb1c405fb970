# PR checks on pushes to any branch but main; the release build on main (dev) or release tags (prod).
# Substitutions hand the build this environment's resource names (cloudbuild.yaml declares them all).

locals {
  release_substitutions = {
    _ENV                  = var.env
    _REGION               = var.region
    _DOCKER_REPO          = google_artifact_registry_repository.docker.repository_id
    _KFP_REPO             = google_artifact_registry_repository.kfp.repository_id
    _LANDING_BUCKET       = google_storage_bucket.landing.name
    _PIPELINE_ROOT_BUCKET = google_storage_bucket.pipeline_root.name
    _STAGING_BUCKET       = google_storage_bucket.staging.name
    _BQ_DATASET           = google_bigquery_dataset.ctloop.dataset_id
    _BQ_TABLE             = google_bigquery_table.events.table_id
    _PIPELINE_SA          = google_service_account.pipeline.email
    _SERVING_SA           = google_service_account.serving.email
    _FUNCTION_NAME        = google_cloudfunctions2_function.trigger.name
    _FUNCTION_SA          = google_service_account.trigger.email
    _INVOKER_SA           = google_service_account.trigger_invoker.email
    _FUNCTION_BUILD_SA    = google_service_account.function_build.email
    _DATAPROC_SUBNETWORK  = google_compute_subnetwork.dataproc.id
    _TRIGGER_TOPIC        = google_pubsub_topic.landing_events.name
    _TRIGGER_DELIVERY     = var.trigger_delivery
    _DEPLOY_FUNCTION      = "true"
    _SMOKE_SUBMIT         = var.smoke_submit ? "true" : "false"
  }
}

resource "google_cloudbuild_trigger" "pr_checks" {
  count = var.pr_checks ? 1 : 0

  project         = var.project_id
  location        = "global"
  name            = "${local.prefix}-pr-checks"
  description     = "ctloop PR checks: lint, tests, compile, image builds (no push)."
  filename        = "cloudbuild/pr.yaml"
  service_account = google_service_account.build.id
  tags            = ["ctloop", var.env, "pr-checks"]

  github {
    owner = var.github_owner
    name  = var.github_repo
    push {
      branch       = "^main$"
      invert_regex = true
    }
  }

  substitutions = {
    _REGION      = var.region
    _DOCKER_REPO = google_artifact_registry_repository.docker.repository_id
  }

  depends_on = [google_project_service.required]
}

resource "google_cloudbuild_trigger" "release" {
  project         = var.project_id
  location        = "global"
  name            = "${local.prefix}-release"
  description     = "ctloop release: tests, images, template, settings, trigger function."
  filename        = "cloudbuild.yaml"
  service_account = google_service_account.build.id
  tags            = ["ctloop", var.env, "release"]

  github {
    owner = var.github_owner
    name  = var.github_repo
    push {
      branch = var.release_branch != "" ? var.release_branch : null
      tag    = var.release_branch == "" ? var.release_tag : null
    }
  }

  substitutions = local.release_substitutions

  depends_on = [google_project_service.required]
}
