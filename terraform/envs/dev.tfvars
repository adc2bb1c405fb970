project_id   = "ctloop-dev"
region       = "europe-west4"
env          = "dev"
github_owner = "example-org"
github_repo  = "ctloop"

# dev: every push to main is released; PR checks run here.
release_branch = "^main$"
pr_checks      = true
force_destroy  = true
smoke_submit   = false
