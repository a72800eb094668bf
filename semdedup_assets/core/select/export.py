"""The deduplicated dataset: each input shard written again, in its own format, with only its kept rows.

A *selection* says which items are kept: `eps=E` (one of the configured eps: keep
`max_sim <= 1 - E`), `keep-fraction=F` (keep the N = ceil(F * items) items with the
smallest max_sim, ties by id: docs/export.md's `ORDER BY max_sim, id LIMIT N`, solved exactly
from the stored max_sim), or a pruning selection (`prototypes:...`, `d4:...`, `dbp:...`,
`outliers:...`, `representatives:...`, core/select/prune.py: the kept items of its `pruned/<label>/kept.parquet`). Items flagged by
decontamination (`contaminated`) are dropped too: those whose reference score exceeds
1 - eps, at the selection's eps (keep-fraction and prototypes: the smallest configured eps).

Output: `<storage>/deduplicated/<selection>/<the shard's path relative to the input>`, one
writer per input format, streamed (bounded memory) and published atomically:
- Parquet: the input's schema (with its metadata) and row order, kept rows only;
- JSON Lines (`.jsonl`, `.jsonl.gz`): the kept lines byte for byte (gzip stays gzip);
- WebDataset `.tar`: every member of a kept key, nothing of a removed key (members that
  belong to no sample, e.g. folders, are copied);
- `.npy` + metadata Parquet: the kept rows of both, aligned.

A manifest per shard (`.semdedup/<shard>.json` in the selection folder) records the input
fingerprint and a digest of the kept rows, so a re-export rewrites only the shards whose
keep decision (or input) changed, and what the rows were selected from (`made_from`: the
storage's results fingerprint, core/checks/lineage.py, and the eps at which contaminated items were
dropped), so that a folder made from other results is flagged (`stale_exports`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semdedup_assets.core.checks.lineage import mismatch, results_fingerprint
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import BUCKET_GLOB, scan, sql_quote, stage_source
from semdedup_assets.core.io.schemas import CONTAMINATED_REFERENCE_KEY
from semdedup_assets.core.io.shards import Shard, ShardFile, ShardGroup, discover_shards, members
from semdedup_assets.core.io.storage import UPath
from semdedup_assets.core.io.webdataset import split_member_name
from semdedup_assets.core.select.prune import PruneError, Pruning, is_pruning, keep_count, kept_file, parse_pruning

DEDUPLICATED = "deduplicated"
MANIFEST_DIR = ".semdedup"
PARQUET_BATCH_ROWS = 16384
NPY_CHUNK_ROWS = 65536


class ExportError(ValueError):
    """A selection or an export that cannot be done; the message names the shard or the value."""


@dataclass(frozen=True)
class Selection:
    """Which items the deduplicated dataset keeps: by eps, by size, or by a pruning method."""

    kind: str  # "eps", "keep-fraction", or a pruning method (prune.METHODS)
    value: float  # eps or keep-fraction
    pruning: Pruning | None = None  # the pruning selection, for the pruning methods

    @property
    def label(self) -> str:
        """The folder name under `<storage>/deduplicated/`, e.g. `eps=0.01` or `dbp:eps=0.01,...`."""
        return self.pruning.label if self.pruning is not None else f"{self.kind}={st.format_eps(self.value)}"


def parse_selection(text: str, configured_eps: Sequence[float]) -> Selection:
    """Parse `eps=E` (E must be configured), `keep-fraction=F` (0 < F <= 1) or a pruning selection."""
    if is_pruning(text):
        try:
            p = parse_pruning(text, configured_eps)
        except PruneError as err:
            raise ExportError(str(err)) from None
        return Selection(p.method, p.keep_fraction, p)
    name, sep, raw = str(text).strip().partition("=")
    name = name.strip().lower().replace("_", "-")
    if not sep or name not in ("eps", "keep-fraction"):
        raise ExportError(
            f"selection must be eps=E or keep-fraction=F, or a pruning selection (prototypes:..., "
            f"d4:..., dbp:..., outliers:..., representatives:...), got {text!r}"
        )
    try:
        value = float(raw)
    except ValueError:
        raise ExportError(f"selection {text!r}: {raw.strip()!r} is not a number") from None
    if name == "keep-fraction":
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise ExportError(f"keep-fraction must lie in (0, 1], got {raw.strip()}")
        return Selection(name, value)
    configured = sorted(float(e) for e in configured_eps)
    if not any(value == e for e in configured):
        raise ExportError(
            f"eps={raw.strip()} is not configured; configured eps: {', '.join(st.format_eps(e) for e in configured)}"
        )
    return Selection(name, value)


def default_selection(configured_eps: Sequence[float]) -> str:
    """The selection used when none is given: the smallest configured eps (the fewest removals)."""
    return f"eps={st.format_eps(min(configured_eps))}"


def _items_source(storage: st.Storage) -> str:
    if not storage.stage_files(st.SEMANTIC_DUPLICATES):
        raise ExportError("no semantic_duplicates results yet: run the pipeline first")
    return stage_source(storage, st.SEMANTIC_DUPLICATES, BUCKET_GLOB)


def _contaminated_source(storage: st.Storage, reference: str | None = None) -> str | None:
    """The decontamination results (see core/select/decontaminate.py), when they are those of `reference`.

    Refuses results computed against another reference than the one the settings name
    (a run whose new --reference could not be read), and a missing or damaged file.
    """
    path = storage.contaminated_file
    if not path.exists():
        if reference:
            raise ExportError(
                f"no decontamination results for the reference {reference}: the last run did not "
                "finish them; re-run `semdedup run`"
            )
        return None
    try:
        recorded = (st.read_schema(path).metadata or {}).get(CONTAMINATED_REFERENCE_KEY)
    except st.StageFileError as err:
        raise ExportError(
            f"{path} is damaged ({err.reason}): `semdedup verify --repair` deletes it and `semdedup run` recomputes it"
        ) from None
    if recorded is not None and recorded.decode() != (reference or ""):
        raise ExportError(
            f"{path} was computed against the reference {recorded.decode() or '(none)'}, but the "
            f"settings name {reference or '(none)'} (its run failed): re-run `semdedup run` with a "
            "readable --reference before exporting"
        )
    return f"read_parquet({sql_quote(str(path))})"


def contamination_eps(selection: Selection, configured_eps: Sequence[float]) -> float:
    """The eps at which contaminated items are dropped: the selection's, else the smallest configured."""
    if selection.pruning is not None and selection.pruning.eps is not None:
        return selection.pruning.eps
    return selection.value if selection.kind == "eps" else min(float(e) for e in configured_eps)


def selection_condition(storage: st.Storage, selection: Selection) -> tuple[str, list[object]]:
    """A SQL condition over the `items` columns (max_sim, id) that is true for kept items."""
    if selection.pruning is not None:
        path = kept_file(storage, selection.pruning)
        if not path.exists():
            raise ExportError(
                f"no results for {selection.label} yet: materialize pruned_{selection.kind} "
                f"(or run `semdedup export --select {selection.label}`)"
            )
        return f"id IN (SELECT id FROM read_parquet({sql_quote(str(path))}))", []
    if selection.kind == "eps":
        # 1 - eps in float64, as keep_mask and the keep-list files.
        return "max_sim <= ?", [1.0 - float(selection.value)]
    source = _items_source(storage)
    [(total,)] = scan(storage, f"SELECT count(*) FROM {source}")
    n = keep_count(selection.value, int(total))
    if n >= total:
        return "true", []
    [(cut_sim, cut_id)] = scan(
        storage, f"SELECT max_sim, id FROM {source} ORDER BY max_sim, id LIMIT 1 OFFSET ?", [n - 1]
    )
    return "(max_sim < ? OR (max_sim = ? AND id <= ?))", [cut_sim, cut_sim, cut_id]


def kept_ids(
    storage: st.Storage,
    selection: Selection,
    shards: Sequence[str],
    configured_eps: Sequence[float] = (),
    reference: str | None = None,
) -> dict[str, pa.Array]:
    """The kept ids of some shards under a selection (items contaminated by `reference` left out), by shard."""
    source = _items_source(storage)
    cond, params = selection_condition(storage, selection)
    contaminated = _contaminated_source(storage, reference)
    if contaminated:
        cond += f" AND id NOT IN (SELECT id FROM {contaminated} WHERE score > ?)"
        params.append(1.0 - contamination_eps(selection, configured_eps or [selection.value]))
    try:
        rows = scan(
            storage,
            f"SELECT shard, list(id ORDER BY id) FROM {source} WHERE shard IN (SELECT unnest(?)) "
            f"AND {cond} GROUP BY shard",
            [list(shards), *params],
        )
    except duckdb.Error as err:  # a stage file damaged inside (its footer read fine)
        raise ExportError(
            f"cannot read the results: {str(err).splitlines()[0]} (`semdedup verify` names the damaged file)"
        ) from None
    out = {s: pa.array([], pa.string()) for s in shards}
    out.update({s: pa.array(ids, pa.string()) for s, ids in rows})
    return out


# Kept ids held at once while exporting (shards are queried in groups of about this many rows).
EXPORT_ID_ROWS = 1_000_000


def _next_shards(storage: st.Storage, keys: Sequence[str], first: str) -> list[str]:
    """`first` and the shards after it in `keys` whose raw rows together stay within EXPORT_ID_ROWS."""
    group: list[str] = []
    rows = 0
    for key in keys[list(keys).index(first) :]:
        n = st.parquet_num_rows(storage.shard_file(st.RAW, key))
        if group and rows + n > EXPORT_ID_ROWS:
            break
        group.append(key)
        rows += n
    return group


def kept_rows(raw: pa.Table, ids: pa.Array) -> np.ndarray:
    """Ascending input row numbers of the kept ids, from a shard's raw index (id, row)."""
    mask = pc.is_in(raw.column("id"), value_set=ids).to_numpy(zero_copy_only=False)
    return np.sort(raw.column("row").to_numpy()[mask]).astype(np.int64)


# ---- atomic streamed files ------------------------------------------------------------------


@contextmanager
def _publish_all() -> Iterator[Callable[[UPath], IO[bytes]]]:
    """Open several atomic files; all are published together when the block succeeds."""
    stack: list = []

    def open_(path: UPath) -> IO[bytes]:
        cm = st.atomic_open(path)
        stack.append(cm)
        return cm.__enter__()

    try:
        yield open_
    except BaseException as exc:
        for cm in reversed(stack):
            try:
                cm.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException:
                pass
        raise
    for cm in stack:
        cm.__exit__(None, None, None)


# ---- one writer per input format --------------------------------------------------------------


def _row_filter(rows: np.ndarray, start: int, length: int) -> np.ndarray:
    """Positions within [start, start + length) of the kept rows (sorted `rows`)."""
    lo, hi = np.searchsorted(rows, [start, start + length])
    return rows[lo:hi] - start


def _write_parquet(src: UPath, rows: np.ndarray, out: IO[bytes]) -> None:
    with src.open("rb") as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow  # with the input's key-value metadata
        with pq.ParquetWriter(out, schema, compression="zstd") as writer:
            start = 0
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                take = _row_filter(rows, start, batch.num_rows)
                if len(take):
                    writer.write_batch(batch.take(pa.array(take)))
                start += batch.num_rows
            if not len(rows):
                writer.write_table(schema.empty_table())


def _iter_lines(f: IO[bytes]) -> Iterator[bytes]:
    """Lines with their terminators, as `_read_jsonl` counts them (split on b'\\n')."""
    yield from f  # binary iteration splits on b"\n" only


def _write_jsonl(src: UPath, rows: np.ndarray, out: IO[bytes]) -> None:
    gz = src.name.endswith(".gz")
    wanted = set(rows.tolist())
    with src.open("rb") as raw_in:
        fin = gzip.GzipFile(fileobj=raw_in, mode="rb") if gz else raw_in
        # mtime=0 and no name: the same kept lines give the same bytes.
        fout = gzip.GzipFile(filename="", fileobj=out, mode="wb", mtime=0) if gz else out
        row = 0
        for line in _iter_lines(fin):
            if not line.strip():
                continue  # blank lines are no rows (as when reading)
            if row in wanted:
                fout.write(line if line.endswith(b"\n") else line + b"\n")
            row += 1
        if gz:
            fout.close()


def _write_tar(src: UPath, keep: set[str], drop: set[str], out: IO[bytes]) -> None:
    with (
        src.open("rb") as f,
        tarfile.open(fileobj=f, mode="r|*") as tin,
        tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tout,
    ):
        for member in tin:
            split = split_member_name(member.name)
            key = split[0] if split else None
            if key in drop:
                continue
            data = tin.extractfile(member) if member.isfile() else None
            tout.addfile(member, data)


def _write_npy(src: UPath, rows: np.ndarray, out: IO[bytes]) -> None:
    if st.is_local(src):
        x = np.load(str(src), mmap_mode="r", allow_pickle=False)
    else:
        with src.open("rb") as f:
            x = np.load(io.BytesIO(f.read()), allow_pickle=False)
    header = {
        "descr": np.lib.format.dtype_to_descr(x.dtype),
        "fortran_order": False,
        "shape": (len(rows), *tuple(x.shape[1:])),
    }
    np.lib.format.write_array_header_1_0(out, header) if _fits_v1(header) else np.lib.format.write_array_header_2_0(
        out, header
    )
    for s in range(0, len(rows), NPY_CHUNK_ROWS):
        out.write(np.ascontiguousarray(x[rows[s : s + NPY_CHUNK_ROWS]]).tobytes())


def _fits_v1(header: dict) -> bool:
    try:
        np.lib.format.write_array_header_1_0(io.BytesIO(), header)
        return True
    except ValueError:
        return False


# ---- shards ---------------------------------------------------------------------------------


def relative_path(path: UPath, root: UPath) -> str:
    """A file's path relative to the input root (its own name when the input is one file)."""
    base = str(root).rstrip("/")
    text = str(path)
    if text.startswith(base + "/"):
        return text[len(base) + 1 :]
    return path.name


def shard_outputs(shard: Shard, input_root: UPath, out_dir: UPath) -> list[list[UPath]]:
    """Where each input file of a shard (one, or a group's) goes: `output_files` per file, in key order."""
    return [output_files(member, input_root, out_dir) for member in members(shard)]


def output_files(shard: ShardFile, input_root: UPath, out_dir: UPath) -> list[UPath]:
    """Where a shard's deduplicated file(s) go: its relative path(s) below the selection folder."""
    paths = [shard.path] + ([shard.metadata] if shard.kind == "npy" and shard.metadata is not None else [])
    outs = []
    for p in paths:
        rel = relative_path(p, input_root)
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ExportError(f"shard {shard.key!r}: {p} is not below the input location {input_root}")
        outs.append(out_dir / rel)
    return outs


def write_shard(shard: ShardFile, rows: np.ndarray, ids: Sequence[str], outputs: Sequence[UPath]) -> None:
    """Write one shard's kept rows (`rows`: ascending input row numbers; `ids`: every id, by row)."""
    rows = np.asarray(rows, dtype=np.int64)
    with _publish_all() as open_:
        if shard.kind == "parquet":
            _write_parquet(shard.path, rows, open_(outputs[0]))
        elif shard.kind == "jsonl":
            _write_jsonl(shard.path, rows, open_(outputs[0]))
        elif shard.kind == "tar":
            keep = {ids[r] for r in rows.tolist()}
            _write_tar(shard.path, keep, set(ids) - keep, open_(outputs[0]))
        elif shard.kind == "npy":
            if shard.metadata is None:
                raise ExportError(f"shard {shard.key!r}: no metadata Parquet for {shard.path.name}")
            _write_npy(shard.path, rows, open_(outputs[0]))
            _write_parquet(shard.metadata, rows, open_(outputs[1]))
        else:
            raise ExportError(f"shard {shard.key!r}: cannot export a {shard.kind!r} shard")


def rows_digest(rows: np.ndarray) -> str:
    """A digest of the kept row numbers (what decides whether a shard's output changes)."""
    return hashlib.blake2b(np.asarray(rows, dtype="<i8").tobytes(), digest_size=16).hexdigest()


@dataclass
class ShardExport:
    """What exporting one shard did."""

    shard: str
    kept: int
    removed: int
    rewritten: bool
    files: list[str]


def selection_dir(storage: st.Storage, selection: Selection) -> UPath:
    """`<storage>/deduplicated/<selection>/`."""
    return storage.stage_dir(DEDUPLICATED) / selection.label


def manifest_file(out_dir: UPath, key: str) -> UPath:
    """A shard's manifest in a selection folder."""
    return out_dir / MANIFEST_DIR / f"{key}.json"


def _files_below(folder: UPath) -> list[UPath]:
    return sorted((p for p in folder.rglob("*") if p.is_file()), key=str) if folder.exists() else []


def _remove_files(paths: Sequence[UPath], folder: UPath) -> list[str]:
    """Delete files, then (local) the folders they leave empty; the paths removed, relative to `folder`."""
    removed = [p for p in paths if st.remove(p)]
    if st.is_local(folder):
        top = str(folder).rstrip("/")
        for d in sorted(
            {str(q) for p in removed for q in p.parents if str(q) == top or str(q).startswith(top + "/")},
            key=len,
            reverse=True,
        ):
            try:
                os.rmdir(d)
            except OSError:  # not empty
                pass
    base = str(folder).rstrip("/") + "/"
    return [str(p)[len(base) :] for p in removed]


def prune_selection(storage: st.Storage, selection: Selection, expected: set[str]) -> list[str]:
    """Remove every file in the selection folder that is not in `expected` (paths as strings).

    What is left holds exactly what the current selection implies: no file or manifest of
    a forgotten shard, nothing written by an older layout. Returns the removed paths,
    relative to the folder.
    """
    out_dir = selection_dir(storage, selection)
    return _remove_files([p for p in _files_below(out_dir) if str(p) not in expected], out_dir)


def selection_folders(storage: st.Storage) -> dict[str, UPath]:
    """Every selection folder under `<storage>/deduplicated/`, by label."""
    root = storage.stage_dir(DEDUPLICATED)
    if not root.exists():
        return {}
    return {p.name: p for p in sorted(root.iterdir(), key=str) if p.is_dir()}


def unproducible_selections(storage: st.Storage, configured_eps: Sequence[float]) -> list[str]:
    """Labels of selection folders that the settings can no longer produce (an eps no longer configured)."""
    out = []
    for label in selection_folders(storage):
        try:
            parse_selection(label, configured_eps)
        except ExportError:
            out.append(label)
    return out


def remove_unproducible_selections(storage: st.Storage, configured_eps: Sequence[float]) -> list[str]:
    """Delete every selection folder no `export` can refresh any more; returns their labels."""
    labels = unproducible_selections(storage, configured_eps)
    for label in labels:
        remove_selection_folder(storage, label)
    return labels


def _manifest_files(manifest: UPath) -> list[UPath]:
    """The output files a manifest lists ([] when it is missing or damaged: the next export prunes them)."""
    try:
        return [st.to_upath(p) for p in json.loads(manifest.read_text())["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def remove_exported_shard(storage: st.Storage, key: str) -> list[str]:
    """Delete one shard's files (as its manifest lists them) and manifest from every selection folder."""
    removed = []
    for folder in selection_folders(storage).values():
        manifest = manifest_file(folder, key)
        if not manifest.exists():
            continue
        below = [p for p in _manifest_files(manifest) if str(p).startswith(str(folder).rstrip("/") + "/")]
        removed += [f"{folder.name}/{p}" for p in _remove_files([*below, manifest], folder)]
    return removed


def export_shards(
    storage: st.Storage,
    input_location: str,
    selection: Selection,
    keys: Sequence[str] | None = None,
    configured_eps: Sequence[float] = (),
    log: Callable[[str], None] | None = None,
    reference: str | None = None,
    files_per_shard: int = 1,
) -> list[ShardExport]:
    """Write the deduplicated copy of some shards (default: every shard that has results).

    Every input file is written again in its own format and relative path; a group of
    `files_per_shard` files is one shard (one manifest) whose files are written one by one.

    `log`, if given, is called once per shard done. `reference` is the settings' --reference:
    the decontamination results must be those of it (see `_contaminated_source`).

    Refuses (ExportError naming the shard) when an input shard changed since it was
    ingested, or has no results. Shards whose kept rows and input are unchanged since the
    last export of this selection are not rewritten.
    """
    root = st.to_upath(input_location)
    files = {s.key: s for s in discover_shards(input_location, files_per_shard)}
    raw_keys = [storage.shard_of(st.RAW, p) for p in storage.stage_files(st.RAW)]
    keys = sorted(raw_keys if keys is None else keys)
    for key in keys:
        if key not in files:
            raise ExportError(f"shard {key!r} is no longer under {input_location}")
        if not storage.shard_file(st.RAW, key).exists():
            raise ExportError(f"shard {key!r} has no results yet: run the pipeline first")
        recorded = st.recorded_fingerprint(storage, key)
        if recorded is not None and recorded != files[key].fingerprint():
            raise ExportError(
                f"shard {key!r} changed since it was embedded ({files[key].path}): re-run the pipeline before exporting"
            )
    base = root if root.is_dir() else root.parent
    out_dir = selection_dir(storage, selection)
    # Taken before the results are read: if they change meanwhile, the record is stale, never wrongly current.
    made_from = export_made_from(storage, selection, configured_eps, results_fingerprint(storage))
    results = []
    kept: dict[str, pa.Array] = {}  # by input file key (the `shard` column)
    covered: set[str] = set()
    for key in keys:
        if key not in covered:  # the kept ids of a few shards at a time, never of the whole dataset
            batch = _next_shards(storage, keys, key)
            covered = set(batch)
            kept = kept_ids(
                storage, selection, [m.key for k in batch for m in members(files[k])], configured_eps, reference
            )
        shard = files[key]
        grouped = isinstance(shard, ShardGroup)
        raw = st.read_table(
            storage.shard_file(st.RAW, key), columns=["id", "shard", "row"] if grouped else ["id", "row"]
        )
        per_file = [raw.filter(pc.equal(raw.column("shard"), m.key)) if grouped else raw for m in members(shard)]
        rows_of = [kept_rows(part, kept[m.key]) for m, part in zip(members(shard), per_file, strict=True)]
        outputs_of = shard_outputs(shard, base, out_dir)
        outputs = [p for outs in outputs_of for p in outs]
        n_kept = sum(len(r) for r in rows_of)
        manifest_path = manifest_file(out_dir, key)
        digest = rows_digest(rows_of[0]) if not grouped else ",".join(rows_digest(r) for r in rows_of)
        state = {"fingerprint": shard.fingerprint(), "rows": digest, "files": [str(p) for p in outputs]}
        previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        rewrite = (
            previous is None or {k: previous.get(k) for k in state} != state or not all(p.exists() for p in outputs)
        )
        if rewrite:
            for member, part, rows, outs in zip(members(shard), per_file, rows_of, outputs_of, strict=True):
                ids = part.sort_by("row").column("id").to_pylist() if member.kind == "tar" else []
                write_shard(member, rows, ids, outs)
        if rewrite or (
            previous is not None and previous.get("made_from") != made_from
        ):  # same rows from new results: the record only
            st.atomic_write_bytes(
                json.dumps(
                    {**state, "kept": int(n_kept), "removed": int(raw.num_rows - n_kept), "made_from": made_from}
                ).encode(),
                manifest_path,
            )
        results.append(ShardExport(key, int(n_kept), int(raw.num_rows - n_kept), rewrite, [str(p) for p in outputs]))
        if log is not None:
            log(f"shard {key!r}: kept {n_kept}" + ("" if rewrite else " (unchanged)"))
    return results


def export_made_from(
    storage: st.Storage, selection: Selection, configured_eps: Sequence[float], fingerprint: str
) -> dict[str, object]:
    """What an export of `selection` is computed from: the results, and the eps contaminated items are dropped at
    (None when no item is flagged: then the configured eps do not matter)."""
    path = storage.contaminated_file
    try:
        flagged = path.exists() and st.parquet_num_rows(path) > 0
    except st.StageFileError:
        flagged = True  # damaged: an export refuses it anyway (see _contaminated_source)
    dropped_at = contamination_eps(selection, configured_eps or [selection.value]) if flagged else None
    return {"results": fingerprint, "contamination_eps": dropped_at}


def _label_selection(label: str, configured_eps: Sequence[float]) -> Selection | None:
    """The selection a folder label stands for, also for an eps no longer configured (None: not a label)."""
    for eps in (configured_eps, [float(v) for v in _label_eps(label)]):
        try:
            return parse_selection(label, eps)
        except ExportError:
            continue
    return None


def _label_eps(label: str) -> list[str]:
    """The eps values written in a label (`eps=0.05`, `d4:eps=0.05,...`)."""
    out = []
    for part in label.split(":", 1)[-1].split(","):
        name, _, value = part.partition("=")
        if name.strip() == "eps":
            try:
                out.append(str(float(value)))
            except ValueError:
                pass
    return out


def stale_exports(
    storage: st.Storage, configured_eps: Sequence[float], fingerprint: str | None = None
) -> dict[str, str]:
    """The selection folders (by label) holding a shard not selected from the current results, with the reason.

    `fingerprint`: the storage's results_fingerprint, when the caller has it already.
    """
    folders = selection_folders(storage)
    if not folders:
        return {}
    current = fingerprint or results_fingerprint(storage)
    out = {}
    for label, folder in folders.items():
        selection = _label_selection(label, configured_eps)
        manifests = sorted((folder / MANIFEST_DIR).rglob("*.json"), key=str) if (folder / MANIFEST_DIR).exists() else []
        if selection is None or not manifests:
            continue  # not an export folder, or an empty one: nothing is served from it
        want = export_made_from(storage, selection, configured_eps, current)
        for manifest in manifests:
            try:
                recorded = json.loads(manifest.read_text()).get("made_from")
            except (OSError, ValueError, AttributeError):
                recorded = None
            why = mismatch(recorded.get("results") if isinstance(recorded, dict) else None, current)
            if why is None and recorded != want:
                why = (
                    f"its contaminated items were dropped at eps={recorded.get('contamination_eps')}, the settings "
                    f"now drop them at eps={want['contamination_eps']}"
                )
            if why is not None:
                out[label] = (
                    f"shard {manifest.relative_to(folder / MANIFEST_DIR).with_suffix('')}: {why}"
                    if st.is_local(folder)
                    else why
                )
                break
    return out


def remove_selection_folder(storage: st.Storage, label: str) -> None:
    """Delete one selection folder under `deduplicated/` (files, then the folders they leave)."""
    root = storage.stage_dir(DEDUPLICATED)
    _remove_files(_files_below(root / label), root)
    if st.is_local(root) and (root / label).exists():
        shutil.rmtree(str(root / label))


@dataclass
class Tidied:
    """What `tidy_exports` removed."""

    stale_files: list[str]  # in the selection folder, relative to it
    unproducible: list[str]  # labels of whole selection folders


def tidy_exports(
    storage: st.Storage,
    input_location: str,
    selection: Selection,
    configured_eps: Sequence[float],
    files_per_shard: int = 1,
) -> Tidied:
    """After an export: the selection folder keeps only what the selection implies, and folders
    of selections the settings can no longer produce are removed.

    A file is implied when it is an output file or the manifest of an ingested shard (one
    whose raw index exists), whether or not this export rewrote it; anything else (a
    forgotten shard's copy, a file of an older layout) would be read back with the dataset.
    """
    root = st.to_upath(input_location)
    files = {s.key: s for s in discover_shards(input_location, files_per_shard)}
    base = root if root.is_dir() else root.parent
    out_dir = selection_dir(storage, selection)
    raw_keys = [storage.shard_of(st.RAW, p) for p in storage.stage_files(st.RAW)]
    expected = {str(manifest_file(out_dir, k)) for k in raw_keys}
    expected |= {
        str(p)
        for k in raw_keys
        for p in (
            [p for outs in shard_outputs(files[k], base, out_dir) for p in outs]
            if k in files
            else _manifest_files(manifest_file(out_dir, k))
        )
    }
    return Tidied(
        prune_selection(storage, selection, expected), remove_unproducible_selections(storage, configured_eps)
    )
