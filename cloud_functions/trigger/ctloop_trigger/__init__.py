"""The retraining trigger: a Cloud Storage notification (via Pub/Sub) becomes exactly one training run.

Self-contained on purpose: the function bundle (this directory) deploys without the ctloop package.
"""
