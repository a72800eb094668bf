"""SemDeDup as a library: `SemDeDup(**knobs).run(data)` on arrays, texts, tables or shards, without Dagster.

The data is written as shards under the storage (`<storage>/library_input/`, nothing outside it),
then the core's run loop (`core.run_loop.run_units`) runs the graph's units in the graph's order,
so the files are those `semdedup run` writes on the same shards, byte for byte. The result reads
them back in the input's order: eps curve, keep masks, kept ids, duplicates, explanations, SQL
over the catalog, the deduplicated dataset, and the kept rows in the input's own type.

Nothing here imports Dagster (`semdedup_assets.__init__` loads the Dagster component lazily).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semdedup_assets.core.checks.layout import remove_shard_files
from semdedup_assets.core.config import Settings
from semdedup_assets.core.dedup.keep import keep_for_target
from semdedup_assets.core.dedup.keep import keep_mask as threshold_mask
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import query
from semdedup_assets.core.io.schemas import GROUPS_SCHEMA
from semdedup_assets.core.io.shards import GROUP_SEPARATOR, ShardError, check_vectors, discover_shards
from semdedup_assets.core.run.loop import StrayShardsError, run_units, stray_shards
from semdedup_assets.core.settings_store import save_settings

INPUT_DIR = "library_input"  # under the storage: the shards the library writes from in-memory data
SHARD_ROWS = 100_000  # rows per shard written from in-memory data
# Knobs that the library sets itself (storage and input come from run()).
NOT_KNOBS = {"storage", "input", "extra"}
# Knobs of the assets after the keep-lists, which the library does not run (`semdedup run` does).
GRAPH_ONLY = {"reference": "decontamination", "prune": "pruning selections", "compare_with": "the robustness asset"}
ITEMS_COLUMNS = ["id", "shard", "cluster", "sim_to_centroid", "max_sim", "duplicate_of"]
PAYLOAD_COLUMNS = ("text", "embedding", "image")


def knob_names() -> list[str]:
    """The settings a SemDeDup takes (every `Settings` knob but storage and input)."""
    return [f.name for f in dataclasses.fields(Settings) if f.name not in NOT_KNOBS]


def check_knob_types(knobs: dict[str, Any]) -> None:
    """A ValueError naming the knob whose value is not a number where `Settings` wants one (`eps="0.1"`,
    `clusters="ten"`): Python callers pass values as they are, unlike the CLI's flags, which argparse types."""
    types = {f.name: str(f.type) for f in dataclasses.fields(Settings)}
    for name, value in knobs.items():
        kind = types.get(name, "")
        if kind.startswith("tuple[float"):
            values, what = (value if isinstance(value, (list, tuple)) else [value]), "numbers"
        elif kind.split(" | ")[0] in ("int", "float"):
            if value is None and kind.endswith("| None"):
                continue
            values, what = [value], ("a whole number" if kind.startswith("int") else "a number")
        else:
            continue
        for v in values:
            number = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            if not number or (what == "a whole number" and not isinstance(v, (int, np.integer))):
                auto = ' (or "auto")' if name in ("clusters", "buckets") else ""
                raise ValueError(f"{name} must be {what}{auto}, got {value!r}")


class SemDeDup:
    """The method, configured once and run on any data: `SemDeDup(clusters=20, eps=[0.01, 0.05]).run(data)`.

    Every keyword is a `Settings` knob by its name (`clusters`, `eps`, `model`, `modality`, `column`,
    `id_column`, `engine`, ...); `clusters="auto"` and `buckets="auto"` as on the CLI. `progress`:
    show a tqdm bar (it renders in notebooks too). `shard_rows`: rows per shard written from
    in-memory data. An unknown knob raises TypeError, a bad value ValueError.
    """

    def __init__(self, *, progress: bool = True, shard_rows: int = SHARD_ROWS, **knobs: Any) -> None:
        unknown = sorted(set(knobs) - set(knob_names()))
        if unknown:
            raise TypeError(
                f"unknown setting(s) {', '.join(map(repr, unknown))}; the settings are: {', '.join(knob_names())}"
            )
        for name, what in GRAPH_ONLY.items():
            if knobs.get(name):
                raise ValueError(f"{name}= ({what}) runs in the asset graph only: use `semdedup run`")
        for name in ("clusters", "buckets"):
            if isinstance(knobs.get(name), str) and knobs[name].strip().lower() == "auto":
                knobs[name] = None
        if isinstance(knobs.get("eps"), (int, float, np.integer, np.floating)):
            knobs["eps"] = (knobs["eps"],)
        elif isinstance(knobs.get("eps"), np.ndarray):  # np.linspace(...) as the eps grid
            knobs["eps"] = tuple(knobs["eps"].tolist())
        # Checked by type, not truth: progress="no" would otherwise show a bar.
        if not isinstance(progress, (bool, np.bool_)):
            raise TypeError(f"progress must be True or False, got {progress!r}")
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, (int, np.integer)):
            raise TypeError(f"shard_rows must be an integer, got {shard_rows!r}")
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        check_knob_types(knobs)
        Settings(**knobs)  # a bad value fails here, before any run
        self.knobs = knobs
        self.progress = bool(progress)
        self.shard_rows = int(shard_rows)

    def __repr__(self) -> str:
        return f"SemDeDup({', '.join(f'{k}={v!r}' for k, v in self.knobs.items())})"

    def run(
        self, data: Any, ids: Sequence[Any] | None = None, storage: str | os.PathLike[str] | None = None
    ) -> SemDeDupResult:
        """Deduplicate `data`; returns a SemDeDupResult (close it, or use `with`, to remove a temporary storage).

        `data`: an N x d numpy array or torch tensor of embeddings; a list of strings (texts); a pyarrow
        Table, pandas DataFrame or datasets.Dataset with a text, image or embedding column (`column=`,
        `id_column=`); or a path/URL of shards, as `semdedup run --input`. `ids`: one per row (default:
        the `id_column` of a table, else the row numbers as strings). `storage`: where results go
        (default: a temporary folder removed with the result); a kept storage re-uses its embeddings.
        """
        owned = storage is None
        root = tempfile.mkdtemp(prefix="semdedup-") if storage is None else os.fspath(storage)
        try:
            return self._run(data, ids, root, owned)
        except st.StoreError as err:  # an unusable bucket is bad input here, named as the CLI names it
            if owned:
                shutil.rmtree(root, ignore_errors=True)
            raise ValueError(str(err)) from None
        except BaseException:
            if owned:
                shutil.rmtree(root, ignore_errors=True)
            raise

    def _run(self, data: Any, ids: Sequence[Any] | None, root: str, owned: bool) -> SemDeDupResult:
        settings = Settings(**self.knobs, storage=root)
        st.check_store(root, "storage")  # before anything is written
        if (problem := st.folder_problem(root, "storage")) is not None:  # a file where the folder should be
            raise ValueError(problem)
        kind, source, modality = as_input(data, ids, settings)
        if modality is not None and "modality" not in self.knobs:
            settings = settings.replace(modality=modality)
        if kind == "path":
            st.check_store(source, "input")
            if not st.to_upath(source).exists():
                raise ValueError(f"input {source} does not exist")
            if (overlap := st.overlap_error(source, root)) is not None:
                raise ValueError(overlap)
            settings = settings.replace(input=str(source))
        prepare_model(settings)
        if kind == "path":
            keys = {s.key for s in discover_shards(source, settings.files_per_shard)}
        else:  # the shards write_input makes, and an earlier library input's (it removes them with their results)
            table, embeddings = source
            keys = set(input_keys(table.num_rows if embeddings is None else len(embeddings), self.shard_rows))
            folder = settings.storage_root().root / INPUT_DIR
            keys |= {p.name.split(".")[0] for p in folder.iterdir()} if folder.exists() else set()
        refuse_other_inputs(settings, keys)
        if kind != "path":
            settings = settings.replace(input=str(write_input(source, settings, self.shard_rows)))
        save_settings(settings)  # `semdedup export/sql --storage` find the run's settings, as after `semdedup run`
        with ProgressBar(self.progress) as (on_step, on_unit):
            run_units(settings, on_step=on_step, on_unit=on_unit)
        return SemDeDupResult(settings, data if kind != "path" else source, kind, owned)


def as_input(data: Any, ids: Sequence[Any] | None, settings: Settings) -> tuple[str, Any, str | None]:
    """(kind, what to write or the shards' location, modality implied by the data or None).

    kind is `path`, `array`, `texts` or `table` (pyarrow, pandas and datasets all become an Arrow table).
    """
    if isinstance(data, (str, os.PathLike)):
        if ids is not None:
            raise ValueError("ids cannot be given with a path of shards: the shards' id column holds them")
        return "path", os.fspath(data), None
    module = type(data).__module__.split(".")[0]
    if module == "torch":
        data = data.detach().cpu().numpy()
    if isinstance(data, np.ndarray):
        if data.ndim != 2 or data.shape[1] == 0 or data.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty N x d array, got shape {data.shape}")
        if data.dtype.kind != "f":
            raise TypeError(f"embeddings must hold floats, got dtype {data.dtype}")
        check_embedding_rows(data)
        return "array", (with_ids(None, ids, len(data), settings), data), "embedding"
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError("data is empty")
        for row, text in enumerate(data):
            if not isinstance(text, str):
                raise TypeError(f"data row {row} is a {type(text).__name__}, not a str: a list must hold texts")
        table = pa.table({settings.column or "text": pa.array(list(data), pa.string())})
        return "texts", (with_ids(table, ids, len(data), settings), None), "text"
    table = arrow_table(data)
    if table.num_rows == 0:
        raise ValueError("data is empty (no rows)")
    column = settings.column
    if column is None:
        found = [c for c in PAYLOAD_COLUMNS if c in table.column_names]
        if not found:
            raise ValueError(
                f"no text, embedding or image column (columns: {', '.join(table.column_names)}): "
                f"name the payload with column="
            )
        column = found[0]
    elif column not in table.column_names:
        raise ValueError(f"missing payload column {column!r} (columns: {', '.join(table.column_names)})")
    modality = column if column in PAYLOAD_COLUMNS else None
    if modality is None:  # a named column: its type says the modality
        t = table.schema.field(column).type
        modality = (
            "text"
            if pa.types.is_string(t) or pa.types.is_large_string(t)
            else "image"
            if pa.types.is_binary(t) or pa.types.is_large_binary(t)
            else "embedding"
        )
    return "table", (with_ids(table, ids, table.num_rows, settings), None), modality


def arrow_table(data: Any) -> pa.Table:
    """A pyarrow Table, pandas DataFrame or datasets.Dataset as an Arrow table (a TypeError for anything else)."""
    if isinstance(data, pa.Table):
        return data
    module = type(data).__module__.split(".")[0]
    if module == "pandas" and hasattr(data, "columns"):
        return pa.Table.from_pandas(data, preserve_index=False)
    if module == "datasets" and hasattr(data, "data"):
        return data.flatten_indices().data.table if hasattr(data, "flatten_indices") else data.data.table
    raise TypeError(
        f"data must be an N x d array or tensor, a list of strings, a pyarrow Table, pandas DataFrame, "
        f"datasets.Dataset, or a path of shards; got {type(data).__module__}.{type(data).__name__}"
    )


def check_embedding_rows(data: np.ndarray, chunk: int = 65536) -> None:
    """Refuse what ingest would refuse (a NaN or infinite value, a zero or subnormal norm), naming the caller's row.

    The core's check (`check_vectors`), chunk by chunk: a temporary of `chunk` rows, not a second N x d array.
    """
    for start in range(0, len(data), chunk):
        try:
            check_vectors("data", "embeddings", data[start : start + chunk], start)
        except ShardError as err:
            what = err.reason.removeprefix(f"{'embeddings'!r} ")
            raise ValueError(f"embeddings row {err.row} {what}") from None


def with_ids(table: pa.Table | None, ids: Sequence[Any] | None, n: int, settings: Settings) -> pa.Table:
    """The table (None: no columns) with its id column `id_column`: the given ids, the table's own, or the row
    numbers as strings."""
    name = settings.id_column
    if ids is not None:
        ids = list(ids)
        if len(ids) != n:
            raise ValueError(f"ids has {len(ids)} entries but data has {n} rows")
        missing = next((row for row, i in enumerate(ids) if i is None), None)
        if missing is not None:
            raise ValueError(f"ids row {missing} is None: every row needs an id")
        column = pa.array([str(i) for i in ids], pa.string())
    elif table is not None and name in table.column_names:
        return table
    else:
        column = pa.array(np.arange(n).astype(str), pa.string())
    counts = pc.value_counts(column)  # checked here, on the whole input: the rows named are the input's own
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0]["values"].as_py()
        rows = np.flatnonzero(pc.equal(column, first).to_numpy(zero_copy_only=False))
        raise ValueError(f"id {first!r} appears twice, at rows {rows[0]} and {rows[1]}")
    if table is None:
        return pa.table({name: column})
    if name in table.column_names:
        table = table.drop_columns([name])
    return table.add_column(0, name, column)


def input_keys(n: int, shard_rows: int) -> list[str]:
    """The shard keys of `n` in-memory rows written `shard_rows` to a shard."""
    return [f"part-{i:05d}" for i in range(-(-n // shard_rows))]


def refuse_other_inputs(settings: Settings, keys: set[str]) -> None:
    """A StrayShardsError, before anything is written (the input shards, the settings), when the storage holds
    results of shards that are neither among `keys` nor groups of them (`<key>+N`, files_per_shard): another
    dataset's storage, e.g. one of `semdedup run`. Before, the run loop refused them only after the library
    had written `library_input/` and recorded its settings over those of the other run."""
    stray = [k for k in stray_shards(settings, []) if k not in keys and k.rpartition(GROUP_SEPARATOR)[0] not in keys]
    if stray:
        raise StrayShardsError(
            f"the storage {settings.storage} already holds {len(stray)} shard(s) that are not in "
            f"this input (e.g. {stray[:3]}): use another storage"
        )


def write_input(source: tuple[pa.Table, np.ndarray | None], settings: Settings, shard_rows: int) -> st.UPath:
    """Write in-memory data as shards under `<storage>/library_input/` (embeddings: .npy with a Parquet of ids).

    A file whose bytes are already there is left alone, so a kept storage re-uses its embeddings;
    shards of an earlier, longer input are removed with their results.
    """
    table, embeddings = source
    folder = settings.storage_root().root / INPUT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    n = table.num_rows if embeddings is None else len(embeddings)
    keys = input_keys(n, shard_rows)
    for key, start in zip(keys, range(0, n, shard_rows)):
        part = table.slice(start, shard_rows)
        if embeddings is not None:
            write_npy_if_changed(embeddings[start : start + shard_rows], folder / f"{key}.npy")
        write_if_changed(parquet_bytes(part), folder / f"{key}.parquet")
    for path in list(folder.iterdir()):  # an earlier run's extra shards: their files go
        if path.name.split(".")[0] not in keys:
            st.remove(path)
    # ... and their results, by the shard keys the stages use (with files_per_shard > 1 those are groups,
    # `part-00002+2`, not files). refuse_other_inputs made sure that every such shard is this input's.
    for key in stray_shards(settings, discover_shards(folder, settings.files_per_shard)):
        remove_shard_files(settings.storage_root(), key)
    return folder


def npy_header(x: np.ndarray) -> bytes:
    """The header `np.save` writes before a C-ordered float32 array's data (format 1.0, as np.save picks for
    every header under 64 KiB: a 2-d array's is 128 bytes)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(x))
    return buf.getvalue()


def write_npy_if_changed(x: np.ndarray, path: st.UPath) -> None:
    """Write `x` as the .npy file `np.save` makes (float32, as ingest reads it), atomically, unless the file
    already holds exactly these bytes.

    The header and the array's own buffer are written (and compared) in place: building the file's bytes
    first (np.save into a BytesIO, then `getvalue`) copied the array twice, which cost more than the write.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    header = npy_header(x)
    data = x.data.cast("B")
    if path.exists() and path.stat().st_size == len(header) + len(data):
        with path.open("rb") as f:
            if f.read(len(header)) == header and same_bytes(f, data):
                return
    with st.atomic_open(path) as out:
        out.write(header)
        out.write(data)


def same_bytes(f: Any, data: memoryview, block: int = 1 << 24) -> bool:
    """True when the rest of the open file `f` is exactly `data` (read block by block: bounded memory)."""
    for start in range(0, len(data), block):
        if f.read(block) != data[start : start + block]:
            return False
    return f.read(1) == b""


def parquet_bytes(table: pa.Table) -> bytes:
    """A Parquet file's bytes, written the same way for the same table."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_if_changed(data: bytes, path: st.UPath) -> None:
    """Write `data` to `path` atomically, unless the file already holds exactly these bytes."""
    if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    st.atomic_write_bytes(data, path)


def prepare_model(settings: Settings) -> None:
    """A `model` path that is no folder is refused, a static text `model` made (or checked), before the run,
    as `semdedup run` does."""
    from semdedup_assets.core.embed.encoders.base import missing_model_folder
    from semdedup_assets.core.embed.encoders.static import resolve_static_model, wants_static

    if settings.modality != "embedding" and (problem := missing_model_folder(settings.model, "model")) is not None:
        raise ValueError(problem)
    if settings.modality == "text" and wants_static(settings.model):
        resolve_static_model(settings.model or "")


class ProgressBar:
    """A tqdm bar (tqdm.auto: a widget in notebooks) over a run's units; gives (on_step, on_unit) for run_units."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.bar: Any = None

    def __enter__(self) -> tuple[Callable[[str, int], None], Callable[[str, str], None]]:
        if self.show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, desc="semdedup", unit="unit")
        return self.on_step, self.on_unit

    def on_step(self, step: str, units: int) -> None:
        """A step starts: its units join the bar's total."""
        if self.bar is not None:
            self.bar.total += units
            self.bar.set_postfix_str(step)
            self.bar.refresh()

    def on_unit(self, step: str, key: str) -> None:
        """A unit (a shard, a bucket) is done."""
        if self.bar is not None:
            self.bar.update(1)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


class SemDeDupResult:
    """The results of one run, read from its storage in the input's order.

    A context manager: closing it (or its garbage collection) removes a temporary storage.
    """

    def __init__(self, settings: Settings, data: Any, kind: str, owned: bool) -> None:
        self.settings = settings
        self.storage = settings.storage_root()
        self.data = data
        self.kind = kind
        self._items: pa.Table | None = None
        self._data_ids: pa.Array | None = None
        self._finalizer = weakref.finalize(self, shutil.rmtree, settings.storage, True) if owned else None

    # --- lifetime ---------------------------------------------------------------------------------
    @property
    def input(self) -> str:
        """The input location this result was computed from (the library's own copy for in-memory data)."""
        if self.settings.input is None:
            raise ValueError("this result has no input location")
        return self.settings.input

    def close(self) -> None:
        """Remove the storage if it was a temporary one (results read before stay usable)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> SemDeDupResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"SemDeDupResult({self.items.num_rows} items, eps {list(self.settings.eps)}, storage {self.storage.root})"
        )

    # --- reading ----------------------------------------------------------------------------------
    @property
    def eps_curve(self) -> pa.Table:
        """eps, kept, removed, kept_fraction for each configured eps."""
        return st.read_table(self.storage.eps_curve_file)

    @property
    def items(self) -> pa.Table:
        """One row per input item, in the input's order: id, shard, cluster, sim_to_centroid, max_sim, duplicate_of."""
        if self._items is None:
            buckets = [
                st.read_table(p, columns=ITEMS_COLUMNS) for p in self.storage.stage_files(st.SEMANTIC_DUPLICATES)
            ]
            items = pa.concat_tables(buckets)
            order = self.input_ids()
            position = pc.index_in(items.column("id"), value_set=order).to_numpy(zero_copy_only=False)
            self._items = items.take(pa.array(np.argsort(position, kind="stable")))
        return self._items

    def input_ids(self) -> pa.Array:
        """Every item's id in the input's order (shards in key order, rows in order)."""
        shards = discover_shards(self.input, self.settings.files_per_shard)
        raw = [st.read_table(self.storage.shard_file(st.RAW, s.key), columns=["id"]).column("id") for s in shards]
        return pa.chunked_array([c for r in raw for c in r.chunks], pa.string()).combine_chunks()

    def input_mask(self, item_mask: np.ndarray) -> np.ndarray:
        """A mask over `items` as one over the in-memory data's rows: a row that ingest rejected (an empty
        text, an undecodable image) is not an item, and is False. A path of shards: the items' mask."""
        if self.kind == "path" or self.items.num_rows == len(self.data_ids()):
            return item_mask
        position = pc.index_in(self.items.column("id"), value_set=self.data_ids()).to_numpy(zero_copy_only=False)
        mask = np.zeros(len(self.data_ids()), dtype=bool)
        mask[position] = item_mask
        return mask

    def data_ids(self) -> pa.Array:
        """The id of every row of the in-memory data, rejected rows too (the written input's id column)."""
        if self._data_ids is None:
            shards = discover_shards(self.input)  # file by file, whatever files_per_shard
            tables = [
                st.read_table(st.to_upath(self.input) / f"{s.key}.parquet", columns=[self.settings.id_column])
                for s in shards
            ]
            self._data_ids = pa.concat_tables(tables).column(0).cast(pa.string()).combine_chunks()
        return self._data_ids

    def item_keep_mask(self, eps: float) -> np.ndarray:
        """True where a row of `items` is kept at `eps` (max_sim <= 1 - eps)."""
        check_eps(eps)
        return threshold_mask(self.items.column("max_sim").to_numpy(), eps)

    def keep_mask(self, eps: float) -> np.ndarray:
        """True where an item is kept at `eps` (max_sim <= 1 - eps), one per input row, in the input's order
        (a row that ingest rejected, e.g. an empty text, is False)."""
        return self.input_mask(self.item_keep_mask(eps))

    def kept_ids(self, eps: float) -> list[str]:
        """The ids kept at `eps`, in the input's order."""
        return self.items.column("id").filter(pa.array(self.item_keep_mask(eps))).to_pylist()

    def duplicates(self, eps: float) -> pa.Table:
        """The items removed at `eps`: id, duplicate_of (the earlier item it repeats), max_sim, cluster."""
        removed = pa.array(~self.item_keep_mask(eps))
        return self.items.filter(removed).select(["id", "duplicate_of", "max_sim", "cluster"])

    def groups(self, eps: float) -> pa.Table:
        """The duplicate groups at a configured `eps`: eps, group_id, id, size, one row per member of each connected
        component of two or more items (edges: removed item -> duplicate_of), read from the catalog's `groups` view.

        group_id is the group's one kept item, its first member in the rule's order. Rows are ordered largest
        group first (ties by group_id), the kept item first, then by id. A ValueError names the configured eps
        when `eps` is not one of them (groups are written with the keep-lists, per configured eps).
        """
        check_eps(eps)
        if not any(float(eps) == float(e) for e in self.settings.eps):
            raise ValueError(
                f"eps={eps} is not configured (configured: {', '.join(map(str, self.settings.eps))}): "
                "groups exist for the configured eps only; run with it in eps="
            )
        return self.sql(
            "SELECT eps, group_id, id, size FROM groups WHERE eps = ? ORDER BY size DESC, group_id, id <> group_id, id",
            [float(eps)],
        ).cast(GROUPS_SCHEMA)

    def explain(self, id: Any) -> dict[str, Any]:
        """Why an item is kept or removed: its cluster, max_sim, duplicate_of, the eps values that remove it,
        and the pair's texts where there are texts. A KeyError names an unknown id (or a rejected one, and why)."""
        items = self.items
        hit = items.filter(pc.equal(items.column("id"), str(id)))
        if hit.num_rows == 0:
            rejected = self.sql("SELECT reason FROM rejected WHERE id = ?", [str(id)]).column("reason").to_pylist()
            if rejected:  # an input row that ingest refused is not an item: say why, as the `rejected` view does
                raise KeyError(f"id {str(id)!r} was rejected at ingest ({rejected[0]}): it is not an item")
            raise KeyError(f"no item with id {str(id)!r}")
        row = hit.to_pylist()[0]
        row["removed_at_eps"] = [e for e in self.settings.eps if row["max_sim"] > 1.0 - e]
        if self.settings.modality == "text":
            wanted = [i for i in (row["id"], row["duplicate_of"]) if i is not None]
            found = self.sql("SELECT id, text FROM raw_items WHERE id IN (SELECT unnest(?))", [wanted])
            texts = dict(zip(found.column("id").to_pylist(), found.column("text").to_pylist()))
            row["text"] = texts.get(row["id"])
            row["duplicate_text"] = texts.get(row["duplicate_of"])
        return row

    def sql(self, statement: str, params: Sequence[Any] | None = None) -> pa.Table:
        """A query against the catalog's views (items, embeddings, centroids, eps_curve, ...), as `semdedup sql`."""
        columns, rows = query(self.storage, statement, params)
        return pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)})

    # --- selections -------------------------------------------------------------------------------
    def pruned_ids(self, selection: str) -> list[str]:
        """The ids a pruning selection keeps (`prototypes:...`, `d4:...`, `dbp:...`, `outliers:fraction=F`,
        `representatives:size=N[,diversity=L]`; docs/pruning.md), computed from the stored results as
        `semdedup export --select` does, in id order. A bad selection is a ValueError naming it."""
        # Imported here, as in `export`: a run that never selects does not load them (the fixed cost).
        from semdedup_assets.core.select.prune import PruneError, compute_pruning, kept_file, parse_pruning

        try:
            pruning = parse_pruning(selection, self.settings.eps)
            compute_pruning(self.settings, pruning)
        except PruneError as err:
            raise ValueError(str(err)) from None
        return sorted(st.read_table(kept_file(self.storage, pruning), columns=["id"]).column("id").to_pylist())

    def selection_mask(
        self, eps: float | None = None, keep_fraction: float | None = None, select: str | None = None
    ) -> np.ndarray:
        """The kept rows of a selection, one per input row in the input's order: `eps` (any value in (0, 1)),
        `keep_fraction` (the items with the smallest max_sim, ties by id, as `semdedup export --select
        keep-fraction=F`) or `select`, a pruning selection (`pruned_ids`). A row that ingest rejected is never
        kept."""
        if sum(v is not None for v in (eps, keep_fraction, select)) != 1:
            raise ValueError("give exactly one of eps=, keep_fraction= or select=")
        if select is not None:
            kept = pa.array(self.pruned_ids(select), pa.string())
            return self.input_mask(pc.is_in(self.items.column("id"), value_set=kept).to_numpy(zero_copy_only=False))
        if eps is not None:
            return self.keep_mask(eps)
        assert keep_fraction is not None  # exactly one of the two was given
        if not 0.0 < float(keep_fraction) <= 1.0:
            raise ValueError(f"keep_fraction must lie in (0, 1], got {keep_fraction}")
        items = self.items
        rows = keep_for_target(
            items.column("id").to_numpy(zero_copy_only=False),
            items.column("max_sim").to_numpy(),
            fraction=keep_fraction,
        )
        mask = np.zeros(items.num_rows, dtype=bool)
        mask[rows] = True
        return self.input_mask(mask)

    def select(self, eps: float | None = None, keep_fraction: float | None = None, select: str | None = None) -> Any:
        """The kept rows in the input's own type: an array, tensor, list, pyarrow Table, DataFrame or Dataset.

        `select`: a pruning selection, e.g. `outliers:fraction=0.05` (see `pruned_ids`).
        For a path of shards: the deduplicated dataset's folder (see `export`)."""
        if self.kind == "path":
            return self.export(eps=eps, keep_fraction=keep_fraction, select=select)
        mask = self.selection_mask(eps, keep_fraction, select)
        data = self.data
        module = type(data).__module__.split(".")[0]
        if module == "torch":
            import torch

            return data[torch.from_numpy(mask).to(data.device)]
        if isinstance(data, np.ndarray):
            return data[mask]
        if isinstance(data, (list, tuple)):
            return type(data)(x for x, keep in zip(data, mask) if keep)
        if isinstance(data, pa.Table):
            return data.filter(pa.array(mask))
        if module == "pandas":
            return data.iloc[np.flatnonzero(mask)]
        if module == "datasets":
            return data.select(np.flatnonzero(mask).tolist())
        raise TypeError(f"cannot select rows of a {type(data).__name__}")

    def export(self, eps: float | None = None, keep_fraction: float | None = None, select: str | None = None) -> Path:
        """Write the deduplicated dataset (each shard in its own format, kept rows only) as `semdedup export`;
        returns its folder `<storage>/deduplicated/<selection>/`. `eps` must be a configured one."""
        # Imported here: a run that never exports does not load the export formats (the fixed cost, bench/library.py).
        from semdedup_assets.core.select.export import (
            ExportError,
            export_shards,
            parse_selection,
            selection_dir,
            tidy_exports,
        )
        from semdedup_assets.core.select.prune import PruneError, compute_pruning

        if select is None:
            if (eps is None) == (keep_fraction is None):
                raise ValueError("give exactly one of eps=, keep_fraction= or select=")
            select = f"eps={eps}" if eps is not None else f"keep-fraction={keep_fraction}"
        try:
            selection = parse_selection(select, self.settings.eps)
            if selection.pruning is not None:  # computed from the stored results first, as `semdedup export`
                compute_pruning(self.settings, selection.pruning)
        except (ExportError, PruneError) as err:
            raise ValueError(str(err)) from None
        export_shards(
            self.storage,
            self.input,
            selection,
            configured_eps=self.settings.eps,
            reference=self.settings.reference,
        )
        tidy_exports(self.storage, self.input, selection, self.settings.eps)
        return Path(str(selection_dir(self.storage, selection)))


def check_eps(eps: float) -> None:
    """A ValueError for an eps outside (0, 1)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
