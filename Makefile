# Two entry points: `make run` (the local CT loop on the bundled sample data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Linters (checkov, hadolint) in their own venv: their pins conflict with the project's lock.
TOOLS_VENV := .venv-tools
UV_VERSION := 0.13.9

.PHONY: setup tools run test lint compile bench demo clean trigger-bundle images test-images

# The development venv: requirements-dev.lock (the runtime lock plus test and lint tools), the project, and the
# development tools (devtools/: emulators, sample data, demo, image builds), which the images leave out.
$(BIN)/.installed: requirements-dev.lock pyproject.toml devtools/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r requirements-dev.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e . -e devtools
	# Spark's classes, recorded once for every later local session to map (ctloop/spark_session.py).
	$(BIN)/python -m ctloop.spark_session
	touch $@

setup: $(BIN)/.installed

$(TOOLS_VENV)/bin/.installed: requirements-tools.lock $(BIN)/.installed
	$(PYTHON) -m venv --without-pip $(TOOLS_VENV)
	$(BIN)/uv pip install --quiet --python $(TOOLS_VENV)/bin/python -r requirements-tools.lock
	touch $@

tools: $(TOOLS_VENV)/bin/.installed

run: setup
	$(BIN)/ctloop sample-data --if-missing
	$(BIN)/ctloop run

test: setup tools
	$(BIN)/ruff check .
	$(BIN)/pytest -q

compile: setup
	$(BIN)/ctloop compile --out build/pipelines

# The trigger function's deployable source (what Cloud Build deploys): build/trigger-function.
trigger-bundle: setup
	$(BIN)/python cloudbuild/bundle_trigger.py --out build/trigger-function

bench: setup
	$(BIN)/python -m bench

demo: setup
	$(BIN)/ctloop demo

# The component and serving images, built here with podman (installed from Debian if missing) or Docker, from
# the Dockerfiles the release builds; the base is a debootstrapped bookworm (no registry needed), built once.
images: setup
	$(BIN)/python -m devtools.images

# The images at work (needs `make images`): the training pipeline under kfp's DockerRunner, the serving image
# with Vertex's environment, the transform job as Dataproc starts it, the trigger bundle in a clean container.
test-images: setup trigger-bundle
	$(BIN)/pytest -q -p no:cacheprovider tests_images

# The local Spark service and step server the runs started (ctloop/local_daemon.py) run from the venv: stopped first.
clean:
	-$(BIN)/python -m ctloop.local_daemon stop
	rm -rf $(VENV) .ctloop build
