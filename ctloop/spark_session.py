"""The local Spark session: the same transform job as on Dataproc, in one JVM on this machine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from ctloop.config import Settings

# A short-lived batch JVM: the serial collector starts faster and costs less memory than the server default on
# a small machine; the timezone pins java.time defaults to the session's UTC.
JVM_OPTIONS = "-XX:+UseSerialGC -Duser.timezone=UTC"
# On small inputs the job ends before the optimising (C2) compiler pays back the CPU it takes from the two
# tasks: the quick C1 compiler alone is faster there (bench/: 100k rows ~4 s faster), slower on big ones
# (1M rows ~17 s slower).
SMALL_INPUT_JVM_OPTIONS = "-XX:TieredStopAtLevel=1"


def local_spark(settings: Settings, app_name: str = "ctloop", rows: int | None = None) -> SparkSession:
    """Start (or return the running) local session configured from ``settings.local``.

    ``rows`` (the input's row count, when known) picks the JIT: below ``settings.local.spark_full_jit_rows``
    or unknown, the quick compiler only. Static options (master, memory, JVM flags) only take effect for the
    first session of the process.
    """
    # Bind to loopback: no hostname lookups (which stall on machines without DNS) and nothing exposed.
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    # PySpark starts its Python workers with $PYSPARK_PYTHON (default: python3 from PATH); the
    # spark.pyspark.python option below reaches only spark-submit. Workers must run this interpreter.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    local = settings.local
    jvm_options = JVM_OPTIONS
    if rows is None or rows < local.spark_full_jit_rows:
        jvm_options = f"{SMALL_INPUT_JVM_OPTIONS} {jvm_options}"
    builder = (
        SparkSession.builder.master(local.spark_master)
        .appName(app_name)
        .config("spark.driver.memory", local.spark_driver_memory)
        .config("spark.driver.extraJavaOptions", jvm_options)
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(local.spark_shuffle_partitions))
        # The job's caches live one step in one JVM: compressing them costs more CPU than it saves (1M rows:
        # about 1.5 s per cached table); above the memory share they spill to local disk as before.
        .config("spark.sql.inMemoryColumnarStorage.compressed", "false")
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        # Python workers (if any job needs them) run in this interpreter, which has the project installed.
        .config("spark.pyspark.python", sys.executable)
    )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def parquet_rows(directory: str) -> int:
    """Rows in a directory's Parquet files, from their footers (no data read): the ``rows`` hint above."""
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(str(f)).num_rows for f in Path(directory).glob("*.parquet"))
