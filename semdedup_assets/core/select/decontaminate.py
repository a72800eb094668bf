"""Decontamination: flag dataset items that are near-copies of an evaluation (reference) set.

The reference shards (any supported input format, or bring-your-own embeddings) are
embedded with the dataset's own encoder. Every dataset item's nearest reference item is
found by an exact all-pairs search in tiles (dataset rows x reference block, as the
pairwise kernel), so memory stays O(rows * block) however large the reference is. An
item is *contaminated at eps* when its best score exceeds 1 - eps; the results keep every
item above 1 - max(configured eps), with the reference id and score, and each consumer
applies its own eps (the deduplicated dataset: the selection's eps).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from semdedup_assets.core.config import Settings
from semdedup_assets.core.embed.encoders import Encoder, encoder_for, l2_normalize, resolve_device
from semdedup_assets.core.embed.shard import empty_items
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.schemas import CONTAMINATED_REFERENCE_KEY, CONTAMINATED_SCHEMA
from semdedup_assets.core.io.shards import (
    ShardError,
    ShardFile,
    discover,
    iter_embedding_chunks,
    read_images,
    read_shard,
)
from semdedup_assets.core.io.tables import unit_embeddings

if TYPE_CHECKING:
    import torch

REFERENCE_BLOCK = 4096


class ReferenceError(ValueError):
    """A reference set that cannot be used; the message says why."""


@dataclass(frozen=True)
class Reference:
    """The embedded reference set: ids (`<shard>:<row>` without an id column) and unit-norm rows."""

    ids: np.ndarray
    vectors: np.ndarray
    skipped: int = 0  # items with an empty id or an empty or whitespace-only text: nothing to compare


def _reference_shards(location: str) -> list[ShardFile]:
    """The reference's shard files (ReferenceError when the location is missing or holds none)."""
    try:
        shards = discover(location).files  # one file per shard: the reference is never grouped
    except (FileNotFoundError, ValueError) as err:
        raise ReferenceError(f"reference {location}: {err}") from None
    if not shards:
        raise ReferenceError(f"reference {location}: no shard files")
    return shards


def embed_reference(
    location: str,
    modality: str,
    column: str,
    id_column: str,
    encode: Callable[[list], np.ndarray] | None,
    encode_images: Callable[[list], tuple[np.ndarray, np.ndarray]] | None = None,
) -> Reference:
    """Read and embed every reference shard under `location` like dataset shards.

    `encode(texts)` embeds text; `encode_images(images)` returns (vectors, ok positions)
    (undecodable reference images are skipped); the embedding modality needs neither. Items
    with nothing to compare (an empty id, an empty or whitespace-only text: `embed.empty_items`,
    as the dataset's own are rejected) are skipped and counted in `skipped`: an empty text
    would embed to a vector that flags unrelated short items.
    """
    shards = _reference_shards(location)
    ids: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    skipped = 0
    for shard in shards:
        try:
            index = read_shard(shard, modality, column, id_column).table
            id_list = index.column("id").to_pylist()
            texts = index.column("text").to_pylist() if modality == "text" else None
            empty = {row for row, _ in empty_items(id_list, texts)}
            skipped += len(empty)
            keep = np.array([row not in empty for row in range(len(id_list))], dtype=bool)
            shard_ids = np.asarray(id_list, dtype=object)
            if modality == "embedding":
                x = np.concatenate(list(iter_embedding_chunks(shard, column)))[keep]
                shard_ids = shard_ids[keep]
            elif modality == "text":
                assert encode is not None and texts is not None
                x = encode([t for t, k in zip(texts, keep) if k]) if keep.any() else np.zeros((0, 1), np.float32)
                shard_ids = shard_ids[keep]
            else:
                assert encode_images is not None
                x, ok = encode_images(read_images(shard, column))
                kept = keep[np.asarray(ok, dtype=np.int64)]
                x, shard_ids = np.asarray(x)[kept], shard_ids[np.asarray(ok, dtype=np.int64)[kept]]
        except ShardError as err:
            raise ReferenceError(f"reference {err}") from None
        if not len(shard_ids):
            continue
        ids.append(np.asarray([f"{i}" for i in shard_ids], dtype=object))
        vectors.append(l2_normalize(np.asarray(x, dtype=np.float32)))
    if not ids:
        raise ReferenceError(f"reference {location}: no item to compare ({skipped} with an empty id or text)")
    return Reference(np.concatenate(ids), np.concatenate(vectors), skipped)


def check_reference(location: str, modality: str, column: str, id_column: str, dataset_dim: int | None = None) -> int:
    """Fail (ReferenceError) when a --reference cannot be used; returns its item count. Embeds nothing.

    Run before any stage, so that a missing location, an unreadable shard, a bad vector
    (NaN/inf, zero norm, subnormal: the ingest checks) or, for bring-your-own embeddings,
    a dimension other than the dataset's `dataset_dim` stops the run before it writes.
    """
    shards = _reference_shards(location)
    items = 0
    for shard in shards:
        try:
            index = read_shard(shard, modality, column, id_column)
        except ShardError as err:
            raise ReferenceError(f"reference {err}") from None
        if dataset_dim is not None and index.dim is not None and index.dim != dataset_dim:
            raise ReferenceError(
                f"reference shard {shard.key!r} has dimension {index.dim} but the dataset's "
                f"embeddings have dimension {dataset_dim}: embed both with the same encoder"
            )
        items += index.table.num_rows
    return items


def check_run_reference(settings: Settings, first_shard: ShardFile) -> int:
    """Refuse a --reference that the last stage could not use (a ReferenceError naming it and why), before a run.

    With bring-your-own embeddings the reference's dimension must be the dataset's, read here
    from its first shard (a damaged shard is left for the ingest stage to report).
    """
    dim = None
    if settings.modality == "embedding":
        try:
            dim = read_shard(first_shard, settings.modality, settings.payload_column, settings.id_column).dim
        except ShardError:
            dim = None
    return check_reference(settings.reference, settings.modality, settings.payload_column, settings.id_column, dim)


def nearest_reference(
    x: np.ndarray, reference: np.ndarray, block: int = REFERENCE_BLOCK, device: str | torch.device | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(best cosine float32, index of the first reference row achieving it) for every row of x, exact.

    Fails naming both dimensions when they differ.
    """
    if x.shape[1] != reference.shape[1]:
        raise ReferenceError(
            f"the reference embeddings have dimension {reference.shape[1]} but the dataset's have "
            f"dimension {x.shape[1]}: embed both with the same encoder"
        )
    import torch  # here, not at import: the code location loads without torch

    with torch.inference_mode():
        q = torch.from_numpy(np.array(x, dtype=np.float32, order="C")).to(device or "cpu")
        r = torch.from_numpy(np.array(reference, dtype=np.float32, order="C")).to(q.device)
        best = torch.full((len(q),), float("-inf"), device=q.device)
        arg = torch.full((len(q),), -1, dtype=torch.int64, device=q.device)
        for r0 in range(0, len(r), block):  # ascending blocks, strict >: the first index wins ties
            val, idx = (q @ r[r0 : r0 + block].T).max(dim=1)
            better = val > best
            best = torch.where(better, val, best)
            arg = torch.where(better, idx + r0, arg)
        return best.cpu().numpy(), arg.cpu().numpy()


def find_contaminated(
    chunks: Iterable[tuple[str, np.ndarray, np.ndarray]],
    reference: Reference,
    threshold: float,
    block: int = REFERENCE_BLOCK,
    device: str | torch.device | None = None,
) -> Iterator[pa.Table]:
    """For (shard, ids, unit-norm vectors) chunks: the items whose best reference score > threshold."""
    for shard, ids, x in chunks:
        if not len(x):
            continue
        best, arg = nearest_reference(x, reference.vectors, block, device)
        hit = np.flatnonzero(best.astype(np.float64) > threshold)
        yield pa.table(
            {
                "id": pa.array(np.asarray(ids, dtype=object)[hit].tolist(), pa.string()),
                "shard": pa.array([shard] * len(hit), pa.string()),
                "reference_id": pa.array(reference.ids[arg[hit]].tolist(), pa.string()),
                "score": pa.array(best[hit].astype(np.float64)),
            },
            schema=CONTAMINATED_SCHEMA,
        )


def contamination_threshold(eps: Sequence[float]) -> float:
    """The score above which items are recorded: 1 - the largest configured eps (every eps's flags)."""
    return 1.0 - max(float(e) for e in eps)


@dataclass
class DecontaminationResult:
    """What `decontaminate` flagged: every item above 1 - max(eps), and counts per eps."""

    path: str
    reference_items: int
    flagged: int
    per_eps: dict[float, int]
    seconds: float
    reference_skipped: int = 0  # reference items with an empty id or text (not compared)


def _stored_chunks(embedding_files: Mapping[str, st.UPath]) -> Iterator[tuple[str, list[str], np.ndarray]]:
    """(shard, ids, unit-norm rows) per shard's embeddings file, in shard order."""
    for key in sorted(embedding_files):
        table = st.read_table(embedding_files[key])
        yield key, table.column("id").to_pylist(), unit_embeddings(table)


def decontaminate(
    settings: Settings, embedding_files: Mapping[str, st.UPath], encoder: Encoder | None = None
) -> DecontaminationResult | None:
    """Flag the dataset's items within 1 - eps of `settings.reference`; writes the contaminated file atomically.

    Without a reference the file holds no rows (nothing is contaminated) and None is returned;
    it is not removed, so a catalog a client still holds never loses the file under its view.
    The file records the reference it was computed against (CONTAMINATED_REFERENCE_KEY).
    The reference is embedded with the dataset's encoder (`encoder`, else `encoder_for(settings)`).
    """
    storage = settings.storage_root()
    schema = CONTAMINATED_SCHEMA.with_metadata({CONTAMINATED_REFERENCE_KEY: (settings.reference or "").encode()})
    if not settings.reference:
        st.atomic_write_table(schema.empty_table(), storage.contaminated_file)
        return None
    start = time.perf_counter()
    if settings.modality != "embedding" and encoder is None:
        encoder = encoder_for(settings)

    def encode_images(items: list) -> tuple[np.ndarray, np.ndarray]:
        result = encoder.encode_images(items)
        return result.vectors, result.ok_index

    reference = embed_reference(
        settings.reference,
        settings.modality,
        settings.payload_column,
        settings.id_column,
        encoder.encode if settings.modality == "text" else None,
        encode_images,
    )
    threshold = contamination_threshold(settings.eps)
    writer = st.AtomicParquetWriter(storage.contaminated_file, schema)
    per_eps = {e: 0 for e in settings.eps}  # counted shard by shard: no list of every flagged item's score
    flagged = 0
    with st.publish_together([writer]):
        for table in find_contaminated(
            _stored_chunks(embedding_files), reference, threshold, device=resolve_device(settings.device)
        ):
            writer.write(table)
            s = table.column("score").to_numpy()
            flagged += len(s)
            for e in per_eps:
                per_eps[e] += int((s > 1.0 - e).sum())
    return DecontaminationResult(
        path=str(storage.contaminated_file),
        reference_items=len(reference.ids),
        reference_skipped=reference.skipped,
        flagged=flagged,
        per_eps=per_eps,
        seconds=round(time.perf_counter() - start, 2),
    )
