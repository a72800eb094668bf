"""core.io.recent: the embeddings a run just wrote, held for its k-means sample, are the stored values exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import recent
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.tables import embedding_array, embedding_matrix
from semdedup_assets.core.run import loop as run_loop
from semdedup_assets_tests.fixtures import write_embedding_shards


def settings(tmp_path: Path, storage: str, **kw) -> Settings:
    return Settings(
        storage=str(tmp_path / storage),
        input=str(tmp_path / "input"),
        modality="embedding",
        clusters=5,
        buckets=3,
        eps=(0.01, 0.1),
        **kw,
    )


def test_the_sample_from_memory_is_the_stored_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run recalls every shard's embeddings for the sample (the file's very values) and writes the files of a
    run that reads them back, byte for byte."""
    write_embedding_shards(tmp_path / "input", n_shards=3, per_shard=150, d=8, dup_every=5)  # not unit norm
    recall, hits = recent.recall, []

    def checked(path: st.UPath) -> np.ndarray | None:
        held = recall(path)
        if held is not None:
            stored = embedding_matrix(st.read_table(path, columns=["embedding"]).column("embedding"))
            assert held.dtype == np.float32 and held.tobytes() == stored.tobytes()
            hits.append(path)
        return held

    monkeypatch.setattr(recent, "recall", checked)
    held = settings(tmp_path, "held")
    run_loop.run_units(held)
    assert len(hits) == 3
    monkeypatch.setattr(recent, "recall", lambda path: None)  # every shard read from its file, as before
    read = settings(tmp_path, "read")
    run_loop.run_units(read)
    for stage in (st.CENTROIDS, st.CLUSTER_ASSIGNMENTS, st.SEMANTIC_DUPLICATES, st.KEEP_LISTS):
        ours = {p.name: p.read_bytes() for p in held.storage_root().stage_files(stage)}
        theirs = {p.name: p.read_bytes() for p in read.storage_root().stage_files(stage)}
        assert ours and ours == theirs, stage
    assert not recent.accepting(1)  # the run's matrices are dropped when it ends


def test_float16_storage_is_read_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A float16 file does not hold the float32 matrix that was encoded: nothing is held for it."""
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=100, d=8)
    remembered: list[st.UPath] = []
    remember = recent.remember
    monkeypatch.setattr(recent, "remember", lambda path, m: (remembered.append(path), remember(path, m)))
    run_loop.run_units(settings(tmp_path, "half", embedding_dtype="float16"))
    assert remembered == []


def test_only_the_file_as_written_inside_the_limit(tmp_path: Path) -> None:
    """Outside `holding`, over its limit, or once the file changed, `recall` gives None (the caller reads)."""
    path = st.to_upath(str(tmp_path)) / "embeddings" / "a.parquet"
    m = np.arange(12, dtype=np.float32).reshape(4, 3)

    def write(x: np.ndarray) -> None:
        st.atomic_write_table(pa.table({"embedding": embedding_array(x)}), path)

    write(m)
    recent.remember(path, m)
    assert recent.recall(path) is None  # not holding
    with recent.holding(m.nbytes - 1):
        recent.remember(path, m)
        assert recent.recall(path) is None  # over the limit
    with recent.holding(m.nbytes):
        recent.remember(path, m)
        assert recent.recall(path) is m
        write(m + 1)  # another version of the file: read, not recalled
        assert recent.recall(path) is None
    with recent.holding(m.nbytes):
        assert recent.recall(path) is None  # dropped when the earlier block ended
