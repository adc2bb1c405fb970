# One service account per actor, each granted only what its job needs, on the narrowest resource that works.

resource "google_service_account" "pipeline" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-pipeline"
  display_name = "ctloop training pipeline (${var.env})"
  description  = "Runs the Vertex AI pipeline steps and their Dataproc Serverless batches."
}

resource "google_service_account" "trigger" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-trigger"
  display_name = "ctloop trigger function (${var.env})"
  description  = "Runtime identity of the trigger function: submits pipeline jobs as the pipeline SA."
}

resource "google_service_account" "trigger_invoker" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-trigger-invoker"
  display_name = "ctloop trigger invoker (${var.env})"
  description  = "Identity Pub/Sub (or Eventarc) presents when delivering notifications to the function."
}

resource "google_service_account" "build" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-build"
  display_name = "ctloop Cloud Build (${var.env})"
  description  = "Runs the PR-check and release builds: pushes images and templates, deploys the function."
}

resource "google_service_account" "function_build" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-function-build"
  display_name = "ctloop trigger function build (${var.env})"
  description  = "Builds the trigger function's container from its source (the function's build_config)."
}

resource "google_service_account" "serving" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-serving"
  display_name = "ctloop serving (${var.env})"
  description  = "The serving containers on the Vertex AI endpoints: reads the model files, writes the prediction log."
}

# --- pipeline SA -------------------------------------------------------------------------------------------

resource "google_project_iam_member" "pipeline" {
  for_each = toset([
    "roles/aiplatform.user",           # pipeline tasks, Model Registry, endpoints
    "roles/bigquery.jobUser",          # run the extract query
    "roles/dataproc.serverlessEditor", # the transform creates and polls its Dataproc Serverless batch
    "roles/dataproc.worker",           # Dataproc Serverless batch workers run as this SA
  ])

  project = var.project_id
  role    = each.value
  member  = "serviceAccount:${google_service_account.pipeline.email}"
}

# Data Editor on the one dataset: extract reads the landing table; scoring creates and rewrites its scores table.
resource "google_bigquery_dataset_iam_member" "pipeline_edits_dataset" {
  project    = var.project_id
  dataset_id = google_bigquery_dataset.ctloop.dataset_id
  role       = "roles/bigquery.dataEditor"
  member     = "serviceAccount:${google_service_account.pipeline.email}"
}

# Object User: read, write, overwrite and delete objects; unlike Object Admin, no object ACL/IAM changes.
resource "google_storage_bucket_iam_member" "pipeline_owns_objects" {
  for_each = {
    pipeline_root = google_storage_bucket.pipeline_root.name
    staging       = google_storage_bucket.staging.name
  }

  bucket = each.value
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.pipeline.email}"
}

# The external table reads the landing files with the querying identity's permissions; nothing writes there.
resource "google_storage_bucket_iam_member" "pipeline_reads_landing" {
  bucket = google_storage_bucket.landing.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.pipeline.email}"
}

# The monitoring pipeline launches retraining from the training template (components/launch.py).
resource "google_artifact_registry_repository_iam_member" "pipeline_reads_templates" {
  project    = var.project_id
  location   = google_artifact_registry_repository.kfp.location
  repository = google_artifact_registry_repository.kfp.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.pipeline.email}"
}

# The transform step submits its Dataproc batch to run as the pipeline SA itself.
resource "google_service_account_iam_member" "pipeline_acts_as_itself" {
  service_account_id = google_service_account.pipeline.name
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${google_service_account.pipeline.email}"
}

# The deploy step names the serving SA on each deployed model (gcp.serving_service_account).
resource "google_service_account_iam_member" "pipeline_acts_as_serving" {
  service_account_id = google_service_account.serving.name
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${google_service_account.pipeline.email}"
}

# --- trigger function SA -----------------------------------------------------------------------------------

resource "google_project_iam_member" "trigger_submits_pipelines" {
  project = var.project_id
  role    = "roles/aiplatform.user"
  member  = "serviceAccount:${google_service_account.trigger.email}"
}

# Pipeline jobs run as the pipeline SA: the function may act as that one account only.
resource "google_service_account_iam_member" "trigger_acts_as_pipeline" {
  service_account_id = google_service_account.pipeline.name
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${google_service_account.trigger.email}"
}

resource "google_artifact_registry_repository_iam_member" "trigger_reads_templates" {
  project    = var.project_id
  location   = google_artifact_registry_repository.kfp.location
  repository = google_artifact_registry_repository.kfp.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.trigger.email}"
}

# Only the rendered settings (config/ctloop.yaml), not the rest of the staging bucket.
resource "google_storage_bucket_iam_member" "trigger_reads_config" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.trigger.email}"

  condition {
    title       = "ctloop-config-only"
    description = "Objects under config/ only."
    expression  = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.staging.name}/objects/config/\")"
  }
}

# --- invoker SA (Pub/Sub push or Eventarc -> function) ------------------------------------------------------

resource "google_cloud_run_service_iam_member" "invoker_runs_trigger" {
  project  = var.project_id
  location = google_cloudfunctions2_function.trigger.location
  # A 2nd gen function runs as the Cloud Run service of the same name.
  service = google_cloudfunctions2_function.trigger.name
  role    = "roles/run.servicesInvoker"
  member  = "serviceAccount:${google_service_account.trigger_invoker.email}"
}

# Pub/Sub mints the push request's OIDC token for the invoker SA.
resource "google_service_account_iam_member" "pubsub_signs_as_invoker" {
  service_account_id = google_service_account.trigger_invoker.name
  role               = "roles/iam.serviceAccountOpenIdTokenCreator"
  member             = local.pubsub_agent
}

# --- Cloud Build SA ----------------------------------------------------------------------------------------

resource "google_project_iam_member" "build" {
  for_each = toset(concat(
    [
      "roles/logging.logWriter",        # build logs (CLOUD_LOGGING_ONLY)
      "roles/cloudfunctions.developer", # redeploy the trigger function (operations are project-scoped)
    ],
    var.smoke_submit ? ["roles/aiplatform.user"] : [],
  ))

  project = var.project_id
  role    = each.value
  member  = "serviceAccount:${google_service_account.build.email}"
}

resource "google_artifact_registry_repository_iam_member" "build_pushes" {
  for_each = {
    docker = google_artifact_registry_repository.docker.name
    kfp    = google_artifact_registry_repository.kfp.name
  }

  project    = var.project_id
  location   = var.region
  repository = each.value
  role       = "roles/artifactregistry.writer"
  member     = "serviceAccount:${google_service_account.build.email}"
}

# Publishes config/ctloop.yaml (overwrites it) on release.
resource "google_storage_bucket_iam_member" "build_publishes_config" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.build.email}"
}

# Deploying the function as its runtime SA (and, with Eventarc delivery, naming the invoker SA) needs actAs on
# exactly those accounts; a smoke submit additionally runs a pipeline job as the pipeline SA.
resource "google_service_account_iam_member" "build_acts_as" {
  # A filtered for expression rather than a conditional: both branches of `?:` must share one object type.
  for_each = {
    for key, account in {
      trigger  = google_service_account.trigger.name
      invoker  = google_service_account.trigger_invoker.name
      pipeline = google_service_account.pipeline.name
    } : key => account if key != "pipeline" || var.smoke_submit
  }

  service_account_id = each.value
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${google_service_account.build.email}"
}

# --- function build SA ---------------------------------------------------------------------------------------

# Cloud Run Builder: read the function source, push the built image, write build logs; the role Google names for
# a function's build account (https://cloud.google.com/run/docs/configuring/services/build-service-account),
# a subset of roles/cloudbuild.builds.builder.
resource "google_project_iam_member" "function_build" {
  project = var.project_id
  role    = "roles/run.builder"
  member  = "serviceAccount:${google_service_account.function_build.email}"
}

# Whoever deploys the function names its build account: Terraform's caller and the release build.
resource "google_service_account_iam_member" "build_acts_as_function_build" {
  service_account_id = google_service_account.function_build.name
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${google_service_account.build.email}"
}

# --- serving SA ----------------------------------------------------------------------------------------------

# The registered model files (models/ of the staging bucket, gcp.model_bucket's default), read-only. Vertex
# collects the container's stdout/stderr itself, and the server writes no metrics: no logging or monitoring role.
resource "google_storage_bucket_iam_member" "serving_reads_models" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.serving.email}"

  condition {
    title       = "ctloop-models-only"
    description = "Objects under models/ only."
    expression  = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.staging.name}/objects/models/\")"
  }
}

# The prediction log (monitoring.sample_rate > 0): new objects only, each flush a new name (create-only writes).
resource "google_storage_bucket_iam_member" "serving_writes_prediction_log" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectCreator"
  member = "serviceAccount:${google_service_account.serving.email}"

  condition {
    title       = "ctloop-prediction-log-only"
    description = "Objects under prediction_log/ only."
    expression  = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.staging.name}/objects/prediction_log/\")"
  }
}

# Online features: the server reads each entity's history state from the Feature Store view (fetchFeatureValues).
# Feature Store Data Viewer is the smallest predefined role that holds that permission.
resource "google_project_iam_member" "serving_reads_online_features" {
  project = var.project_id
  role    = "roles/aiplatform.featurestoreDataViewer"
  member  = "serviceAccount:${google_service_account.serving.email}"
}
