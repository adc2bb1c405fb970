terraform {
  required_version = ">= 1.5"

  required_providers {
    google = {
      source = "hashicorp/google"
      # The version tests/test_terraform_schema.py checks every block against (terraform/schema/google.json).
      version = "~> 6.50.0"
    }
    archive = {
      source = "hashicorp/archive"
      # Checked against terraform/schema/archive.json; 2.4 added glob patterns to archive_file's excludes.
      version = "~> 2.7.1"
    }
  }

  # Partial configuration: the bucket and prefix come from envs/<env>.gcs.tfbackend at init time, so one
  # configuration serves every environment with its own state (docs/terraform.md).
  backend "gcs" {}
}
