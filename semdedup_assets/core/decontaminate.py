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

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from semdedup_assets.core.encoders import l2_normalize
from semdedup_assets.core.shards import ShardError, discover_shards, iter_embedding_chunks, read_images, read_shard

CONTAMINATED_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.string()), ("reference_id", pa.string()),
                                 ("score", pa.float64())])
REFERENCE_BLOCK = 4096


class ReferenceError(ValueError):
    """A reference set that cannot be used; the message says why."""


@dataclass(frozen=True)
class Reference:
    """The embedded reference set: ids (`<shard>:<row>` without an id column) and unit-norm rows."""

    ids: np.ndarray
    vectors: np.ndarray


def embed_reference(location: str, modality: str, column: str, id_column: str,
                    encode: Callable[[list], np.ndarray] | None,
                    encode_images: Callable[[list], tuple[np.ndarray, np.ndarray]] | None = None) -> Reference:
    """Read and embed every reference shard under `location` like dataset shards.

    `encode(texts)` embeds text; `encode_images(images)` returns (vectors, ok positions)
    (undecodable reference images are skipped); the embedding modality needs neither.
    """
    try:
        shards = discover_shards(location)
    except (FileNotFoundError, ValueError) as err:
        raise ReferenceError(f"reference {location}: {err}") from None
    if not shards:
        raise ReferenceError(f"reference {location}: no shard files")
    ids: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    for shard in shards:
        try:
            index = read_shard(shard, modality, column, id_column).table
            shard_ids = np.asarray(index.column("id").to_pylist(), dtype=object)
            if modality == "embedding":
                x = np.concatenate(list(iter_embedding_chunks(shard, column)))
            elif modality == "text":
                assert encode is not None
                x = encode(index.column("text").to_pylist())
            else:
                assert encode_images is not None
                x, ok = encode_images(read_images(shard, column))
                shard_ids = shard_ids[ok]
        except ShardError as err:
            raise ReferenceError(f"reference {err}") from None
        ids.append(np.asarray([f"{i}" for i in shard_ids], dtype=object))
        vectors.append(l2_normalize(np.asarray(x, dtype=np.float32)))
    return Reference(np.concatenate(ids), np.concatenate(vectors))


def nearest_reference(x: np.ndarray, reference: np.ndarray, block: int = REFERENCE_BLOCK,
                      device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(best cosine float32, index of the first reference row achieving it) for every row of x, exact.

    Fails naming both dimensions when they differ.
    """
    if x.shape[1] != reference.shape[1]:
        raise ReferenceError(f"the reference embeddings have dimension {reference.shape[1]} but the dataset's have "
                             f"dimension {x.shape[1]}: embed both with the same encoder")
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


def find_contaminated(chunks: Iterable[tuple[str, np.ndarray, np.ndarray]], reference: Reference,
                      threshold: float, block: int = REFERENCE_BLOCK,
                      device: str | torch.device | None = None) -> Iterator[pa.Table]:
    """For (shard, ids, unit-norm vectors) chunks: the items whose best reference score > threshold."""
    for shard, ids, x in chunks:
        if not len(x):
            continue
        best, arg = nearest_reference(x, reference.vectors, block, device)
        hit = np.flatnonzero(best.astype(np.float64) > threshold)
        yield pa.table({"id": pa.array(np.asarray(ids, dtype=object)[hit].tolist(), pa.string()),
                        "shard": pa.array([shard] * len(hit), pa.string()),
                        "reference_id": pa.array(reference.ids[arg[hit]].tolist(), pa.string()),
                        "score": pa.array(best[hit].astype(np.float64))}, schema=CONTAMINATED_SCHEMA)


def contamination_threshold(eps: Sequence[float]) -> float:
    """The score above which items are recorded: 1 - the largest configured eps (every eps's flags)."""
    return 1.0 - max(float(e) for e in eps)
