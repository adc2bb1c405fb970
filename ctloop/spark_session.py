"""The local Spark session: the same transform job as on Dataproc, in one JVM on this machine.

``python -m ctloop.spark_session`` (run by ``make setup``) records Spark's classes in a class-data archive
(AppCDS) inside the environment: every later JVM maps them instead of loading them one by one, which halves a
session's start (bench/: 5.3 -> 2.5 s, and its first job 2.8 -> 1.2 s). A JVM that finds the archive stale
(other jars or another JDK build) says so in one line and starts without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pyspark.sql import SparkSession

from ctloop.config import Settings
from ctloop.parquet_files import parquet_files

# A short-lived batch JVM: the serial collector starts faster and costs less memory than the server default on
# a small machine; the timezone pins java.time defaults to the session's UTC.
JVM_OPTIONS = "-XX:+UseSerialGC -Duser.timezone=UTC"
# On small inputs the job ends before the optimising (C2) compiler pays back the CPU it takes from the two
# tasks: the quick C1 compiler alone is faster there (bench/: 100k rows ~4 s faster), slower on big ones
# (1M rows ~17 s slower).
SMALL_INPUT_JVM_OPTIONS = "-XX:TieredStopAtLevel=1"
# Belongs to the environment whose jars it lists, so it lives there (see the module docstring).
CLASS_ARCHIVE = Path(sys.prefix) / "share" / "ctloop" / "spark-classes.jsa"


def local_spark(settings: Settings, app_name: str = "ctloop", rows: int | None = None,
                long_lived: bool = False) -> SparkSession:
    """Start (or return the running) local session configured from ``settings.local``.

    ``rows`` (the input's row count, when known) picks the JIT of a JVM started for one job: below
    ``settings.local.spark_full_jit_rows`` or unknown, the quick compiler only. A ``long_lived`` JVM (the local
    Spark service) runs many jobs, so it always compiles fully. Static options (master, memory, JVM flags) only
    take effect for the first session of the process.
    """
    archive = f"-XX:SharedArchiveFile={CLASS_ARCHIVE}" if CLASS_ARCHIVE.is_file() else ""
    return _start(settings, app_name, None if long_lived else rows, archive, long_lived)


def _start(settings: Settings, app_name: str, rows: int | None, archive_option: str,
           long_lived: bool = False) -> SparkSession:
    # Bind to loopback: no hostname lookups (which stall on machines without DNS) and nothing exposed.
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    # PySpark starts its Python workers with $PYSPARK_PYTHON (default: python3 from PATH); the
    # spark.pyspark.python option below reaches only spark-submit. Workers must run this interpreter.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    local = settings.local
    jvm_options = JVM_OPTIONS
    if not long_lived and (rows is None or rows < local.spark_full_jit_rows):
        jvm_options = f"{SMALL_INPUT_JVM_OPTIONS} {jvm_options}"
    jvm_options = f"{jvm_options} {archive_option}".strip()
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

    return sum(pq.read_metadata(str(f)).num_rows for f in parquet_files(directory))


def build_class_archive(target: Path = CLASS_ARCHIVE) -> Path:
    """Record the classes a small job of every kind the transform runs (Parquet in and out, a shuffle, a sort,
    windows, an aggregate, a cache) loads, into ``target``; written aside and renamed, so a JVM never maps a
    partial archive."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    os.close(fd)
    os.unlink(partial)  # the JVM writes it at exit
    try:
        run = subprocess.run([sys.executable, "-m", "ctloop.spark_session", "--record", partial],
                             capture_output=True, text=True)
        if run.returncode != 0 or not Path(partial).is_file():
            tail = " | ".join((run.stdout + run.stderr).strip().splitlines()[-5:])
            raise RuntimeError(f"class archive: the recording JVM failed (exit {run.returncode}): {tail}")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def _record(archive: str) -> None:
    """The job ``build_class_archive`` runs, in a JVM that writes ``archive`` when it exits."""
    from pyspark import SparkContext, StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    spark = _start(Settings(), "ctloop-class-archive", None, f"-XX:ArchiveClassesAtExit={archive}")
    with tempfile.TemporaryDirectory() as tmp:
        df = spark.range(10_000).select((F.col("id") % 97).cast("string").alias("k"), F.col("id").alias("v"),
                                        F.timestamp_micros(F.col("id")).alias("t"))
        df.write.parquet(f"{tmp}/in")
        df = spark.read.parquet(f"{tmp}/in").repartition("k").groupBy("k", "v", "t").count()
        w = Window.partitionBy("k").orderBy("v")
        df = df.sortWithinPartitions("k", "v").select(
            "*", F.lag("v").over(w).alias("p"),
            F.avg("v").over(w.rangeBetween(Window.unboundedPreceding, -1)).alias("m"))
        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        df.groupBy("k").agg(F.max("m"), F.percentile_approx("v", [0.5], 100)).collect()
        df.coalesce(1).write.parquet(f"{tmp}/out")
        df.unpersist()
    jvm = SparkContext._gateway.proc  # type: ignore[union-attr]
    spark.stop()
    jvm.stdin.close()  # the gateway JVM exits when its stdin closes, and writes the archive as it does
    jvm.wait(timeout=300)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--record"]:
        _record(sys.argv[2])
    else:
        try:
            print(f"class archive: {build_class_archive()}")
        except RuntimeError as e:
            sys.exit(str(e))
