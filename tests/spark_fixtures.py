"""One local Spark session per test process (a JVM start costs seconds): import ``spark`` into a test module.

    from tests.spark_fixtures import spark  # noqa: F401  (pytest fixture)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from ctloop.config import Settings


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    with warnings.catch_warnings():
        # pyspark warns at import that it is not yet tested with pandas 3; the jobs here do not use pandas.
        warnings.simplefilter("ignore", FutureWarning)
        from ctloop.spark_session import local_spark

        session = local_spark(Settings(), app_name="ctloop-tests")
    try:
        yield session
    finally:
        session.stop()
