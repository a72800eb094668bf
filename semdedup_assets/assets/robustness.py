"""Robustness stage (the paper's RQ3): `robustness` compares this storage's removals with other storages'.

The work is core.robustness.build_robustness; this asset reports its tables and plot.
"""


import dagster as dg

from semdedup_assets.assets.common import table_metadata
from semdedup_assets.core.plots import png_markdown
from semdedup_assets.core.robustness import CompareError, build_robustness
from semdedup_assets.resources import SemDedupConfig


@dg.asset(deps=["keep_lists"], group_name="robustness", kinds={"parquet"})
def robustness(context: dg.AssetExecutionContext, semdedup: SemDedupConfig) -> dg.MaterializeResult:
    """Per eps: removed items of this storage and of every `compare_with` storage (same items, other k, seed
    or encoder), the Jaccard index of each pair's removed sets, and every configuration's eps curve in one plot."""
    try:
        r, files, png = build_robustness(semdedup.settings(), log=context.log.info)
    except CompareError as err:
        raise dg.Failure(description=str(err)) from None
    configurations = [{k: v for k, v in row.items() if k != "storage"} for row in r.per_configuration]
    return dg.MaterializeResult(metadata={
        "items": r.items,
        "configurations": dg.MetadataValue.md("\n".join(
            f"- `{c.label}`: `{c.storage}` " + ", ".join(f"{k}={v}" for k, v in c.settings.items())
            for c in r.configurations)),
        "removed": table_metadata(configurations),
        "pairs": table_metadata(r.pairs) if r.pairs else "a single storage: nothing to pair (set compare_with)",
        "eps_curves": dg.MetadataValue.md(png_markdown(png, "eps curves")),
        "plot": dg.MetadataValue.path(files.plot),
        "pairs_file": dg.MetadataValue.path(files.pairs),
    })
