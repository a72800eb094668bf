"""The storage root: deterministic paths for every stage's files, and atomic writes.

The root is a local folder or any fsspec URL (``s3://bucket/prefix``) through
universal_pathlib. Local writes go to a temporary file in the same folder and are
renamed into place, so a reader never sees half a file; object stores publish an
object only when its upload completes, which gives the same guarantee.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath as UPath  # re-exported: the other core modules annotate with st.UPath

from semdedup_assets.core.messages import printable

T = TypeVar("T")

# Stage folders under the root; names follow the paper and the asset graph.
RAW = "raw"
EMBEDDINGS = "embeddings"
CENTROIDS = "centroids"
CLUSTER_ASSIGNMENTS = "cluster_assignments"
SEMANTIC_DUPLICATES = "semantic_duplicates"
KEEP_LISTS = "keep_lists"
# Duplicate groups (core/dedup/groups.py): one file per configured eps, written with the keep-lists.
GROUPS = "groups"
REJECTED = "rejected"  # undecodable images, per shard (id, shard, reason)
CONTAMINATED = "contaminated"  # items near a --reference (evaluation) set
PRUNED = "pruned"  # pruning selections (core/select/prune.py), one folder per selection
# Schema metadata of an embeddings file: what it was computed from (raw bytes, input, encoder settings).
EMBEDDING_CACHE_KEY = b"semdedup.cache_key"
# Schema metadata of a raw file ingested with --keep-by: its keep-by columns (a JSON list).
RAW_KEEP_BY_KEY = b"semdedup.keep_by"
# Beside it in every raw file: the input as ingested (its fingerprint) and a digest of the input's
# bytes (`verify --content`). Written by ingest, read by export and verify.
FINGERPRINT_KEY = b"semdedup.fingerprint"
CONTENT_KEY = b"semdedup.content"
STAGES = (RAW, REJECTED, EMBEDDINGS, CENTROIDS, CLUSTER_ASSIGNMENTS, SEMANTIC_DUPLICATES, KEEP_LISTS, CONTAMINATED)

# Characters a shard key may never hold: backslashes (a Windows separator) and controls.
_FORBIDDEN_KEY_CHARS = re.compile(r"[\\\x00-\x1f\x7f]")


class UnsafeKeyError(ValueError):
    """A shard key that would leave its stage folder (or cannot be a file name)."""


def validate_shard_key(key: str) -> str:
    """Return `key` when it is a safe relative path inside a stage folder, else raise UnsafeKeyError.

    Keys come from input listings (an object-store key may hold `..`), from partitions
    added in the UI or over GraphQL, and from the command line, and every stage turns
    them into paths below the storage root: so `..` or `.` segments, absolute paths,
    empty segments (`a//b`, a trailing `/`), backslashes and control characters are refused.
    """
    if not isinstance(key, str) or not key:
        raise UnsafeKeyError(f"unsafe shard key {key!r}: it is empty")
    if key.startswith("/"):
        raise UnsafeKeyError(f"unsafe shard key {key!r}: an absolute path")
    bad = _FORBIDDEN_KEY_CHARS.search(key)
    if bad:
        raise UnsafeKeyError(f"unsafe shard key {key!r}: it holds the character {bad.group()!r}")
    for part in key.split("/"):
        if part == "..":
            raise UnsafeKeyError(f"unsafe shard key {key!r}: a '..' segment would leave the stage folder")
        if part in ("", "."):
            raise UnsafeKeyError(f"unsafe shard key {key!r}: an empty or '.' path segment")
    return key


# Fixed writer options: byte-identical files for identical tables.
_PARQUET_OPTIONS = {"write_statistics": True, "store_schema": True}


def _is_vector(field: pa.Field) -> bool:
    """A list or fixed-size list of floats: an embedding column."""
    t = field.type
    return (pa.types.is_list(t) or pa.types.is_fixed_size_list(t)) and pa.types.is_floating(t.value_type)


def parquet_options(schema: pa.Schema) -> dict[str, object]:
    """Writer options for a schema: zstd + dictionary, except for embedding columns.

    Unit-norm float vectors are close to incompressible (zstd saves ~7%) and never
    repeat, yet zstd and the dictionary attempt made writes 2.6x slower and reads of
    small row groups slower still (bench/results/end_to_end.md), so they are stored plain.
    """
    vectors = {f.name for f in schema if _is_vector(f)}
    return {
        **_PARQUET_OPTIONS,
        "compression": {f.name: ("none" if f.name in vectors else "zstd") for f in schema},
        "use_dictionary": [f.name for f in schema if f.name not in vectors],
    }


# s3fs/botocore defaults retry a dead endpoint for minutes (botocore's legacy mode, then s3fs'
# own 5 retries with back-off): bounded here, explicitly, so an outage fails a step in seconds
# with an error naming the endpoint, bucket and key. Listings are not cached: the shard sensor
# must see objects that land after its first tick. Endpoint and credentials stay botocore's
# business (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... or an instance role): never passed here.
S3_OPTIONS: dict[str, object] = {
    "use_listings_cache": False,
    "config_kwargs": {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}},
}
S3_RETRIES = 2  # s3fs' retries of timeouts and throttling, on top of botocore's attempts


def to_upath(location: str | os.PathLike[str] | UPath) -> UPath:
    """Turn a local path or fsspec URL into a UPath (local paths made absolute)."""
    if isinstance(location, UPath):
        return location
    text = os.fspath(location)
    if text.startswith(("s3://", "s3a://")):
        path = UPath(text, **S3_OPTIONS)
        path.fs.retries = S3_RETRIES  # a class attribute in s3fs, not a constructor argument
        return path
    if "://" in text and not text.startswith("file://"):
        return UPath(text)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return UPath(os.path.abspath(os.path.expanduser(text)))


def is_local(path: UPath) -> bool:
    """True when the path lives on the local file system."""
    return getattr(path, "protocol", "") in ("", "file", "local")


# Object stores whose URL's first component is a bucket (S3 is tested; GCS and Azure are not).
BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


class StoreError(OSError):
    """An object store that cannot be used (missing bucket, refused credentials, unreachable)."""


def check_store(location: str | os.PathLike[str] | UPath, role: str) -> None:
    """Fail early, naming the bucket, when an object-store location cannot be used.

    s3fs' `exists()` answers False on refused credentials, which would read as "no input";
    a bucket HEAD tells a missing bucket, refused credentials and an unreachable endpoint
    apart. `role` ("input", "storage") goes into the message. Other locations pass untouched.
    """
    path = to_upath(location)
    if getattr(path, "protocol", "") not in BUCKET_PROTOCOLS:
        return
    bucket = urlsplit(str(path)).netloc
    try:
        path.fs.info(f"{bucket}/")
    except FileNotFoundError:
        raise StoreError(f"{role} {printable(path)}: bucket {bucket!r} does not exist") from None
    except PermissionError as err:
        raise StoreError(
            f"{role} {printable(path)}: access to bucket {bucket!r} refused ({err}); check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the instance role)"
        ) from None
    except Exception as err:  # botocore's connection errors are not OSErrors
        raise StoreError(f"{role} {printable(path)}: cannot reach bucket {bucket!r}: {err}") from None


def folder_problem(location: str | os.PathLike[str] | UPath, role: str) -> str | None:
    """Why a local folder cannot be (created and) used at `location`, else None; object stores pass.

    Checked before anything is written: a regular file, or a file where a parent folder should be,
    would otherwise fail deep inside a run (NotADirectoryError on `<storage>/dagster_home`).
    """
    path = to_upath(location)
    if not is_local(path):
        return None
    target = probe = os.path.abspath(os.fspath(path))
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if os.path.isdir(probe):
        return None
    if probe == target and os.path.islink(probe) and not os.path.exists(probe):
        return f"{role} {printable(target)} is a broken symbolic link (to {printable(os.readlink(probe))})"
    if probe == target:
        return f"{role} {printable(target)} is a file, not a folder"
    return f"{role} {printable(target)} cannot be a folder: {printable(probe)} is a file"


def _location_parts(location: str | os.PathLike[str] | UPath) -> tuple[str, tuple[str, ...]]:
    """(protocol, path components) of a location, local paths with their symbolic links resolved."""
    path = to_upath(location)
    if is_local(path):
        return "", tuple(p for p in os.path.realpath(str(path)).split(os.sep) if p)
    return str(getattr(path, "protocol", "")), tuple(
        p for p in urlsplit(str(path))._replace(scheme="").geturl().strip("/").split("/") if p
    )


def overlap_error(
    input_location: str | os.PathLike[str] | UPath, storage_location: str | os.PathLike[str] | UPath
) -> str | None:
    """Why the input and the storage root cannot be used together (None when they are apart).

    A storage inside the input would be read back as input shards on the next run (the
    centroids file as a shard), and an input inside the storage could be overwritten by it.
    """
    (p_in, a), (p_st, b) = _location_parts(input_location), _location_parts(storage_location)
    if p_in != p_st:
        return None
    if a == b:
        return f"--input {printable(input_location)} and --storage {printable(storage_location)} are the same location"
    if b[: len(a)] == a:
        return (
            f"--storage {printable(storage_location)} is inside --input {printable(input_location)}: its files would be read as input "
            "shards; put the storage outside the input"
        )
    if a[: len(b)] == b:
        return (
            f"--input {printable(input_location)} is inside --storage {printable(storage_location)}: the storage's files would be "
            "mixed with the input; put the input outside the storage"
        )
    return None


def _make_parent(path: UPath) -> None:
    """Create a file's folder; object stores have no folders (and s3fs' mkdir would create a missing bucket)."""
    if is_local(path):
        path.parent.mkdir(parents=True, exist_ok=True)


class Storage:
    """The storage root and the layout of every stage's files below it."""

    def __init__(
        self, root: str | os.PathLike[str] | UPath, catalog: str = "catalog.duckdb", scan_memory: int | None = None
    ) -> None:
        self.root = to_upath(root)
        self.catalog = catalog  # the catalog file's path when the root is not local
        # DuckDB's memory for a scan of the stage files (catalog.scan), from the settings' memory budget: None
        # leaves DuckDB's own default (80% of the machine), which a GROUP BY of every id would take at scale.
        self.scan_memory = scan_memory

    def __repr__(self) -> str:
        return f"Storage({str(self.root)!r})"

    @property
    def local(self) -> bool:
        """True when the root is a local folder."""
        return is_local(self.root)

    def stage_dir(self, stage: str) -> UPath:
        """The folder of one stage."""
        return self.root / stage

    def shard_file(self, stage: str, shard: str, suffix: str = ".parquet") -> UPath:
        """The file of one shard in a per-shard stage (shard keys may contain '/'; unsafe keys are refused)."""
        return self.stage_dir(stage) / f"{validate_shard_key(shard)}{suffix}"

    def bucket_file(self, bucket: str) -> UPath:
        """The result file of one cluster bucket."""
        return self.stage_dir(SEMANTIC_DUPLICATES) / f"bucket-{bucket}.parquet"

    @property
    def centroids_file(self) -> UPath:
        """The trained centroids (cluster, centroid)."""
        return self.stage_dir(CENTROIDS) / "centroids.parquet"

    @property
    def eps_curve_file(self) -> UPath:
        """The kept/removed counts per configured eps."""
        return self.stage_dir(KEEP_LISTS) / "eps_curve.parquet"

    @property
    def contaminated_file(self) -> UPath:
        """Items near a reference item: id, shard, reference_id, score."""
        return self.stage_dir(CONTAMINATED) / "contaminated.parquet"

    def keep_list_file(self, eps: float) -> UPath:
        """The keep-list for one eps."""
        return self.stage_dir(KEEP_LISTS) / f"eps={format_eps(eps)}.parquet"

    def groups_file(self, eps: float) -> UPath:
        """The duplicate groups (connected components of the duplicate graph) for one eps."""
        return self.stage_dir(GROUPS) / f"eps={format_eps(eps)}.parquet"

    @property
    def catalog_file(self) -> Path:
        """The DuckDB catalog (always local: DuckDB needs a file it can lock)."""
        if not self.local:
            return Path(self.catalog).absolute()
        return Path(str(self.root)) / "catalog.duckdb"

    @property
    def settings_file(self) -> UPath:
        """The settings that `semdedup run` used, read back by the Dagster definitions."""
        return self.root / "semdedup.json"

    def stage_files(self, stage: str, suffix: str = ".parquet") -> list[UPath]:
        """Every file of a stage, sorted by path (deterministic order)."""
        folder = self.stage_dir(stage)
        if not folder.exists():
            return []
        return sorted((p for p in folder.rglob(f"*{suffix}") if p.is_file()), key=lambda p: str(p))

    def shard_of(self, stage: str, path: UPath, suffix: str = ".parquet") -> str:
        """The shard key of a per-shard stage file."""
        rel = str(path)[len(str(self.stage_dir(stage))) + 1 :]
        return rel[: -len(suffix)] if rel.endswith(suffix) else rel


def format_eps(eps: float) -> str:
    """A stable, short text form of eps for file names and metadata."""
    return format(float(eps), ".10g")


TMP_SUFFIX = ".tmp"
# Local temporary files of this process not yet published or removed: a process stopped by a
# signal deletes them before it exits (a SIGKILL leaves them; `semdedup verify --repair` removes them).
_LIVE_TEMPS: set[str] = set()


def _host_tag() -> str:
    """A short, file-name-safe tag of this machine's name (8 hex digits)."""
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def _tmp_sibling(path: UPath) -> UPath:
    # The writer's pid and machine are in the name: a sweep of leftovers (`remove_temporaries`) must
    # not delete the file another live process (a second run on the same storage) is writing.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{_host_tag()}-{uuid.uuid4().hex}{TMP_SUFFIX}")
    if is_local(tmp):
        _LIVE_TEMPS.add(str(tmp))
    return tmp


def live_writer(tmp: UPath, other_machines: bool = True) -> int | None:
    """The pid of another process, still running, that wrote the temporary file `tmp`; else None.

    None for a file of this process, of a process on this machine that has gone, or of a name
    without an owner (an older version's). A file of another machine counts as live when
    `other_machines` (nothing here can tell that its writer has gone, so a sweep leaves it;
    `semdedup verify --repair` deletes it).
    """
    token = tmp.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1] if tmp.name.endswith(TMP_SUFFIX) else ""
    parts = token.split("-")
    if len(parts) != 3 or not parts[0].isdigit() or len(parts[1]) != 8:
        return None
    pid, host = int(parts[0]), parts[1]
    if host != _host_tag():
        return pid if other_machines else None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # it exists, under another user
        return pid
    return pid


def _drop_tmp(tmp: UPath | None) -> None:
    """Delete a temporary file if it is still there, and stop tracking it."""
    if tmp is None:
        return
    _LIVE_TEMPS.discard(str(tmp))
    if os.path.exists(str(tmp)):
        os.unlink(str(tmp))


def discard_temporary_files() -> list[str]:
    """Delete every temporary file this process has not published (for a stop on a signal)."""
    removed = []
    for name in sorted(_LIVE_TEMPS):
        try:
            os.unlink(name)
            removed.append(name)
        except OSError:
            pass
    _LIVE_TEMPS.clear()
    return removed


def is_temporary(path: UPath) -> bool:
    """True for an unpublished temporary file of an atomic write (left behind by a killed process)."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


@contextmanager
def writing(path: UPath) -> Iterator[None]:
    """Name the file in a write error (a full disk says only 'No space left on device')."""
    try:
        yield
    except OSError as err:
        if str(path) in str(err):
            raise
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from None  # a chain would hide the path


@contextmanager
def atomic_open(path: UPath) -> Iterator[IO[bytes]]:
    """A binary file handle for streamed writes; the file appears at `path` only if the block succeeds."""
    _make_parent(path)
    if not is_local(path):  # buffered, so a failed block uploads nothing
        buf = io.BytesIO()
        yield buf
        with path.open("wb") as f:
            f.write(buf.getvalue())
        return
    tmp = _tmp_sibling(path)
    try:
        with writing(path), open(str(tmp), "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(str(tmp), str(path))
    finally:
        _drop_tmp(tmp)


def atomic_write_bytes(data: bytes, path: UPath) -> None:
    """Write bytes so that readers see either the old file or the whole new one."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_table(table: pa.Table, path: UPath, row_group_size: int | None = None) -> None:
    """Write a table as Parquet atomically, with fixed options for byte-identical output."""
    _make_parent(path)
    if not is_local(path):
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=row_group_size, **parquet_options(table.schema))
        atomic_write_bytes(buf.getvalue(), path)
        return
    tmp = _tmp_sibling(path)
    try:
        with writing(path):
            pq.write_table(table, str(tmp), row_group_size=row_group_size, **parquet_options(table.schema))
        os.replace(str(tmp), str(path))
    finally:
        _drop_tmp(tmp)


# Row groups of streamed stage files (keep-lists, bucket results): a fixed size, so a file's
# bytes do not depend on how its rows were read or computed (--buckets, --memory-budget).
STREAM_ROW_GROUP = 65536


class AtomicParquetWriter:
    """A streaming Parquet writer that publishes its file only on a clean close.

    With `row_group_rows`, rows are buffered and written in row groups of exactly that
    many rows (the last one shorter), whatever the sizes of the tables written.
    """

    def __init__(self, path: UPath, schema: pa.Schema, row_group_rows: int | None = None) -> None:
        self.path = path
        self._group = row_group_rows
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        _make_parent(path)
        self._local = is_local(path)
        self._tmp = _tmp_sibling(path) if self._local else None
        self._buf = None if self._local else io.BytesIO()
        sink = str(self._tmp) if self._local else self._buf
        try:
            with writing(path):
                self._writer = pq.ParquetWriter(sink, schema, **parquet_options(schema))
        except BaseException:
            _drop_tmp(self._tmp)
            raise
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        """Append a table (one or more row groups; buffered into fixed row groups with `row_group_rows`)."""
        if not table.num_rows:
            return
        self.rows += table.num_rows
        if self._group is None:
            with writing(self.path):
                self._writer.write_table(table)
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self._group:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write the buffered rows in whole row groups (and, if `final`, the rest)."""
        pending = pa.concat_tables(self._pending)
        full = (pending.num_rows // self._group) * self._group
        end = pending.num_rows if final else full
        with writing(self.path):
            for start in range(0, end, self._group):
                self._writer.write_table(
                    pending.slice(start, min(self._group, end - start)), row_group_size=self._group
                )
        rest = pending.slice(end)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def _close(self) -> None:
        """Write the buffered rows and the footer."""
        if self._pending:
            self._flush(final=True)
        with writing(self.path):
            self._writer.close()

    def commit(self) -> None:
        """Close and publish the file."""
        try:
            self._close()
            if self._local:
                os.replace(str(self._tmp), str(self.path))
            else:
                atomic_write_bytes(self._buf.getvalue(), self.path)
        finally:
            _drop_tmp(self._tmp)

    def stage(self) -> UPath:
        """Close the file and return where it is staged, unpublished: a hidden temporary sibling of `path`.

        `publish_staged` moves it into place later, possibly from another process (a Ray
        task stages, the run's process publishes the batch together); `drop_staged` deletes it.
        """
        try:
            self._close()
            if self._local:
                _LIVE_TEMPS.discard(str(self._tmp))  # the publisher tracks it: this process may be a Ray worker
                return self._tmp
            staged = _tmp_sibling(self.path)
            atomic_write_bytes(self._buf.getvalue(), staged)
            return staged
        except BaseException:
            _drop_tmp(self._tmp)
            raise

    def abort(self) -> None:
        """Close and drop the unfinished file."""
        try:
            self._writer.close()
        except OSError:
            pass  # a full disk fails the close too; the file is dropped either way
        finally:
            _drop_tmp(self._tmp)


def track_staged(staged: UPath) -> UPath:
    """Take over a staged file this process will publish; returns where it now is.

    A local file is renamed to a name of this process (a Ray worker that staged it may exit before
    the batch is published, and a sweep by another run would then take it for a leftover), and a
    signal that stops this process deletes it while it is unpublished.
    """
    if not is_local(staged):
        return staged
    mine = _tmp_sibling(staged.with_name(staged.name[1:].rsplit(".", 2)[0]))
    if mine != staged:
        os.replace(str(staged), str(mine))
    return mine


def publish_staged(staged: UPath, path: UPath) -> None:
    """Move a staged file (`AtomicParquetWriter.stage`) to `path`: a rename, or a copy of the object on S3."""
    if is_local(path):
        with writing(path):
            os.replace(str(staged), str(path))
        _LIVE_TEMPS.discard(str(staged))
        return
    with writing(path):
        path.fs.copy(staged.path, path.path)  # one object copy: readers see the old object or the whole new one
    drop_staged(staged)


def remove_temporaries(paths: Iterable[UPath]) -> None:
    """Delete the temporary siblings (`.<name>.<uuid>.tmp`, see _tmp_sibling) that writers of these paths left:
    a killed process's half-written file or a staged file that will not be published. The paths themselves
    stay as they are. One listing per folder, not one per path: a batch of S files costs O(files), not
    O(S x files). A file another live process is writing (`live_writer`: a second run on this storage)
    stays.
    """
    folders: dict[str, tuple[UPath, list[str]]] = {}
    for path in paths:
        folders.setdefault(str(path.parent), (path.parent, []))[1].append(f".{path.name}.")
    for folder, prefixes in folders.values():
        if not folder.exists():
            continue
        for tmp in folder.iterdir():
            if tmp.name.startswith(tuple(prefixes)) and tmp.name.endswith(TMP_SUFFIX) and live_writer(tmp) is None:
                drop_staged(tmp)


def drop_staged(staged: UPath) -> None:
    """Delete a staged file that will not be published (a missing one is fine)."""
    if is_local(staged):
        _drop_tmp(staged)
        return
    try:
        staged.fs.rm(staged.path)
    except FileNotFoundError:
        pass


@contextmanager
def publish_together(writers: list[AtomicParquetWriter]) -> Iterator[list[AtomicParquetWriter]]:
    """Commit every writer when the block succeeds, abort all of them when it fails."""
    try:
        yield writers
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for i, w in enumerate(writers):
        try:
            w.commit()
        except BaseException:
            for rest in writers[i + 1 :]:
                rest.abort()
            raise


class StageFileError(OSError):
    """A stage file that exists but cannot be read (truncated, corrupt): the message names it."""

    def __init__(self, path: UPath, cause: BaseException) -> None:
        self.path = path
        self.reason = f"{type(cause).__name__}: {cause}"
        super().__init__(
            f"cannot read {printable(path)}: {self.reason} (the file is damaged; "
            "delete it, or run `semdedup verify --repair`, and the next run recomputes it)"
        )


# What a damaged Parquet file raises: ArrowInvalid (bad footer), OSError, EOF, ValueError.
_READ_ERRORS = (pa.ArrowException, OSError, EOFError, ValueError)


@contextmanager
def reading(path: UPath) -> Iterator[None]:
    """Turn any error from reading `path` into a StageFileError naming it (a missing file stays FileNotFoundError)."""
    try:
        yield
    except (FileNotFoundError, StageFileError):
        raise
    except _READ_ERRORS as err:
        raise StageFileError(path, err) from None  # the message holds the cause; a chain would hide the path


def read_table(path: UPath, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file from the storage root (StageFileError, naming it, when it is damaged)."""
    with reading(path):
        if is_local(path):
            return pq.read_table(str(path), columns=columns)
        with path.open("rb") as f:
            return pq.read_table(f, columns=columns)


def read_schema(path: UPath) -> pa.Schema:
    """A Parquet file's schema (with its key-value metadata), from the footer."""
    with reading(path):
        if is_local(path):
            return pq.read_schema(str(path))
        with path.open("rb") as f:
            return pq.read_schema(f)


def recorded_fingerprint(storage: Storage, key: str, what: bytes = FINGERPRINT_KEY) -> str | None:
    """The input fingerprint (or with `what=CONTENT_KEY` the content digest) stored in a shard's raw
    index when it was ingested (None if not recorded)."""
    meta = read_schema(storage.shard_file(RAW, key)).metadata or {}
    value = meta.get(what)
    return value.decode() if value else None


def parquet_num_rows(path: UPath) -> int:
    """The row count from a Parquet footer, without reading the data."""
    with reading(path):
        if is_local(path):
            return pq.ParquetFile(str(path)).metadata.num_rows
        with path.open("rb") as f:
            return pq.ParquetFile(f).metadata.num_rows


def iter_batches(path: UPath, columns: list[str] | None = None, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
    """Stream a Parquet file in record batches."""
    with reading(path):
        if is_local(path):
            yield from pq.ParquetFile(str(path)).iter_batches(batch_size=batch_size, columns=columns)
            return
        with path.open("rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def usable(path: UPath, read: Callable[[UPath], T], warn: Callable[[str], None] | None = None) -> T | None:
    """`read(path)` for a file that may be reused, or None when it is missing or damaged.

    A damaged file is treated as missing, so that it is recomputed; `warn` is told which
    file and why. Every reuse path (embedding cache, buckets, centroids, keep-lists, an
    old assignment file) goes through here, so a bad disk or a crashed copy never blocks a re-run.
    """
    if not path.exists():
        return None
    try:
        return read(path)
    except StageFileError as err:
        if warn is not None:
            warn(f"{err.path} is damaged and is recomputed ({err.reason})")
        return None


def remove_tree(path: UPath) -> None:
    """Delete a folder and everything below it (local or object store); a missing one is left alone."""
    if is_local(path):
        shutil.rmtree(str(path), ignore_errors=True)
    elif path.exists():
        path.fs.rm(path.path, recursive=True)


def remove(path: UPath) -> bool:
    """Delete a file if present; True when something was removed."""
    if path.exists():
        path.unlink()
        return True
    return False
