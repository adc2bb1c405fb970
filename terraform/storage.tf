# Cloud Storage Data Access audit logs (off by default): every read and write of the buckets below is logged,
# which is what their CKV_GCP_62 skips (no legacy usage-log bucket) rely on. The config is per project and
# service, so it covers every bucket of the project (Cloud Logging bills the volume).
resource "google_project_iam_audit_config" "storage" {
  project = var.project_id
  service = "storage.googleapis.com"

  audit_log_config {
    log_type = "DATA_READ"
  }
  audit_log_config {
    log_type = "DATA_WRITE"
  }
}

# Three buckets, one job each: landing (new data; notifications), pipeline root (KFP artifacts: datasets,
# models, metrics), staging (Dataproc job files and temp data, the function source, the rendered settings).

resource "google_storage_bucket" "landing" {
  #checkov:skip=CKV_GCP_62:Reads and writes are audited by Data Access audit logs (google_project_iam_audit_config.storage), not usage-log buckets.
  name                        = "${var.project_id}-landing"
  project                     = var.project_id
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy
  labels                      = merge(local.labels, { component = "landing" })

  # A re-uploaded file must not silently replace the data an earlier run trained on.
  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  depends_on = [google_project_service.required]
}

resource "google_storage_bucket" "pipeline_root" {
  #checkov:skip=CKV_GCP_62:Reads and writes are audited by Data Access audit logs (google_project_iam_audit_config.storage), not usage-log buckets.
  name                        = "${var.project_id}-pipeline-root"
  project                     = var.project_id
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy
  labels                      = merge(local.labels, { component = "pipelines" })

  # Registered models point at artifacts here: keep overwritten versions for a while.
  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.required]
}

resource "google_storage_bucket" "staging" {
  #checkov:skip=CKV_GCP_62:Reads and writes are audited by Data Access audit logs (google_project_iam_audit_config.storage), not usage-log buckets.
  name                        = "${var.project_id}-staging"
  project                     = var.project_id
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy
  labels                      = merge(local.labels, { component = "staging" })

  # config/ctloop.yaml is overwritten by every release: keep the previous ones for rollback.
  versioning {
    enabled = true
  }

  # Temporary output: what Dataproc stages per batch (its metainfo prefix) and any tmp/ scratch space.
  lifecycle_rule {
    condition {
      age            = var.staging_temp_days
      matches_prefix = ["tmp/", "google-cloud-dataproc-metainfo/"]
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.required]
}
