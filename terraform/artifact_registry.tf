# Images (component, serving, kaniko's layer cache) and compiled pipeline templates.

resource "google_artifact_registry_repository" "docker" {
  #checkov:skip=CKV_GCP_84:Images hold code and open-source dependencies only; Google-managed encryption is sufficient.
  project       = var.project_id
  location      = var.region
  repository_id = var.name_prefix
  format        = "DOCKER"
  description   = "ctloop component and serving images (${var.env})."
  labels        = merge(local.labels, { component = "images" })

  cleanup_policy_dry_run = false

  # kaniko's layer cache is rebuilt on demand: drop layers nobody used for two weeks.
  cleanup_policies {
    id     = "expire-build-cache"
    action = "DELETE"
    condition {
      tag_state             = "ANY"
      package_name_prefixes = ["cache"]
      older_than            = "1209600s"
    }
  }

  cleanup_policies {
    id     = "expire-untagged"
    action = "DELETE"
    condition {
      tag_state  = "UNTAGGED"
      older_than = "2592000s"
    }
  }

  depends_on = [google_project_service.required]
}

resource "google_artifact_registry_repository" "kfp" {
  #checkov:skip=CKV_GCP_84:Pipeline templates are compiled code; Google-managed encryption is sufficient.
  project       = var.project_id
  location      = var.region
  repository_id = "${var.name_prefix}-pipelines"
  format        = "KFP"
  description   = "Compiled ctloop pipeline templates (${var.env})."
  labels        = merge(local.labels, { component = "pipelines" })

  depends_on = [google_project_service.required]
}
