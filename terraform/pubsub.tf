# Landing notifications: OBJECT_FINALIZE under the table prefix -> topic -> the trigger function.
# Delivery (var.trigger_delivery) is either a push subscription managed here, with bounded delivery attempts
# and a dead-letter topic, or the function's Eventarc trigger with retries (no dead-lettering possible there).

data "google_storage_project_service_account" "gcs" {
  project = var.project_id
}

resource "google_pubsub_topic" "landing_events" {
  #checkov:skip=CKV_GCP_83:Notification payloads are object metadata only; Google-managed encryption is sufficient.
  name                       = "${var.name_prefix}-landing-events"
  project                    = var.project_id
  labels                     = merge(local.labels, { component = "trigger" })
  message_retention_duration = "604800s"

  depends_on = [google_project_service.required]
}

# Cloud Storage publishes the notifications as its service agent.
resource "google_pubsub_topic_iam_member" "gcs_publishes_landing_events" {
  project = var.project_id
  topic   = google_pubsub_topic.landing_events.name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

resource "google_storage_notification" "landing" {
  bucket             = google_storage_bucket.landing.name
  topic              = google_pubsub_topic.landing_events.id
  payload_format     = "JSON_API_V1"
  event_types        = ["OBJECT_FINALIZE"]
  object_name_prefix = local.landing_prefix

  depends_on = [google_pubsub_topic_iam_member.gcs_publishes_landing_events]
}

resource "google_pubsub_topic" "dead_letter" {
  #checkov:skip=CKV_GCP_83:Dead letters are the same notification payloads; Google-managed encryption is sufficient.
  name                       = "${var.name_prefix}-landing-events-dead-letter"
  project                    = var.project_id
  labels                     = merge(local.labels, { component = "trigger" })
  message_retention_duration = "604800s"

  depends_on = [google_project_service.required]
}

# Dead letters are kept here for inspection and replay (a topic alone keeps nothing without a subscription).
resource "google_pubsub_subscription" "dead_letter" {
  name                       = "${var.name_prefix}-landing-events-dead-letter"
  project                    = var.project_id
  topic                      = google_pubsub_topic.dead_letter.id
  labels                     = merge(local.labels, { component = "trigger" })
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"
  retain_acked_messages      = false

  expiration_policy {
    ttl = ""
  }
}

# The function's subscription (push delivery): OIDC-authenticated push to the function's URL, exponential
# backoff between attempts, and after max_delivery_attempts the notification moves to the dead-letter topic.
resource "google_pubsub_subscription" "trigger" {
  count = var.trigger_delivery == "push" ? 1 : 0

  name                       = "${var.name_prefix}-trigger"
  project                    = var.project_id
  topic                      = google_pubsub_topic.landing_events.id
  labels                     = merge(local.labels, { component = "trigger" })
  ack_deadline_seconds       = 600
  message_retention_duration = "604800s"

  push_config {
    # The topic in the path lets functions-framework name the event source like Eventarc does.
    push_endpoint = "${google_cloudfunctions2_function.trigger.service_config[0].uri}/${google_pubsub_topic.landing_events.id}"

    oidc_token {
      service_account_email = google_service_account.trigger_invoker.email
      audience              = google_cloudfunctions2_function.trigger.service_config[0].uri
    }
  }

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = var.max_delivery_attempts
  }

  expiration_policy {
    ttl = ""
  }

  depends_on = [
    google_pubsub_topic_iam_member.pubsub_publishes_dead_letters,
    google_cloud_run_service_iam_member.invoker_runs_trigger,
  ]
}

# Dead-lettering needs the Pub/Sub service agent to publish to the dead-letter topic and to ack on the source
# subscription.
resource "google_pubsub_topic_iam_member" "pubsub_publishes_dead_letters" {
  project = var.project_id
  topic   = google_pubsub_topic.dead_letter.name
  role    = "roles/pubsub.publisher"
  member  = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "pubsub_acks_forwarded" {
  count = var.trigger_delivery == "push" ? 1 : 0

  project      = var.project_id
  subscription = google_pubsub_subscription.trigger[0].name
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}
