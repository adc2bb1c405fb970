"""The retraining trigger: a Cloud Storage notification (via Pub/Sub) becomes exactly one pipeline run.

This package holds what is the function's own: event parsing, filtering and the choice of what to launch. Job
ids, parameters, labels, the PipelineJob request and the local launch ledger come from the ``ctloop`` runtime
package (``ctloop.launching``, ``ctloop.local_launch``), which the deployed bundle carries as a wheel
(cloudbuild/bundle_trigger.py).
"""
