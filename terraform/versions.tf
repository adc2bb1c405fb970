terraform {
  required_version = ">= 1.5"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0"
    }
    archive = {
      source = "hashicorp/archive"
      # 2.4 added glob patterns to archive_file's excludes.
      version = "~> 2.4"
    }
  }

  # Partial configuration: the bucket and prefix come from envs/<env>.gcs.tfbackend at init time, so one
  # configuration serves every environment with its own state (docs/terraform.md).
  backend "gcs" {}
}
