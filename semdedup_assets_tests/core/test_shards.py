"""Input discovery, shard keys, and validation of each format."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.core.io.shards import ShardError, discover_shards, read_shard


def test_discovery_keys_and_formats(tmp_path: Path) -> None:
    (tmp_path / "2024").mkdir()
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "part-00.parquet")
    (tmp_path / "2024" / "part-03.jsonl.gz").write_bytes(gzip.compress(b'{"text": "b"}\n'))
    (tmp_path / "part-01.jsonl").write_text('{"text": "c"}\n')
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden.parquet").write_bytes(b"ignored")
    shards = discover_shards(tmp_path)
    assert [s.key for s in shards] == ["2024/part-03", "part-00", "part-01"]
    assert discover_shards(tmp_path / "part-01.jsonl")[0].key == "part-01"


def test_two_files_with_one_key_are_refused(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text('{"text": "c"}\n')
    with pytest.raises(ValueError, match="two files give shard key 'p'"):
        discover_shards(tmp_path)


def test_missing_location(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        discover_shards(tmp_path / "nope")


def test_ids_default_to_shard_and_row(tmp_path: Path) -> None:
    (tmp_path / "s.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n')
    table = read_shard(discover_shards(tmp_path)[0], "text", "text").table
    assert table.column("id").to_pylist() == ["s:0", "s:1"]
    assert table.column("row").to_pylist() == [0, 1]


def test_integer_ids_become_strings_and_custom_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"doc": [10, 11], "body": ["x", "y"]}), tmp_path / "s.parquet")
    table = read_shard(discover_shards(tmp_path)[0], "text", "body", id_column="doc").table
    assert table.column("id").to_pylist() == ["10", "11"]
    assert table.column("text").to_pylist() == ["x", "y"]


def test_embedding_payload_validation(tmp_path: Path) -> None:
    good = pa.array([[1.0, 0.0], [0.0, 2.0]], pa.list_(pa.float32()))
    pq.write_table(pa.table({"id": ["a", "b"], "embedding": good}), tmp_path / "e.parquet")
    index = read_shard(discover_shards(tmp_path)[0], "embedding", "embedding")
    assert index.dim == 2 and index.table.column_names == ["id", "row", "payload_hash"]
    pq.write_table(
        pa.table({"id": ["a", "b"], "embedding": pa.array([[1.0, 0.0], [0.0, np.nan]], pa.list_(pa.float32()))}),
        tmp_path / "e.parquet",
    )
    with pytest.raises(ShardError, match="non-finite") as exc:
        read_shard(discover_shards(tmp_path)[0], "embedding", "embedding")
    assert exc.value.row == 1 and exc.value.shard == "e"
    pq.write_table(
        pa.table({"id": ["a", "b"], "embedding": pa.array([[1.0, 0.0], [0.0, 1.0, 2.0]], pa.list_(pa.float32()))}),
        tmp_path / "e.parquet",
    )
    with pytest.raises(ShardError, match="dimension 3, expected 2") as exc:
        read_shard(discover_shards(tmp_path)[0], "embedding", "embedding")
    assert exc.value.row == 1


def test_null_id_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.jsonl").write_text(
        json.dumps({"id": "a", "text": "x"}) + "\n" + json.dumps({"id": None, "text": "y"}) + "\n"
    )
    with pytest.raises(ShardError, match="id column 'id' is null") as exc:
        read_shard(discover_shards(tmp_path)[0], "text", "text")
    assert exc.value.row == 1


def test_symlinked_subfolders_are_followed_and_a_loop_is_refused(tmp_path: Path) -> None:
    """Issue 20.2: `symsub/linked -> ../inner` was skipped silently (50 of 150 items)."""
    root, inner = tmp_path / "input", tmp_path / "inner"
    (root / "symsub").mkdir(parents=True)
    inner.mkdir()
    pq.write_table(pa.table({"text": ["a"]}), root / "top.parquet")
    pq.write_table(pa.table({"text": ["b"]}), inner / "deep.parquet")
    (root / "symsub" / "linked").symlink_to("../../inner")
    shards = discover_shards(root)
    assert [s.key for s in shards] == ["symsub/linked/deep", "top"]
    assert str(shards[0].path) == str(root / "symsub" / "linked" / "deep.parquet")  # the key's path, not the target
    (inner / "back").symlink_to("..")  # inner/back -> tmp_path, which holds input/symsub/linked -> inner: a loop
    with pytest.raises(ValueError, match=r"symbolic link loop under the input: .*linked/back"):
        discover_shards(root)
    (inner / "back").unlink()
    (root / "gone.parquet").symlink_to(tmp_path / "nowhere.parquet")
    with pytest.raises(ValueError, match=r"broken symbolic link under the input: .*gone.parquet"):
        discover_shards(root)


def test_names_starting_with_underscore_or_dot_are_skipped_and_listed(tmp_path: Path) -> None:
    """Issue 20.3: `_b.parquet` and `.c.parquet` were skipped without a word."""
    from semdedup_assets.core.io.shards import discover

    (tmp_path / "sub").mkdir()
    for name in ("a.parquet", "_b.parquet", "sub/.c.parquet"):
        pq.write_table(pa.table({"text": ["x"]}), tmp_path / name)
    (tmp_path / "_SUCCESS").write_text("")  # no shard suffix: not worth a word
    found = discover(tmp_path)
    assert [s.key for s in found.shards] == ["a"] and found.skipped == ["_b.parquet", "sub/.c.parquet"]
    note = found.skipped_note(tmp_path)
    assert note is not None and "skipped 2 file(s)" in note and "_b.parquet" in note and "in ., sub" in note
    assert discover(tmp_path / "sub").skipped_note(tmp_path / "sub").count("\n") == 0
