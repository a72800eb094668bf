"""`semdedup verify`: is every stage file whole and consistent with its upstream?

Checks, stage by stage: every file reads back completely (not just its footer);
embeddings have one row per raw row (minus rejected images), the same ids in the same
order and, where the caller can compute it, the cache key of their current input and
settings; assignments hold exactly the embeddings' ids with clusters in [0, k); each
bucket holds exactly the assigned items of its cluster range; each keep-list and the eps
curve agree with the buckets; the decontamination results read back whole. Temporary files left by a killed writer are reported too.
A missing file is not a problem (it is simply not computed yet), and a file whose
upstream is missing or bad is not judged (the next run recomputes both). `repair` deletes every
file found damaged, so that the next `semdedup run` recomputes it; a *stale* file (whole, but made
from an input or settings that changed since, e.g. a `touch`ed input) is reported apart and left
alone: the next run redoes it anyway. With `content`, each input's bytes are checked against
the digest recorded at ingest: an in-place edit that kept size and modification time makes
the raw index wrong (a run cannot see the edit), so `repair` deletes it. The derived outputs
(export folders, pruning selections) made from other results than the storage holds now are
stale too (`stale_outputs`, core/checks/lineage.py): `export` writes an export again, the next
successful run removes a stale pruning selection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_assets.core.checks.lineage import results_fingerprint
from semdedup_assets.core.cluster.assign import bucket_cluster_range, bucket_keys
from semdedup_assets.core.config import Settings
from semdedup_assets.core.dedup.keep import keep_mask
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.schemas import CONTAMINATED_SCHEMA
from semdedup_assets.core.io.shards import Shard, ShardGroup, members
from semdedup_assets.core.select.export import DEDUPLICATED, stale_exports
from semdedup_assets.core.select.prune import remove_pruning_folder, stale_prunings


def _sorted(ids: pa.ChunkedArray) -> pa.Array:
    ids = ids.combine_chunks()
    return ids.take(pc.sort_indices(ids))


DAMAGED, STALE = "damaged", "stale"


@dataclass(frozen=True)
class Problem:
    """One file that is wrong, and why.

    `kind` is DAMAGED (unreadable, or inconsistent with its upstream: `repair` deletes it) or
    STALE (whole, but made from an input or settings that changed since: the next run redoes
    it, so `repair` leaves it).
    """

    path: st.UPath
    reason: str
    kind: str = DAMAGED

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _read_whole(path: st.UPath, columns: list[str] | None = None) -> pa.Table:
    """Every row group of a file (a footer can be intact over damaged data)."""
    schema = st.read_schema(path)
    batches = list(st.iter_batches(path, columns=columns))
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    return pa.Table.from_batches(batches, schema=schema.remove_metadata()) if batches else schema.empty_table()


class _Checker:
    def __init__(
        self,
        storage: st.Storage,
        settings: Settings,
        expected_cache_key: Callable[[str], str | None] | None,
        inputs: Mapping[str, Shard] | None = None,
        content: bool = False,
    ) -> None:
        self.storage, self.settings, self.expected_cache_key = storage, settings, expected_cache_key
        self.inputs, self.content = inputs or {}, content
        self.problems: list[Problem] = []

    def bad(self, path: st.UPath, reason: str, kind: str = DAMAGED) -> None:
        self.problems.append(Problem(path, reason, kind))

    def read(self, path: st.UPath, columns: list[str] | None = None) -> pa.Table | None:
        """The file's table, or None (recorded as a problem) when it is damaged."""
        try:
            return _read_whole(path, columns)
        except st.StageFileError as err:
            self.bad(path, f"damaged: {err.reason}")
        except KeyError as err:
            self.bad(path, f"missing column {err}")
        return None

    def per_shard(self, stage: str) -> dict[str, st.UPath]:
        return {self.storage.shard_of(stage, p): p for p in self.storage.stage_files(stage)}

    def temporaries(self) -> None:
        for stage in (*st.STAGES, st.PRUNED, st.GROUPS):
            folder = self.storage.stage_dir(stage)
            if folder.exists():
                for p in sorted(folder.rglob(f".*{st.TMP_SUFFIX}"), key=str):
                    if st.live_writer(p, other_machines=False) is None:  # a running command's file is no problem
                        self.bad(p, "temporary file of an interrupted write")

    def run(self) -> list[Problem]:
        self.temporaries()
        raw = self.per_shard(st.RAW)
        if self.content:
            self.input_contents(raw)
        rejected = self.per_shard(st.REJECTED)
        # A first read reports the damaged raw and rejected files; their ids are read again shard by shard where
        # a check needs them, so no stage's ids of every shard are in memory at once (O(shard), not O(N)).
        raw_ok = {k: p for k, p in raw.items() if self.read(p, ["id"]) is not None}
        rejected_ok = {k: p for k, p in rejected.items() if self.read(p, ["id"]) is not None}
        emb_ok = self.embeddings(raw_ok, rejected_ok)
        k = self.centroids()
        self.buckets(self.assignments(emb_ok, k), k)
        for path in self.storage.stage_files(st.PRUNED):  # pruning selections: whole and readable
            self.read(path)
        self.contaminated()
        self.problems += stale_outputs(self.storage, self.settings)
        return self.problems

    def input_changed(self, key: str) -> str | None:
        """How a shard's input differs from the one its raw file was made from (None: same, or unknown)."""
        shard = self.inputs.get(key)
        if shard is None:
            return None
        try:
            recorded = st.recorded_fingerprint(self.storage, key)
        except st.StageFileError:
            return None
        if recorded is not None and recorded != shard.fingerprint():
            if isinstance(shard, ShardGroup):
                return shard.changed_files(recorded)
            return f"its input {shard.path} changed since it was ingested (size or modification time)"
        return None

    def input_contents(self, raw: dict[str, st.UPath]) -> None:
        """`--content`: each input's bytes against the digest recorded when it was ingested."""
        for key, path in raw.items():
            shard = self.inputs.get(key)
            try:
                recorded = st.recorded_fingerprint(self.storage, key, st.CONTENT_KEY)
            except st.StageFileError:
                continue  # damaged: reported by the read below
            if shard is None or recorded is None or self.input_changed(key):
                continue  # gone, ingested before digests were recorded, or already told by the fingerprint
            if shard.content_digest(like=recorded) != recorded:
                # A run sees only the fingerprint: deleting the raw index makes the next one ingest and embed again.
                inputs = ", ".join(str(f.path) for f in members(shard)[:3]) + (
                    ", ..." if len(members(shard)) > 3 else ""
                )
                self.bad(
                    path,
                    f"the content of its input {inputs} changed since it was ingested, with the same "
                    "size and modification time, so a run cannot see it: --repair deletes this raw index and "
                    "the next `semdedup run` ingests and embeds the shard again",
                )

    def embeddings(self, raw: dict[str, st.UPath], rejected: dict[str, st.UPath]) -> dict[str, st.UPath]:
        """The embeddings files whose ids match their (readable) raw file's, minus the rejected items."""
        out = {}
        for key, path in self.per_shard(st.EMBEDDINGS).items():
            table = self.read(path)
            if table is None:
                continue
            if key not in raw:  # raw missing or damaged: the next run rewrites it, then checks the cache
                continue
            raw_ids = _read_whole(raw[key], ["id"]).column("id")
            skip = _read_whole(rejected[key], ["id"]).column("id") if key in rejected else None
            expected = (
                raw_ids.filter(pc.invert(pc.is_in(raw_ids, skip.combine_chunks())))
                if skip is not None and len(skip)
                else raw_ids
            )
            if table.num_rows != len(expected):
                self.bad(path, f"{table.num_rows} rows, but its raw file has {len(expected)} (minus rejected)")
            elif not table.column("id").equals(expected):
                self.bad(path, "ids differ from its raw file's")
            elif not (cache_key := (st.read_schema(path).metadata or {}).get(st.EMBEDDING_CACHE_KEY, b"").decode()):
                self.bad(path, "no cache key: not written by the embeddings stage")
            elif (
                self.expected_cache_key is not None
                and (want := self.expected_cache_key(key)) is not None
                and want != cache_key
            ):
                why = self.input_changed(key) or "it was made from another raw file or encoder settings"
                self.bad(path, f"stale: {why}; the next `semdedup run` redoes it", STALE)
            else:
                out[key] = path
        return out

    def centroids(self) -> int | None:
        path = self.storage.centroids_file
        if not path.exists():
            return None
        table = self.read(path)
        if table is None:
            return None
        if table.num_rows == 0 or table.column("cluster").to_pylist() != list(range(table.num_rows)):
            self.bad(path, "clusters are not 0..k-1")
            return None
        return table.num_rows

    def assignments(self, embeddings: dict[str, st.UPath], k: int | None) -> tuple[bool, np.ndarray | None]:
        """Each assignment file against its embeddings; (buckets can be judged, members per cluster).

        The buckets cannot be judged when an assignment file is unreadable or k is unknown;
        the sizes are None when there is no assignment file. Streamed shard by shard: O(k) kept.
        """
        judge = k is not None
        sizes = None
        for key, path in self.per_shard(st.CLUSTER_ASSIGNMENTS).items():
            table = self.read(path, ["id", "cluster"])
            if table is None:
                judge = False
                continue
            clusters = table.column("cluster").to_numpy()
            if k is not None:
                inside = clusters[(clusters >= 0) & (clusters < k)]
                sizes = (sizes if sizes is not None else 0) + np.bincount(inside, minlength=k)
            if key not in embeddings:  # upstream missing or bad: the next run recomputes both
                continue
            emb_ids = _read_whole(embeddings[key], ["id"]).column("id")
            if table.num_rows != len(emb_ids):
                self.bad(path, f"{table.num_rows} rows, but its embeddings have {len(emb_ids)}")
            elif not _sorted(table.column("id")).equals(_sorted(emb_ids)):
                self.bad(path, "ids differ from its embeddings'")
            elif k is not None and len(clusters) and (clusters.min() < 0 or clusters.max() >= k):
                self.bad(path, f"a cluster outside [0, {k}): the centroids changed since")
        return judge, sizes

    def buckets(self, assigned: tuple[bool, np.ndarray | None], k: int | None) -> None:
        """Each bucket against the assignments; the keep-lists against the buckets when all are whole.

        The buckets' max_sim are counted per eps bucket by bucket (no array of every item's).
        """
        judge, sizes = assigned
        whole = judge and sizes is not None
        kept = {e: 0 for e in self._eps_to_check()}
        total = 0
        for bucket in bucket_keys(self.settings.bucket_partitions):
            path = self.storage.bucket_file(bucket)
            table = self.read(path, ["id", "cluster", "max_sim"]) if path.exists() else None
            if table is None or not judge:
                whole = False
                continue
            first, end = bucket_cluster_range(int(bucket), k, self.settings.bucket_partitions)
            clusters = table.column("cluster").to_numpy()
            expected = int(sizes[first:end].sum()) if sizes is not None else 0
            if len(clusters) and (clusters.min() < first or clusters.max() >= end):
                self.bad(path, f"clusters outside the bucket's range [{first}, {end})")
            elif pc.count_distinct(table.column("id")).as_py() != table.num_rows:
                self.bad(path, "an id appears twice")
            elif sizes is not None and table.num_rows != expected:
                self.bad(
                    path,
                    f"{table.num_rows} rows, but the assignments put {expected} items in clusters [{first}, {end})",
                )
            else:
                max_sim = table.column("max_sim").to_numpy()
                total += len(max_sim)
                for e in kept:
                    kept[e] += int(keep_mask(max_sim, e).sum())
                continue
            whole = False
        # The keep-lists can be checked against the buckets only when every bucket is whole.
        self.keep_lists(kept if whole else None, total)

    def _eps_to_check(self) -> list[float]:
        """The configured eps and those of the eps curve on disk (read quietly: keep_lists reports its damage)."""
        eps = set(self.settings.eps)
        path = self.storage.eps_curve_file
        if path.exists():
            try:
                eps |= set(_read_whole(path, ["eps"]).column("eps").to_pylist())
            except (st.StageFileError, KeyError):
                pass
        return sorted(eps)

    def contaminated(self) -> None:
        """The decontamination results read back whole, with their columns and scores in [-1, 1]."""
        path = self.storage.contaminated_file
        if not path.exists() or (table := self.read(path)) is None:
            return
        missing = [c for c in CONTAMINATED_SCHEMA.names if c not in table.column_names]
        if missing:
            self.bad(path, f"missing column(s) {', '.join(missing)}")
        elif table.num_rows and not np.all(np.abs(table.column("score").to_numpy(zero_copy_only=False)) <= 1 + 1e-5):
            self.bad(path, "a score outside [-1, 1]")

    def groups(self, eps: float, removed: int | None) -> None:
        """One eps's groups file read back whole: every removed item is a non-kept member of exactly one group
        (`removed`: the buckets' count; None: not judged). A storage from before the groups has none: no problem."""
        path = self.storage.groups_file(eps)
        if not path.exists() or (table := self.read(path, ["group_id", "id"])) is None or removed is None:
            return
        members = pc.sum(pc.not_equal(table.column("group_id"), table.column("id"))).as_py() or 0
        if members != removed or pc.count_distinct(table.column("id")).as_py() != table.num_rows:
            self.bad(
                path,
                f"{members} removed members in {table.num_rows} rows, but the buckets remove {removed} items "
                f"at eps={st.format_eps(eps)}",
            )

    def keep_lists(self, kept: dict[float, int] | None, total: int) -> None:
        """Each keep-list's and the eps curve's counts against the buckets' (`kept` per eps; None: not judged)."""
        for eps in self.settings.eps:
            path = self.storage.keep_list_file(eps)
            if path.exists() and (table := self.read(path, ["id"])) is not None and kept is not None:
                want = kept[eps]
                if table.num_rows != want:
                    self.bad(path, f"{table.num_rows} ids, but the buckets keep {want} at eps={st.format_eps(eps)}")
            self.groups(eps, None if kept is None else total - kept[eps])
        path = self.storage.eps_curve_file
        if path.exists() and (table := self.read(path)) is not None and kept is not None:
            for row in table.to_pylist():
                want = kept.get(row["eps"])
                if row["kept"] != want or row["kept"] + row["removed"] != total:
                    self.bad(path, f"eps={st.format_eps(row['eps'])}: kept {row['kept']}, but the buckets keep {want}")
                    break


def verify_storage(
    storage: st.Storage,
    settings: Settings,
    expected_cache_key: Callable[[str], str | None] | None = None,
    inputs: Mapping[str, Shard] | None = None,
    content: bool = False,
) -> list[Problem]:
    """Every stage file that is damaged, inconsistent with its upstream or stale (empty when all is well).

    `expected_cache_key(shard)`, if given, is the cache key that shard's embeddings file
    should carry for the current input and settings (None when it cannot be computed).
    `inputs` (the input shards by key) tells a changed input apart from other causes; with
    `content`, every input is read and compared with the digest recorded at ingest.
    """
    return _Checker(storage, settings, expected_cache_key, inputs, content).run()


def derived_outputs_exist(storage: st.Storage) -> bool:
    """Whether the storage holds any export folder or pruning selection."""
    folders = (storage.stage_dir(DEDUPLICATED), storage.stage_dir(st.PRUNED))
    return any(f.exists() and any(True for _ in f.iterdir()) for f in folders)


def stale_outputs(storage: st.Storage, settings: Settings) -> list[Problem]:
    """Every export folder and pruning selection not made from the current results (kind STALE), with why."""
    if not derived_outputs_exist(storage):
        return []  # nothing derived: no need to read the results
    fingerprint = results_fingerprint(storage)
    exports = stale_exports(storage, settings.eps, fingerprint)
    prunings = stale_prunings(storage, fingerprint)
    return [
        Problem(
            storage.stage_dir(DEDUPLICATED) / label,
            f"stale export: {why}; `semdedup export --select {label}` writes it again",
            STALE,
        )
        for label, why in exports.items()
    ] + [
        Problem(
            storage.stage_dir(st.PRUNED) / label,
            f"stale pruning selection (left out of the `pruned` view): {why}; the next `semdedup run` removes it",
            STALE,
        )
        for label, why in prunings.items()
    ]


def remove_stale_prunings(storage: st.Storage, fingerprint: str | None = None) -> list[str]:
    """Delete every pruning selection not made from the current results; returns them as `pruned/<label>`.

    A run calls it once its results are committed: the `pruned` view then holds only selections
    of these results (the view leaves stale ones out meanwhile). Exports are not removed: they are
    the user's files, flagged (`stale_outputs`) until `semdedup export` writes them again.
    `fingerprint`: the storage's results_fingerprint, when the caller has it already.
    """
    removed = []
    for label in stale_prunings(storage, fingerprint):
        remove_pruning_folder(storage, label)
        removed.append(f"{st.PRUNED}/{label}")
    return removed


def repair(problems: list[Problem]) -> list[st.UPath]:
    """Delete every damaged file named in `problems` (the next run recomputes them); stale ones are left."""
    return [p.path for p in problems if p.kind == DAMAGED and st.remove(p.path)]
