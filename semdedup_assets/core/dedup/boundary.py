"""Choosing eps by looking: the duplicate pairs just above and just below each threshold 1 - eps.

The paper chose eps by inspecting what a threshold separates. For every configured eps,
`keep_lists` shows the few pairs (item, the earlier member it duplicates) whose max_sim
lies closest above 1 - eps (removed at this eps) and closest at or below it (kept), with
their text, or thumbnails of the images.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence

from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import BUCKET_GLOB, scan, stage_source

Pair = tuple[float, str, str]  # (max_sim, id, duplicate_of)
THUMBNAIL_PX = 96


def boundary_pairs(storage: st.Storage, eps: float, n: int = 3) -> tuple[list[Pair], list[Pair]]:
    """The n pairs with max_sim just above 1 - eps (removed) and the n at or just below it (kept)."""
    source = stage_source(storage, st.SEMANTIC_DUPLICATES, BUCKET_GLOB)
    threshold = 1.0 - float(eps)
    above = scan(
        storage,
        f"SELECT max_sim, id, duplicate_of FROM {source} WHERE duplicate_of IS NOT NULL "
        "AND max_sim > ? ORDER BY max_sim, id LIMIT ?",
        [threshold, n],
    )
    below = scan(
        storage,
        f"SELECT max_sim, id, duplicate_of FROM {source} WHERE duplicate_of IS NOT NULL "
        "AND max_sim <= ? ORDER BY max_sim DESC, id LIMIT ?",
        [threshold, n],
    )
    return [tuple(r) for r in above], [tuple(r) for r in below]  # type: ignore[misc]


def boundary_markdown(eps: float, above: Sequence[Pair], below: Sequence[Pair], cell: Callable[[str], str]) -> str:
    """One eps's boundary as a markdown table: removed pairs above the line, kept pairs below it."""
    lines = [
        f"Threshold 1 - eps = {1.0 - float(eps):.6g} (removed when max_sim > threshold)",
        "",
        "| side | max_sim | item | earlier member it resembles |",
        "|---|---|---|---|",
    ]
    lines += [f"| removed | {s:.5f} | {cell(a)} | {cell(b)} |" for s, a, b in reversed(list(above))]
    lines += [f"| kept | {s:.5f} | {cell(a)} | {cell(b)} |" for s, a, b in below]
    if not above and not below:
        lines.append("| - | - | no duplicate pairs | - |")
    return "\n".join(lines)


def thumbnail_uri(data: bytes | None, px: int = THUMBNAIL_PX) -> str | None:
    """A small JPEG data URI of an encoded image (None when it does not decode)."""
    if not data:
        return None
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            img.thumbnail((px, px))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
    except Exception:  # an undecodable image just shows no thumbnail
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def image_thumbnails(storage: st.Storage, input_location: str, ids: Sequence[str], column: str) -> dict[str, str]:
    """Thumbnails of a few items' images, read from their input shards (by the raw index's shard and row)."""
    from semdedup_assets.core.io.shards import discover_shards, read_images

    if not ids or not storage.stage_files(st.RAW):
        return {}
    rows = scan(
        storage,
        f"SELECT id, shard, row FROM {stage_source(storage, st.RAW)} WHERE id IN (SELECT unnest(?))",
        [list(ids)],
    )
    shards = {s.key: s for s in discover_shards(input_location)}
    out: dict[str, str] = {}
    for key in sorted({r[1] for r in rows}):
        if key not in shards:
            continue
        images = read_images(shards[key], column)
        for i, shard, row in rows:
            if shard == key and (uri := thumbnail_uri(images[row])):
                out[i] = uri
    return out
