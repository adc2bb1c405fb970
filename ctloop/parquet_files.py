"""Which files of a Parquet dataset directory hold its data, by the rule Spark and Hadoop read it with."""

from pathlib import Path


def is_data_file(relative: str) -> bool:
    """A Parquet data file, not a marker, temporary or hidden file (any path segment starting '_' or '.')."""
    return relative.endswith(".parquet") and not any(seg.startswith(("_", ".")) for seg in relative.split("/"))


def parquet_files(directory: str | Path, *, recursive: bool = False) -> list[Path]:
    """A directory's Parquet data files in path order (its subfolders' too when ``recursive``); [] for none."""
    root = Path(directory)
    found = root.rglob("*.parquet") if recursive else root.glob("*.parquet")
    return sorted(p for p in found if is_data_file(p.relative_to(root).as_posix()))
