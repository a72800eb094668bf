"""Images through the whole graph with a tiny open_clip model saved and loaded like a user's checkpoint.

The weights are random: these tests show plumbing (decoding, preprocessing, loading,
rejection, dedup of re-encoded copies), never semantic quality.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io.catalog import query
from semdedup_assets.pipeline import PipelineError, run_pipeline
from semdedup_assets_tests.fixtures import save_tiny_clip


def synthetic_image(seed: int, size: int = 96) -> Image.Image:
    """A distinct picture per seed: a gradient background with random shapes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    c = rng.uniform(0, 255, size=(3, 3))
    bg = np.stack([(c[i, 0] * xx / size + c[i, 1] * yy / size + c[i, 2]) % 256 for i in range(3)], axis=-1)
    img = Image.fromarray(bg.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, size - 20, size=2)
        x1, y1 = x0 + rng.integers(10, 40), y0 + rng.integers(10, 40)
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([int(x0), int(y0), int(x1), int(y1)], fill=fill)
    return img


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def image_rows() -> list[dict]:
    """12 distinct originals, plus a recompressed JPEG and a 0.75x resize of originals 0-3, plus one corrupt file."""
    rows = [{"id": f"orig-{i:02d}", "image": encode(synthetic_image(i))} for i in range(12)]
    for i in range(4):
        img = synthetic_image(i)
        rows.append({"id": f"jpeg-{i:02d}", "image": encode(img, "JPEG", quality=60)})
        rows.append({"id": f"small-{i:02d}", "image": encode(img.resize((72, 72)), "PNG")})
    rows.append({"id": "corrupt", "image": b"\x89PNG\r\n\x1a\n this is not an image"})
    return rows


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def _settings(tmp_path: Path, clip: dict[str, str], **kw) -> Settings:
    base = dict(
        storage=str(tmp_path / "storage"),
        input=str(tmp_path / "input"),
        modality="image",
        model=clip["local_dir"],
        clusters=1,
        buckets=1,
        eps=(0.001, 0.01, 0.05),
        num_workers=0,
        batch_size=8,
    )
    base.update(kw)
    return Settings(**base)


def _write_parquet(tmp_path: Path, rows: list[dict]) -> None:
    (tmp_path / "input").mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), tmp_path / "input" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:]), tmp_path / "input" / "b.parquet")


def _write_tar(tmp_path: Path, rows: list[dict]) -> None:
    (tmp_path / "input").mkdir(parents=True, exist_ok=True)
    for name, part in (("wds-0", rows[::2]), ("wds-1", rows[1::2])):
        with tarfile.open(tmp_path / "input" / f"{name}.tar", "w") as tar:
            for r in part:
                for suffix, data in ((".png", r["image"]), (".json", json.dumps({"caption": r["id"]}).encode())):
                    info = tarfile.TarInfo(r["id"] + suffix)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def _assert_copies_are_duplicates(settings: Settings) -> None:
    storage = settings.storage_root()
    _, rows = query(storage, "SELECT id, max_sim, duplicate_of FROM items ORDER BY id")
    by_id = {i: (m, d) for i, m, d in rows}
    assert "corrupt" not in by_id and len(by_id) == 20
    copies = [i for i in by_id if i.startswith(("jpeg", "small"))]
    originals = [i for i in by_id if i.startswith("orig")]
    # Re-encoded copies sit closer to their original than any two distinct originals do.
    _, sims = query(
        storage,
        "SELECT a.id, b.id, list_dot_product(a.embedding, b.embedding) FROM embeddings a, embeddings b WHERE a.id < b.id",
    )
    sim = {(a, b): s for a, b, s in sims} | {(b, a): s for a, b, s in sims}
    distinct_max = max(sim[(a, b)] for a in originals for b in originals if a != b)
    for c in copies:
        assert sim[(c, "orig-" + c.split("-")[1])] > distinct_max, (c, distinct_max)
    # At the eps that separates the two groups, each original-or-copy group keeps exactly one member.
    eps = 1 - (distinct_max + min(sim[(c, "orig-" + c.split("-")[1])] for c in copies)) / 2
    _, [(kept,)] = query(storage, f"SELECT count(*) FROM items WHERE max_sim <= 1 - {eps!r}")
    assert kept == 12
    _, rejected = query(storage, "SELECT id, shard, reason FROM rejected")
    assert len(rejected) == 1 and rejected[0][0] == "corrupt" and rejected[0][2]


def test_parquet_images_through_the_graph(
    tmp_path: Path, tiny_clip: dict[str, str], instance: dg.DagsterInstance
) -> None:
    _write_parquet(tmp_path, image_rows())
    settings = _settings(tmp_path, tiny_clip)
    run_pipeline(settings, instance, log=lambda m: None)
    _assert_copies_are_duplicates(settings)
    events = instance.fetch_materializations(dg.AssetKey("embeddings"), limit=10).records
    assert sum(e.asset_materialization.metadata["rejected"].value for e in events) == 1  # per shard
    assert events[0].asset_materialization.metadata["run_rejected"].value == 1


def test_webdataset_images_through_the_graph_with_a_checkpoint_file(
    tmp_path: Path, tiny_clip: dict[str, str], instance: dg.DagsterInstance
) -> None:
    _write_tar(tmp_path, image_rows())
    settings = _settings(
        tmp_path, tiny_clip, model=tiny_clip["arch"], pretrained=tiny_clip["checkpoint"], num_workers=2
    )
    run_pipeline(settings, instance, log=lambda m: None)
    _assert_copies_are_duplicates(settings)
    _, [(caption,)] = query(settings.storage_root(), "SELECT caption FROM raw_items WHERE id = 'jpeg-01'")
    assert caption == "jpeg-01"


def test_strict_mode_names_shard_and_key(
    tmp_path: Path, tiny_clip: dict[str, str], instance: dg.DagsterInstance
) -> None:
    _write_parquet(tmp_path, image_rows())
    with pytest.raises(PipelineError, match=r"shard 'b', key 'corrupt'"):
        run_pipeline(_settings(tmp_path, tiny_clip, strict=True), instance, log=lambda m: None)
    assert not list((tmp_path / "storage").glob("embeddings/b.parquet"))
