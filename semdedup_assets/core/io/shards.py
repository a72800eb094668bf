"""Input shards: discovery under an input location, shard keys, reading and validation.

A shard is one Parquet, JSON Lines or WebDataset `.tar` file, or a `.npy` matrix of
embeddings with its metadata Parquet (LAION's `img_emb/img_emb_N.npy` with
`metadata/metadata_N.parquet`, or `X.npy` beside `X.parquet`). Its key is its path
relative to the input location without the extension (`2024/part-03`).

`read_shard` validates a shard and returns its index `id, row` (plus the text for the
text modality); heavy payloads (embeddings, images) are read again by the embedding
stage with `iter_embedding_chunks` / `read_images`, never copied. Anything wrong raises
`ShardError` naming the shard and, where known, the row.

With `--files-per-shard N` (N > 1) a shard is a `ShardGroup`: N consecutive files in key
order (group i holds files i*N .. i*N+N-1; the last may hold fewer), keyed
`<first file's key>+<N>` (docs/files-per-shard.md). Every item still names its own
file: the raw index's `shard` column is the file's key and `row` its row in that file,
so ids, keep-lists and exports are what one file per shard gives.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from upath import UPath

from semdedup_assets.core.io.storage import UnsafeKeyError, check_store, is_local, to_upath, validate_shard_key
from semdedup_assets.core.messages import printable

SHARD_SUFFIXES = (".jsonl.gz", ".parquet", ".jsonl", ".tar", ".npy")
LAION_EMBEDDINGS = re.compile(r"^img_emb_(\d+)\.npy$")
EMBEDDING_CHUNK_ROWS = 65536
DEFAULT_ID_COLUMN = "id"  # the one id column that may be absent (ids are then <shard>:<row>)
DIGEST_PREFIX = "sha256:"  # content digests recorded since SHA-256 replaced BLAKE2b-128 (unprefixed hex)
PAYLOAD_HASH = "payload_hash"  # the raw index column: a digest of each item's payload (exact copies share it)
PAYLOAD_HASH_BYTES = 16


class ShardError(ValueError):
    """A shard that cannot be used, with the shard key and row where known."""

    def __init__(self, shard: str, message: str, row: int | None = None) -> None:
        self.shard = shard
        self.row = row
        self.reason = message
        where = f"shard {shard!r}" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class ShardFile:
    """One input file and its shard key."""

    key: str
    path: UPath
    metadata: UPath | None = None  # the metadata Parquet of a .npy embeddings shard

    @property
    def kind(self) -> str:
        """'parquet', 'jsonl', 'tar' or 'npy'."""
        suffix = shard_suffix(self.path.name) or ""
        return {".jsonl.gz": "jsonl", ".jsonl": "jsonl"}.get(suffix, suffix.lstrip("."))

    def fingerprint(self) -> str:
        """Size plus modification time (or ETag) of every file: cheap change detection."""
        return "|".join(_fingerprint(p) for p in (self.path, self.metadata) if p is not None)

    def content_digest(self, like: str | None = None) -> str:
        """A digest of the bytes of every file: certain change detection, at the cost of reading them.

        New digests are `sha256:<hex>`: OpenSSL's SHA-256 uses the CPU's SHA extensions, and ingest
        hashes every new input (a 15 MB shard: 16-19 ms against BLAKE2b's 36-39 ms, AMD EPYC).
        `like` a recorded digest computes it the same way, so a raw index written before (an
        unprefixed BLAKE2b-128 hex digest) still verifies against its input.
        """

        def blocks() -> Iterator[bytes | None]:
            for path in (self.path, self.metadata):
                if path is not None:
                    with path.open("rb") as f:
                        yield from iter(lambda: f.read(1 << 20), b"")
                    yield None  # file boundary

        return bytes_digest(blocks(), like)

    def read_once(self) -> tuple[bytes, str, str]:
        """(bytes, fingerprint, content digest) of a one-file shard, from one open of the file.

        Ingest reads an input file once: the digest is of the very bytes it validates, and locally
        the fingerprint is the open file's `fstat` (an object store's is its listing's entry, or
        one HEAD). What `fingerprint()` and `content_digest()` give, without a second read. An
        `.npy` shard (memory-mapped, with its metadata file) is read as before: ValueError here.
        """
        if self.kind == "npy":
            raise ValueError(f"{self.path.name}: an .npy shard is memory-mapped, not read whole")
        if not is_local(self.path):
            data = _read_bytes(self.key, self.path)
            return data, self.fingerprint(), bytes_digest(iter((data, None)))
        try:
            with open(str(self.path), "rb") as f:
                fingerprint = stat_fingerprint(os.fstat(f.fileno()))
                data = f.read()
        except OSError as exc:
            raise ShardError(self.key, f"cannot read {self.path.name}: {exc}") from None
        return data, fingerprint, bytes_digest(iter((data, None)))


@dataclass(frozen=True)
class ShardGroup:
    """Consecutive input files (in key order) read, ingested and embedded as one shard (one partition)."""

    key: str
    files: tuple[ShardFile, ...]

    @property
    def kind(self) -> str:
        """The kind of its files (a group holds one kind)."""
        return self.files[0].kind

    @property
    def path(self) -> UPath:
        """The first file's path (what a log line names for the group)."""
        return self.files[0].path

    def fingerprint(self) -> str:
        """Every member's key and fingerprint: a file added, removed, renamed or changed changes it."""
        return group_fingerprint((f.key, f.fingerprint()) for f in self.files)

    def changed_files(self, recorded: str) -> str:
        """What differs from a recorded group fingerprint, naming the files (for an error message)."""
        before = dict(part.partition("=")[::2] for part in recorded.split(";") if "=" in part)
        now = {f.key: f for f in self.files}
        added = [str(now[k].path) for k in now if k not in before]
        gone = [k for k in before if k not in now]
        edited = [str(now[k].path) for k in now if k in before and before[k] != now[k].fingerprint()]
        parts = [
            f"{what}: {', '.join(names[:3])}"
            for what, names in (("added", added), ("gone", gone), ("changed", edited))
            if names
        ]
        return f"its input files changed since it was ingested ({'; '.join(parts) or 'order'})"

    def content_digest(self, like: str | None = None) -> str:
        """One digest of every member's bytes, in order, each preceded by its key."""
        return group_digest(((m.key, m.content_digest(like)) for m in self.files), like)


Shard = ShardFile | ShardGroup  # what a `shards` partition stands for


def bytes_digest(blocks: Iterator[bytes | None], like: str | None = None) -> str:
    """The content digest of a file's blocks, None marking the end of each file (`ShardFile.content_digest`)."""
    legacy = like is not None and not like.startswith(DIGEST_PREFIX)
    h = hashlib.blake2b(digest_size=16) if legacy else hashlib.sha256()
    for block in blocks:
        h.update(b"\0" if block is None else block)
    return h.hexdigest() if legacy else DIGEST_PREFIX + h.hexdigest()


def group_digest(parts: Iterable[tuple[str, str]], like: str | None = None) -> str:
    """A group's content digest from its members' (key, content digest), in order (`ShardGroup.content_digest`)."""
    return bytes_digest((b for key, digest in parts for b in (key.encode() + b"\0", digest.encode() + b"\0")), like)


def group_fingerprint(parts: Iterable[tuple[str, str]]) -> str:
    """A group's fingerprint from its members' (key, fingerprint), in order (`ShardGroup.fingerprint`)."""
    return ";".join(f"{key}={fingerprint}" for key, fingerprint in parts)


def members(shard: Shard) -> tuple[ShardFile, ...]:
    """The input files of a shard, in key order (one for a plain file)."""
    return shard.files if isinstance(shard, ShardGroup) else (shard,)


GROUP_SEPARATOR = "+"


def group_key(first: str, files_per_shard: int) -> str:
    """The key of the group whose first file has key `first`: `<first>+<N>` (N the configured group size).

    The nominal size, not the count: the last group keeps its key while appended files fill it.
    """
    return f"{first}{GROUP_SEPARATOR}{files_per_shard}"


def group_files(files: list[ShardFile], files_per_shard: int) -> list[Shard]:
    """Group files sorted by key into shards of `files_per_shard` consecutive files (1: the files themselves).

    Group i is files [i*N, (i+1)*N): appending files whose keys sort after the others fills the
    last group and then starts new ones, never moving a file of a full group. A group mixing
    kinds (say .parquet and .jsonl) is refused naming both files.
    """
    if files_per_shard < 1:
        raise ValueError(f"files_per_shard must be >= 1, got {files_per_shard}")
    if files_per_shard == 1:
        return list(files)
    groups: list[Shard] = []
    for start in range(0, len(files), files_per_shard):
        run = tuple(files[start : start + files_per_shard])
        odd = next((f for f in run if f.kind != run[0].kind), None)
        if odd is not None:
            raise ValueError(
                f"files {run[0].path} ({run[0].kind}) and {odd.path} ({odd.kind}) fall in one group of "
                f"--files-per-shard {files_per_shard}: a group holds one kind of file"
            )
        groups.append(ShardGroup(validate_shard_key(group_key(run[0].key, files_per_shard)), run))
    return groups


def regrouped_shards(stray: list[str], files: set[str], files_per_shard: int) -> list[str]:
    """The registered shards that are no longer shards only because the input's files were grouped anew.

    A group key `<first>+<n>` whose first file is still an input file, or (with
    `files_per_shard` > 1) sorts between the input's first and last files (a file added,
    removed or renamed inside the input, or the group size changed); with `files_per_shard`
    > 1, the plain key of a file now in a group. Any other stray key is a shard that
    vanished (or another dataset's): left to `semdedup forget`, as ever.
    """
    low, high = (min(files), max(files)) if files else ("", "")

    def is_group(key: str) -> bool:
        first, sep, size = key.rpartition(GROUP_SEPARATOR)
        if not (sep and size.isdigit() and int(size) > 1):
            return False
        return first in files or (files_per_shard > 1 and low < first < high)

    return [k for k in stray if is_group(k) or (files_per_shard > 1 and k in files)]


def stat_fingerprint(info: object) -> str:
    """`size:mtime` of a stat result (an fsspec backend's info dict: its size and mtime or ETag)."""
    size = getattr(info, "st_size", None)
    mtime = getattr(info, "st_mtime", None)
    if size is None and isinstance(info, dict):  # some fsspec backends
        size, mtime = info.get("size"), info.get("mtime") or info.get("ETag")
    return f"{size}:{mtime}"


def _fingerprint(path: UPath) -> str:
    return stat_fingerprint(path.stat())


def npy_metadata_path(npy: UPath) -> UPath:
    """Where the metadata of an embeddings .npy lives: LAION's layout, else X.parquet beside X.npy."""
    m = LAION_EMBEDDINGS.match(npy.name)
    if m and npy.parent.name == "img_emb":
        return npy.parent.parent / "metadata" / f"metadata_{m.group(1)}.parquet"
    return npy.with_name(npy.name[: -len(".npy")] + ".parquet")


def shard_suffix(name: str) -> str | None:
    """The recognised shard extension of a file name, or None."""
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def shard_key(path: UPath, root: UPath) -> str:
    """The key of a shard file: its path relative to the input root, without extension.

    An object-store listing may hold keys such as `a/../../x.parquet`: a key that would
    leave a stage folder is refused here, before any stage turns it into a path.
    """
    rel = str(path)[len(str(root).rstrip("/")) + 1 :]
    suffix = shard_suffix(rel)
    if suffix is None:
        raise ValueError(f"not a shard file: {printable(path)}")
    try:
        return validate_shard_key(rel[: -len(suffix)])
    except UnsafeKeyError as err:
        raise UnsafeKeyError(f"input file {printable(path)}: {err}") from None


HIDDEN_PREFIXES = (".", "_")  # Spark/Hive convention: _SUCCESS, _temporary, .crc files are not data


@dataclass(frozen=True)
class Discovery:
    """What a listing of the input found: the shards, and the shard-like files it skipped."""

    shards: list[Shard]  # one per partition: the files, or with files_per_shard > 1 their groups
    skipped: list[str]  # paths relative to the input of files with a shard suffix named `_...` or `.…`
    files: list[ShardFile] = field(default_factory=list)  # every input file, sorted by key

    def skipped_note(self, location: str | UPath) -> str | None:
        """One line saying how many files were skipped and where (None when none were)."""
        if not self.skipped:
            return None
        folders = sorted({p.rpartition("/")[0] or "." for p in self.skipped})
        return (
            f"skipped {len(self.skipped)} file(s) whose names start with '_' or '.' under {printable(location)} "
            f"(in {', '.join(map(printable, folders[:3]))}{', ...' if len(folders) > 3 else ''}; e.g. "
            f"{', '.join(map(printable, self.skipped[:3]))}): such names are never shards"
        )


def _walk_local(root: str) -> Iterator[str]:
    """Every file below a local folder, following symlinked folders.

    A link to a folder that holds it (a loop) is refused naming the link, as is a broken
    link with a shard suffix: data is never dropped silently.
    """
    stack = [(root, (os.path.realpath(root),))]
    while stack:
        folder, ancestors = stack.pop()
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name, reverse=True):
                if entry.is_dir():  # follows symbolic links
                    real = os.path.realpath(entry.path)
                    if real in ancestors:
                        raise ValueError(
                            f"symbolic link loop under the input: {printable(entry.path)} points to {printable(real)}, "
                            "a folder that contains it"
                        )
                    stack.append((entry.path, (*ancestors, real)))
                elif entry.is_file():
                    yield entry.path
                elif entry.is_symlink() and shard_suffix(entry.name):
                    raise ValueError(
                        f"broken symbolic link under the input: {printable(entry.path)} -> {printable(os.readlink(entry.path))}"
                    )


def discover(location: str | UPath, files_per_shard: int = 1) -> Discovery:
    """Every shard under the input location (or the one file it names), sorted by key.

    Files whose names start with `_` or `.` are skipped (and listed in `skipped`); local
    symbolic links to folders are followed. `files_per_shard` > 1 groups the files
    (`group_files`); `files` always lists them one by one.
    """
    root = to_upath(location)
    check_store(root, "input")  # refused credentials must not read as "no such input"
    if root.is_file():
        suffix = shard_suffix(root.name)
        if suffix is None:
            raise ValueError(f"{printable(root)}: not a shard file (one of {', '.join(SHARD_SUFFIXES)})")
        one = [ShardFile(validate_shard_key(root.name[: -len(suffix)]), root)]
        return Discovery(group_files(one, files_per_shard), [], one)
    if not root.exists():
        raise FileNotFoundError(f"input location does not exist: {printable(root)}")
    if is_local(root):
        candidates = [to_upath(p) for p in _walk_local(str(root)) if shard_suffix(os.path.basename(p))]
    else:
        candidates = [p for p in root.rglob("*") if shard_suffix(p.name) and p.is_file()]
    base = str(root).rstrip("/") + "/"
    skipped = sorted(str(p)[len(base) :] for p in candidates if p.name.startswith(HIDDEN_PREFIXES))
    paths = [p for p in candidates if not p.name.startswith(HIDDEN_PREFIXES)]
    # An .npy shard's metadata Parquet belongs to it and is not a shard of its own.
    metadata = {str(p): npy_metadata_path(p) for p in paths if p.name.endswith(".npy")}
    paired = {str(m) for m in metadata.values()}
    found: dict[str, ShardFile] = {}
    for path in paths:
        if str(path) in paired:
            continue
        key = shard_key(path, root)
        if key in found:
            raise ValueError(f"two files give shard key {key!r}: {printable(found[key].path)} and {printable(path)}")
        found[key] = ShardFile(key, path, metadata.get(str(path)))
    files = [found[k] for k in sorted(found)]
    return Discovery(group_files(files, files_per_shard), skipped, files)


def discover_shards(location: str | UPath, files_per_shard: int = 1) -> list[Shard]:
    """Every shard under the input location (or the one file it names), sorted by key (see `discover`)."""
    return discover(location, files_per_shard).shards


def _read_jsonl(shard: str, data: bytes) -> pa.Table:
    rows: list[dict] = []
    for lineno, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ShardError(
                shard, f"line is not valid UTF-8 ({exc.reason} at byte {exc.start})", row=len(rows)
            ) from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ShardError(shard, f"invalid JSON on line {lineno + 1}: {exc.msg}", row=len(rows)) from None
        if not isinstance(obj, dict):
            raise ShardError(shard, f"line {lineno + 1} is not a JSON object", row=len(rows))
        rows.append(obj)
    if not rows:
        return pa.table({})
    columns = sorted({k for r in rows for k in r})
    return pa.table({c: _jsonl_column(shard, c, [r.get(c) for r in rows]) for c in columns})


def _json_kind(value: object) -> str:
    """A JSON value's type as JSON names it (ints and floats are both numbers)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _jsonl_column(shard: str, name: str, values: list[object]) -> pa.Array:
    """One field of every JSON line as an Arrow array; a field of mixed types names its first odd row."""
    try:
        if name == "embedding":
            return pa.array(values, type=pa.list_(pa.float32()))
        return pa.array(values, from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        present = [(i, _json_kind(v)) for i, v in enumerate(values) if v is not None]
        first_row, first = present[0] if present else (0, "null")
        odd = next((i for i, kind in present if kind != first), None)
        if odd is None:
            raise ShardError(shard, f"field {name!r} cannot be read: {exc}") from None
        raise ShardError(
            shard,
            f"field {name!r} is a {_json_kind(values[odd])} here but a {first} in row "
            f"{first_row}: a field must have one type in every line",
            row=odd,
        ) from None


def _read_bytes(shard: str, path: UPath) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read()
    except OSError as exc:
        raise ShardError(shard, f"cannot read {path.name}: {exc}") from None


def _read_parquet(shard: str, path: UPath, columns: list[str] | None = None, data: bytes | None = None) -> pa.Table:
    """One Parquet file as a table, from `data` (its bytes, already read) or from the file.

    `ParquetFile.read`, not `pq.read_table`: on a path the latter builds a dataset (two stats
    and two opens of the file, ~1 ms of overhead per file, which dominated ingest at 40,000
    small files); the table is the same. A local file is opened once and only the asked
    columns' chunks are read.
    """
    try:
        if data is not None:
            return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns)
        if is_local(path):
            with pa.OSFile(str(path)) as f:
                return pq.ParquetFile(f).read(columns=columns)
        return pq.ParquetFile(pa.BufferReader(_read_bytes(shard, path))).read(columns=columns)
    except (pa.ArrowException, OSError, EOFError, ValueError) as exc:
        raise ShardError(shard, f"corrupt or unreadable {path.name}: {exc}") from None


def read_raw_table(shard: ShardFile, columns: list[str] | None = None, data: bytes | None = None) -> pa.Table:
    """Read a Parquet, JSON Lines or WebDataset shard as an Arrow table (npy: its metadata).

    `data`: the file's bytes when the caller has read them already (`ShardFile.read_once`), so the
    file is not opened again.
    """
    if shard.kind == "npy":
        if shard.metadata is None or not shard.metadata.exists():
            raise ShardError(shard.key, f"no metadata Parquet for {shard.path.name} (expected {shard.metadata})")
        return _read_parquet(shard.key, shard.metadata, columns)
    if shard.kind == "parquet":
        return _read_parquet(shard.key, shard.path, columns, data)
    if data is None:
        data = _read_bytes(shard.key, shard.path)
    try:
        if shard.kind == "tar":
            from semdedup_assets.core.io.webdataset import read_webdataset

            return read_webdataset(io.BytesIO(data))
        if shard.path.name.endswith(".gz"):
            data = gzip.decompress(data)
        return _read_jsonl(shard.key, data)
    except ShardError:
        raise
    except (pa.ArrowException, OSError, EOFError, ValueError) as exc:
        raise ShardError(shard.key, f"corrupt or unreadable {shard.path.name}: {exc}") from None


def _first_bad_utf8(column: pa.ChunkedArray) -> int | None:
    offset = 0
    for chunk in column.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            for i, value in enumerate(chunk.cast(pa.binary()).to_pylist()):
                if value is not None:
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError:
                        return offset + i
        offset += len(chunk)
    return None


def _validate_text(shard: str, column: str, values: pa.ChunkedArray) -> pa.Array:
    if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
        for i, v in enumerate(values.to_pylist()):
            if v is None:
                raise ShardError(shard, f"{column!r} is null", row=i)
            try:
                v.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ShardError(
                    shard, f"{column!r} is not valid UTF-8 ({exc.reason} at byte {exc.start})", row=i
                ) from None
        values = values.cast(pa.string())
    elif pa.types.is_large_string(values.type):
        values = values.cast(pa.string())
    elif not pa.types.is_string(values.type):
        if values.null_count == len(values):
            raise ShardError(shard, f"{column!r} is null", row=0)
        bad = next((i for i, v in enumerate(values.to_pylist()) if not isinstance(v, str)), 0)
        raise ShardError(
            shard, f"{column!r} must be text, found {type(values[bad].as_py()).__name__} ({values.type})", row=bad
        )
    if values.null_count:
        raise ShardError(
            shard, f"{column!r} is null", row=int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        )
    bad_row = _first_bad_utf8(values)
    if bad_row is not None:
        raise ShardError(shard, f"{column!r} is not valid UTF-8", row=bad_row)
    return values.combine_chunks()


def _embedding_matrix_of(shard: str, column: str, values: pa.ChunkedArray) -> np.ndarray:
    """A list-of-floats column as an (n, d) float32 matrix, with shape checks and `check_vectors`."""
    if not (
        pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type) or pa.types.is_large_list(values.type)
    ):
        raise ShardError(shard, f"{column!r} must be a list of floats, found {values.type}")
    if values.null_count:
        raise ShardError(
            shard, f"{column!r} is null", row=int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        )
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        bad = int(np.flatnonzero(lengths != lengths[0])[0])
        raise ShardError(shard, f"{column!r} has dimension {lengths[bad]}, expected {lengths[0]} (row 0)", row=bad)
    dim = int(lengths[0]) if len(lengths) else 0
    if dim == 0:
        raise ShardError(shard, f"{column!r} has dimension 0")
    flat = pc.list_flatten(values).cast(pa.float32()).to_numpy(zero_copy_only=False).reshape(-1, dim)
    check_vectors(shard, column, flat, 0)
    return flat


FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32


def check_vectors(shard: str, column: str, block: np.ndarray, offset: int) -> None:
    """Every row can be L2-normalised in float32: finite, not all zero, not subnormal. Names the first bad row."""
    block = np.asarray(block, dtype=np.float32)  # what the pipeline computes with (a float64 1e39 overflows)
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        raise ShardError(
            shard, f"{column!r} has a non-finite value (NaN or inf)", row=offset + int(np.flatnonzero(~finite)[0])
        )
    norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
    if (norms == 0).any():
        raise ShardError(
            shard,
            f"{column!r} is a zero vector (zero norm): it has no direction to compare",
            row=offset + int(np.flatnonzero(norms == 0)[0]),
        )
    tiny = norms < FLOAT32_TINY
    if tiny.any():
        bad = int(np.flatnonzero(tiny)[0])
        raise ShardError(
            shard,
            f"{column!r} is subnormal (norm {norms[bad]:.3g}, below float32's smallest normal "
            f"{FLOAT32_TINY:.3g}): it cannot be L2-normalised in float32",
            row=offset + bad,
        )


def _open_npy(shard: ShardFile) -> np.ndarray:
    """The .npy matrix: memory-mapped when local, so a shard is never loaded whole."""
    try:
        if is_local(shard.path):
            x = np.load(str(shard.path), mmap_mode="r", allow_pickle=False)
        else:
            x = np.load(io.BytesIO(_read_bytes(shard.key, shard.path)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ShardError(shard.key, f"corrupt or unreadable {shard.path.name}: {exc}") from None
    if x.ndim != 2 or x.shape[1] == 0:
        raise ShardError(shard.key, f"{shard.path.name} must be a 2-d (rows, dim) matrix, found shape {x.shape}")
    if x.dtype.kind != "f":
        raise ShardError(shard.key, f"{shard.path.name} must hold floats, found {x.dtype}")
    return x


def iter_embedding_chunks(
    shard: Shard, column: str = "embedding", chunk_rows: int = EMBEDDING_CHUNK_ROWS
) -> Iterator[np.ndarray]:
    """The shard's embeddings as float32 (rows, dim) chunks, in row order (npy: memory-mapped); a group's
    files one after the other."""
    if isinstance(shard, ShardGroup):
        for member in shard.files:
            yield from iter_embedding_chunks(member, column, chunk_rows)
        return
    if shard.kind == "npy":
        x = _open_npy(shard)
        for start in range(0, x.shape[0], chunk_rows):
            yield np.asarray(x[start : start + chunk_rows], dtype=np.float32)
        return
    values = read_raw_table(shard, [column] if shard.kind == "parquet" else None).column(column)
    matrix = _embedding_matrix_of(shard.key, column, values)
    for start in range(0, len(matrix), chunk_rows):
        yield matrix[start : start + chunk_rows]


def _validate_npy(shard: ShardFile, n_metadata: int) -> int:
    x = _open_npy(shard)
    if x.shape[0] != n_metadata:
        raise ShardError(
            shard.key,
            f"{shard.path.name} has {x.shape[0]} rows but its metadata "
            f"{shard.metadata.name if shard.metadata else ''} has {n_metadata}",
        )
    for start in range(0, x.shape[0], EMBEDDING_CHUNK_ROWS):
        check_vectors(shard.key, shard.path.name, np.asarray(x[start : start + EMBEDDING_CHUNK_ROWS]), start)
    return int(x.shape[1])


def read_images(shard: Shard, column: str = "image") -> list[bytes | None]:
    """The encoded image bytes of a shard, in row order (None where a sample has none); a group's files in order."""
    if isinstance(shard, ShardGroup):
        return [image for member in shard.files for image in read_images(member, column)]
    table = read_raw_table(shard, [column] if shard.kind == "parquet" else None)
    return table.column(column).to_pylist()


def _validate_images(shard: str, column: str, values: pa.ChunkedArray) -> None:
    if not (
        pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type) or values.null_count == len(values)
    ):
        raise ShardError(shard, f"{column!r} must hold encoded image bytes, found {values.type}")


@dataclass(frozen=True)
class ShardIndex:
    """A validated shard: its `id, row` table (plus `text` for text) and the embedding dim if known."""

    table: pa.Table
    dim: int | None = None


def keep_by_kind(type_: pa.DataType) -> str:
    """How a stored keep-by column orders: 'number', 'string', or 'null' (a column with no value at all)."""
    if pa.types.is_null(type_):
        return "null"
    return "string" if pa.types.is_string(type_) else "number"


def keep_by_column(shard: str, name: str, values: pa.ChunkedArray) -> pa.Array:
    """One keep-by column as stored: float64 for numbers, booleans, dates and timestamps (microseconds
    since the epoch; NaN becomes null, so it sorts last), string for text, null when it holds no value.

    One stored type per kind lets every shard's assignments be read as one table.
    """
    t = values.type
    if pa.types.is_dictionary(t):
        values, t = values.cast(t.value_type), t.value_type
    if pa.types.is_null(t):
        return values.combine_chunks()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return values.cast(pa.string()).combine_chunks()
    if pa.types.is_date(t) or pa.types.is_timestamp(t):
        tz = t.tz if pa.types.is_timestamp(t) else None
        values = values.cast(pa.timestamp("us", tz)).cast(pa.int64())
    elif not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)):
        raise ShardError(
            shard,
            f"keep-by column {name!r} is {t}: only numbers, booleans, dates, timestamps and "
            "strings can order the members of a cluster",
        )
    out = values.cast(pa.float64()).combine_chunks()
    return pc.if_else(pc.is_nan(out), pa.scalar(None, pa.float64()), out)


def read_shard(
    shard: ShardFile,
    modality: str,
    column: str,
    id_column: str = "id",
    keep_by: tuple[str, ...] = (),
    data: bytes | None = None,
) -> ShardIndex:
    """Validate one shard and return its index (id, row; text for the text modality; the `keep_by` columns).

    `data`: the file's bytes when already read (`ShardFile.read_once`); else the file is read here.
    """
    if shard.kind == "npy" and modality != "embedding":
        raise ShardError(shard.key, f".npy shards hold embeddings: use --modality embedding, not {modality!r}")
    if shard.kind == "tar" and modality != "image":
        raise ShardError(shard.key, f"WebDataset .tar shards hold images: use --modality image, not {modality!r}")
    table = read_raw_table(shard, data=data)
    if table.num_rows == 0:
        raise ShardError(shard.key, "the shard is empty (no rows)")
    if shard.kind != "npy" and column not in table.column_names:
        raise ShardError(
            shard.key, f"missing payload column {column!r} (columns: {', '.join(table.column_names) or 'none'})"
        )
    ids = _validated_ids(shard.key, table, id_column)
    index = {"id": ids, "row": pa.array(np.arange(table.num_rows, dtype=np.int64))}
    dim = None
    if modality == "text":
        index["text"] = _validate_text(shard.key, column, table.column(column))
        hashes = payload_hashes(index["text"].cast(pa.binary()).to_pylist())
    elif modality == "embedding":
        if shard.kind == "npy":
            dim = _validate_npy(shard, table.num_rows)
            hashes = payload_hashes(row.tobytes() for chunk in iter_embedding_chunks(shard) for row in chunk)
        else:
            matrix = _embedding_matrix_of(shard.key, column, table.column(column))
            dim = int(matrix.shape[1])
            hashes = payload_hashes(row.tobytes() for row in matrix)
    else:
        _validate_images(shard.key, column, table.column(column))
        if "caption" in table.column_names and column != "caption":
            index["caption"] = table.column("caption").cast(pa.string())
        hashes = payload_hashes(table.column(column).to_pylist())
    for name in keep_by:
        if name not in table.column_names:
            raise ShardError(shard.key, f"missing keep-by column {name!r} (columns: {', '.join(table.column_names)})")
        index[name] = keep_by_column(shard.key, name, table.column(name))
    index[PAYLOAD_HASH] = hashes
    return ShardIndex(pa.table(index), dim)


def payload_hashes(payloads: Iterable[bytes | None]) -> pa.Array:
    """A 16-byte BLAKE2b digest of each payload's bytes (null where an item has none, e.g. a missing image).

    Text: its UTF-8 bytes as given (no normalisation: a copy is byte for byte the same text);
    images: the encoded file's bytes; bring-your-own: the row's float32 bytes, what the pipeline
    computes with. Equal digests mark exact copies, whose vectors the embed stage computes once.
    """
    out = [None if p is None else hashlib.blake2b(p, digest_size=PAYLOAD_HASH_BYTES).digest() for p in payloads]
    return pa.array(out, type=pa.binary(PAYLOAD_HASH_BYTES))


def _validated_ids(shard: str, table: pa.Table, id_column: str) -> pa.Array:
    n = table.num_rows
    if id_column not in table.column_names and id_column != DEFAULT_ID_COLUMN:
        # Only the default may fall back to <shard>:<row>: a column the user named must exist.
        raise ShardError(shard, f"missing id column {id_column!r} (columns: {', '.join(table.column_names) or 'none'})")
    if id_column in table.column_names:
        ids = table.column(id_column)
        if ids.null_count:
            raise ShardError(
                shard,
                f"id column {id_column!r} is null",
                row=int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0]),
            )
        ids = ids.cast(pa.string()).combine_chunks()
    else:
        ids = pa.array([f"{shard}:{i}" for i in range(n)], type=pa.string())
    counts = pc.value_counts(ids)
    if len(counts) != n:
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        rows = np.flatnonzero(pc.equal(ids, dup).to_numpy(zero_copy_only=False))
        raise ShardError(shard, f"id {dup!r} appears twice, at rows {rows[0]} and {rows[1]}", row=int(rows[1]))
    return ids
