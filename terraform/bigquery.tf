# The source table of the extract step: an external table over the landing files, so new data is queryable
# the moment it lands (no load jobs). Its schema is declared (landing_schema.json, generated from the settings'
# column roles by cloudbuild/landing_schema.py), never autodetected: the landing bucket is created empty in the
# same apply, and BigQuery rejects autodetection over a URI that matches no file. A new column joins the
# table by adding it to the settings, regenerating the file and applying again (an in-place update).

resource "google_bigquery_dataset" "ctloop" {
  #checkov:skip=CKV_GCP_81:The dataset holds only external table definitions; data-at-rest is the landing bucket.
  project                    = var.project_id
  dataset_id                 = var.bq_dataset
  location                   = var.region
  description                = "ctloop source data (${var.env})."
  delete_contents_on_destroy = var.force_destroy
  labels                     = merge(local.labels, { component = "data" })

  depends_on = [google_project_service.required]
}

resource "google_bigquery_table" "events" {
  #checkov:skip=CKV_GCP_80:External table: BigQuery stores no data for it, so there is nothing for a CMEK to encrypt.
  #checkov:skip=CKV_GCP_121:External table: deleting the definition loses no data; protection follows var.force_destroy.
  project             = var.project_id
  dataset_id          = google_bigquery_dataset.ctloop.dataset_id
  table_id            = var.bq_table
  description         = "Parquet files under gs://${google_storage_bucket.landing.name}/${local.landing_prefix}"
  deletion_protection = !var.force_destroy
  labels              = merge(local.labels, { component = "data" })

  external_data_configuration {
    autodetect    = false
    schema        = file("${path.module}/landing_schema.json")
    source_format = "PARQUET"
    # Only the data files: markers or temp files next to them must not break the table.
    source_uris = ["gs://${google_storage_bucket.landing.name}/${local.landing_prefix}*.parquet"]

    dynamic "hive_partitioning_options" {
      for_each = var.hive_partition_keys != "" ? [1] : []
      content {
        mode                     = "CUSTOM"
        source_uri_prefix        = "gs://${google_storage_bucket.landing.name}/${local.landing_prefix}${var.hive_partition_keys}"
        require_partition_filter = false
      }
    }
  }
}
