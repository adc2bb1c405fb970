"""The container image every ctloop component runs in."""

# The compile step rewrites this to the configured ``gcp.component_image``; the default only has to be a valid
# image reference so the components can be defined (and run by the local SubprocessRunner) without settings.
COMPONENT_IMAGE = "ctloop-component:compiled-default"
