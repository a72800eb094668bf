"""Issue 20: results a new user could read wrongly without a word (stale exports, skipped or
changed inputs, an overlapping storage, misleading verify verdicts, empty texts, a quiet k)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.cli import main
from semdedup_assets_tests.fixtures import make_planted, write_embedding_shards

RUN = ["--modality", "embedding", "--clusters", "4", "--buckets", "2"]


def _run(tmp_path: Path, *extra: str, input_dir: Path | None = None, storage: Path | None = None) -> int:
    return main(
        [
            "run",
            "--input",
            str(input_dir or tmp_path / "input"),
            "--storage",
            str(storage or tmp_path / "storage"),
            *RUN,
            *extra,
        ]
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_export_folders_hold_exactly_the_current_selection(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture
) -> None:
    """20.1: after `forget part-02` the eps folder still held part-02 (read back with the dataset), and a
    folder of an eps no longer configured stayed, unrefreshable and unflagged."""
    write_embedding_shards(tmp_path / "input", n_shards=3, per_shard=50, d=8)
    storage = str(tmp_path / "storage")
    assert _run(tmp_path, "--eps", "0.05,0.1") == 0
    for select in ("eps=0.05", "eps=0.1"):
        assert main(["export", "--select", select, "--storage", storage]) == 0
    dedup = tmp_path / "storage" / "deduplicated"
    stray = dedup / "eps=0.05" / "old-layout.parquet"
    stray.write_bytes((dedup / "eps=0.05" / "part-00.parquet").read_bytes())
    assert main(["forget", "part-02", "--storage", storage]) == 0
    # forget takes the shard out of every selection folder at once
    for label in ("eps=0.05", "eps=0.1"):
        assert not (dedup / label / "part-02.parquet").exists()
        assert not (dedup / label / ".semdedup" / "part-02.json").exists()
    capsys.readouterr()
    assert main(["export", "--select", "eps=0.05", "--storage", storage]) == 0
    out = capsys.readouterr().out
    kept = int(out.split("eps=0.05: kept ")[1].split(" of ")[0])
    assert "removed 1 file(s) the selection no longer implies (e.g. old-layout.parquet)" in out
    assert pq.read_table(dedup / "eps=0.05").num_rows == kept  # the folder reads back as what was printed
    assert sorted(p.name for p in (dedup / "eps=0.05").iterdir()) == [".semdedup", "part-00.parquet", "part-01.parquet"]
    # eps 0.05 is no longer configured: its folder cannot be refreshed, so it goes (and says so)
    assert _run(tmp_path, "--eps", "0.02,0.1") == 0
    capsys.readouterr()
    assert main(["export", "--select", "eps=0.1", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert "removed deduplicated/eps=0.05/: the configured eps (0.02, 0.1) can no longer produce it" in out
    assert sorted(p.name for p in dedup.iterdir()) == ["eps=0.1"]


def test_skipped_files_are_named_by_the_run_and_by_status(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture
) -> None:
    """20.3: `_b.parquet` and `.c.parquet` (50 of 150 items) were skipped without a word."""
    write_embedding_shards(tmp_path / "input", n_shards=3, per_shard=50, d=8)
    (tmp_path / "input" / "part-01.parquet").rename(tmp_path / "input" / "_b.parquet")
    (tmp_path / "input" / "part-02.parquet").rename(tmp_path / "input" / ".c.parquet")
    assert _run(tmp_path) == 0
    out = capsys.readouterr().out
    [line] = [ln for ln in out.splitlines() if "whose names start with" in ln]
    assert f"skipped 2 file(s) whose names start with '_' or '.' under {tmp_path / 'input'}" in line
    assert ".c.parquet" in line and "_b.parquet" in line
    assert main(["status", "--storage", str(tmp_path / "storage")]) == 0
    assert "2 file(s) skipped for names starting with '_' or '.': .c.parquet, _b.parquet" in capsys.readouterr().out
    assert main(["status", "--json", "--storage", str(tmp_path / "storage")]) == 0
    assert json.loads(capsys.readouterr().out)["input_skipped"] == [".c.parquet", "_b.parquet"]


@pytest.mark.parametrize("layout", ["storage-in-input", "input-in-storage", "same"])
def test_overlapping_input_and_storage_are_refused_naming_both(
    tmp_path: Path, home: Path, layout: str, capsys: pytest.CaptureFixture
) -> None:
    """20.8: a storage inside the input worked once, then failed reading its centroids as a shard."""
    data = tmp_path / "data"
    write_embedding_shards(data, n_shards=1, per_shard=20, d=8)
    storage = {"storage-in-input": data / "st", "input-in-storage": tmp_path, "same": data}[layout]
    assert _run(tmp_path, input_dir=data, storage=storage) == 1
    err = capsys.readouterr().err
    assert f"--input {data}" in err and f"--storage {storage}" in err, err
    assert not (Path(storage) / "semdedup.json").exists() and not (data / "st").exists()


def test_touched_input_is_stale_not_damaged_and_repair_keeps_it(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture
) -> None:
    """20.11: `touch` on an input made verify call its embeddings "stale" like a damaged file, and --repair
    deleted them."""
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=40, d=8)
    storage = tmp_path / "storage"
    assert _run(tmp_path) == 0
    part = tmp_path / "input" / "part-01.parquet"
    os.utime(part, (part.stat().st_atime + 100, part.stat().st_mtime + 100))
    emb = storage / "embeddings" / "part-01.parquet"
    capsys.readouterr()
    assert main(["verify", "--storage", str(storage)]) == 1
    out = capsys.readouterr()
    assert f"STALE {emb}: stale: its input {part} changed since it was ingested" in out.out, out.out
    assert "the next `semdedup run` redoes it" in out.out and "BAD" not in out.out
    assert main(["verify", "--repair", "--storage", str(storage)]) == 0
    assert emb.exists() and "deleted 0 file(s)" in capsys.readouterr().out
    assert _run(tmp_path) == 0
    assert main(["verify", "--storage", str(storage)]) == 0


def test_in_place_edit_keeping_size_and_mtime_is_found_by_verify_content(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture
) -> None:
    """20.5: an in-place edit that keeps size and mtime went unnoticed (verify said consistent)."""
    x = make_planted(60, 8, dup_every=1000, seed=5)  # no planted duplicates
    (tmp_path / "input").mkdir()
    npy = tmp_path / "input" / "vecs.npy"
    np.save(npy, x)
    pq.write_table(pa.table({"id": [f"v{i}" for i in range(60)]}), tmp_path / "input" / "vecs.parquet")
    storage = tmp_path / "storage"
    assert _run(tmp_path) == 0
    before = os.stat(npy)
    edited = np.load(npy, mmap_mode="r+")
    edited[1] = edited[0]  # row 1 becomes an exact copy of row 0
    edited.flush()
    del edited
    os.utime(npy, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(npy).st_size == before.st_size and os.stat(npy).st_mtime_ns == before.st_mtime_ns
    assert main(["verify", "--storage", str(storage)]) == 0  # the fingerprint (size, mtime) cannot tell
    capsys.readouterr()
    assert main(["verify", "--content", "--storage", str(storage)]) == 1
    raw = storage / "raw" / "vecs.parquet"
    out = capsys.readouterr().out
    assert f"BAD {raw}: the content of its input {npy} changed since it was ingested, with the same size" in out, out
    # The fingerprint cannot tell, but the raw index records each row's payload digest (exact copies,
    # docs/exact-copies.md): ingest writes a raw index with row 1's new digest, so the run embeds again.
    assert _run(tmp_path) == 0
    emb = pq.read_table(storage / "embeddings" / "vecs.parquet").column("embedding").to_pylist()
    assert emb[1] == emb[0]
    capsys.readouterr()
    # The recorded content digest is the one of the first ingest (kept for an unchanged fingerprint): verify
    # --content still names the edit until --repair makes the next run ingest the file whole again.
    assert main(["verify", "--content", "--storage", str(storage)]) == 1
    assert main(["verify", "--content", "--repair", "--storage", str(storage)]) == 0
    assert not raw.exists()
    assert _run(tmp_path) == 0  # ingested and embedded again
    emb = pq.read_table(storage / "embeddings" / "vecs.parquet").column("embedding").to_pylist()
    assert emb[1] == emb[0]
    assert main(["verify", "--content", "--storage", str(storage)]) == 0
    assert "(and every input's content)" in capsys.readouterr().out


def _file_bytes_digest(h, *paths: Path) -> str:
    for path in paths:
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def test_content_digests_are_sha256_and_a_recorded_blake2b_digest_still_verifies(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New raw indexes record `sha256:<hex>`; one written before (an unprefixed BLAKE2b-128 digest) is
    verified with BLAKE2b, so `verify --content` neither cries wolf over it nor misses an edit."""
    import hashlib

    from semdedup_assets.core.io.shards import ShardFile
    from semdedup_assets.core.io.storage import CONTENT_KEY

    def recorded(storage: Path, key: str) -> str:
        return pq.read_schema(storage / "raw" / f"{key}.parquet").metadata[CONTENT_KEY].decode()

    x = make_planted(60, 8, dup_every=1000, seed=5)
    (tmp_path / "input").mkdir()
    npy, meta = tmp_path / "input" / "vecs.npy", tmp_path / "input" / "vecs.parquet"
    np.save(npy, x)
    pq.write_table(pa.table({"id": [f"v{i}" for i in range(60)]}), meta)
    assert _run(tmp_path, storage=tmp_path / "new") == 0
    assert recorded(tmp_path / "new", "vecs") == "sha256:" + _file_bytes_digest(hashlib.sha256(), npy, meta)

    # A storage written before the change: the same ingest, recording BLAKE2b-128 as it did.
    def blake2b_digest(self: ShardFile, like: str | None = None) -> str:
        return _file_bytes_digest(hashlib.blake2b(digest_size=16), *(p for p in (self.path, self.metadata) if p))

    with monkeypatch.context() as m:
        m.setattr(ShardFile, "content_digest", blake2b_digest)
        assert _run(tmp_path) == 0
    storage = tmp_path / "storage"
    assert recorded(storage, "vecs") == _file_bytes_digest(hashlib.blake2b(digest_size=16), npy, meta)
    capsys.readouterr()
    assert main(["verify", "--content", "--storage", str(storage)]) == 0, capsys.readouterr().out
    assert _run(tmp_path) == 0  # unchanged input: the recorded digest is kept, not recomputed
    assert not recorded(storage, "vecs").startswith("sha256:")
    before = os.stat(npy)
    edited = np.load(npy, mmap_mode="r+")
    edited[1] = edited[0]
    edited.flush()
    del edited
    os.utime(npy, ns=(before.st_atime_ns, before.st_mtime_ns))
    capsys.readouterr()
    assert main(["verify", "--content", "--storage", str(storage)]) == 1
    assert f"the content of its input {npy} changed since it was ingested" in capsys.readouterr().out


class _LengthEncoder:
    """A stand-in text encoder: one unit vector per text length (records what it was asked to embed)."""

    modality, name, dim = "text", "length", 4

    def __init__(self) -> None:
        self.seen: list[str] = []

    def encode(self, items: list[str]) -> np.ndarray:
        self.seen += items
        x = np.array([[1.0, len(t), 1.0 + (len(t) % 3), 2.0] for t in items], dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_empty_texts_and_ids_go_to_rejected_with_a_reason_or_fail_in_strict_mode(tmp_path: Path) -> None:
    """20.12: "" and "   " were embedded (so "" removed "   " as a duplicate), and an empty id was accepted."""
    from semdedup_assets.core.checks.verify import verify_storage
    from semdedup_assets.core.config import Settings
    from semdedup_assets.core.embed.shard import EmbedError, embed_shard
    from semdedup_assets.core.io.shards import discover_shards
    from semdedup_assets.core.run.loop import ingest_shards

    (tmp_path / "input").mkdir()
    rows = [("a", "hello there"), ("b", ""), ("c", "  \t "), ("", "no id"), ("e", "general kenobi")]
    pq.write_table(
        pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows]}), tmp_path / "input" / "t.parquet"
    )
    settings = Settings(storage=str(tmp_path / "storage"), input=str(tmp_path / "input"), modality="text")
    [shard] = discover_shards(settings.input)
    ingest_shards(settings, [shard])
    encoder = _LengthEncoder()
    result = embed_shard(settings, "t", shard, encoder=encoder)
    assert encoder.seen == ["hello there", "general kenobi"]
    assert (result.rows, result.rejected) == (2, 3)
    storage = settings.storage_root()
    rejected = pq.read_table(str(storage.shard_file("rejected", "t"))).to_pylist()
    assert [(r["id"], r["reason"]) for r in rejected] == [
        ("b", "empty text"),
        ("c", "whitespace-only text"),
        ("", "empty id"),
    ]
    assert pq.read_table(str(storage.shard_file("embeddings", "t"))).column("id").to_pylist() == ["a", "e"]
    assert verify_storage(storage, settings) == []  # embeddings = raw minus rejected
    with pytest.raises(
        EmbedError, match=r"shard 't', key 'b' \(row 1\): empty text \(3 empty item\(s\); strict mode\)"
    ):
        embed_shard(settings.replace(strict=True, max_length=100), "t", shard, encoder=_LengthEncoder())
    # Strict over the lenient run's reused file (same cache key): the recorded rejections fail it too, not a
    # silent cache hit; lenient again reuses it.
    with pytest.raises(
        EmbedError,
        match=r"shard 't', key 'b' \(row 1\): empty text \(3 rejected item\(s\) "
        r"recorded when it was embedded; strict mode\)",
    ):
        embed_shard(settings.replace(strict=True), "t", shard, encoder=_LengthEncoder())
    again = embed_shard(settings, "t", shard, encoder=_LengthEncoder())
    assert again.cached and (again.rows, again.rejected) == (2, 3)


def test_more_clusters_than_items_and_auto_are_said_plainly(
    tmp_path: Path, home: Path, capfd: pytest.CaptureFixture
) -> None:
    """20.13: --clusters 500 on 50 items silently used k=50; the settings warning printed "clusters is None"."""
    write_embedding_shards(tmp_path / "input", n_shards=1, per_shard=50, d=8)
    assert _run(tmp_path, "--clusters", "500") == 0
    err = capfd.readouterr().err
    assert "--clusters 500 is more than the 50 items: using k=50" in err, err
    assert _run(tmp_path, "--clusters", "auto") == 0
    err = capfd.readouterr().err
    assert "warning: clusters is auto, the previous run on this storage used 500" in err, err
    assert "None" not in err and "more than the" not in err
