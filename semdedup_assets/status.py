"""`semdedup status`: what a storage holds and what state it is in, without writing SQL.

Reads the stage files under the storage root and, when there is one, the Dagster instance
(registered shards, the centroids' training metadata, the run history). Writes nothing:
a storage that was never run reads as `fresh`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semdedup_assets.core.cluster.assign import bucket_keys
from semdedup_assets.core.config import Settings, describe_settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.settings_store import load_settings, stored_settings

if TYPE_CHECKING:
    from semdedup_assets.names import GraphNames

RECENT_RUNS = 8  # runs listed
HISTORY_RUNS = 200  # runs searched for failures not followed by a success of the same job
UNFINISHED = ("NOT_STARTED", "QUEUED", "STARTING", "STARTED", "CANCELING")
LISTED = 10  # shard keys named per list


def _mtime(path: st.UPath) -> float | None:
    try:
        return float(path.stat().st_mtime)
    except (OSError, AttributeError, KeyError, NotImplementedError, TypeError):  # object stores may not say
        return None


def _disk(storage: st.Storage) -> dict[str, int]:
    """Bytes per stage folder, plus the catalog and (when inside the storage) the Dagster home."""
    out: dict[str, int] = {}
    for stage in st.STAGES:
        folder = storage.stage_dir(stage)
        out[stage] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
    out["catalog"] = storage.catalog_file.stat().st_size if storage.catalog_file.exists() else 0
    home = storage.root / "dagster_home"
    if storage.local and home.exists():
        out["dagster_home"] = sum(p.stat().st_size for p in home.rglob("*") if p.is_file())
    return out


def _exact_copies(storage: st.Storage) -> int | None:
    """How many items repeat an earlier item's payload (`catalog.exact_copy_count`); None where a raw file
    cannot be read (`semdedup verify` names it), so status still reports the rest."""
    import duckdb

    from semdedup_assets.core.io.catalog import exact_copy_count

    try:
        return exact_copy_count(storage)
    except (OSError, duckdb.Error):  # StageFileError is an OSError
        return None


def _eps_curve(storage: st.Storage) -> list[dict[str, Any]]:
    if not storage.eps_curve_file.exists():
        return []
    rows = st.read_table(storage.eps_curve_file).to_pylist()
    return [
        {
            "eps": float(r["eps"]),
            "kept": int(r["kept"]),
            "removed": int(r["removed"]),
            "kept_fraction": round(float(r["kept_fraction"]), 4),
        }
        for r in sorted(rows, key=lambda r: r["eps"])
    ]


def _contamination(storage: st.Storage, settings: Settings) -> dict[str, Any]:
    """The decontamination results: present, flagged items, the reference they were computed against."""
    from semdedup_assets.core.io.schemas import CONTAMINATED_REFERENCE_KEY

    path = storage.contaminated_file
    out: dict[str, Any] = {"reference": settings.reference, "present": path.exists()}
    if out["present"]:
        try:
            out["flagged"] = st.parquet_num_rows(path)
            recorded = (st.read_schema(path).metadata or {}).get(CONTAMINATED_REFERENCE_KEY)
        except st.StageFileError as err:
            out["damaged"] = err.reason
            return out
        out["computed_against"] = recorded.decode() if recorded is not None else None
        out["current"] = recorded is None or recorded.decode() == (settings.reference or "")
    else:
        out["current"] = not settings.reference
    return out


def _exports(storage: st.Storage, stale: set[str] = frozenset()) -> list[dict[str, Any]]:
    """Each `deduplicated/<selection>/` folder: shards exported and items kept, from its manifests
    (`stale`: the labels of those made from other results)."""
    folder = storage.stage_dir("deduplicated")
    out = []
    for sel in sorted(folder.iterdir(), key=lambda p: p.name) if folder.exists() else []:
        if not sel.is_dir() or sel.name.startswith("."):
            continue
        kept = removed = shards = 0
        for manifest in (sel / ".semdedup").rglob("*.json") if (sel / ".semdedup").exists() else []:
            try:
                m = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            shards, kept, removed = shards + 1, kept + int(m.get("kept", 0)), removed + int(m.get("removed", 0))
        out.append(
            {
                "selection": sel.name,
                "shards": shards,
                "kept": kept,
                "removed": removed,
                "written_at": _mtime(sel),
                "stale": sel.name in stale,
            }
        )
    return out


def _instance_facts(home: str, names: GraphNames) -> dict[str, Any]:
    """Registered shards, the centroids' last materialization and the run history of the graph `names`,
    from the instance (which a component's graph may share with other graphs)."""
    import dagster as dg

    with dg.DagsterInstance.from_config(home) as instance:
        registered = list(instance.get_dynamic_partitions(names.partitions))
        event = instance.get_latest_materialization_event(names.key("centroids"))
        training: dict[str, Any] = {}
        if event is not None and event.asset_materialization is not None:
            meta = event.asset_materialization.metadata
            for key in ("clusters", "items", "sample_rows", "train_rows", "iterations", "seed"):
                if key in meta:
                    training[key] = meta[key].value
            training["trained_at"] = event.timestamp
        records = instance.get_run_records(limit=HISTORY_RUNS)
    if names.prefix:  # the instance of a user's project: only this graph's runs
        records = [r for r in records if r.dagster_run.job_name.startswith(names.definition(""))]
    runs = []
    for r in records:  # newest first
        start, end = r.start_time or r.create_timestamp.timestamp(), r.end_time
        runs.append(
            {
                "run_id": r.dagster_run.run_id,
                "job": r.dagster_run.job_name,
                "status": r.dagster_run.status.value,
                "stage": r.dagster_run.tags.get("semdedup/stage")
                or (
                    "forget " + r.dagster_run.tags["semdedup/forget"] if "semdedup/forget" in r.dagster_run.tags else ""
                ),
                "partition": r.dagster_run.tags.get("dagster/partition", ""),
                "started": start,
                "seconds": round(end - start, 2) if start and end else None,
            }
        )
    # A failed run is still a problem unless a later run of the same job succeeded.
    failed, succeeded_later = [], set()
    for run in runs:
        key = (run["job"], run["partition"])
        if run["status"] == "SUCCESS":
            succeeded_later.add(key)
        elif run["status"] == "FAILURE" and key not in succeeded_later:
            failed.append(run)
    # In-process runs end with their process: one still "started" is stale unless a run is going on now.
    unfinished = [run for run in runs if run["status"] in UNFINISHED]
    return {
        "registered": registered,
        "training": training,
        "runs": runs[:RECENT_RUNS],
        "failed_runs": failed,
        "unfinished_runs": unfinished,
        "total_runs": len(records),
    }


def _input_files(location: str | None, files_per_shard: int = 1) -> tuple[set[str], list[str]]:
    """The shard keys under the input, and the files discovery skips for their `_` or `.` names.

    Both empty when the input is not given or not reachable (then every shard counts as gone).
    """
    from semdedup_assets.core.io.shards import discover

    if not location:
        return set(), []
    try:
        found = discover(location, files_per_shard)
    except (OSError, ValueError):
        return set(), []
    return {f.key for f in found.shards}, found.skipped


def collect_status(settings: Settings, dagster_home: str | None) -> dict[str, Any]:
    """Everything `semdedup status` shows, as plain JSON-able values."""
    from semdedup_assets.core.checks.verify import stale_outputs
    from semdedup_assets.names import recorded_graph

    storage = settings.storage_root()
    now = time.time()
    names = recorded_graph(storage).names
    has_instance = bool(dagster_home) and os.path.isfile(os.path.join(str(dagster_home), "dagster.yaml"))
    facts = (
        _instance_facts(str(dagster_home), names)
        if has_instance
        else {"registered": [], "training": {}, "runs": [], "failed_runs": [], "unfinished_runs": [], "total_runs": 0}
    )

    def keys(stage: str) -> list[str]:
        return [storage.shard_of(stage, p) for p in storage.stage_files(stage)]

    raw, embedded, assigned = keys(st.RAW), keys(st.EMBEDDINGS), keys(st.CLUSTER_ASSIGNMENTS)
    registered = facts["registered"]
    rejected = sum(st.parquet_num_rows(p) for p in storage.stage_files(st.REJECTED))
    copies = _exact_copies(storage)

    centroids: dict[str, Any] = {"present": storage.centroids_file.exists()}
    if centroids["present"]:
        trained = _mtime(storage.centroids_file) or facts["training"].get("trained_at")
        centroids.update(
            {
                "k": st.parquet_num_rows(storage.centroids_file),
                "trained_at": trained,
                "age_seconds": round(now - trained, 1) if trained else None,
            }
        )
        training = facts["training"]
        centroids.update(
            {k: training[k] for k in ("items", "sample_rows", "train_rows", "iterations", "seed") if k in training}
        )
        newer = [
            storage.shard_of(st.EMBEDDINGS, p)
            for p in storage.stage_files(st.EMBEDDINGS)
            if trained and (_mtime(p) or 0) > trained
        ]
        centroids["embedded_after_training"] = newer

    buckets = bucket_keys(settings.bucket_partitions)
    done = [b for b in buckets if storage.bucket_file(b).exists()]
    keep_files = sorted(
        str(p.name) for p in storage.stage_files(st.KEEP_LISTS) if p.name != storage.eps_curve_file.name
    )
    keep = {
        "configured_eps": list(settings.eps),
        "present_eps": [e for e in settings.eps if storage.keep_list_file(e).exists()],
        "files": keep_files,
        "eps_curve": _eps_curve(storage),
    }

    stages_done = {
        "embedded": bool(registered or raw) and set(registered or raw) <= set(embedded),
        "assigned": bool(embedded) and set(registered or embedded) <= set(assigned),
        "buckets": len(done) == len(buckets),
        "keep_lists": bool(keep["eps_curve"]) and len(keep["present_eps"]) == len(settings.eps),
    }
    present, skipped = _input_files(settings.input, settings.files_per_shard)
    input_missing = sorted(set(registered or raw) - present) if settings.input else []
    contamination = _contamination(storage, settings)
    stale = [{"path": str(p.path), "reason": p.reason} for p in stale_outputs(storage, settings)]
    started = bool(registered or raw or embedded or storage.settings_file.exists() or facts["total_runs"])
    if not started:
        state = "fresh"
    elif facts["unfinished_runs"]:  # a run going on now, or one whose process died (stale)
        state = "running"
    elif (
        all(stages_done.values())
        and not facts["failed_runs"]
        and not input_missing
        and contamination["current"]
        and not stale
    ):
        state = "complete"
    else:
        state = "partial"
    return {
        "storage": str(storage.root),
        "state": state,
        "input": settings.input,
        "input_skipped": skipped,
        "settings_recorded": bool(stored_settings(settings.storage)),
        "settings": {k: v for k, v in settings.to_dict().items() if k != "extra"},
        "dagster_home": dagster_home if has_instance else None,
        "shards": {
            "registered": len(registered),
            "ingested": len(raw),
            "embedded": len(embedded),
            "assigned": len(assigned),
            "rejected_items": rejected,
            "exact_copies": copies,  # items whose payload an earlier item has (None: unreadable raw files)
            # Without an instance (a remote storage, no DAGSTER_HOME) the ingested shards stand in.
            "not_embedded": sorted(set(registered or raw) - set(embedded))[:LISTED],
            "not_assigned": sorted(set(embedded) - set(assigned))[:LISTED],
        },
        "centroids": centroids,
        "input_missing": input_missing,
        "buckets": {"total": len(buckets), "done": len(done), "missing": [b for b in buckets if b not in done]},
        "contamination": contamination,
        "graph": "/".join(names.prefix) or None,
        "exports": _exports(
            storage, {Path(e["path"]).name for e in stale if Path(e["path"]).parent.name == "deduplicated"}
        ),
        "stale_outputs": stale,
        "keep_lists": keep,
        "runs": {
            "recent": facts["runs"],
            "failed": facts["failed_runs"],
            "unfinished": facts["unfinished_runs"],
            "total": facts["total_runs"],
        },
        "disk_bytes": _disk(storage),
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} days ago"


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _run_line(run: dict[str, Any]) -> str:
    what = run["stage"] or run["job"]
    if run["partition"]:
        what += f" [{run['partition']}]"
    secs = f"{run['seconds']:.2f} s" if run["seconds"] is not None else "-"
    return f"  {_when(run['started'])}  {run['status']:<8} {secs:>9}  {what}  ({run['run_id'][:8]})"


def format_status(s: dict[str, Any]) -> str:
    """The human-readable report."""
    from semdedup_assets.core.io.catalog import format_table

    lines = [f"storage:    {s['storage']}  ({s['state']})"]
    if s["state"] == "fresh":
        lines.append("nothing here yet: `semdedup run --input PATH --storage ...` fills it")
        return "\n".join(lines)
    if s.get("graph"):
        lines.append(
            f"graph:      {s['graph']} (a SemDedup component's: partitions, jobs and runs under that prefix, "
            f"instance {s['dagster_home'] or '-'})"
        )
    lines.append(f"input:      {s['input'] or '-'}")
    if skipped := s.get("input_skipped"):
        lines.append(
            f"            {len(skipped)} file(s) skipped for names starting with '_' or '.': "
            f"{', '.join(skipped[:LISTED])}{', ...' if len(skipped) > LISTED else ''}"
        )
    settings = Settings(**{**s["settings"], "eps": tuple(s["settings"]["eps"])})
    lines.append(
        f"settings:   {describe_settings(settings)}"
        + ("" if s["settings_recorded"] else "  (no run recorded: defaults and environment)")
    )
    sh = s["shards"]
    # "registered" counts the Dagster partitions: a storage without an instance (a library run, a remote
    # storage without DAGSTER_HOME) has none, and "0 registered, 1 ingested" would read as a fault.
    registered = f"{sh['registered']} registered, " if s["dagster_home"] else ""
    lines.append(
        f"shards:     {registered}{sh['ingested']} ingested, {sh['embedded']} embedded, "
        f"{sh['assigned']} assigned" + (f", {sh['rejected_items']} items rejected" if sh["rejected_items"] else "")
    )
    if sh.get("exact_copies"):
        lines.append(
            f"            {sh['exact_copies']} item(s) are exact copies of an earlier item's payload"
            + (" (each payload embedded once)" if s["settings"].get("exact_copies") else "")
        )
    if sh["not_embedded"]:
        lines.append(f"            not embedded yet: {', '.join(sh['not_embedded'])}")
    if sh["not_assigned"]:
        lines.append(f"            not assigned yet: {', '.join(sh['not_assigned'])}")
    c = s["centroids"]
    if c["present"]:
        sample = f" on a sample of {c['sample_rows']} of {c['items']} items" if "sample_rows" in c else ""
        extra = f" (seed {c['seed']}, {c['iterations']} iterations)" if "seed" in c else ""
        age = _age(c["age_seconds"]) if c["age_seconds"] is not None else "(age unknown)"
        lines.append(f"centroids:  k={c['k']}, trained {age}{sample}{extra}")
        if c["embedded_after_training"]:
            lines.append(f"            {len(c['embedded_after_training'])} shard(s) embedded after training")
    else:
        lines.append("centroids:  not trained yet")
    if s["input_missing"]:
        gone = s["input_missing"]
        lines.append(
            f"            input gone: {len(gone)} shard(s) no longer under {s['input']}: "
            f"{', '.join(gone[:LISTED])}{', ...' if len(gone) > LISTED else ''}"
        )
    b = s["buckets"]
    more = ", ..." if len(b["missing"]) > LISTED else ""
    lines.append(
        f"buckets:    {b['done']}/{b['total']} done"
        + (f" (missing: {', '.join(b['missing'][:LISTED])}{more})" if b["missing"] else "")
    )
    k = s["keep_lists"]
    lines.append(f"keep-lists: {len(k['present_eps'])} of {len(k['configured_eps'])} configured eps present")
    if k["eps_curve"]:
        cols = ["eps", "kept", "removed", "kept_fraction"]
        table = format_table(cols, [tuple(r[c] for c in cols) for r in k["eps_curve"]])
        lines += ["            " + line for line in table.splitlines()]
    c = s["contamination"]
    if c["present"] or c["reference"]:
        if "damaged" in c:
            what = f"contaminated.parquet is damaged ({c['damaged']}): `semdedup verify --repair`, then re-run"
        elif not c["present"]:
            what = f"no results yet for the reference {c['reference']}"
        else:
            against = c.get("computed_against")
            what = (
                f"{c['flagged']} item(s) flagged against {against or c['reference'] or '(no reference)'}"
                if c["reference"] or c["flagged"]
                else "no reference set"
            )
            if not c["current"]:
                what += f" (stale: the settings name {c['reference'] or 'no reference'}; re-run)"
        lines.append(f"contamination: {what}")
    for e in s["exports"]:
        lines.append(
            f"export:     deduplicated/{e['selection']}: {e['kept']} kept, {e['removed']} removed in "
            f"{e['shards']} shard(s), written {_age(time.time() - e['written_at']) if e['written_at'] else '-'}"
            + ("  STALE" if e.get("stale") else "")
        )
    if s.get("stale_outputs"):
        lines.append(
            "stale outputs (made from other results: `semdedup export` writes an export again, "
            "the next `semdedup run` removes a pruning selection):"
        )
        lines += [f"  {o['path']}: {o['reason']}" for o in s["stale_outputs"]]
    r = s["runs"]
    if not s["dagster_home"]:
        lines.append("runs:       none recorded (no Dagster instance: a library run, or no DAGSTER_HOME)")
    else:
        lines.append(f"runs:       {r['total']} recorded" + (f", last {len(r['recent'])}:" if r["recent"] else ""))
    lines += [_run_line(run) for run in r["recent"]]
    if r["failed"]:
        lines.append("failed (no later success of the same job):")
        lines += [_run_line(run) for run in r["failed"]]
    if r["unfinished"]:
        lines.append("unfinished (stale unless a run is going on now):")
        lines += [_run_line(run) for run in r["unfinished"]]
    disk = s["disk_bytes"]
    lines.append(
        "disk:       "
        + ", ".join(f"{name} {_size(n)}" for name, n in disk.items() if n)
        + f"; total {_size(sum(disk.values()))}"
    )
    return "\n".join(lines)


def missing_storage(settings: Settings) -> str | None:
    """Why commands that read an existing storage cannot use this one (None when it exists).

    Checked before anything is opened, so a mistyped --storage creates no folder or catalog.
    """
    root = settings.storage_root().root
    if not root.exists():
        return f"no storage at {root}: the location does not exist (give the --storage of a `semdedup run`)"
    if not root.is_dir():
        return f"the storage {root} is not a folder"
    return None


def refuse_missing_storage(settings: Settings) -> bool:
    """Say on stderr why the storage cannot be used; True when the command must stop (exit 1)."""
    missing = missing_storage(settings)
    if missing is not None:
        print(f"semdedup: error: {missing}", file=sys.stderr)
    return missing is not None


def cmd_status(storage: str | None, as_json: bool = False) -> int:
    """Print the status of a storage (text, or JSON with `as_json`)."""
    from semdedup_assets.instance import default_dagster_home
    from semdedup_assets.pipeline import PipelineError

    settings = load_settings(storage)
    if refuse_missing_storage(settings):  # a mistyped --storage is an error, not a fresh storage
        return 1
    try:
        home: str | None = default_dagster_home(settings)
    except PipelineError:  # a remote storage without DAGSTER_HOME: its files only
        home = None
    report = collect_status(settings, home)
    print(json.dumps(report, indent=2, sort_keys=True) if as_json else format_status(report))
    sys.stdout.flush()
    return 0
