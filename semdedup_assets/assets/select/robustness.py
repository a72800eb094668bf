"""Robustness stage (the paper's RQ3): `robustness` compares this storage's removals with other storages'.

The work is core.select.robustness.build_robustness; this asset reports its tables and plot.
"""

import dagster as dg

from semdedup_assets.assets.common import settings_resource, table_metadata
from semdedup_assets.core.plots import png_markdown
from semdedup_assets.core.select.robustness import CompareError, Comparison, RobustnessFiles, build_robustness
from semdedup_assets.names import GraphNames


def build_robustness_asset(names: GraphNames) -> dg.AssetsDefinition:
    """The robustness asset (one for the whole dataset)."""

    @dg.asset(
        key=names.key("robustness"),
        deps=[names.key("keep_lists")],
        required_resource_keys={names.resource},
        group_name=names.definition("robustness"),
        kinds={"parquet"},
    )
    def robustness(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Per eps: removed items of this storage and of every `compare_with` storage (same items, other k, seed
        or encoder), the Jaccard index of each pair's removed sets, and every configuration's eps curve in one plot."""
        try:
            r, files, png = build_robustness(settings_resource(context, names).settings(), log=context.log.info)
        except CompareError as err:
            raise dg.Failure(description=str(err)) from None
        return dg.MaterializeResult(metadata=robustness_metadata(r, files, png))

    return robustness


def robustness_metadata(r: Comparison, files: RobustnessFiles, png: bytes) -> dict[str, object]:
    """The robustness tables (removed per configuration, pairs) and the eps-curve plot."""
    configurations = [{k: v for k, v in row.items() if k != "storage"} for row in r.per_configuration]
    return {
        "items": r.items,
        "configurations": dg.MetadataValue.md(
            "\n".join(
                f"- `{c.label}`: `{c.storage}` " + ", ".join(f"{k}={v}" for k, v in c.settings.items())
                for c in r.configurations
            )
        ),
        "removed": table_metadata(configurations),
        "pairs": table_metadata(r.pairs) if r.pairs else "a single storage: nothing to pair (set compare_with)",
        "eps_curves": dg.MetadataValue.md(png_markdown(png, "eps curves")),
        "plot": dg.MetadataValue.path(files.plot),
        "pairs_file": dg.MetadataValue.path(files.pairs),
    }
