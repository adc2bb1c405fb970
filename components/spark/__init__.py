"""The PySpark job files: standalone scripts uploaded to GCS for Dataproc, importable for local runs."""
