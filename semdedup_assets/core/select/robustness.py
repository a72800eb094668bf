"""Robustness (the paper's RQ3): how much do the removals move with k, the seed or the encoder?

`compare_storages` joins several finished storages on the item id (the join key: every
storage must hold exactly the same ids) and, per eps, compares their removed sets
R(eps) = {j : max_sim[j] > 1 - eps}: each configuration's |R|, and per pair (A, B) the
Jaccard index |R_A & R_B| / |R_A | R_B| (1 when both are empty) and the share of A's
removals that B also makes, |R_A & R_B| / |R_A| (and the other way round; empty when
R_A is empty). `max_sim` is stored, so any eps is a comparison, not a recomputation.

`run_sweep` makes such storages: one sub-storage per (encoder, k[, seed]), each a normal storage,
whose embeddings are computed once per encoder and shared (hard links) by the others.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import BUCKET_GLOB, scan, stage_source
from semdedup_assets.core.messages import printable
from semdedup_assets.core.settings_store import load_settings

ROBUSTNESS = "robustness"  # folder of the `robustness` asset's files under a storage root
SWEEP_FILE = "sweep.json"  # at a sweep's root: the sub-storages it made
CURVE_POINTS = 40
MAX_NAMED_IDS = 5

CONFIG_SCHEMA = pa.schema(
    [
        ("eps", pa.float64()),
        ("configuration", pa.string()),
        ("storage", pa.string()),
        ("removed", pa.int64()),
        ("kept_fraction", pa.float64()),
    ]
)
PAIR_SCHEMA = pa.schema(
    [
        ("eps", pa.float64()),
        ("a", pa.string()),
        ("b", pa.string()),
        ("removed_a", pa.int64()),
        ("removed_b", pa.int64()),
        ("both", pa.int64()),
        ("jaccard", pa.float64()),
        ("a_also_in_b", pa.float64()),
        ("b_also_in_a", pa.float64()),
    ]
)


class CompareError(ValueError):
    """Storages that cannot be compared; the message names the storage and, for ids, a few of them."""


@dataclass
class Configuration:
    """One storage taking part in a comparison."""

    label: str
    storage: str
    settings: dict[str, Any]  # what distinguishes configurations: k, model, seed, keep, keep_by, probes


@dataclass
class Comparison:
    """What `compare_storages` found; plain values only."""

    configurations: list[Configuration]
    items: int
    eps: list[float]
    per_configuration: list[dict[str, Any]]  # CONFIG_SCHEMA rows, by eps then configuration
    pairs: list[dict[str, Any]]  # PAIR_SCHEMA rows, by eps then pair
    curves: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # label -> (eps, kept fraction)


def results_source(storage: st.Storage) -> str:
    """The read_parquet() of a storage's bucket results (its `items`)."""
    if not storage.stage_files(st.SEMANTIC_DUPLICATES):
        raise CompareError(f"{storage.root} has no semantic_duplicates results: `semdedup run` it first")
    return stage_source(storage, st.SEMANTIC_DUPLICATES, BUCKET_GLOB)


def _id_difference(storage: st.Storage, memory: int | None, a: str, source_a: str, b: str, source_b: str) -> str | None:
    """How the ids of two results differ (None when they are the same), with a few examples; DuckDB does the sets."""
    parts = []
    for x, source_x, source_y in ((a, source_a, source_b), (b, source_b, source_a)):
        only = f"(SELECT id FROM {source_x} EXCEPT SELECT id FROM {source_y})"
        [(count, examples)] = scan(
            storage,
            f"SELECT (SELECT count(*) FROM {only}), "
            f"(SELECT list(id ORDER BY id) FROM (SELECT id FROM {only} ORDER BY id "
            f"LIMIT {MAX_NAMED_IDS}))",
            memory_limit=memory,
        )
        if count:
            parts.append(f"{count} id(s) only in {x} (e.g. {', '.join(examples)})")
    return "; ".join(parts) or None


def _counts(
    storage: st.Storage, memory: int | None, sql_from: str, conditions: Sequence[str], params: Sequence[float]
) -> list[int]:
    """count(*) FILTER (WHERE condition) for each condition, in one pass over `sql_from` (DuckDB under `memory`)."""
    if not conditions:
        return []
    cols = ", ".join(f"count(*) FILTER (WHERE {c})" for c in conditions)
    [row] = scan(storage, f"SELECT {cols} FROM {sql_from}", list(params), memory_limit=memory)
    return [int(v) for v in row]


def labels_for(storages: Sequence[str]) -> list[str]:
    """Short, distinct names: each storage's path below the storages' common folder."""
    paths = [str(p).rstrip("/") for p in storages]
    try:
        common = posixpath.commonpath(paths) if len(set(paths)) > 1 else posixpath.dirname(paths[0])
    except ValueError:  # mixed absolute and relative, or URLs of different stores
        common = ""
    if not all(p.startswith(common + "/") or p == common for p in paths):  # commonpath folds a URL's `//`
        common = ""
    labels = [p[len(common) :].lstrip("/") or p if common else p for p in paths]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def expand_sweeps(storages: Sequence[str]) -> list[str]:
    """Storages as given, with a sweep root replaced by the sub-storages its sweep.json lists."""
    out: list[str] = []
    for s in storages:
        manifest = st.to_upath(s) / SWEEP_FILE
        if manifest.exists() and not (st.to_upath(s) / "semdedup.json").exists():
            out += sweep_configurations(s)
        else:
            out.append(s)
    return out


def _distinguishing(settings: Settings) -> dict[str, Any]:
    return {
        "clusters": settings.clusters if settings.clusters is not None else "auto",
        "model": settings.model,
        "seed": settings.seed,
        "keep": settings.keep,
        "keep_by": settings.keep_by,
        "probes": settings.probes,
        "modality": settings.modality,
    }


def compare_storages(
    storages: Sequence[str], eps: Sequence[float] | None = None, labels: Sequence[str] | None = None
) -> Comparison:
    """Compare the removed sets of finished storages at every eps (default: every eps any of them configured).

    Raises CompareError when a storage has no results or when the storages' ids differ
    (naming a few of the differing ids).
    """
    if not storages:
        raise CompareError("no storage to compare")
    # Local paths absolute, once: a sweep's sub-storages (absolute in its sweep.json) and storages given
    # relative to the working folder then share one folder in their labels and read alike.
    storages = [str(st.to_upath(s)) for s in storages]
    labels = list(labels) if labels is not None else labels_for(storages)
    configs: list[Configuration] = []
    sources: list[str] = []
    wanted: set[float] = set(float(e) for e in eps or ())
    first: st.Storage | None = None
    n = first_distinct = memory = 0
    # Every figure is a DuckDB aggregate over the stored results (joins on the id spill to disk beyond a quarter
    # of the budget): no storage's ids or scores are held in Python.
    for label, location in zip(labels, storages):
        if not st.to_upath(location).exists():
            raise CompareError(f"no storage at {printable(location)}")
        if not st.to_upath(location).is_dir():
            raise CompareError(f"the storage {printable(location)} is not a folder")
        settings = load_settings(location)
        storage = settings.storage_root()
        source = results_source(storage)
        [(count, distinct)] = scan(storage, f"SELECT count(*), count(DISTINCT id) FROM {source}")
        if first is None:  # DuckDB gets the first storage's scan memory for the joins and set operations
            first, n, first_distinct, memory = storage, int(count), int(distinct), storage.scan_memory
        elif (
            (difference := _id_difference(first, memory, label, source, labels[0], sources[0])) is not None
            or count != n
            or distinct != first_distinct
        ):
            raise CompareError(
                f"{label} and {labels[0]} hold different items, so their removals cannot be "
                f"compared: {difference or 'the same ids appear a different number of times'}"
            )
        if eps is None:
            wanted |= set(settings.eps)
        configs.append(Configuration(label, str(location), _distinguishing(settings)))
        sources.append(source)
    assert first is not None
    eps_values = sorted(wanted)
    if not eps_values or any(not 0.0 < e < 1.0 for e in eps_values):
        raise CompareError(f"every eps must lie in (0, 1), got {eps_values}")
    grid = (
        sorted(set(np.geomspace(eps_values[0], eps_values[-1], CURVE_POINTS).tolist()) | set(eps_values))
        if len(eps_values) > 1
        else eps_values
    )
    thresholds = [1.0 - e for e in eps_values]  # the rule's strict inequality, in float64 (DOUBLE) as everywhere
    removed, curves = [], {}
    for c, source in zip(configs, sources):
        removed.append(_counts(first, memory, source, ["max_sim > ?"] * len(thresholds), thresholds))
        kept = _counts(first, memory, source, ["max_sim <= ?"] * len(grid), [1.0 - e for e in grid])
        curves[c.label] = (grid, [k / n if n else 1.0 for k in kept])
    both: dict[tuple[int, int], list[int]] = {}
    for i in range(len(configs)):
        for j in range(i + 1, len(configs)):
            both[i, j] = _counts(
                first,
                memory,
                f"{sources[i]} a JOIN {sources[j]} b USING (id)",
                ["a.max_sim > ? AND b.max_sim > ?"] * len(thresholds),
                [t for t in thresholds for _ in (0, 1)],
            )
    per_config, pairs = [], []
    for x, e in enumerate(eps_values):
        for c, r in zip(configs, removed):
            per_config.append(
                {
                    "eps": e,
                    "configuration": c.label,
                    "storage": c.storage,
                    "removed": r[x],
                    "kept_fraction": (n - r[x]) / n if n else 1.0,
                }
            )
        for (i, j), counts in both.items():
            na, nb, ab = removed[i][x], removed[j][x], counts[x]
            either = na + nb - ab
            pairs.append(
                {
                    "eps": e,
                    "a": configs[i].label,
                    "b": configs[j].label,
                    "removed_a": na,
                    "removed_b": nb,
                    "both": ab,
                    "jaccard": ab / either if either else 1.0,
                    "a_also_in_b": ab / na if na else None,
                    "b_also_in_a": ab / nb if nb else None,
                }
            )
    return Comparison(configs, n, eps_values, per_config, pairs, curves)


@dataclass
class RobustnessFiles:
    """Where a comparison was written under a storage root."""

    configurations: str
    pairs: str
    plot: str


def write_comparison(storage: st.Storage, comparison: Comparison, png: bytes) -> RobustnessFiles:
    """Write the comparison's tables and plot under `<storage>/robustness/`, each file atomically."""
    folder = storage.stage_dir(ROBUSTNESS)
    paths = RobustnessFiles(
        str(folder / "configurations.parquet"), str(folder / "pairs.parquet"), str(folder / "eps_curves.png")
    )
    st.atomic_write_table(
        pa.Table.from_pylist(comparison.per_configuration, schema=CONFIG_SCHEMA), folder / "configurations.parquet"
    )
    st.atomic_write_table(pa.Table.from_pylist(comparison.pairs, schema=PAIR_SCHEMA), folder / "pairs.parquet")
    st.atomic_write_bytes(png, folder / "eps_curves.png")
    return paths


def sub_storage(root: str, k: int | None, model: str | None, seed: int | None = None) -> str:
    """A sweep's sub-storage: `<root>/[model=<name>/]k=<k>[/seed=<s>]` (the model's `/` and `:` made path-safe)."""
    parts = [root.rstrip("/")]
    if model is not None:
        parts.append("model=" + "".join(c if c.isalnum() or c in "-_.=" else "_" for c in model))
    parts.append(f"k={k if k is not None else 'auto'}")
    if seed is not None:
        parts.append(f"seed={seed}")
    return posixpath.join(*parts)


def share_embeddings(source: st.Storage, target: st.Storage) -> int:
    """Give `target` the embeddings (and rejected items) of `source` without copying them; returns files linked.

    Local storages get hard links: the target's embedding stage then finds a valid cache
    (same raw index and encoder settings) and never runs the encoder. Every writer
    replaces a file by renaming a new one into place, so a later recomputation in one
    storage never changes the other's file. An object store gets server-side copies.
    """
    linked = 0
    for stage in (st.EMBEDDINGS, st.REJECTED):
        for path in source.stage_files(stage):
            dest = target.shard_file(stage, source.shard_of(stage, path))
            if source.local and target.local:
                if dest.exists() and os.path.samefile(str(path), str(dest)):
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.link{st.TMP_SUFFIX}")
                if tmp.exists():
                    tmp.unlink()
                os.link(str(path), str(tmp))
                os.replace(str(tmp), str(dest))
            else:
                path.fs.copy(path.path, dest.path)
            linked += 1
    return linked


@dataclass
class SweepResult:
    """What a sweep made: the sub-storages in order, and how many embedding files each got shared."""

    storages: list[str]
    shared: dict[str, int]


def run_sweep(
    base: Settings,
    root: str,
    clusters: Sequence[int | None],
    models: Sequence[str | None],
    run: Callable[[Settings], None],
    log: Callable[[str], None] = print,
    seeds: Sequence[int | None] = (None,),
) -> SweepResult:
    """One `run` (the whole graph) per (encoder, k[, seed]), each in its own sub-storage, then `<root>/sweep.json`.

    The first configuration of each encoder computes the embeddings; every other one of
    that encoder gets them shared (`share_embeddings`) before its run, so it runs only
    centroids to keep-lists. `seeds` (None: the base seed, no `seed=` level) re-seed
    k-means and the random order. Every sub-storage records the others in
    `compare_with`, so its `robustness` asset compares the whole sweep.
    """
    root = str(st.to_upath(root))  # local paths absolute: `compare_with` must not depend on the cwd
    plan = [(m, k, s, sub_storage(root, k, m, s)) for m in models for k in clusters for s in seeds]
    if len({p for *_, p in plan}) != len(plan):
        raise ValueError("the sweep repeats a configuration (the same k, model or seed twice)")
    retired = retire_configurations(root, [p for *_, p in plan])
    if retired:
        log(
            f"[semdedup] sweep: removed {len(retired)} sub-storage(s) of the previous sweep into {root} that this "
            f"one does not make: {', '.join(posixpath.relpath(p, root) for p in retired)}"
        )
    # Written before the runs too: a sweep stopped half-way still names every sub-storage it may have made,
    # so that the next sweep into this root finds and retires them.
    write_sweep_manifest(root, plan, complete=False)
    everyone = ",".join(p for *_, p in plan)
    shared: dict[str, int] = {}
    first: dict[str | None, st.Storage] = {}
    for model, k, seed, path in plan:
        # dataclasses.replace, not Settings.replace: that one drops None, and clusters=None means auto.
        settings = dataclasses.replace(
            base.replace(model=model, seed=seed), storage=path, clusters=k, compare_with=everyone
        )
        if model in first:
            shared[path] = share_embeddings(first[model], settings.storage_root())
            log(f"[semdedup] sweep: {path}: embeddings shared with {first[model].root} ({shared[path]} file(s))")
        log(
            f"[semdedup] sweep: {path} (k={k if k is not None else 'auto'}"
            + (f", model={model}" if model else "")
            + (f", seed={seed}" if seed is not None else "")
            + ")"
        )
        run(settings)
        first.setdefault(model, settings.storage_root())
    write_sweep_manifest(root, plan, complete=True)
    return SweepResult([p for *_, p in plan], shared)


def write_sweep_manifest(
    root: str, plan: Sequence[tuple[str | None, int | None, int | None, str]], complete: bool
) -> None:
    """`<root>/sweep.json`: the sub-storages of the sweep (model, k, seed, path), and whether every run finished."""
    manifest = {
        "configurations": [{"storage": p, "clusters": k, "model": m, "seed": s} for m, k, s, p in plan],
        "complete": complete,
    }
    st.atomic_write_bytes(json.dumps(manifest, indent=2).encode(), st.to_upath(root) / SWEEP_FILE)


def sweep_configurations(root: str) -> list[str]:
    """The sub-storages that `<root>/sweep.json` lists ([] without one)."""
    manifest = st.to_upath(root) / SWEEP_FILE
    if not manifest.exists():
        return []
    try:
        return [str(c["storage"]) for c in json.loads(manifest.read_text())["configurations"]]
    except (ValueError, KeyError, TypeError) as err:
        raise CompareError(f"{printable(manifest)} is not a sweep manifest ({err}); move it away") from None


def retire_configurations(root: str, planned: Sequence[str]) -> list[str]:
    """Delete the sub-storages an earlier sweep into `root` made that `planned` does not hold; returns them.

    A sweep root then holds exactly the configurations of its last sweep: an old `k=10/seed=0`
    would otherwise stay beside (or inside) a new `k=10`, and `compare ROOT` would mix them in.
    Only sub-storages the root's sweep.json lists, strictly below the root, are ever deleted.
    """
    base = root.rstrip("/") + "/"
    keep = {p.rstrip("/") for p in planned}
    retired = []
    for path in sweep_configurations(root):
        path = str(st.to_upath(path)).rstrip("/")
        if path in keep or not path.startswith(base):
            continue
        st.remove_tree(st.to_upath(path))
        retired.append(path)
        parent = posixpath.dirname(path)  # `k=3/` of a retired `k=3/seed=0`: gone too once empty
        while (
            parent.startswith(base)
            and st.is_local(st.to_upath(parent))
            and os.path.isdir(parent)
            and not os.listdir(parent)
        ):
            os.rmdir(parent)
            parent = posixpath.dirname(parent)
    return retired


def compared_storages(settings: Settings) -> list[str]:
    """This storage first, then every other storage of `compare_with` (each once)."""
    out = [settings.storage]
    for other in (settings.compare_with or "").split(","):
        if other.strip() and str(st.to_upath(other.strip())) not in {str(st.to_upath(s)) for s in out}:
            out.append(other.strip())
    return out


def build_robustness(
    settings: Settings, log: Callable[[str], None] = lambda m: None
) -> tuple[Comparison, RobustnessFiles, bytes]:
    """The `robustness` asset's work: compare this storage with `compare_with`, write the tables and the PNG.

    `log` gets one line as the comparison starts and one before the plot and the writes, so
    that a long comparison (large storages) shows where it is.
    """
    from semdedup_assets.core.plots import eps_curves_png

    storages = compared_storages(settings)
    log(f"robustness: comparing the removals of {len(storages)} storage(s)")
    comparison = compare_storages(storages)
    log(
        f"robustness: {comparison.items} items, {len(comparison.eps)} eps: drawing the eps curves, "
        f"writing {ROBUSTNESS}/"
    )
    png = eps_curves_png(comparison.curves)
    return comparison, write_comparison(settings.storage_root(), comparison, png), png
