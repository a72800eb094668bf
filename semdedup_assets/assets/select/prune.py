"""Prune stage: `pruned_prototypes`, `pruned_d4`, `pruned_dbp`, `pruned_outliers`, `pruned_representatives`,
one asset per method (core/select/prune.py).

Each materializes the selections of its method named by the `prune` knob (and by `select`,
when that names the method), and shows per selection its per-cluster budget table and a plot.
"""

import dagster as dg

from semdedup_assets.assets.common import settings_resource, table_metadata
from semdedup_assets.core.config import Settings
from semdedup_assets.core.io.catalog import refresh_catalog
from semdedup_assets.core.plots import budget_markdown
from semdedup_assets.core.select.prune import (
    METHODS,
    PruneError,
    Pruning,
    compute_pruning,
    is_pruning,
    parse_prune_list,
    parse_pruning,
    prune_stale,
    selection_dir,
)
from semdedup_assets.names import GraphNames

BUDGET_ROWS = 100  # clusters shown in the metadata table (the plot and the view have them all)


def configured_prunings(settings: Settings, method: str | None = None) -> list[Pruning]:
    """The pruning selections of the `prune` knob plus `select` (when it is one), optionally of one method."""
    prunings = parse_prune_list(settings.prune, settings.eps)
    if settings.select and is_pruning(settings.select):
        extra = parse_pruning(settings.select, settings.eps)
        if extra.label not in {p.label for p in prunings}:
            prunings.append(extra)
    return [p for p in prunings if method is None or p.method == method]


def build_pruned(names: GraphNames, method: str) -> dg.AssetsDefinition:
    """The asset of one pruning method."""

    @dg.asset(
        key=names.key(f"pruned_{method}"),
        deps=[names.key("keep_lists")],
        required_resource_keys={names.resource},
        group_name=names.definition("prune"),
        kinds={"duckdb", "parquet"},
        description=f"The {method} pruning selections of the `prune` knob: `pruned/<label>/kept.parquet` and "
        "`budget.parquet` (views `pruned`, `pruned_budget`).",
    )
    def pruned(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        config = settings_resource(context, names).settings()
        storage = config.storage_root()
        try:
            prunings = configured_prunings(config, method)
            results = [compute_pruning(config, p, log=context.log.info) for p in prunings]
        except PruneError as err:
            raise dg.Failure(description=str(err)) from None
        stale = prune_stale(storage, method, prunings)
        if stale:
            context.log.info(f"removed {len(stale)} {method} selection(s) no longer configured: {stale}")
        refresh_catalog(storage)
        meta: dict[str, object] = {"selections": len(results), "removed_selections": len(stale)}
        if not results:
            meta["note"] = f"no {method} selection in the `prune` or `select` knob"
        for p, r in zip(prunings, results):
            meta[f"{r.label}: kept"] = r.kept
            meta[f"{r.label}: summary"] = dg.MetadataValue.md(
                f"items {r.items}, survivors {r.survivors}, target N {r.target}, kept {r.kept}, {r.seconds} s"
                + (f"; {r.note}" if r.note else "")
            )
            rows = sorted(r.budget, key=lambda b: (-b["members"], b["cluster"]))[:BUDGET_ROWS]
            meta[f"{r.label}: budget"] = table_metadata(
                [{k: (v if v is not None else float("nan")) for k, v in b.items()} for b in rows]
            )
            meta[f"{r.label}: budget_plot"] = dg.MetadataValue.md(budget_markdown(r.budget, r.label))
            meta[f"{r.label}: folder"] = dg.MetadataValue.path(str(selection_dir(storage, p)))
        return dg.MaterializeResult(metadata=meta)

    return pruned


def build_pruned_assets(names: GraphNames) -> list[dg.AssetsDefinition]:
    """One asset per pruning method."""
    return [build_pruned(names, m) for m in METHODS]
