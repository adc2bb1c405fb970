"""The local Spark session: the same transform job as on Dataproc, in one JVM on this machine."""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from ctloop.config import Settings

# A short-lived batch JVM: the C1 compiler and the serial collector start faster and cost less memory than the
# server defaults on a small machine; the timezone pins java.time defaults to the session's UTC.
JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Duser.timezone=UTC"


def local_spark(settings: Settings, app_name: str = "ctloop") -> SparkSession:
    """Start (or return the running) local session configured from ``settings.local``.

    Static options (master, memory, JVM flags) only take effect for the first session of the process.
    """
    # Bind to loopback: no hostname lookups (which stall on machines without DNS) and nothing exposed.
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    # PySpark starts its Python workers with $PYSPARK_PYTHON (default: python3 from PATH); the
    # spark.pyspark.python option below reaches only spark-submit. Workers must run this interpreter.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    local = settings.local
    builder = (
        SparkSession.builder.master(local.spark_master)
        .appName(app_name)
        .config("spark.driver.memory", local.spark_driver_memory)
        .config("spark.driver.extraJavaOptions", JVM_OPTIONS)
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(local.spark_shuffle_partitions))
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        # Python workers (if any job needs them) run in this interpreter, which has the project installed.
        .config("spark.pyspark.python", sys.executable)
    )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
