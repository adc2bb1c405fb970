"""What the numbers were measured on: CPUs, memory, versions, date, and how busy the machine was."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("kfp", "scikit-learn", "pandas", "pyarrow", "pyspark", "duckdb", "fastapi", "uvicorn", "httpx",
            "functions-framework")


def loadavg() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages; (nan, nan, nan) where /proc/loadavg is missing."""
    try:
        one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
        return float(one), float(five), float(fifteen)
    except (OSError, ValueError):
        nan = float("nan")
        return nan, nan, nan


def meminfo_bytes(key: str) -> int | None:
    """A /proc/meminfo field in bytes (MemTotal, MemAvailable, ...); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _command(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return "unavailable"
    return (done.stdout + done.stderr).strip()


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe() -> dict[str, Any]:
    """The machine and software the run used, as a JSON-ready dict."""
    java = _command(["java", "-version"]).splitlines()
    sha = _command(["git", "rev-parse", "--short", "HEAD"])
    dirty = _command(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_total_bytes": meminfo_bytes("MemTotal"),
        "memory_available_bytes": meminfo_bytes("MemAvailable"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "java": java[0] if java else "unavailable",
        "packages": _versions(),
        "git": f"{sha}{' (with uncommitted changes)' if dirty and dirty != 'unavailable' else ''}",
    }
