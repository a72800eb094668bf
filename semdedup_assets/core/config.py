"""Settings shared by the command line, the Dagster definitions and the assets.

One JSON file in the storage root (`semdedup.json`) records what `semdedup run` was
asked for, so that `dagster dev` on the same storage loads the same graph (the bucket
count shapes the partitions) and the same knobs. Environment variables
`SEMDEDUP_<FIELD>` override it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from semdedup_assets.core.storage import Storage, atomic_write_bytes, check_store

MODALITIES = ("text", "image", "embedding")
DEFAULT_EPS = (0.0001, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
DEFAULT_STORAGE = ".storage"


@dataclass(frozen=True)
class Settings:
    """Every knob of the pipeline, with the defaults a new user gets."""

    storage: str = DEFAULT_STORAGE
    input: str | None = None
    modality: str = "text"
    column: str | None = None  # payload column; None -> the modality's name
    id_column: str = "id"
    model: str | None = None  # None -> the modality's default (offline all-MiniLM-L6-v2 for text)
    pretrained: str | None = None  # open_clip: a pretrained tag or a local checkpoint file
    num_workers: int = 2  # image decoding worker processes
    strict: bool = False  # image modality: fail on an undecodable image instead of rejecting it
    pooling: str = "mean"
    max_length: int = 256
    batch_size: int = 64
    device: str = "auto"
    clusters: int | None = None  # None -> round(sqrt(items))
    kmeans_iterations: int = 20
    max_points_per_centroid: int = 256
    seed: int = 0
    eps: tuple[float, ...] = DEFAULT_EPS
    keep: str = "hard"
    buckets: int = 16
    block_size: int = 1024
    embedding_dtype: str = "float32"  # stored embeddings: float32, or float16 (half the I/O; fp32 compute)
    precision: str = "fp32"  # pairwise tiles: fp32, or fp16/bf16 (GPU) with an fp32 re-check near every 1 - eps
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.keep not in ("hard", "easy", "random"):
            raise ValueError(f"keep must be hard, easy or random, got {self.keep!r}")
        if self.clusters is not None and self.clusters < 1:
            raise ValueError(f"clusters must be >= 1, got {self.clusters}")
        if self.buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {self.buckets}")
        if self.embedding_dtype not in ("float32", "float16"):
            raise ValueError(f"embedding_dtype must be float32 or float16, got {self.embedding_dtype!r}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if not self.eps or any(not 0.0 < e < 1.0 for e in self.eps):
            raise ValueError(f"every eps must lie in (0, 1), got {self.eps}")
        object.__setattr__(self, "eps", tuple(sorted(set(float(e) for e in self.eps))))

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The similarity thresholds 1 - eps, one per configured eps."""
        return tuple(1.0 - e for e in self.eps)

    @property
    def payload_column(self) -> str:
        """The input column holding the payload."""
        return self.column or self.modality

    def storage_root(self) -> Storage:
        """The storage root object."""
        return Storage(self.storage)

    def n_clusters(self, n_items: int) -> int:
        """k for a dataset of n_items: the configured value, else round(sqrt(n))."""
        if n_items < 1:
            raise ValueError("cannot cluster an empty dataset")
        k = self.clusters if self.clusters is not None else max(1, round(math.sqrt(n_items)))
        return min(k, n_items)

    def to_json(self) -> str:
        """Serialise (for semdedup.json)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "Settings":
        """A copy with some fields changed (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _coerce(name: str, raw: Any) -> Any:
    if raw is None or name == "extra":
        return raw
    if name == "eps":
        if isinstance(raw, str):
            return tuple(float(x) for x in raw.split(",") if x.strip())
        return tuple(float(x) for x in raw)
    if name == "strict":
        return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes", "on")
    if name in ("num_workers", "max_length", "batch_size", "kmeans_iterations", "max_points_per_centroid", "seed", "buckets", "block_size"):
        return int(raw)
    if name == "clusters":
        return None if raw in ("", "auto", "none") else int(raw)
    return str(raw)


def load_settings(storage: str | None = None, **overrides: Any) -> Settings:
    """Defaults, then `<storage>/semdedup.json`, then SEMDEDUP_* env vars, then overrides."""
    values: dict[str, Any] = {}
    storage = storage or os.environ.get("SEMDEDUP_STORAGE") or DEFAULT_STORAGE
    check_store(storage, "storage")  # refused credentials raise here, naming the bucket, not in exists()
    settings_file = Storage(storage).settings_file
    if settings_file.exists():
        values.update(json.loads(settings_file.read_text()))
    for name in _FIELDS:
        env = os.environ.get(f"SEMDEDUP_{name.upper()}")
        if env is not None:
            values[name] = env
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["storage"] = storage
    unknown = set(values) - set(_FIELDS)
    if unknown:
        raise ValueError(f"unknown settings: {sorted(unknown)}")
    return Settings(**{k: _coerce(k, v) for k, v in values.items()})


def save_settings(settings: Settings) -> None:
    """Record the settings in the storage root."""
    atomic_write_bytes(settings.to_json().encode(), settings.storage_root().settings_file)
