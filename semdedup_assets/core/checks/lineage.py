"""What a derived output was made from: the fingerprint of the results it was computed on.

The derived outputs (the exported `deduplicated/<selection>/` folders, the pruning
selections under `pruned/<label>/`) are written from the stage files a run leaves: the
bucket results (`max_sim`, `duplicate_of`, `sim_to_centroid`, cluster), the centroids and
the decontamination results. `results_fingerprint` digests the bytes of exactly those
files; each derived output records it when it is written (an export in every shard's
manifest, a pruning selection in its `made_from.json`). An output whose recorded
fingerprint differs from the storage's current one was made from other results: status,
verify and the next successful run flag it, the `pruned` view leaves a stale selection out
and that run removes it; `export` writes an export again (docs/stale-outputs.md). A run with the same settings rewrites the same bytes
(the byte-identity guarantee), so it keeps its outputs current.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from semdedup_assets.core.checks.layout import bucket_files_on_disk
from semdedup_assets.core.io import storage as st

MADE_FROM_FILE = "made_from.json"  # in each pruning selection's folder
READ_CHUNK = 1 << 20


def _file_digest(path: st.UPath) -> str:
    """SHA-256 of a file's bytes, read in chunks (bounded memory, local or remote)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def results_files(storage: st.Storage) -> list[st.UPath]:
    """The files every derived output is computed from, in a fixed order (those that exist)."""
    files = [p for _, p in sorted(bucket_files_on_disk(storage).items())]
    return files + [p for p in (storage.centroids_file, storage.contaminated_file) if p.exists()]


def results_fingerprint(storage: st.Storage) -> str:
    """`sha256:<hex>` over the names and bytes of the results files: equal exactly when the results are."""
    h = hashlib.sha256()
    root = str(storage.root).rstrip("/") + "/"
    for path in results_files(storage):
        name = str(path)[len(root) :] if str(path).startswith(root) else path.name
        h.update(f"{name}\0{_file_digest(path)}\n".encode())
    return "sha256:" + h.hexdigest()


def made_from_file(folder: st.UPath) -> st.UPath:
    """The record of what a pruning selection's folder was made from."""
    return folder / MADE_FROM_FILE


def write_made_from(folder: st.UPath, fingerprint: str, **extra: Any) -> None:
    """Record (atomically) that the files in `folder` were made from the results `fingerprint`."""
    st.atomic_write_bytes(
        json.dumps({"results": fingerprint, **extra}, sort_keys=True).encode(), made_from_file(folder)
    )


def read_made_from(folder: st.UPath) -> dict[str, Any]:
    """What a folder records it was made from ({} when nothing, or nothing readable, is recorded)."""
    path = made_from_file(folder)
    try:
        value = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def mismatch(recorded: str | None, current: str) -> str | None:
    """Why an output recording `recorded` does not match the results `current` (None: it matches)."""
    if recorded is None:
        return "no record of the results it was made from (written before they were recorded, or interrupted)"
    if recorded != current:
        return "made from other results than the storage holds now (a later run, forget or stage changed them)"
    return None
