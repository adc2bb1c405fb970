# Online features: each entity's latest history state, written by the pipeline's materialize_features step
# into a BigQuery table and served by a Vertex AI Feature Store view over it (ctloop/online_store_vertex.py).
# The names match the settings' online_features section (ctloop/config.py). The view has no sync schedule:
# the step syncs it after each write and waits for the sync.

locals {
  online_store_name  = "ctloop"
  history_table_name = "entity_history"
}

resource "google_bigquery_table" "entity_history" {
  #checkov:skip=CKV_GCP_80:Derived data, rebuilt from the splits by every training run; Google-managed encryption.
  #checkov:skip=CKV_GCP_121:Derived data: the next training run rewrites it whole; protection follows var.force_destroy.
  project             = var.project_id
  dataset_id          = google_bigquery_dataset.ctloop.dataset_id
  table_id            = local.history_table_name
  description         = "Each entity's latest history state (JSON), written whole by every training run."
  deletion_protection = !var.force_destroy
  labels              = merge(local.labels, { component = "online-features" })

  schema = jsonencode([
    { name = "entity_id", type = "STRING", mode = "REQUIRED" },
    { name = "state", type = "STRING", mode = "REQUIRED" },
    { name = "as_of", type = "STRING", mode = "REQUIRED" },
    { name = "feature_timestamp", type = "TIMESTAMP", mode = "REQUIRED" },
  ])
}

resource "google_vertex_ai_feature_online_store" "ctloop" {
  project       = var.project_id
  region        = var.region
  name          = local.online_store_name
  labels        = merge(local.labels, { component = "online-features" })
  force_destroy = var.force_destroy

  # Bigtable serving: the regional API endpoint, no dedicated endpoint or private networking to manage.
  bigtable {
    auto_scaling {
      min_node_count         = 1
      max_node_count         = 3
      cpu_utilization_target = 70
    }
  }

  depends_on = [google_project_service.required]
}

resource "google_vertex_ai_feature_online_store_featureview" "entity_history" {
  project              = var.project_id
  region               = var.region
  name                 = local.history_table_name
  feature_online_store = google_vertex_ai_feature_online_store.ctloop.name
  labels               = merge(local.labels, { component = "online-features" })

  big_query_source {
    uri               = "bq://${google_bigquery_table.entity_history.project}.${google_bigquery_table.entity_history.dataset_id}.${google_bigquery_table.entity_history.table_id}"
    entity_id_columns = ["entity_id"]
  }
}

# The view's syncs read the table as Vertex AI's service agent (the view's default service agent type).
resource "google_bigquery_dataset_iam_member" "vertex_agent_reads_dataset" {
  project    = var.project_id
  dataset_id = google_bigquery_dataset.ctloop.dataset_id
  role       = "roles/bigquery.dataViewer"
  member     = local.vertex_agent
}
