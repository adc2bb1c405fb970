"""Development tooling: local emulators, the sample-data generator, the event-driven demo and the image builds.

Installed into the development venv by ``make setup`` as its own distribution (``devtools/pyproject.toml``);
the runtime package ``ctloop`` never imports it and the images never contain it.
"""
