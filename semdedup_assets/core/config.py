"""The one settings model: every knob of the pipeline, defined once.

`Settings` is a frozen dataclass whose fields carry their help text, command-line flag
and allowed values (as `Literal` types). The `semdedup run` options
(`semdedup_assets.cli`) and the Dagster resource `SemDedupConfig`
(`semdedup_assets.resources`) are both derived from these fields, so a knob added here
appears in both, and `test_settings_model.py` fails if they drift apart.

Where values come from (core/settings_store.py loads and saves them; it and this module's
`visible_cuda_devices` are the only places that read the environment):
- `semdedup run`: defaults, then `SEMDEDUP_<NAME>` environment variables, then the flags
  given on the command line. Settings of an earlier run are *not* re-applied; a flag left
  out means its default, and the run warns about every setting that differs from the
  stored run's (`changed_settings`).
- everything that works on an existing storage (`dagster dev`, sensors, `forget`, `sql`):
  defaults, then the stored run's `<storage>/semdedup.json`, then `SEMDEDUP_<NAME>`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from semdedup_assets.core.io.storage import Storage
from semdedup_assets.core.messages import printable

Modality = Literal["text", "image", "embedding"]
Pooling = Literal["mean", "cls", "last_token"]
KeepStrategy = Literal["hard", "easy", "random"]
EmbeddingDtype = Literal["float32", "float16"]
Precision = Literal["fp32", "fp16", "bf16"]
EngineName = Literal["local", "ray"]

MODALITIES: tuple[str, ...] = typing.get_args(Modality)
KEEP_STRATEGIES: tuple[str, ...] = typing.get_args(KeepStrategy)
DEFAULT_EPS = (0.0001, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
DEFAULT_STORAGE = ".storage"
ENV_PREFIX = "SEMDEDUP_"
AUTO = "auto"  # `--clusters auto`: the default k, round(sqrt(items)); `--buckets auto`: buckets planned from counts
# `--buckets auto`: the Dagster partitions of semantic_duplicates stay this fixed set (a graph's partitions are
# known before any data is); the core plans each partition's memory buckets from the assignment counts.
AUTO_BUCKET_PARTITIONS = 16


def knob(
    default: Any, help: str, *, flag: str | None = "", metavar: str | None = None, default_factory: Any = None
) -> Any:
    """A Settings field with its help text and command-line flag.

    `flag=""` derives `--name-with-dashes` from the field name; `flag=None` keeps the knob
    off the `semdedup run` command line (it is still in the resource, the stored settings
    and the environment).
    """
    metadata = {"help": help, "flag": flag, "metavar": metavar}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Every knob of the pipeline, with the defaults a new user gets."""

    storage: str = knob(DEFAULT_STORAGE, "storage root: local folder or fsspec URL", flag=None)
    input: str | None = knob(None, "folder (or fsspec URL) of .parquet/.jsonl/.jsonl.gz/.tar/.npy shards, or one file")
    files_per_shard: int = knob(
        1,
        "input files per shard (partition): N > 1 groups N consecutive files in key "
        "order, keyed <first file's key>+N; appended files fill the last group, then new "
        "ones (docs/files-per-shard.md)",
        metavar="N",
    )
    modality: Modality = knob("text", "payload kind")
    column: str | None = knob(None, "payload column (default: the modality's name: text, image or embedding)")
    id_column: str = knob(
        "id",
        "id column (only the default `id` may be absent, then ids are <shard>:<row>; "
        "any other name must exist in every shard)",
    )
    model: str | None = knob(
        None,
        "text: HF model name or local path (default: the offline all-MiniLM-L6-v2), "
        "open_clip:ARCH for CLIP's text tower, model2vec:PATH (or a static model folder) for a "
        "static model, or static for this machine's model2vec distillation of all-MiniLM-L6-v2 "
        "(made on first use, `semdedup distill`); image: open_clip ARCH, local-dir:PATH or "
        "hf-hub:ORG/REPO",
    )
    pretrained: str | None = knob(None, "open_clip: pretrained tag (online) or local checkpoint file")
    num_workers: int = knob(2, "image decoding worker processes", flag="--workers")
    strict: bool = knob(
        False,
        "fail on an item that would be recorded in `rejected` (an undecodable image, an empty "
        "or whitespace-only text, an empty id) instead of recording it there",
    )
    pooling: Pooling = knob("mean", "text pooling")
    max_length: int = knob(256, "max tokens per text")
    batch_size: int = knob(64, "encoder batch size")
    device: str = knob("auto", "auto, cpu, cuda or cuda:N")
    clusters: int | None = knob(None, "k for spherical k-means, or auto for round(sqrt(items))", metavar="K|auto")
    kmeans_iterations: int = knob(20, "k-means iterations", flag="--iterations")
    max_points_per_centroid: int = knob(256, "k-means training sample per centroid")
    seed: int = knob(0, "seed for k-means sampling/training and the random order")
    eps: tuple[float, ...] = knob(
        None, "comma-separated eps values", default_factory=lambda: DEFAULT_EPS, metavar="E1,E2,..."
    )
    keep: KeepStrategy = knob("hard", "cluster order: hard (far from the centroid first), easy, random")
    keep_by: str | None = knob(
        None,
        "order each cluster's members first by these input columns (numbers or "
        "strings, carried through ingest and assignment; nulls last), then by --keep's "
        "order, then by id: the earlier member survives",
        metavar="COLUMN[:asc|desc],...",
    )
    probes: int = knob(
        1,
        "multi-probe: also compare each item with the members of its P-1 next-nearest clusters "
        "(1 = the paper's rule; exact fp32 tiles)",
        metavar="P",
    )
    buckets: int | None = knob(
        16,
        "cluster buckets = partitions of semantic_duplicates, or auto: 16 partitions "
        "whose clusters are grouped into buckets that fit --memory-budget, planned from the "
        "assignment counts (a number B is split the same way where a bucket exceeds the "
        "budget)",
        metavar="B|auto",
    )
    block_size: int = knob(1024, "tile size of the pairwise kernel")
    memory_budget: str | None = knob(
        None,
        "memory a stage may hold for its data (bucket rows, k-means sample, "
        "buffers), e.g. 4GB or 512MB; the interpreter itself is extra. Buckets larger "
        "than it are deduplicated a few clusters at a time; default: half the "
        "machine's memory",
        metavar="SIZE",
    )
    exact_copies: bool = knob(
        False,
        "embed each distinct payload once: exact copies (the same text, image or vector bytes, by "
        "the digest ingest records) get the very vector bits of the first, in this run or an "
        "earlier one; applies where the encoder's vectors do not depend on the batch (static "
        "models), so keep-lists equal those of embedding every copy. Off by default: each shard's "
        "lookup reads every other shard's digests, a cost that grows with the shard count "
        "(docs/exact-copies.md)",
    )
    embedding_dtype: EmbeddingDtype = knob(
        "float32", "stored embeddings: float32, or float16 (half the I/O; compute stays fp32)"
    )
    precision: Precision = knob(
        "fp32",
        "pairwise tiles: fp32, or fp16/bf16 on a GPU with an exact fp32 re-check "
        "of every item near a threshold 1 - eps",
    )
    reference: str | None = knob(
        None,
        "decontamination: folder (or file) of evaluation-set shards, embedded with the "
        "same encoder; items within 1 - eps of a reference item are flagged (view "
        "`contaminated`) and left out of the deduplicated dataset",
        metavar="PATH",
    )
    compare_with: str | None = knob(
        None,
        "robustness asset: other storages (comma-separated) whose removals to "
        "compare with this one's, on the same items (`semdedup sweep` sets it)",
        flag=None,
        metavar="STORAGE,...",
    )
    select: str | None = knob(
        None,
        "deduplicated dataset: eps=E (a configured eps), keep-fraction=F or a pruning "
        "selection (prototypes:..., d4:..., dbp:..., outliers:..., representatives:...; default: the "
        "smallest configured eps); "
        "`semdedup export --select`",
        flag=None,
    )
    prune: str | None = knob(
        None,
        "pruning selections to materialize after the keep-lists, ';'-separated: "
        "prototypes:keep-fraction=F, d4:eps=E,keep-fraction=F[,clusters=K], "
        "dbp:eps=E,keep-fraction=F[,temperature=T,neighbours=L], outliers:fraction=F[,neighbours=K], "
        "representatives:size=N[,diversity=L] (views `pruned`, `pruned_budget`)",
        metavar="METHOD:K=V,...[;...]",
    )
    # Scale-out (core/run/engines.py): where the per-shard and per-bucket work runs.
    engine: EngineName = knob(
        "local",
        "where embedding and the pairwise rule run: local (this process) or ray "
        "(a local Ray instance, or the cluster at --ray-address)",
    )
    ray_address: str | None = knob(
        None,
        "with --engine ray: an existing cluster, HOST:PORT (GCS), ray://HOST:PORT "
        "(Ray client) or auto (default: inside a Ray job, e.g. a run under dagster-ray's "
        "RayRunLauncher, that job's cluster; else a new local Ray instance)",
        metavar="HOST:PORT|auto",
    )
    ray_actors: int = knob(
        0,
        "with --engine ray: embedding actors; 0 means one per GPU of the cluster, or without "
        "GPUs one per CPU (each actor then gets CPUs/actors cores)",
    )
    ray_retries: int = knob(3, "with --engine ray: times a shard or bucket is retried after its Ray worker dies")
    # Operations knobs: the code location (`dagster dev`), not a single `semdedup run`.
    sensors: bool = knob(False, "start the sensors running when the code location loads", flag=None)
    sensor_interval: int = knob(30, "seconds between sensor ticks", flag=None)
    retrain_cron: str = knob(
        "0 3 * * 0", "cron of retrain_centroids_schedule (default weekly, Sunday 03:00)", flag=None
    )
    backfill_batch: int = knob(64, "shards per run of a per-shard backfill (BackfillPolicy.multi_run)", flag=None)
    progress_interval: float = knob(10.0, "seconds between progress lines in a run's event log", flag=None)
    catalog: str = knob("catalog.duckdb", "DuckDB catalog file when the storage root is not a local folder", flag=None)
    extra: dict[str, Any] = field(default_factory=dict, metadata={"flag": None, "internal": True})

    def __post_init__(self) -> None:
        for f in knobs():
            allowed = allowed_values(f)
            if allowed and getattr(self, f.name) not in allowed:
                raise ValueError(f"{f.name} must be one of {', '.join(allowed)}, got {getattr(self, f.name)!r}")
        if self.clusters is not None and self.clusters < 1:
            raise ValueError(f"clusters must be >= 1 (or auto), got {self.clusters}")
        if self.buckets is not None and self.buckets < 1:
            raise ValueError(f"buckets must be >= 1 (or auto), got {self.buckets}")
        for name in (
            "probes",
            "block_size",
            "batch_size",
            "max_length",
            "kmeans_iterations",
            "max_points_per_centroid",
            "backfill_batch",
            "sensor_interval",
            "files_per_shard",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ray_actors < 0 or self.ray_retries < 0:
            raise ValueError(f"ray_actors and ray_retries must be >= 0, got {self.ray_actors}, {self.ray_retries}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        parse_keep_by(self.keep_by)  # a malformed spec fails here, before any run
        if self.keep_by is not None and not str(self.keep_by).strip():
            object.__setattr__(self, "keep_by", None)  # an empty spec is no keep-by: one value for "none"
        if self.memory_budget is not None:
            parse_size(self.memory_budget)
        if not self.eps or any(not 0.0 < e < 1.0 for e in self.eps):
            raise ValueError(f"every eps must lie in (0, 1), got {self.eps}")
        object.__setattr__(self, "eps", tuple(sorted(set(float(e) for e in self.eps))))

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The similarity thresholds 1 - eps, one per configured eps."""
        return tuple(1.0 - e for e in self.eps)

    @property
    def keep_by_columns(self) -> tuple[tuple[str, bool], ...]:
        """The `keep_by` columns as (name, descending) pairs, most significant first (() without it)."""
        return parse_keep_by(self.keep_by)

    @property
    def memory_budget_bytes(self) -> int:
        """The memory budget in bytes: the `memory_budget` knob, else half of this machine's memory."""
        return parse_size(self.memory_budget) if self.memory_budget is not None else machine_memory() // 2

    @property
    def scan_memory_bytes(self) -> int:
        """DuckDB's share of the budget for one scan of the stage files (an O(N) aggregate spills beyond it)."""
        return self.memory_budget_bytes // 4

    @property
    def bucket_partitions(self) -> int:
        """The partition count of semantic_duplicates: `buckets`, or AUTO_BUCKET_PARTITIONS for `auto`."""
        return self.buckets if self.buckets is not None else AUTO_BUCKET_PARTITIONS

    @property
    def payload_column(self) -> str:
        """The input column holding the payload."""
        return self.column or self.modality

    def storage_root(self) -> Storage:
        """The storage root object."""
        return Storage(self.storage, catalog=self.catalog, scan_memory=self.scan_memory_bytes)

    def n_clusters(self, n_items: int) -> int:
        """k for a dataset of n_items: the configured value, else round(sqrt(n))."""
        if n_items < 1:
            raise ValueError("cannot cluster an empty dataset")
        k = self.clusters if self.clusters is not None else max(1, round(math.sqrt(n_items)))
        return min(k, n_items)

    def to_dict(self) -> dict[str, Any]:
        """Every knob as plain JSON-able values."""
        out = dataclasses.asdict(self)
        out["eps"] = list(self.eps)
        return out

    def to_json(self) -> str:
        """Serialise (for semdedup.json)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# Names the stage files use themselves (raw index, payload, assignments): a keep-by column cannot take them.
RESERVED_COLUMNS = ("id", "shard", "row", "text", "caption", "cluster", "sim_to_centroid", "embedding")


def parse_keep_by(text: str | None) -> tuple[tuple[str, bool], ...]:
    """`score:desc,lang` -> (("score", True), ("lang", False)); ascending unless `:desc`.

    The text after an entry's last `:` is its direction, `asc` or `desc` (a column whose name holds
    a `:` is written with its direction, `a:b:asc`). Raises ValueError for another direction
    (`quality:up`), an empty entry, a repeated column or a reserved name.
    """
    if text is None or not str(text).strip():
        return ()
    out: list[tuple[str, bool]] = []
    for part in str(text).split(","):
        name, colon, order = part.strip().rpartition(":")
        if not colon:
            name, order = order, "asc"  # no direction: ascending
        elif order.strip().lower() not in ("asc", "desc"):
            raise ValueError(
                f"keep_by direction must be asc or desc, got {printable(order.strip())!r} in "
                f"{printable(part.strip())!r}; expected COLUMN[:asc|desc],..."
            )
        name = name.strip()
        if not name:
            raise ValueError(f"keep_by has an empty column name in {text!r}; expected COLUMN[:asc|desc],...")
        if name in RESERVED_COLUMNS:
            raise ValueError(
                f"keep_by column {name!r} is a name the stage files use themselves "
                f"({', '.join(RESERVED_COLUMNS)}); rename the input column"
            )
        if name in (n for n, _ in out):
            raise ValueError(f"keep_by names column {name!r} twice")
        out.append((name, order.strip().lower() == "desc"))
    return tuple(out)


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10,
    "KB": 2**10,
    "KIB": 2**10,
    "M": 2**20,
    "MB": 2**20,
    "MIB": 2**20,
    "G": 2**30,
    "GB": 2**30,
    "GIB": 2**30,
    "T": 2**40,
    "TB": 2**40,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """`4GB`, `512MB`, `1.5G` or a plain byte count -> bytes (binary units: 1 GB = 2**30 bytes)."""
    raw = str(text).strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number) :]
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"memory_budget must be a size such as 4GB or 512MB, got {text!r}") from None
    if not math.isfinite(value) or value < 2**16:
        raise ValueError(f"memory_budget must be at least 64KB, got {text!r}")
    return int(value)


def machine_memory() -> int:
    """This machine's physical memory in bytes (8 GiB where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def knobs() -> tuple[dataclasses.Field, ...]:
    """The user-facing fields of Settings (everything but internal ones), in order."""
    return tuple(f for f in dataclasses.fields(Settings) if not f.metadata.get("internal"))


@functools.lru_cache(maxsize=1)
def field_types() -> dict[str, Any]:
    """The resolved type of every Settings field."""
    return typing.get_type_hints(Settings)


def allowed_values(f: dataclasses.Field) -> tuple[str, ...]:
    """The allowed values of a Literal-typed knob, else ()."""
    tp = field_types()[f.name]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def base_type(name: str) -> type:
    """The scalar type behind a knob (`int | None` -> int, Literal[...] -> str, tuple[float, ...] -> float)."""
    tp = field_types()[name]
    if typing.get_origin(tp) is Literal:
        return str
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        return args[0]
    if args:
        return args[0]
    return tp


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


AUTO_KNOBS = ("clusters", "buckets")  # knobs whose None is written `auto`
_TRUE = ("1", "true", "yes", "on", "running")
_FALSE = ("0", "false", "no", "off", "stopped", "")


def coerce(name: str, raw: Any) -> Any:
    """Turn a raw value (a string from the environment or a flag, or JSON) into the knob's type."""
    if raw is None or name == "extra":
        return raw
    kind = base_type(name)
    if name == "eps":
        items = raw.split(",") if isinstance(raw, str) else raw
        try:
            return tuple(float(x) for x in items if str(x).strip())
        except ValueError:
            raise ValueError(f"eps must be comma-separated numbers, got {raw!r}") from None
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(f"{name} must be on or off, got {raw!r}")
    if name in AUTO_KNOBS and isinstance(raw, str) and raw.strip().lower() in (AUTO, "none", ""):
        return None
    if kind in (int, float):
        try:
            return kind(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    return str(raw)


def visible_cuda_devices() -> str:
    """This process's CUDA_VISIBLE_DEVICES ("" when unset); Ray sets it for actors and tasks that hold GPUs."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def model_cache_dir() -> str:
    """This machine's cache of derived models (`--model static`) and of the demo's parsed texts: $SEMDEDUP_CACHE,
    else $XDG_CACHE_HOME/semdedup."""
    explicit = os.environ.get(ENV_PREFIX + "CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "semdedup")


def shown_value(name: str, value: object) -> str:
    """A knob's value as the command line writes it (`auto` for the default k, lists comma-separated)."""
    if name in AUTO_KNOBS and value is None:
        return AUTO
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def describe_settings(settings: Settings) -> str:
    """The effective settings of a run, one `name=value` per knob that a run uses."""
    parts = []
    for f in knobs():
        if f.metadata.get("flag", "") is None and f.name != "storage":
            continue
        parts.append(f"{f.name}={shown_value(f.name, getattr(settings, f.name))}")
    return " ".join(parts)
