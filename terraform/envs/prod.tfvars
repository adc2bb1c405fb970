project_id   = "ctloop-prod"
region       = "europe-west4"
env          = "prod"
github_owner = "example-org"
github_repo  = "ctloop"

# prod: only release tags (vX.Y.Z) are released; PR checks run in dev only.
release_branch = ""
release_tag    = "^v[0-9]+\\.[0-9]+\\.[0-9]+$"
pr_checks      = false
force_destroy  = false
smoke_submit   = false
