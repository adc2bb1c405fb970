variable "project_id" {
  description = "GCP project of this environment."
  type        = string
}

variable "region" {
  description = "Region of every regional resource (buckets, function, repositories, dataset, Vertex AI)."
  type        = string
  default     = "europe-west4"
}

variable "env" {
  description = "Environment name; goes into labels and resource names."
  type        = string
  validation {
    condition     = contains(["dev", "prod"], var.env)
    error_message = "env must be \"dev\" or \"prod\"."
  }
}

variable "name_prefix" {
  description = "Prefix of every resource name (buckets add the project id, being globally unique)."
  type        = string
  default     = "ctloop"
}

variable "bq_dataset" {
  description = "BigQuery dataset (ctloop.yaml data.bq_dataset)."
  type        = string
  default     = "ctloop"
}

variable "bq_table" {
  description = "External table over the landing data (ctloop.yaml data.bq_table)."
  type        = string
  default     = "events"
}

variable "hive_partition_keys" {
  description = <<-EOT
    Folder keys under the landing table prefix exposed as partition columns, in BigQuery's custom layout
    syntax, e.g. "{batch:STRING}" for .../batch=2024-06/part-0.parquet. Empty = no partition columns.
    Declared rather than inferred: inference reads files, and the bucket is empty when the table is created.
  EOT
  type        = string
  default     = ""
}

variable "trigger_delivery" {
  description = <<-EOT
    How landing notifications reach the trigger function:
    "push"     - a Pub/Sub push subscription managed here, with retry backoff, max delivery attempts and a
                 dead-letter topic (default);
    "eventarc" - the function's own event trigger with RETRY_POLICY_RETRY; Eventarc owns that subscription,
                 so there is no dead-letter topic on it (undeliverable events are retried until they expire).
  EOT
  type        = string
  default     = "push"
  validation {
    condition     = contains(["push", "eventarc"], var.trigger_delivery)
    error_message = "trigger_delivery must be \"push\" or \"eventarc\"."
  }
}

variable "max_delivery_attempts" {
  description = "Deliveries of one notification before it goes to the dead-letter topic (push delivery)."
  type        = number
  default     = 5
  validation {
    condition     = var.max_delivery_attempts >= 5 && var.max_delivery_attempts <= 100
    error_message = "Pub/Sub accepts 5 to 100 delivery attempts."
  }
}

variable "staging_temp_days" {
  description = "Days before temporary objects in the staging bucket (tmp/, google-cloud-dataproc-metainfo/) are deleted."
  type        = number
  default     = 7
}

variable "noncurrent_version_days" {
  description = "Days an overwritten or deleted object version is kept in versioned buckets."
  type        = number
  default     = 30
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete non-empty buckets and the dataset (never in prod)."
  type        = bool
  default     = false
}

variable "function_env" {
  description = "Extra CTLOOP_TRIGGER_* settings of the trigger function (cloud_functions/trigger/ctloop_trigger/settings.py)."
  type        = map(string)
  default     = {}
}

variable "template_tag" {
  description = "Artifact Registry tag of the pipeline template the function launches (the release moves it)."
  type        = string
  default     = "latest"
}

variable "github_owner" {
  description = "GitHub owner of the repository the Cloud Build triggers watch (Cloud Build GitHub app installed)."
  type        = string
}

variable "github_repo" {
  description = "GitHub repository name."
  type        = string
}

variable "release_branch" {
  description = "Branch regex whose pushes run the release build (empty: release on tags only)."
  type        = string
  default     = "^main$"
}

variable "release_tag" {
  description = "Tag regex whose pushes run the release build (used when release_branch is empty)."
  type        = string
  default     = "^v[0-9]+\\.[0-9]+\\.[0-9]+$"
}

variable "pr_checks" {
  description = "Create the PR-checks trigger (push to any branch other than main). Usually dev only."
  type        = bool
  default     = true
}

variable "smoke_submit" {
  description = "Release builds submit one training run of the new template (grants the build SA Vertex AI access)."
  type        = bool
  default     = false
}

variable "dataproc_subnet_cidr" {
  description = "Address range of the Dataproc Serverless subnetwork (network.tf); Dataproc needs room for every executor."
  type        = string
  default     = "10.20.0.0/20"
}

variable "batch_markers" {
  description = <<-EOT
    Base names of the files that close a landing batch (CTLOOP_TRIGGER_MARKERS of the trigger function).
    Upload a batch's data files first, then its marker: one training run starts for the marker's folder.
    Empty = every data file starts its own run.
  EOT
  type        = list(string)
  default     = ["_SUCCESS"]
}
