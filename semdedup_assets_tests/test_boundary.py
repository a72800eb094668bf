"""Choosing eps by looking: keep_lists shows, per eps, the pairs just above and just below 1 - eps."""

from __future__ import annotations

import io
import re
from pathlib import Path

import dagster as dg
from PIL import Image

from semdedup_assets.core.config import Settings
from semdedup_assets.core.dedup.boundary import thumbnail_uri
from semdedup_assets.core.io.catalog import query
from semdedup_assets.pipeline import run_pipeline
from semdedup_assets_tests.fixtures import write_embedding_shards


def test_keep_lists_metadata_shows_the_pairs_on_both_sides_of_each_threshold(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=200, d=8, dup_every=4)
    settings = Settings(
        storage=str(tmp_path / "storage"),
        input=str(tmp_path / "input"),
        modality="embedding",
        clusters=4,
        buckets=2,
        eps=(0.001, 0.01, 0.3),
        block_size=32,
    )
    run_pipeline(settings, instance, log=lambda m: None)
    event = instance.get_latest_materialization_event(dg.AssetKey("keep_lists"))
    meta = event.asset_materialization.metadata
    for eps in settings.eps:
        text = meta[f"pairs_at_eps={eps:g}"].value
        rows = re.findall(r"\| (removed|kept) \| ([0-9.]+) \| `([^`]+)`[^|]*\| `([^`]+)`[^|]*\|", text)
        threshold = 1 - eps
        _, above = query(
            settings.storage_root(),
            "SELECT id FROM items WHERE duplicate_of IS NOT NULL AND "
            f"max_sim > {threshold!r} ORDER BY max_sim, id LIMIT 3",
        )
        _, below = query(
            settings.storage_root(),
            "SELECT id FROM items WHERE duplicate_of IS NOT NULL AND "
            f"max_sim <= {threshold!r} ORDER BY max_sim DESC, id LIMIT 3",
        )
        assert [r[2] for r in rows if r[0] == "removed"] == [a[0] for a in above][::-1]
        assert [r[2] for r in rows if r[0] == "kept"] == [b[0] for b in below]
        assert all(float(s) > threshold for side, s, _, _ in rows if side == "removed")
        assert all(float(s) <= threshold + 5e-6 for side, s, _, _ in rows if side == "kept")
        assert above and below  # both sides shown for every eps of this data


def test_thumbnails_are_small_jpeg_data_uris() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (640, 320), (200, 30, 30)).save(buf, format="PNG")
    uri = thumbnail_uri(buf.getvalue())
    assert uri is not None and uri.startswith("data:image/jpeg;base64,") and len(uri) < 4000
    assert thumbnail_uri(b"not an image") is None and thumbnail_uri(None) is None
