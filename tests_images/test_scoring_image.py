"""The scoring image (components/spark/Dockerfile), the scoring batch's Dataproc Serverless container, holds what
Dataproc asks of a custom container and unpickles a model trained in the development venv to the same
probabilities. Spark and Java are Dataproc's to mount, so the job itself does not run here."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctloop.modeling import read_split, train_model
from ctloop.scoring import load_scoring_model
from devtools import images
from tests.modeling_fixtures import settings_for, write_splits
from tests_images.conftest import Containers

SCORE = """
import json, sys
import pandas as pd
from ctloop.scoring import load_scoring_model
model = load_scoring_model('/data/model')
frame = pd.read_parquet('/data/rows.parquet')
print(json.dumps(model.predict_proba(frame).tolist()))
"""


@pytest.fixture(scope="module")
def trained() -> tuple[Path, np.ndarray]:
    """A model and rows to score in a folder the image's user (1099) can read, and the venv's probabilities."""
    root = Path(tempfile.mkdtemp(prefix="ctloop-scoring-image-"))
    splits = write_splits(root / "splits")
    model_dir = root / "data" / "model"
    train_model(settings_for(root / "work"), splits["train"], splits["valid"], model_dir, "image-1")
    model = load_scoring_model(model_dir)
    frame = read_split(splits["test"], model.spec, "test")
    frame.to_parquet(root / "data" / "rows.parquet", index=False)
    for folder, dirs, files in os.walk(root / "data"):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.chmod(name, 0o755 if os.path.isdir(name) else 0o644)
    return root / "data", model.predict_proba(frame)


def test_scoring_image_meets_dataproc_custom_container_rules(containers: Containers) -> None:
    image = images.SCORING_IMAGE
    script = ("id -u; id -g; id -un; echo $HOME; command -v tini; command -v ps; echo $PYSPARK_PYTHON; "
              "python -c 'import importlib.util as u; print(\"pyspark:\", u.find_spec(\"pyspark\"))'")
    out = containers.run(image, "custom-container rules", [image, "sh", "-c", script]).split()
    assert out[:4] == ["1099", "1099", "spark", "/home/spark"]
    assert out[4:7] == ["/usr/bin/tini", "/usr/bin/ps", "/opt/venv/bin/python"]
    assert out[7:] == ["pyspark:", "None"]  # Dataproc mounts its own Spark


def test_scoring_image_unpickles_the_model_to_the_same_probabilities(containers: Containers,
                                                                     trained: tuple[Path, np.ndarray]) -> None:
    data, expected = trained
    image = images.SCORING_IMAGE
    out = containers.run(image, "score", ["-v", f"{data}:/data:ro", image, "python", "-c", SCORE])
    got = np.array(json.loads(out.strip().splitlines()[-1]))
    assert len(got) == len(expected) == len(pd.read_parquet(data / "rows.parquet"))
    np.testing.assert_array_equal(got, expected)
