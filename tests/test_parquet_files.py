"""Which files of a dataset directory are read as its data."""

from pathlib import Path

from ctloop.parquet_files import is_data_file, parquet_files


def test_a_directorys_data_files_leave_out_markers_hidden_and_other_files(tmp_path: Path) -> None:
    for name in ["part-1.parquet", "part-0.parquet", "_SUCCESS", "_common_metadata.parquet", ".part-2.parquet",
                 ".part-0.parquet.crc", "notes.txt", "sub/part-3.parquet", "_temporary/0/part-4.parquet",
                 ".hidden/part-5.parquet"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in parquet_files(tmp_path)] == ["part-0.parquet", "part-1.parquet"]
    assert [p.relative_to(tmp_path).as_posix() for p in parquet_files(tmp_path, recursive=True)] == [
        "part-0.parquet", "part-1.parquet", "sub/part-3.parquet"]
    assert parquet_files(tmp_path / "sub" / "missing") == []
    assert is_data_file("a/b.parquet") and not is_data_file("a/_b.parquet") and not is_data_file("b.parquet.crc")
