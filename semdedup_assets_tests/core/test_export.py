"""The deduplicated dataset writers: every format round-trips its kept rows byte for byte."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.core.io.shards import discover_shards, read_raw_table
from semdedup_assets.core.io.storage import to_upath
from semdedup_assets.core.io.webdataset import read_webdataset
from semdedup_assets.core.select.export import (
    ExportError,
    Selection,
    keep_count,
    output_files,
    parse_selection,
    write_shard,
)

KEEP = np.array([0, 2, 3, 7])


def _export(input_dir: Path, out_dir: Path, rows: np.ndarray = KEEP, ids: list[str] | None = None) -> list[Path]:
    [shard] = discover_shards(str(input_dir))
    outputs = output_files(shard, to_upath(str(input_dir)), to_upath(str(out_dir)))
    write_shard(shard, rows, ids or [], outputs)
    return [Path(str(p)) for p in outputs]


def test_parquet_keeps_schema_metadata_columns_and_row_order(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(10)],
            "text": [f"t{i}" for i in range(10)],
            "score": pa.array(np.arange(10, dtype=np.float16)),
            "tags": pa.array([[i, i + 1] for i in range(10)], pa.list_(pa.int8())),
        },
    ).replace_schema_metadata({b"origin": b"crawl-7"})
    (tmp_path / "in" / "2024").mkdir(parents=True)
    pq.write_table(table, tmp_path / "in" / "2024" / "part-01.parquet", row_group_size=3)
    [out] = _export(tmp_path / "in", tmp_path / "out")
    assert out == tmp_path / "out" / "2024" / "part-01.parquet"  # its relative path
    got = pq.read_table(out)
    assert got.schema == table.schema and got.schema.metadata == table.schema.metadata
    assert got.equals(table.take(pa.array(KEEP)))


def test_parquet_with_nothing_kept_is_an_empty_file_of_the_same_schema(tmp_path: Path) -> None:
    table = pa.table({"id": ["a", "b"], "x": [1, 2]})
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "p.parquet")
    [out] = _export(tmp_path / "in", tmp_path / "out", rows=np.array([], dtype=np.int64))
    got = pq.read_table(out)
    assert got.num_rows == 0 and got.schema == table.schema


@pytest.mark.parametrize("name", ["part.jsonl", "part.jsonl.gz"])
def test_jsonl_kept_lines_are_byte_identical_and_gzip_stays_gzip(tmp_path: Path, name: str) -> None:
    # Odd spacing, key order and unicode must survive: lines are copied, never re-serialised.
    lines = [f'{{"text": "caf\\u00e9 {i}",  "id":"r{i}", "n": {i}.50}}\n'.encode() for i in range(10)]
    lines.insert(4, b"\n")  # a blank line is no row
    data = b"".join(lines)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    [out] = _export(tmp_path / "in", tmp_path / "out")
    body = out.read_bytes()
    if name.endswith(".gz"):
        assert body[:2] == b"\x1f\x8b"
        body = gzip.decompress(body)
    rows = [ln for ln in lines if ln.strip()]
    assert body == b"".join(rows[i] for i in KEEP)
    [shard] = discover_shards(str(tmp_path / "out"))  # and it reads back as the same rows
    assert read_raw_table(shard).column("id").to_pylist() == [f"r{i}" for i in KEEP]


def _tar_bytes(members: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size, info.mtime = len(data), 1700000000
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_webdataset_keeps_every_member_of_kept_keys_and_nothing_of_removed_ones(tmp_path: Path) -> None:
    members: list[tuple[str, bytes | None]] = [("shots", None)]
    for i in range(10):
        members += [
            (f"shots/{i:04d}.jpg", b"\xff\xd8 img %d" % i),
            (f"shots/{i:04d}.txt", b"caption %d" % i),
            (f"shots/{i:04d}.json", json.dumps({"i": i}).encode()),
            (f"shots/{i:04d}.cls", b"%d" % (i % 3)),
        ]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "wds-000.tar").write_bytes(_tar_bytes(members))
    ids = read_webdataset(str(tmp_path / "in" / "wds-000.tar")).column("id").to_pylist()
    [out] = _export(tmp_path / "in", tmp_path / "out", ids=ids)
    with tarfile.open(out) as tar:
        got = {m.name: (tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()}
    kept_keys = {f"shots/{i:04d}" for i in KEEP}
    expected = {n: d for n, d in members if d is None or n.rsplit(".", 1)[0] in kept_keys}
    assert got == expected


def test_npy_and_its_metadata_stay_aligned(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float16)
    meta = pa.table({"key": [f"k{i}" for i in range(10)], "url": [f"http://x/{i}" for i in range(10)]})
    for d in ("img_emb", "metadata"):
        (tmp_path / "in" / d).mkdir(parents=True)
    np.save(tmp_path / "in" / "img_emb" / "img_emb_0.npy", x)
    pq.write_table(meta, tmp_path / "in" / "metadata" / "metadata_0.parquet")
    outs = _export(tmp_path / "in", tmp_path / "out")
    assert outs == [
        tmp_path / "out" / "img_emb" / "img_emb_0.npy",
        tmp_path / "out" / "metadata" / "metadata_0.parquet",
    ]
    got = np.load(outs[0])
    assert got.dtype == x.dtype and got.tobytes() == x[KEEP].tobytes()
    assert pq.read_table(outs[1]).equals(meta.take(pa.array(KEEP)))
    assert [s.key for s in discover_shards(str(tmp_path / "out"))] == ["img_emb/img_emb_0"]


def test_a_failing_write_publishes_nothing(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(OSError):
        _export(tmp_path / "in", tmp_path / "out")
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_selection_parsing_and_bad_input() -> None:
    eps = (0.001, 0.01, 0.05)
    assert parse_selection("eps=0.01", eps) == Selection("eps", 0.01)
    assert parse_selection("keep-fraction=0.5", eps).label == "keep-fraction=0.5"
    with pytest.raises(ExportError, match=r"eps=0.02 is not configured; configured eps: 0.001, 0.01, 0.05"):
        parse_selection("eps=0.02", eps)
    for bad in ("keep-fraction=0", "keep-fraction=1.5", "keep-fraction=-0.1", "keep-fraction=nan"):
        with pytest.raises(ExportError, match=r"keep-fraction must lie in \(0, 1\]"):
            parse_selection(bad, eps)
    with pytest.raises(ExportError, match="eps=E or keep-fraction=F"):
        parse_selection("size=10", eps)


def test_keep_count_is_the_ceiling_of_the_exact_decimal() -> None:
    assert keep_count(0.3, 10) == 3  # 0.3 * 10 is 3.0000000000000004 in binary floating point
    assert keep_count(0.5, 7) == 4
    assert keep_count(1.0, 7) == 7
    assert keep_count(1e-9, 7) == 1


def test_nearest_reference_is_exact_across_blocks_and_first_on_ties() -> None:
    from semdedup_assets.core.select.decontaminate import ReferenceError, nearest_reference

    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    r = rng.normal(size=(33, 6)).astype(np.float32)
    r[20] = r[3]  # an exact tie: the first reference row wins
    x[7] = r[3]
    best, arg = nearest_reference(x, r, block=4)
    dense = x.astype(np.float64) @ r.astype(np.float64).T
    np.testing.assert_allclose(best, dense.max(axis=1), rtol=1e-5)
    assert arg[7] == 3 and (arg == dense.argmax(axis=1)).mean() > 0.95
    with pytest.raises(ReferenceError, match="dimension 5 but the dataset's have dimension 6"):
        nearest_reference(x, r[:, :5])


def test_reference_items_with_nothing_to_compare_are_skipped_and_counted(tmp_path: Path) -> None:
    """An empty or whitespace-only reference text was embedded (a vector near every short item) and an empty
    reference id accepted; both are now skipped, as the dataset's own are rejected, and counted."""
    from semdedup_assets.core.select.decontaminate import ReferenceError, embed_reference

    seen: list[str] = []

    def encode(texts: list[str]) -> np.ndarray:
        seen.extend(texts)
        return np.array([[1.0, len(t), 2.0] for t in texts], dtype=np.float32)

    ref = tmp_path / "ref"
    ref.mkdir()
    pq.write_table(
        pa.table({"id": ["r0", "r1", "r2", "", "r4"], "text": ["a cat", "", "  \t", "no id", "a dog"]}),
        ref / "eval.parquet",
    )
    pq.write_table(pa.table({"id": ["q0", "q1"], "text": [" ", ""]}), ref / "empty.parquet")
    reference = embed_reference(str(ref), "text", "text", "id", encode)
    assert seen == ["a cat", "a dog"]
    assert list(reference.ids) == ["r0", "r4"] and reference.skipped == 5
    np.testing.assert_allclose(np.linalg.norm(reference.vectors, axis=1), 1.0, atol=1e-6)

    (ref / "eval.parquet").unlink()
    with pytest.raises(ReferenceError, match=r"reference .*ref: no item to compare \(2 with an empty id or text\)"):
        embed_reference(str(ref), "text", "text", "id", encode)


def test_reference_images_skip_empty_ids_and_undecodable_items(tmp_path: Path) -> None:
    from semdedup_assets.core.select.decontaminate import embed_reference

    def encode_images(items: list) -> tuple[np.ndarray, np.ndarray]:
        ok = np.array([i for i, item in enumerate(items) if item != b"bad"], dtype=np.int64)
        return np.array([[1.0, float(i), 0.5] for i in ok], dtype=np.float32), ok

    ref = tmp_path / "ref"
    ref.mkdir()
    pq.write_table(
        pa.table({"id": ["i0", "", "i2", "i3"], "image": [b"png0", b"png1", b"bad", b"png3"]}), ref / "eval.parquet"
    )
    reference = embed_reference(str(ref), "image", "image", "id", None, encode_images)
    assert list(reference.ids) == ["i0", "i3"] and reference.skipped == 1
    np.testing.assert_allclose(reference.vectors[1] * np.linalg.norm([1.0, 3.0, 0.5]), [1.0, 3.0, 0.5], atol=1e-5)
