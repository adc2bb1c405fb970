# The network Dataproc Serverless batches run on. Their VMs have internal IPs only, so the subnetwork needs
# Private Google Access to reach Cloud Storage, BigQuery and the image registry, and Spark's driver and
# executors talk to each other on any port, so the subnetwork needs an ingress rule open to its own range. The
# network keeps its default route to the internet gateway, which the Dataproc agent and Private Google Access
# use (https://cloud.google.com/dataproc-serverless/docs/concepts/network). A dedicated network also works in
# organisations that have no `default` network. The subnetwork reaches the settings as gcp.dataproc_subnetwork
# (outputs.tf, and the release build's rendered settings).

resource "google_compute_network" "ctloop" {
  project                 = var.project_id
  name                    = "${var.name_prefix}-network"
  description             = "ctloop Dataproc Serverless workloads (${var.env})."
  auto_create_subnetworks = false
  routing_mode            = "REGIONAL"

  depends_on = [google_project_service.required]
}

resource "google_compute_subnetwork" "dataproc" {
  project                  = var.project_id
  name                     = "${var.name_prefix}-dataproc"
  description              = "Dataproc Serverless batches of the transform step (${var.env})."
  region                   = var.region
  network                  = google_compute_network.ctloop.id
  ip_cidr_range            = var.dataproc_subnet_cidr
  private_ip_google_access = true

  log_config {
    aggregation_interval = "INTERVAL_5_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# Spark's driver and executors connect to each other on arbitrary ports inside the subnetwork.
resource "google_compute_firewall" "dataproc_internal" {
  project       = var.project_id
  name          = "${var.name_prefix}-dataproc-internal"
  description   = "Dataproc Serverless: all traffic between VMs of the ctloop Dataproc subnetwork."
  network       = google_compute_network.ctloop.id
  direction     = "INGRESS"
  priority      = 1000
  source_ranges = [google_compute_subnetwork.dataproc.ip_cidr_range]

  allow {
    protocol = "all"
  }
}
